"""Finetuning: optimiser groups, schedule, shard reading, errors, a tiny end-to-end run."""
from __future__ import annotations

import importlib.util
import io
import json
import math
import os
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import webdataset as wds
import yaml
from PIL import Image

from pipeline.finetune import (AUShardStream, finetune, make_loader, param_groups_lrd,
                               train_base_rates,
                               read_au_meta)
from pipeline.models import vit
from pipeline.models.au_model import AUModel
from pipeline.params import FinetuneParams, build

TINY = vit.ViTSize(embed_dim=32, depth=2, num_heads=2, patch_size=8)
AUS = [1, 2, 4]
SUBJECTS = ["F01", "F02", "M01", "M02", "M03", "M04"]
PARTS = {"1": ["F01", "M02"], "2": ["F02", "M03"], "3": ["M01", "M04"]}
FRAMES = 6  # per subject
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def tiny_vit(monkeypatch):
    monkeypatch.setitem(vit.VIT_SIZES, "tiny", TINY)


def make_au_shards(root: Path, dataset: str = "synthetic", size: int = 32) -> Path:
    """A tiny AU shard folder in the docs/design.md contract (without pipeline/au_data.py)."""
    au_dir = root / dataset
    au_dir.mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows = []
    for si, subject in enumerate(SUBJECTS):
        shard = f"{subject}-000000.tar"
        with wds.TarWriter(str(au_dir / shard), mtime=0) as w:
            for f in range(FRAMES):
                labels = rng.integers(-1, 2, len(AUS)).tolist()
                labels[0] = f % 2  # AU1 known in every frame, both classes present
                pixels = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
                pixels[..., si % 3] = 40 * si  # a subject-specific colour
                buf = io.BytesIO()
                Image.fromarray(pixels).save(buf, format="JPEG")
                key = f"{subject}_T1_{f}"
                w.write({"__key__": key, "jpg": buf.getvalue(), "json": json.dumps(
                    {"dataset": dataset, "subject": subject, "task": "T1", "frame": f,
                     "aus": AUS, "labels": labels}).encode()})
                rows.append({"key": key, "subject": subject, "task": "T1", "frame": f,
                             "shard": shard, **{f"AU{a}": np.int8(v) for a, v in
                                                zip(AUS, labels)}})
    pd.DataFrame(rows).to_parquet(au_dir / "index.parquet")
    (au_dir / "meta.json").write_text(json.dumps({
        "dataset": dataset, "aus": AUS, "subjects": SUBJECTS, "parts": PARTS,
        "counts": {s: FRAMES for s in SUBJECTS}}))
    return au_dir


def make_checkpoint(path: Path, img: int = 32) -> Path:
    torch.manual_seed(0)
    enc = vit.build_vit("tiny", img, 8, global_pool="token")
    state = dict(enc.state_dict())
    state.update({"mask_token": torch.zeros(1, 1, 16),
                  "decoder_embed.weight": torch.zeros(16, 32),
                  "decoder_embed.bias": torch.zeros(16),
                  "decoder_pred.weight": torch.zeros(192, 16)})
    torch.save({"model": state, "config": {"model_size": "tiny", "img_size": img,
                                           "patch_size": 8}, "epoch": 1}, path)
    return path


def cfg(**kw) -> FinetuneParams:
    base = {"image_size": 32, "epochs": 2, "warmup_epochs": 1, "batch_size": 8,
            "save_backbone_epochs": [0, 1, 2], "num_workers": 0, "amp": "off"}
    base.update(kw)
    return build(FinetuneParams, base, "finetune.")


