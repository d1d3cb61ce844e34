"""Data-parallel AU finetuning and identity probing on 2 CPU processes (gloo).

Checks that the gathered evaluation of given weights is the 1-process evaluation frame for
frame (no frame lost or counted twice), that FMAE and FMAE-IAT train under DDP with rank 0
the only writer, that a run is deterministic for a given world size, and that the identity
probe shared out over 2 processes writes what one process writes.

The tests launch this file under ``torchrun --standalone --nproc_per_node=2``; run as a
script with ``--worker DIR finetune|probe`` it is the per-rank worker (DIR holds the shards
and checkpoints the test built).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the worker imports the fixtures
import test_probe  # noqa: E402
from test_finetune import AUS, FRAMES, PARTS, SUBJECTS, TINY, cfg, make_au_shards, \
    make_checkpoint  # noqa: E402

EVAL_SEED = 3


def _eval_model(ckpt: Path):
    """An AU model on the test checkpoint with seeded heads (identical in every process)."""
    from pipeline.finetune import _load_checkpoint
    from pipeline.models.au_model import AUModel, load_pretrained_encoder
    from pipeline.models.vit import build_vit

    torch.manual_seed(EVAL_SEED)
    enc = build_vit("tiny", 32, 8, 0.0, global_pool="avg")
    model = AUModel(enc, len(AUS))
    load_pretrained_encoder(model, _load_checkpoint(ckpt, "tiny", 8, 32))
    return model


def _evaluate(root: Path, rank: int, world: int, num_workers: int) -> tuple[dict, dict]:
    """(this rank's own predictions, the gathered ones) over every subject's shard."""
    from pipeline.finetune import (AUShardStream, build_transforms, gather_predictions,
                                   make_loader, predict)

    _, t_eval = build_transforms(cfg())
    urls = sorted(str(p) for p in (root / "synthetic").glob("*.tar"))
    ds = AUShardStream(urls, AUS, t_eval, rank=rank, world_size=world)
    mine = predict(_eval_model(root / "ckpt.pt"), make_loader(ds, 4, num_workers, False),
                   torch.device("cpu"), None, allow_empty=world > 1)
    return mine, gather_predictions(mine)


def _launch(root: Path, mode: str) -> None:
    """Run this file's worker in ``mode`` as 2 gloo processes under torchrun."""
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(repo)}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
              "MASTER_PORT"):
        env.pop(k, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           "--nproc_per_node=2", str(Path(__file__).resolve()), "--worker", str(root), mode]
    proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def _worker(root: Path, mode: str) -> None:
    from pipeline.distributed import cleanup_distributed, init_distributed
    from pipeline.io import setup_logging
    from pipeline.models import vit

    setup_logging()
    vit.VIT_SIZES["tiny"] = TINY
    torch.set_num_threads(1)
    info = init_distributed(timeout_s=120, device="cpu")
    try:
        assert info.world_size == 2 and info.backend == "gloo", info
        if mode == "probe":
            _probe(root, root / f"probe-rank{info.rank}", info)
        else:
            _finetune_worker(root, info.rank, info)
    finally:
        cleanup_distributed()


def _finetune_worker(root: Path, r: int, info) -> None:
    from pipeline.finetune import finetune

    mine, gathered = _evaluate(root, r, 2, num_workers=2)
    torch.save({"mine": mine, "gathered": gathered}, root / f"eval{r}.pt")
    runs = {"fmae": ("fmae", 1, cfg(epochs=1, warmup_epochs=0, batch_size=4,
                                    save_backbone_epochs=[1])),
            "iat_a": ("iat", 2, cfg(batch_size=4, val_fraction=0.3)),
            "iat_b": ("iat", 2, cfg(batch_size=4, val_fraction=0.3))}  # = iat_a
    results = {}
    for name, (variant, fold, c) in runs.items():
        # One output folder per rank, so that a file written by rank 1 would show.
        results[name] = finetune(root / "synthetic", root / "ckpt.pt",
                                 root / f"{name}-rank{r}", c, dataset="synthetic",
                                 fold=fold, variant=variant, lambda_=1.0,
                                 model_size="tiny", patch_size=8, seed=0, dist_info=info)
    (root / f"results{r}.json").write_text(json.dumps(results))


