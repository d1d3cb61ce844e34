"""Data-parallel pretraining on 2 CPU processes (gloo): the replicas must stay identical.

The test launches this file under ``torchrun --standalone --nproc_per_node=2``; run as a
script with ``--worker DIR`` it is the per-rank worker.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

IMG = 32


def _factory(*, batch_size, steps_per_epoch, num_workers, map_sample, seed, rank, world_size):
    """An in-memory loader: random images whose stream depends on (seed, rank)."""
    def batches():
        g = torch.Generator().manual_seed(seed * 1000 + rank)
        for _ in range(steps_per_epoch):
            yield (torch.rand(batch_size, 3, IMG, IMG, generator=g) * 2 - 1,)
    return batches()


def _cfg():
    from pipeline.params import PretrainParams

    return PretrainParams(image_size=IMG, patch_size=8, decoder_dim=32, decoder_depth=1,
                          decoder_heads=2, epochs=2, warmup_epochs=1, steps_per_epoch=3,
                          batch_size=4, accum_iter=2, blr=0.05, num_workers=0, log_every=1)


def _worker(root: Path) -> None:
    from pipeline.distributed import cleanup_distributed, init_distributed
    from pipeline.io import setup_logging
    from pipeline.models import vit
    from pipeline.pretrain import train_mae

    setup_logging()
    vit.VIT_SIZES["micro"] = vit.ViTSize(64, 2, 2, 8)  # a 2-block ViT keeps this fast
    info = init_distributed(timeout_s=120, device="cpu")
    try:
        assert info.world_size == 2 and info.backend == "gloo", info
        model, metrics = train_mae(None, root / f"out{info.rank}", _cfg(), model_size="micro",
                                   seed=0, dist_info=info, loader_factory=_factory)
        # The test, not the library, writes each replica so that they can be compared.
        torch.save({"state": model.state_dict(), "metrics": metrics},
                   root / f"rank{info.rank}.pt")
    finally:
        cleanup_distributed()


@pytest.mark.slow
def test_two_cpu_ranks_end_with_identical_weights(tmp_path):
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(repo)}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           "--nproc_per_node=2", str(Path(__file__).resolve()), "--worker", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    a, b = r0["state"], r1["state"]
    assert set(a) == set(b)
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert differ == [], f"replicas diverged in {differ[:5]}"
    assert r0["metrics"]["epoch_loss"] == r1["metrics"]["epoch_loss"]  # all-reduced means

    # Training happened: the weights moved away from the seeded initialisation.
    from pipeline.io import seed_everything
    from pipeline.models import vit
    from pipeline.models.mae import MAE

    vit.VIT_SIZES.setdefault("micro", vit.ViTSize(64, 2, 2, 8))
    try:
        seed_everything(0)
        init = MAE("micro", img_size=IMG, patch_size=8, decoder_dim=32, decoder_depth=1,
                   decoder_heads=2).state_dict()
    finally:
        vit.VIT_SIZES.pop("micro", None)
    assert not torch.equal(init["blocks.0.attn.qkv.weight"], a["blocks.0.attn.qkv.weight"])
    assert torch.equal(init["pos_embed"], a["pos_embed"])  # frozen

    # Only rank 0 wrote outputs; global batch = 4 x 2 accumulation x 2 ranks.
    out0, out1 = tmp_path / "out0", tmp_path / "out1"
    assert (out0 / "checkpoint.pt").is_file() and (out0 / "recon_epoch2.png").is_file()
    assert r0["metrics"]["global_batch"] == 16
    assert not out1.exists() or not any(out1.rglob("*"))


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        _worker(Path(sys.argv[2]))
    else:
        sys.exit("usage: torchrun --nproc_per_node=2 tests/test_pretrain_ddp.py --worker DIR")