def test_layer_decay_groups():
    enc = vit.build_vit("tiny", 32, 8, global_pool="avg")
    enc.pos_embed.requires_grad_(True)  # as finetune() does (the reference trains it)
    model = AUModel(enc, n_aus=3, n_ids=4)
    groups = param_groups_lrd(model, weight_decay=0.05, layer_decay=0.5)
    seen = Counter(n for g in groups for n in g["names"])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(seen) == trainable and max(seen.values()) == 1
    scale = {n: g["lr_scale"] for g in groups for n in g["names"]}
    wd = {n: g["weight_decay"] for g in groups for n in g["names"]}
    L = 2
    assert scale["encoder.patch_embed.proj.weight"] == 0.5 ** (L + 1)
    assert scale["encoder.cls_token"] == 0.5 ** (L + 1)
    assert scale["encoder.pos_embed"] == 0.5 ** (L + 1) and wd["encoder.pos_embed"] == 0.0
    assert scale["encoder.blocks.0.attn.qkv.weight"] == 0.5 ** L
    assert scale["encoder.blocks.1.mlp.fc1.weight"] == 0.5 ** (L - 1)
    for n in ("encoder.fc_norm.weight", "au_head.weight", "id_head.weight"):
        assert scale[n] == 1.0
    assert wd["encoder.blocks.0.attn.qkv.weight"] == 0.05 and wd["au_head.weight"] == 0.05
    for n in ("encoder.cls_token", "au_head.bias", "encoder.blocks.0.norm1.weight",
              "encoder.fc_norm.bias"):
        assert wd[n] == 0.0, n


def test_eval_stream_sees_every_sample_once_with_workers(tmp_path):
    au_dir = make_au_shards(tmp_path)
    urls = sorted(str(p) for p in au_dir.glob("*.tar"))
    ds = AUShardStream(urls, AUS, lambda im: torch.zeros(1))
    keys = [k for _, _, _, ks, _ in make_loader(ds, 4, num_workers=2, pin=False) for k in ks]
    assert len(keys) == len(SUBJECTS) * FRAMES == len(set(keys))


@pytest.mark.parametrize("shuffle,workers", [(False, 0), (True, 0), (False, 2), (True, 2)])
def test_ranks_split_the_samples_disjointly_and_evenly(tmp_path, shuffle, workers):
    au_dir = make_au_shards(tmp_path)
    urls = sorted(str(p) for p in au_dir.glob("*.tar"))

    def keys(rank: int, world: int) -> list[str]:
        ds = AUShardStream(urls, AUS, lambda im: torch.zeros(1), shuffle=shuffle, seed=0,
                           rank=rank, world_size=world)
        ds.set_epoch(1)
        return [k for _, _, _, ks, _ in make_loader(ds, 4, workers, pin=False) for k in ks]

    whole = keys(0, 1)
    for world in (2, 5):
        shares = [keys(r, world) for r in range(world)]
        assert sorted(k for s in shares for k in s) == sorted(whole)  # each sample once
        sizes = [len(s) for s in shares]
        assert max(sizes) - min(sizes) <= max(workers, 1)  # one per worker at most
    with pytest.raises(ValueError, match="rank 2 is outside world size 2"):
        AUShardStream(urls, AUS, lambda im: im, rank=2, world_size=2)


def test_train_stream_reshuffles_and_maps_labels(tmp_path):
    au_dir = make_au_shards(tmp_path)
    urls = sorted(str(p) for p in au_dir.glob("*.tar"))
    ids = {s: i for i, s in enumerate(SUBJECTS)}
    ds = AUShardStream(urls, AUS, lambda im: torch.zeros(1), subject_ids=ids,
                       unknown_as_negative=True, shuffle=True, seed=0)
    orders = []
    for epoch in (0, 1):
        ds.set_epoch(epoch)
        items = list(ds)
        orders.append([it[3] for it in items])
        assert sorted(orders[-1]) == sorted(set(orders[-1])) and len(items) == 36
        assert all(int(it[1].min()) >= 0 for it in items)  # -1 -> 0
        assert all(it[2] == ids[it[4]] for it in items)
    assert orders[0] != orders[1]
    # Shards are interleaved: the first dozen samples come from several subjects.
    assert len({k.split("_")[0] for k in orders[0][:12]}) >= 3