@pytest.mark.slow
def test_two_cpu_ranks_evaluate_and_finetune(tmp_path, monkeypatch):
    from pipeline.finetune import _check_exactly_once
    from pipeline.models import vit

    monkeypatch.setitem(vit.VIT_SIZES, "tiny", TINY)
    make_au_shards(tmp_path)
    make_checkpoint(tmp_path / "ckpt.pt")
    _launch(tmp_path, "finetune")

    # --- evaluation: the ranks' shares are disjoint and together the 1-process evaluation
    single, _ = _evaluate(tmp_path, 0, 1, num_workers=0)
    n = len(SUBJECTS) * FRAMES
    e0, e1 = (torch.load(tmp_path / f"eval{r}.pt", weights_only=False) for r in (0, 1))
    k0, k1 = set(e0["mine"]["keys"]), set(e1["mine"]["keys"])
    assert k0 and k1 and not k0 & k1 and len(k0) + len(k1) == n
    assert abs(len(k0) - len(k1)) <= 2  # one sample per DataLoader worker at most
    for g in (e0["gathered"], e1["gathered"]):
        _check_exactly_once(g, n, "test")
        assert g["keys"] == single["keys"] and g["subjects"] == single["subjects"]
        np.testing.assert_array_equal(g["labels"], single["labels"])
        np.testing.assert_allclose(g["probs"], single["probs"], rtol=1e-5, atol=1e-6)

    # --- finetuning: rank 0 wrote everything, rank 1 nothing; both return the same metrics
    res = [json.loads((tmp_path / f"results{r}.json").read_text()) for r in (0, 1)]
    assert res[0] == res[1]
    for name in ("fmae", "iat_a", "iat_b"):
        assert not (tmp_path / f"{name}-rank1").exists(), f"rank 1 wrote {name}"
        out = tmp_path / f"{name}-rank0"
        assert json.loads((out / "metrics.json").read_text()) == res[0][name]
        assert (out / "model.safetensors").is_file() and (out / "history.csv").is_file()
        pred = pd.read_parquet(out / "predictions.parquet")
        fold = res[0][name]["fold"]
        n_epochs = res[0][name]["final"]["epoch"]
        # every test frame of the fold once per epoch
        assert len(pred) == n_epochs * 2 * FRAMES
        assert (pred.groupby("epoch")["key"].nunique() == 2 * FRAMES).all()
        assert set(pred["subject"]) == set(PARTS[str(fold)])
    assert sorted(p.name for p in (tmp_path / "fmae-rank0" / "backbones").iterdir()) == \
        ["epoch_001.pt"]
    iat = res[0]["iat_a"]
    assert iat["val_selected"] is not None and np.isfinite(iat["final_id_loss"])
    hist = pd.read_csv(tmp_path / "iat_a-rank0" / "history.csv")
    assert hist["id_acc"].between(0, 1).all()
    # 18 training frames (3 subjects) / global batch 4 x 2 processes = 2 steps an epoch; the
    # lr scales with the global batch: epoch 1's last step is halfway through the warmup.
    from pipeline.schedule import lr_at
    c = cfg()
    assert hist["lr"].iloc[0] == pytest.approx(lr_at(0.5, base_lr=c.blr * 4 * 2 / 256,
                                                     min_lr=c.min_lr, warmup=1, total=2))
    # deterministic for a given world size: the same run twice gives the same bytes
    for f in ("predictions.parquet", "history.csv", "model.safetensors",
              "backbones/epoch_002.pt"):
        assert (tmp_path / "iat_a-rank0" / f).read_bytes() == \
            (tmp_path / "iat_b-rank0" / f).read_bytes(), f


# --------------------------------------------------------------------------- probe
PROBE_RUNS = ["synthetic-1", "disfa-1"]  # two datasets: same backbones, different frames


def _probe(root: Path, out: Path, info=None) -> dict:
    from pipeline.params import ProbeParams
    from pipeline.probe import probe_all
    from pipeline.tracking import Tracker

    cfg_ = ProbeParams(frames_per_subject=10, train_fraction=0.7, epochs=2, warmup_epochs=1,
                       batch_size=64, tsne_subjects=4, num_workers=0, converged_max_iter=50)
    return probe_all(root / "finetune", root / "au_shards", out, cfg_, test_probe.FT,
                     PROBE_RUNS, seed=0, tracker=Tracker(active=False), dist_info=info)


@pytest.mark.slow
def test_two_cpu_ranks_share_the_identity_probe(tmp_path, monkeypatch):
    from pipeline.models import vit

    monkeypatch.setitem(vit.VIT_SIZES, "tiny", TINY)
    for run in PROBE_RUNS:
        for variant in ("fmae", "iat"):  # identical backbones: probed once per dataset
            test_probe.make_run(tmp_path / "finetune" / variant / run)
    test_probe.make_au_shards(tmp_path / "au_shards" / "synthetic", identity=True)
    test_probe.make_au_shards(tmp_path / "au_shards" / "disfa", identity=False, seed=1)
    _launch(tmp_path, "probe")
    assert not (tmp_path / "probe-rank1").exists(), "rank 1 wrote probe outputs"
    torch.set_num_threads(1)
    single = _probe(tmp_path, tmp_path / "probe-single")
    shared, alone = tmp_path / "probe-rank0", tmp_path / "probe-single"
    names = sorted(str(p.relative_to(alone)) for p in alone.rglob("*.json"))
    assert names == sorted(str(p.relative_to(shared)) for p in shared.rglob("*.json"))
    assert len(names) == 1 + 2 * len(PROBE_RUNS)  # metrics.json, one per variant and run
    for name in names:
        assert json.loads((shared / name).read_text()) == json.loads((alone / name).read_text())
    assert json.loads((shared / "metrics.json").read_text()) == json.loads(json.dumps(single))
    for png in ("identity_vs_epoch.png", *(f"tsne_{r}.png" for r in PROBE_RUNS)):
        assert (shared / png).is_file()


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--worker":
        _worker(Path(sys.argv[2]), sys.argv[3])
    else:
        sys.exit("usage: torchrun --nproc_per_node=2 tests/test_finetune_ddp.py --worker DIR "
                 "finetune|probe")
