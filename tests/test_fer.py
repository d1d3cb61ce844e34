"""FER finetuning: metrics, a tiny end-to-end run, Table 4, the report and the params."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from sklearn.metrics import confusion_matrix as sk_confusion
from sklearn.metrics import f1_score

from pipeline.fer import finetune_fer
from pipeline.fer_data import build_fer_shards
from pipeline.fer_metrics import confusion_matrix, fer_report
from pipeline.fer_tables import build_fer_tables
from pipeline.models import vit
from pipeline.params import (FerShardsParams, FinetuneFerParams, ParamsError,
                             SyntheticFerParams, build, load_params)
from pipeline.report import Section, append_sections, write_report
from pipeline.synthetic import FER_EXPRESSIONS, generate_fer

TINY = vit.ViTSize(embed_dim=32, depth=2, num_heads=2, patch_size=8)
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def tiny_vit(monkeypatch):
    monkeypatch.setitem(vit.VIT_SIZES, "tiny", TINY)


# --------------------------------------------------------------------------- metrics
def test_report_matches_sklearn_and_its_own_confusion_matrix():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 5, 200)
    labels[labels == 4] = 3  # class 4 never occurs in the labels ...
    preds = np.where(rng.uniform(size=200) < 0.6, labels, rng.integers(0, 5, 200))
    names = list("abcde")
    rep = fer_report(labels, preds, names)
    cm = np.asarray(rep["confusion_matrix"])
    assert (cm == sk_confusion(labels, preds, labels=range(5))).all()
    assert rep["top1"] == pytest.approx(100 * (labels == preds).mean(), abs=1e-3)
    assert rep["top1"] == pytest.approx(100 * np.trace(cm) / cm.sum(), abs=1e-3)
    for i, c in enumerate(names[:4]):
        assert rep["per_class_accuracy"][c] == pytest.approx(100 * cm[i, i] / cm[i].sum(),
                                                             abs=1e-3)
    assert rep["per_class_accuracy"]["e"] is None  # ... so its accuracy is undefined
    present = sorted(set(labels) | set(preds))
    assert rep["macro_f1"] == pytest.approx(
        100 * f1_score(labels, preds, labels=present, average="macro"), abs=1e-3)


def test_confusion_matrix_refuses_out_of_range_classes():
    with pytest.raises(ValueError, match="outside 0..2"):
        confusion_matrix(np.array([0, 3]), np.array([0, 1]), 3)


# --------------------------------------------------------------------------- end to end
def make_checkpoint(path: Path, img: int = 32) -> Path:
    torch.manual_seed(0)
    enc = vit.build_vit("tiny", img, 8, global_pool="token")
    state = dict(enc.state_dict())
    state.update({"mask_token": torch.zeros(1, 1, 16),
                  "decoder_embed.weight": torch.zeros(16, 32)})
    torch.save({"model": state, "config": {"model_size": "tiny", "img_size": img,
                                           "patch_size": 8}}, path)
    return path


def ft_cfg(**recipe) -> FinetuneFerParams:
    return build(FinetuneFerParams, {
        "image_size": 32, "amp": "off", "num_workers": 0,
        "synthetic": {"epochs": 2, "warmup_epochs": 1, "batch_size": 8, "blr": 1e-2,
                      **recipe}}, "finetune_fer.")


@pytest.fixture
def fer_shards(tmp_path) -> Path:
    generate_fer(tmp_path / "download", SyntheticFerParams(
        subjects=4, test_subjects=1, frames_per_expression=2, frame_size=32))
    out = tmp_path / "fer_shards" / "synthetic"
    build_fer_shards("synthetic", tmp_path / "download", out,
                     build(FerShardsParams, {"image_size": 32, "samples_per_shard": 10},
                           "fer_shards."))
    return out


def test_tiny_finetune_fer_end_to_end(tmp_path, fer_shards):
    out = tmp_path / "run"
    res = finetune_fer(fer_shards, make_checkpoint(tmp_path / "ckpt.pt"), out, ft_cfg(),
                       dataset="synthetic", model_size="tiny", patch_size=8, seed=0)
    for name in ("metrics.json", "history.csv", "predictions.parquet",
                 "confusion_matrix.csv", "confusion_matrix.png"):
        assert (out / name).is_file(), name
    m = json.loads((out / "metrics.json").read_text())
    assert m == json.loads(json.dumps(res))
    assert m["n_train"] == 3 * 7 * 2 and m["n_test"] == 7 * 2 and m["classes"] == list(
        FER_EXPRESSIONS)
    # metrics and the confusion matrix agree with the written predictions
    pred = pd.read_parquet(out / "predictions.parquet")
    assert len(pred) == m["n_test"] and set(pred["epoch"]) == {2}
    probs = pred[[f"prob_{c}" for c in FER_EXPRESSIONS]].to_numpy()
    assert np.allclose(probs.sum(1), 1, atol=1e-4)
    assert (probs.argmax(1) == pred["pred"]).all()
    cm = np.asarray(m["final"]["confusion_matrix"])
    assert (cm == sk_confusion(pred["label"], pred["pred"], labels=range(7))).all()
    assert cm.sum(1).tolist() == [2] * 7  # two test images per expression
    assert m["final"]["top1"] == pytest.approx(100 * (pred["label"] == pred["pred"]).mean(),
                                               abs=1e-3)
    assert m["final"] == {"epoch": 2, **fer_report(pred["label"].to_numpy(),
                                                   pred["pred"].to_numpy(),
                                                   list(FER_EXPRESSIONS))}
    with open(out / "confusion_matrix.csv") as f:
        rows = list(csv.reader(f))
    assert rows[0][1:] == list(FER_EXPRESSIONS)
    assert [[int(v) for v in r[1:]] for r in rows[1:]] == cm.tolist()
    hist = pd.read_csv(out / "history.csv")
    assert hist["epoch"].tolist() == [1, 2] and hist["top1"].iloc[-1] == pytest.approx(
        m["final"]["top1"], abs=1e-3)
    assert m["best_epoch"]["top1"] == pytest.approx(hist["top1"].max(), abs=1e-3)
    assert m["chance_top1"] == pytest.approx(100 / 7, abs=1e-3)


def test_finetune_fer_refuses_a_batch_larger_than_the_training_split(tmp_path, fer_shards):
    with pytest.raises(ValueError, match=r"fewer than one batch.*finetune_fer\.synthetic\."
                                         "batch_size"):
        finetune_fer(fer_shards, make_checkpoint(tmp_path / "ckpt.pt"), tmp_path / "run",
                     ft_cfg(batch_size=1000), dataset="synthetic", model_size="tiny",
                     patch_size=8, seed=0)


@pytest.mark.slow
def test_stages_and_table4_report(tmp_path, fer_shards, monkeypatch):
    """stages.finetune_fer on a params file, then Table 4 and its report section."""
    from stages import finetune_fer as stage

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setattr("pipeline.tracking.repo_root", lambda *a: tmp_path)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["model_size"] = "tiny"
    params["pretrain"]["patch_size"] = 8
    params["finetune_fer"].update({"image_size": 32, "amp": "off",
                                   "synthetic": {"epochs": 1, "warmup_epochs": 0,
                                                 "batch_size": 8, "blr": 1e-2}})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    fer_dir = tmp_path / "finetune_fer"
    assert stage.main(["--params", str(tmp_path / "params.yaml"), "--dataset", "synthetic",
                       "--fer-shards", str(fer_shards.parent), "--pretrained",
                       str(make_checkpoint(tmp_path / "ckpt.pt")), "--out",
                       str(fer_dir / "synthetic")]) == 0
    assert (fer_dir / "synthetic" / "run_info.json").is_file()

    out = tmp_path / "tables"
    write_report(out / "report.html", "r", ["intro"], [Section("AU")])
    written, headline, section = build_fer_tables(fer_dir, out, ["synthetic"], True)
    append_sections(out / "report.html", [section])
    m = json.loads((fer_dir / "synthetic" / "metrics.json").read_text())
    assert headline == {"synthetic": {"top1": m["final"]["top1"],
                                      "best_top1": m["best_epoch"]["top1"],
                                      "macro_f1": m["final"]["macro_f1"]}}
    md = (out / "table4_fer.md").read_text()
    assert "93.45" in md and "64.79" in md and "synthetic" in md
    assert (out / "table4_confusion_synthetic.png") in written
    html = (out / "report.html").read_text()
    assert html.count("<section id=") == 2 and 'href="#s1"' in html
    assert "Table 4" in html and "data:image/png;base64" in html
    assert not [b for b in section.blocks if 'class="warn"' in b]  # predictions agree
    # a predictions file that disagrees with metrics.json is reported
    pred = pd.read_parquet(fer_dir / "synthetic" / "predictions.parquet")
    pred["pred"] = (pred["label"] + 1) % 7
    pred.to_parquet(fer_dir / "synthetic" / "predictions.parquet")
    _, _, section = build_fer_tables(fer_dir, out, ["synthetic"], True)
    assert any("predictions.parquet gives top-1 0.000%" in b for b in section.blocks)


# --------------------------------------------------------------------------- params
def _params_with(tmp_path, edit) -> Path:
    data = yaml.safe_load((REPO / "params.yaml").read_text())
    edit(data)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_default_and_paper_params_hold_the_paper_recipes():
    for name in ("params.yaml", "configs/paper.yaml"):
        p = load_params(REPO / name)
        assert p.finetune_fer.recipe("rafdb") == build(
            type(p.finetune_fer.rafdb), {"epochs": 60, "warmup_epochs": 6, "batch_size": 32,
                                         "blr": 1e-3})
        r = p.finetune_fer.recipe("affectnet")
        assert (r.epochs, r.warmup_epochs, r.batch_size, r.blr) == (30, 3, 64, 5e-4)
    paper = load_params(REPO / "configs/paper.yaml")
    assert paper.finetune_fer.datasets == ["rafdb", "affectnet"]
    assert paper.fer_shards.image_size == paper.finetune_fer.image_size == 224


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["finetune_fer"].update(epochs=3), r"unknown key finetune_fer\.epochs"),
    (lambda d: d["finetune_fer"]["rafdb"].update(warmup_epochs=61),
     r"warmup_epochs must not exceed its epochs"),
    (lambda d: d["finetune_fer"].update(datasets=["rafdb"]),
     r"finetune_fer\.datasets: 'rafdb' is not in download\.fer_datasets"),
    (lambda d: d["download"].update(fer_datasets=["ck+"]),
     r"download\.fer_datasets: 'ck\+' is not one of"),
    (lambda d: d["fer_shards"]["face_crop"].update(rafdb="mtcnn"),
     r"fer_shards\.face_crop\.rafdb: 'mtcnn' is not one of none, detect"),
    (lambda d: d["download"]["synthetic_fer"].update(test_subjects=16),
     r"test_subjects \(16\) must be below"),
    (lambda d: d["finetune_fer"]["synthetic"].update(blr=0), r"finetune_fer\.synthetic\.blr"),
])
def test_bad_fer_params_fail_naming_the_key(tmp_path, edit, message):
    with pytest.raises(ParamsError, match=message):
        load_params(_params_with(tmp_path, edit))