def test_unknown_dataset_or_fold_is_a_clear_error(tmp_path):
    au_dir = make_au_shards(tmp_path)
    with pytest.raises(ValueError, match="no fold 7"):
        read_au_meta(au_dir, "synthetic", 7)
    with pytest.raises(ValueError, match="holds dataset 'synthetic', not the requested 'bp4d'"):
        read_au_meta(au_dir, "bp4d", 1)
    with pytest.raises(ValueError, match="no fold 4"):
        finetune(au_dir, tmp_path / "none.pt", tmp_path / "out", cfg(), dataset="synthetic",
                 fold=4, variant="iat", lambda_=1.0, model_size="tiny", patch_size=8, seed=0)
    with pytest.raises(ValueError, match="variant 'dann' unknown"):
        finetune(au_dir, tmp_path / "none.pt", tmp_path / "out", cfg(), dataset="synthetic",
                 fold=1, variant="dann", lambda_=1.0, model_size="tiny", patch_size=8, seed=0)


def test_checkpoint_image_size_mismatch(tmp_path):
    au_dir = make_au_shards(tmp_path)
    ckpt = make_checkpoint(tmp_path / "ckpt.pt", img=16)
    with pytest.raises(ValueError, match="finetune.image_size = pretrain.image_size"):
        finetune(au_dir, ckpt, tmp_path / "out", cfg(), dataset="synthetic", fold=1,
                 variant="fmae", lambda_=0.0, model_size="tiny", patch_size=8, seed=0)


def _check_outputs(out: Path, variant: str, n_epochs: int, n_test: int, with_val: bool):
    m = json.loads((out / "metrics.json").read_text())
    assert set(m) == {"dataset", "fold", "variant", "lambda", "id_head_depth", "aus", "final",
                      "paper_protocol", "val_selected", "final_id_loss", "convergence_epoch",
                      "id_loss", "id_classes", "id_head_init", "au_head_init", "n_id_classes",
                      "seed", "recipe", "unknown_labels"}
    assert m["seed"] == 0 and m["recipe"]["epochs"] == n_epochs
    assert m["variant"] == variant and m["aus"] == AUS and m["dataset"] == "synthetic"
    assert set(m["final"]) == {"f1_mean", "auc_mean", "f1", "auc", "epoch"}
    assert m["final"]["epoch"] == n_epochs and set(m["final"]["f1"]) == {"AU1", "AU2", "AU4"}
    assert 0 <= m["final"]["f1_mean"] <= 100
    pp = m["paper_protocol"]
    assert set(pp) == {"f1_mean", "f1", "threshold", "epoch"}
    assert pp["f1_mean"] >= m["final"]["f1_mean"] - 1e-9  # optimised on the test fold
    assert (m["val_selected"] is not None) == with_val
    assert 1 <= m["convergence_epoch"] <= n_epochs
    hist = pd.read_csv(out / "history.csv")
    assert list(hist.columns) == ["epoch", "lr", "au_loss", "id_loss", "id_acc", "f1_mean",
                                  "auc_mean", "best_threshold", "best_threshold_f1_mean"]
    assert hist["epoch"].tolist() == list(range(1, n_epochs + 1))
    assert np.isfinite(hist["au_loss"]).all()
    pred = pd.read_parquet(out / "predictions.parquet")
    assert list(pred.columns) == (["epoch", "key", "subject"] + [f"prob_AU{a}" for a in AUS]
                                  + [f"label_AU{a}" for a in AUS])
    assert len(pred) == n_epochs * n_test
    assert (pred.groupby("epoch")["key"].nunique() == n_test).all()
    assert set(pred["subject"]) == set(PARTS[str(m["fold"])])
    assert pred[[f"prob_AU{a}" for a in AUS]].stack().between(0, 1).all()
    for e in range(n_epochs + 1):
        bb = torch.load(out / "backbones" / f"epoch_{e:03d}.pt", weights_only=True)
        assert bb["config"]["epoch"] == e and bb["config"]["global_pool"] == "avg"
        enc = vit.build_vit("tiny", bb["config"]["img_size"], bb["config"]["patch_size"],
                            global_pool="avg")
        enc.load_state_dict(bb["model"])  # strict: encoder + fc_norm exactly
    return m, hist


