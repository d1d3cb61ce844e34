"""Identity linear probe (paper section 5.1): decodable identity is found, absent identity is not.

Fixtures follow docs/design.md: AU shards (<subject>-000000.tar with jpg/json samples,
index.parquet, meta.json) and finetune backbones (backbones/epoch_<E:03d>.pt holding a timm ViT
built by build_vit(..., global_pool="avg") and its config). The backbone is a random tiny ViT:
the probe must find identity when the images carry it (a per-subject colour) and not when they
are pure noise.
"""
import io
import json
import tarfile

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from pipeline.models.vit import build_vit
from pipeline.params import FinetuneParams, ProbeParams
from pipeline.probe import load_probe_frames, probe_all, probe_run, select_frames
from pipeline.tracking import Tracker

IMG = 32
N_SUBJ = 6
FRAMES = 20


def _jpeg(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def make_au_shards(root, identity: bool, seed: int = 0):
    """A tiny AU dataset: per-subject colour + mild noise (identity) or pure noise (none)."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True)
    rows = []
    colours = rng.integers(30, 226, size=(N_SUBJ, 3))
    for s in range(N_SUBJ):
        subject = f"S{s:03d}"
        shard = f"{subject}-000000.tar"
        with tarfile.open(root / shard, "w") as tar:
            for f in range(FRAMES):
                if identity:
                    img = colours[s] + rng.normal(0, 8, size=(IMG, IMG, 3))
                else:
                    img = rng.integers(0, 256, size=(IMG, IMG, 3))
                key = f"{subject}_T1_{f:04d}"
                meta = {"dataset": "synthetic", "subject": subject, "task": "T1", "frame": f,
                        "aus": [1], "labels": [int(f % 2)]}
                for ext, data in (("jpg", _jpeg(np.clip(img, 0, 255).astype(np.uint8))),
                                  ("json", json.dumps(meta).encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                rows.append({"key": key, "subject": subject, "task": "T1", "frame": f,
                             "shard": shard, "AU1": np.int8(f % 2)})
    pd.DataFrame(rows).to_parquet(root / "index.parquet")
    (root / "meta.json").write_text(json.dumps({"dataset": "synthetic", "aus": [1]}))
    return root


def make_run(run_dir, epochs=(0, 1)):
    (run_dir / "backbones").mkdir(parents=True)
    for e in epochs:
        torch.manual_seed(100 + e)
        model = build_vit("tiny", IMG, 8, global_pool="avg")
        torch.save({"model": model.state_dict(),
                    "config": {"model_size": "tiny", "img_size": IMG, "patch_size": 8}},
                   run_dir / "backbones" / f"epoch_{e:03d}.pt")
    return run_dir


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: one intra-op thread is fastest, especially on a shared 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


CFG = ProbeParams(frames_per_subject=FRAMES, train_fraction=0.7, epochs=20, warmup_epochs=2,
                  batch_size=64, tsne_subjects=4, num_workers=0)
# The authors' recipe trains with the finetuning optimiser settings: here a CPU-sized lr.
FT = FinetuneParams(image_size=IMG, batch_size=16, blr=5e-2, drop_path=0.1)


def test_select_frames_splits_per_subject_and_is_seeded():
    index = pd.DataFrame({"key": [f"s{s}_{f:03d}" for s in range(4) for f in range(50)],
                          "subject": [f"s{s}" for s in range(4) for _ in range(50)],
                          "shard": "x.tar"})
    a = select_frames(index, 10, 0.7, seed=3)
    b = select_frames(index, 10, 0.7, seed=3)
    c = select_frames(index, 10, 0.7, seed=4)
    assert a["key"].tolist() == b["key"].tolist()
    assert a["key"].tolist() != c["key"].tolist()
    per = a.groupby("subject")["is_train"].agg(["sum", "count"])
    assert (per["count"] == 10).all() and (per["sum"] == 7).all()
    # A subject with fewer frames than asked gives all of them, still with a test frame.
    few = index[(index["subject"] != "s0") | (index["key"] < "s0_003")]
    short = select_frames(few, 10, 0.7, seed=0)
    s0 = short[short["subject"] == "s0"]
    assert len(s0) == 3 and 1 <= s0["is_train"].sum() <= 2
    with pytest.raises(ValueError, match="at least 2 subjects"):
        select_frames(index[index["subject"] == "s0"], 10, 0.7, seed=0)


def test_probe_finds_identity_when_present_and_not_when_absent(tmp_path):
    run = make_run(tmp_path / "finetune" / "fmae" / "synthetic-1")
    with_id = make_au_shards(tmp_path / "id", identity=True)
    no_id = make_au_shards(tmp_path / "noise", identity=False)
    res = probe_run(run, with_id, CFG, FT, seed=0)
    chance = 100.0 / N_SUBJ
    assert res["chance"] == pytest.approx(chance)
    assert res["n_subjects"] == N_SUBJ
    assert res["n_train"] == N_SUBJ * 14 and res["n_test"] == N_SUBJ * 6
    assert set(res["epochs"]) == {"0", "1"} == set(res["converged"]["epochs"])
    for probe in (res, res["converged"]):  # authors' recipe, converged
        for e, acc in probe["epochs"].items():
            assert acc > 80.0 and probe["train_accuracy"][e] > 80.0, res
    assert res["underfit"] == {"recipe": [], "converged": []}
    res_noise = probe_run(run, no_id, CFG, FT, seed=0)
    for probe in (res_noise, res_noise["converged"]):
        for acc in probe["epochs"].values():
            assert acc < chance + 20.0, res_noise  # near chance (16.7%), with 36 test frames
    # The converged probe fits its training frames (memorising noise): its low test accuracy
    # is not an untrained probe. The short recipe cannot, and is flagged as underfitting.
    assert min(res_noise["converged"]["train_accuracy"].values()) > 90.0
    assert res_noise["underfit"] == {"recipe": [0, 1], "converged": []}


def test_probes_are_deterministic_for_a_backbone_and_seed(tmp_path):
    run = make_run(tmp_path / "finetune" / "fmae" / "synthetic-1", epochs=(0,))
    au = make_au_shards(tmp_path / "id", identity=True)
    frames = load_probe_frames(au, CFG, seed=0)
    a = probe_run(run, au, CFG, FT, seed=0, frames=frames)
    b = probe_run(run, au, CFG, FT, seed=0, frames=frames)
    assert a == b
    c = probe_run(run, au, CFG, FT, seed=1, frames=frames)
    assert c["loss"] != a["loss"]  # the seed drives init, order, augmentation, drop path


def test_probe_all_writes_jsons_figures_and_metrics(tmp_path):
    ft = tmp_path / "finetune"
    for variant in ("fmae", "iat"):
        make_run(ft / variant / "synthetic-1")
    au_root = tmp_path / "au_shards"
    make_au_shards(au_root / "synthetic", identity=True)
    out = tmp_path / "probe"
    metrics = probe_all(ft, au_root, out, CFG, FT, ["synthetic-1"], seed=0,
                        tracker=Tracker(active=False))
    for variant in ("fmae", "iat"):
        d = json.loads((out / variant / "synthetic-1.json").read_text())
        assert set(d["epochs"]) == {"0", "1"}
        assert {"chance", "n_subjects", "n_train", "n_test", "converged", "train_accuracy",
                "underfit", "recipe"} <= set(d)
        assert d["recipe"]["epochs"] == CFG.epochs and d["recipe"]["lr"] == 5e-2 * 16 / 256
    for name in ("identity_vs_epoch.png", "tsne_synthetic-1.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    on_disk = json.loads((out / "metrics.json").read_text())
    assert on_disk == json.loads(json.dumps(metrics))
    s = metrics["synthetic"]
    assert s["chance"] == pytest.approx(100.0 / N_SUBJ, abs=1e-3)  # rounded to 4 decimals
    d_fmae = json.loads((out / "fmae" / "synthetic-1.json").read_text())
    assert s["fmae"]["recipe"]["final"] == pytest.approx(d_fmae["epochs"]["1"], abs=1e-3)
    assert s["fmae"]["converged"]["final"] == pytest.approx(
        d_fmae["converged"]["epochs"]["1"], abs=1e-3)
    assert s["fmae"]["recipe"]["epoch0"] == pytest.approx(d_fmae["epochs"]["0"], abs=1e-3)
    assert s["recipe_iat_over_fmae"] == pytest.approx(
        s["iat"]["recipe"]["final"] / s["fmae"]["recipe"]["final"], abs=1e-3)
    assert not list(out.rglob(".tmp-*"))


def test_missing_backbones_and_bad_checkpoint_are_explained(tmp_path):
    run = tmp_path / "fmae" / "synthetic-1"
    (run / "backbones").mkdir(parents=True)
    au = make_au_shards(tmp_path / "au", identity=True)
    frames = load_probe_frames(au, CFG, seed=0)
    with pytest.raises(FileNotFoundError, match="save_backbone_epochs"):
        probe_run(run, au, CFG, FT, seed=0, frames=frames)
    torch.save({"model": {"blocks.0.weight": torch.zeros(1)},
                "config": {"model_size": "tiny", "img_size": IMG, "patch_size": 8}},
               run / "backbones" / "epoch_000.pt")
    with pytest.raises(ValueError, match="epoch_000.pt.*do not match"):
        probe_run(run, au, CFG, FT, seed=0, frames=frames)


@pytest.mark.slow
def test_datasets_sharing_a_backbone_are_each_probed_on_their_own_frames(tmp_path):
    # Every dataset's epoch-0 backbone is the same pretrained encoder: its probe results
    # must still come from each dataset's frames, not from the first dataset probed.
    small = ProbeParams(frames_per_subject=10, train_fraction=0.7, epochs=2, warmup_epochs=1,
                        batch_size=64, tsne_subjects=4, num_workers=0, converged_max_iter=50)
    runs = ["synthetic-1", "disfa-1"]
    for run in runs:
        make_run(tmp_path / "finetune" / "fmae" / run, epochs=(0,))  # identical weights
    au_root = tmp_path / "au_shards"
    make_au_shards(au_root / "synthetic", identity=True)
    make_au_shards(au_root / "disfa", identity=False, seed=1)
    out = tmp_path / "probe"
    probe_all(tmp_path / "finetune", au_root, out, small, FT, runs, seed=0,
              tracker=Tracker(active=False), variants=("fmae",))
    for run, ds in zip(runs, ("synthetic", "disfa")):
        alone = probe_run(tmp_path / "finetune" / "fmae" / run, au_root / ds, small, FT, seed=0)
        assert json.loads((out / "fmae" / f"{run}.json").read_text()) == \
            json.loads(json.dumps(alone)), run