def test_end_to_end_fmae_with_workers(tmp_path):
    au_dir = make_au_shards(tmp_path)
    ckpt = make_checkpoint(tmp_path / "ckpt.pt")
    out = tmp_path / "fmae" / "synthetic-1"
    m = finetune(au_dir, ckpt, out, cfg(num_workers=2), dataset="synthetic", fold=1,
                 variant="fmae", lambda_=2.0, model_size="tiny", patch_size=8, seed=0)
    m2, hist = _check_outputs(out, "fmae", 2, n_test=2 * FRAMES, with_val=False)
    assert m == m2
    assert m["lambda"] == 0.0 and m["id_head_depth"] is None and m["final_id_loss"] is None
    assert hist["id_loss"].isna().all()
    # Backbone 0 is the pretrained encoder, later ones moved.
    b0 = torch.load(out / "backbones" / "epoch_000.pt", weights_only=True)["model"]
    b2 = torch.load(out / "backbones" / "epoch_002.pt", weights_only=True)["model"]
    ref = torch.load(ckpt, weights_only=True)["model"]
    assert torch.equal(b0["blocks.0.attn.qkv.weight"], ref["blocks.0.attn.qkv.weight"])
    assert not torch.equal(b2["blocks.0.attn.qkv.weight"], ref["blocks.0.attn.qkv.weight"])
    # The position embedding starts from the pretrained sin-cos one and is trained.
    assert torch.equal(b0["pos_embed"], ref["pos_embed"])
    assert not torch.equal(b2["pos_embed"], ref["pos_embed"])


def test_end_to_end_iat_with_validation(tmp_path):
    au_dir = make_au_shards(tmp_path)
    ckpt = make_checkpoint(tmp_path / "ckpt.pt")
    out = tmp_path / "iat" / "synthetic-2"
    m = finetune(au_dir, ckpt, out, cfg(val_fraction=0.3, id_head_depth=2), dataset="synthetic",
                 fold=2, variant="iat", lambda_=1.0, model_size="tiny", patch_size=8, seed=0)
    _, hist = _check_outputs(out, "iat", 2, n_test=2 * FRAMES, with_val=True)
    assert m["lambda"] == 1.0 and m["id_head_depth"] == 2
    # The reference's identity branch: one-hot BCE over every subject of the dataset, the
    # ID head at nn.Linear's init.
    assert (m["id_loss"], m["id_classes"], m["id_head_init"], m["n_id_classes"]) == \
        ("bce", "dataset", "default", len(SUBJECTS))
    assert m["final_id_loss"] == pytest.approx(hist["id_loss"].iloc[-1])
    assert 0 < m["final_id_loss"] < math.log(2) + 0.2  # per-element BCE starts near ln 2
    assert hist["id_acc"].between(0, 1).all()


def test_iat_with_cross_entropy_over_training_subjects(tmp_path):
    au_dir = make_au_shards(tmp_path)
    ckpt = make_checkpoint(tmp_path / "ckpt.pt")
    out = tmp_path / "iat" / "synthetic-2"
    m = finetune(au_dir, ckpt, out, cfg(val_fraction=0.3, id_loss="ce", id_classes="train",
                                        id_head_init="small"),
                 dataset="synthetic", fold=2, variant="iat", lambda_=1.0, model_size="tiny",
                 patch_size=8, seed=0)
    # 4 training subjects minus 1 for validation -> 3 identity classes.
    assert (m["id_loss"], m["id_classes"], m["n_id_classes"]) == ("ce", "train", 3)
    assert 0 < m["final_id_loss"] < 3 * math.log(3)


def test_training_drops_the_partial_last_batch(tmp_path):
    au_dir = make_au_shards(tmp_path)
    ckpt = make_checkpoint(tmp_path / "ckpt.pt")
    # fold 1 trains on 4 subjects x 6 frames = 24 frames: batches of 10 -> 2 full, 4 dropped
    seen = []
    from pipeline import finetune as ft
    real = ft.train_one_epoch

    def spy(model, loader, *a, **kw):
        sizes = [x.shape[0] for x, *_ in loader]
        seen.append(sizes)
        return real(model, loader, *a, **kw)

    import unittest.mock
    with unittest.mock.patch.object(ft, "train_one_epoch", spy):
        finetune(au_dir, ckpt, tmp_path / "out", cfg(batch_size=10, epochs=1, warmup_epochs=0,
                                                     save_backbone_epochs=[]),
                 dataset="synthetic", fold=1, variant="fmae", lambda_=0.0, model_size="tiny",
                 patch_size=8, seed=0)
    assert seen == [[10, 10]]


def test_stage_script(tmp_path, monkeypatch):
    au_root = tmp_path / "au_shards"
    make_au_shards(au_root)
    ckpt = make_checkpoint(tmp_path / "ckpt.pt")
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({
        "lambda": 0.5, "model_size": "tiny",  # the checkpoint's size, whatever the default
        "pretrain": {"image_size": 32, "patch_size": 8},
        "finetune": {"image_size": 32, "epochs": 1, "warmup_epochs": 0, "batch_size": 8,
                     "save_backbone_epochs": [1], "num_workers": 0,
                     "augment": {"rand_augment": ""}}}))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.chdir(tmp_path)
    spec = importlib.util.spec_from_file_location("stage_finetune", REPO / "stages" / "finetune.py")
    stage = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(stage)
    out = tmp_path / "out"
    assert stage.main(["--params", str(params), "--run", "synthetic-3", "--variant", "iat",
                       "--au-shards", str(au_root), "--pretrained", str(ckpt), "--out", str(out),
                       "--id-head-depth", "3"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert (m["fold"], m["lambda"], m["id_head_depth"]) == (3, 0.5, 3)
    assert (out / "run_info.json").is_file() and (out / "backbones" / "epoch_001.pt").is_file()
    assert not (out / "backbones" / "epoch_000.pt").exists()
    import mlflow
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["fmae-iat"])
    assert runs["tags.mlflow.runName"].tolist() == ["iat/synthetic-3/lambda=0.5,id_head_depth=3"]
    assert runs["tags.dataset"].tolist() == ["synthetic"] and "metrics.test/f1_mean" in runs
    with pytest.raises(SystemExit):
        stage.main(["--params", str(params), "--run", "synthetic-1", "--variant", "fmae",
                    "--au-shards", str(au_root), "--pretrained", str(ckpt), "--out", str(out),
                    "--lambda", "1.0"])


def test_train_transform_survives_posterize_to_zero_bits():
    from pipeline.finetune import build_transforms
    # the paper's RandAugment (the CPU default turns it off)
    train, evaluate = build_transforms(cfg(augment={"rand_augment": "rand-m9-mstd0.5-inc1"}))
    ops = [op for t in train.transforms for op in getattr(t, "ops", [])
           if op.name == "PosterizeIncreasing"]
    assert len(ops) == 1
    op = ops[0]
    op.prob, op.magnitude, op.magnitude_std = 1.0, 10, 0  # the level that keeps 0 bits
    img = Image.fromarray(np.full((40, 40, 3), 200, np.uint8))
    assert np.asarray(op(img)).max() == 0  # black, as older Pillow gave
    assert train(img).shape == (3, 32, 32) and evaluate(img).shape == (3, 32, 32)


# --------------------------------------------------------------------------- hardening
def _stale(folder: Path, name: str) -> Path:
    """A temporary named as pipeline.io.atomic_path names it, left by a killed run."""
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{name}.", dir=folder)
    os.write(fd, b"partial" * 100)
    os.close(fd)
    return Path(tmp)


def test_killed_runs_temporaries_are_removed_at_the_start(tmp_path):
    au_dir = make_au_shards(tmp_path)
    ckpt = make_checkpoint(tmp_path / "ckpt.pt")
    out = tmp_path / "out"
    stale = [_stale(out, "predictions.parquet"), _stale(out, "history.csv"),
             _stale(out / "backbones", "epoch_001.pt")]
    mine = [out / "notes.txt", out / ".tmp-notes", out / "backbones" / "epoch_000.pt.bak"]
    for p in mine:
        p.write_text("not the pipeline's")
    assert all(p.is_file() for p in stale)
    finetune(au_dir, ckpt, out, cfg(epochs=1, warmup_epochs=0, save_backbone_epochs=[1]),
             dataset="synthetic", fold=1, variant="fmae", lambda_=0.0, model_size="tiny",
             patch_size=8, seed=0)
    assert not any(p.exists() for p in stale)
    assert [p.read_text() for p in mine] == ["not the pipeline's"] * 3
    assert sorted(p.name for p in out.rglob(".tmp-*")) == [".tmp-notes"]
    assert (out / "predictions.parquet").is_file()
    assert (out / "backbones" / "epoch_001.pt").is_file()


@pytest.mark.parametrize("spec", ["rand-x9", "randaug", "rand_m9", "foo", "rand-m9.5",
                                  "rand-mX-mstd0.5"])
def test_unknown_rand_augment_policy_fails_first_naming_the_key(tmp_path, spec):
    # Nothing exists: the policy must be refused before the shards or checkpoint are read.
    with pytest.raises(ValueError, match=r"finetune\.augment\.rand_augment: .* is not a policy "
                                         r"timm can build \(.+\)\. Use a RandAugment spec such "
                                         r"as 'rand-m9-mstd0\.5-inc1'"):
        finetune(tmp_path / "no-shards", tmp_path / "none.pt", tmp_path / "out",
                 cfg(augment={"rand_augment": spec}), dataset="synthetic", fold=1,
                 variant="fmae", lambda_=0.0, model_size="tiny", patch_size=8, seed=0)
    assert not (tmp_path / "out").exists()


def test_valid_rand_augment_policies_are_accepted():
    from pipeline.finetune import check_rand_augment
    for spec in ("", "rand-m9-mstd0.5-inc1", "rand-n2-m9", "rand-m9-mstd0.5-inc1-tweights",
                 "augmix-m5-w4-d2", "v0"):
        check_rand_augment(spec, 32)


def _run_with(tmp_path, ckpt, **kw):
    au_dir = tmp_path / "synthetic"
    if not au_dir.exists():
        make_au_shards(tmp_path)
    return finetune(au_dir, ckpt, tmp_path / "out", cfg(**kw), dataset="synthetic", fold=1,
                    variant="fmae", lambda_=0.0, model_size="tiny", patch_size=8, seed=0)


def test_text_file_as_pretrained_checkpoint_is_named(tmp_path):
    ckpt = tmp_path / "checkpoint.pt"
    ckpt.write_text("outs:\n- md5: 0123abcd\n  path: checkpoint.pt\n")  # e.g. a .dvc file
    with pytest.raises(ValueError, match=r"checkpoint\.pt: not a checkpoint: the file is text"):
        _run_with(tmp_path, ckpt)


def test_checkpoint_without_config_is_checked_by_its_shapes(tmp_path, monkeypatch):
    # A bare encoder state dict (no config to compare): patch 16 at 32 px, finetuned at patch 8.
    enc = vit.build_vit("tiny", 32, 16, global_pool="token")
    ckpt = tmp_path / "bare.pt"
    torch.save(enc.state_dict(), ckpt)
    with pytest.raises(ValueError, match=r"bare\.pt: pretrained on 32 px images with 16 px "
                                         r"patches, but finetune\.image_size is 32 and "
                                         r"pretrain\.patch_size is 8.*pretrain\.patch_size = 16"):
        _run_with(tmp_path, ckpt)
    monkeypatch.setitem(vit.VIT_SIZES, "wide", vit.ViTSize(48, 3, 2, 8))
    wide = vit.build_vit("wide", 32, 8, global_pool="token")
    torch.save({"model": wide.state_dict()}, ckpt)
    with pytest.raises(ValueError, match=r"bare\.pt: holds ViT-wide \(48 wide, 3 blocks\) "
                                         r"but model_size is 'tiny' \(32 wide, 2 blocks\)"):
        _run_with(tmp_path, ckpt)


def test_checkpoint_with_nan_weights_is_refused_before_training(tmp_path):
    ckpt = make_checkpoint(tmp_path / "ckpt.pt")
    saved = torch.load(ckpt, weights_only=True)
    saved["model"]["blocks.0.attn.qkv.weight"][0, 0] = float("nan")
    torch.save(saved, ckpt)
    with pytest.raises(ValueError, match=r"ckpt\.pt: 1 of \d+ weight tensors hold NaN or inf "
                                         r"\(e\.g\. \['blocks\.0\.attn\.qkv\.weight'\]\)"):
        _run_with(tmp_path, ckpt)
    assert not (tmp_path / "out" / "history.csv").exists()


def test_dvc_torchrun_commands_reach_the_stage_unchanged():
    # torchrun's parser reads abbreviations of its own options anywhere on the line (a bare
    # --run is an ambiguous --run-path and stops the launch): every torchrun command in
    # dvc.yaml must hand the stage exactly its arguments, which the stage then accepts.
    import re
    import shlex

    from torch.distributed.run import get_args_parser

    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    launched = {}
    for name, stage in stages.items():
        cmd = re.sub(r"\$\{[^}]+\}", "1", stage["cmd"])  # ${item.run} etc.: any plain word
        words = shlex.split(cmd)
        if words[:3] != ["python", "-m", "torch.distributed.run"]:
            continue
        args = get_args_parser().parse_args(words[3:])
        assert args.module and args.nproc_per_node == "1", name
        script = words.index(args.training_script)
        assert args.training_script_args == words[script + 1:], name
        launched[name] = args.training_script
    assert {launched[s] for s in ("finetune_fmae", "finetune_iat", "finetune_sweep_lambda",
                                  "finetune_sweep_depth")} == {"stages.finetune"}
    assert launched["probe"] == "stages.probe"


def test_stage_refuses_a_launch_with_another_process_count(monkeypatch):
    spec = importlib.util.spec_from_file_location("stage_finetune", REPO / "stages" / "finetune.py")
    stage = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(stage)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    stage._check_world_size(1)  # a plain process is one process
    with pytest.raises(SystemExit, match="finetune.nproc_per_node is 2 but this launch runs 1"):
        stage._check_world_size(2)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # torchrun --nproc_per_node=2
    stage._check_world_size(2)
    with pytest.raises(SystemExit, match="--nproc_per_node=1 -m stages.finetune"):
        stage._check_world_size(1)


def test_train_base_rates_follow_the_loss_label_handling(tmp_path):
    """The AU prior init's rates: over the training subjects only, with not-coded labels
    left out (mask) or counted as absent (negative), counted here from the index by hand."""
    au_dir = make_au_shards(tmp_path)
    index = pd.read_parquet(au_dir / "index.parquet")
    train = SUBJECTS[:2]
    rows = index[index["subject"].isin(train)]
    for negative in (False, True):
        rates = train_base_rates(au_dir, train, AUS, unknown_as_negative=negative)
        for a, r in zip(AUS, rates):
            col = rows[f"AU{a}"].tolist()
            n = len(col) if negative else sum(v >= 0 for v in col)
            assert r == pytest.approx(sum(v == 1 for v in col) / n)
    # AU1 is coded in every frame, alternating 0/1: both handlings agree on one half
    assert train_base_rates(au_dir, train, AUS, unknown_as_negative=True)[0] == 0.5
    # the test subjects' labels are not read
    other = train_base_rates(au_dir, SUBJECTS[2:], AUS, unknown_as_negative=False)
    assert other != train_base_rates(au_dir, train, AUS, unknown_as_negative=False)
