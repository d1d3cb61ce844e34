"""FER datasets: RAF-DB and AffectNet-8 readers, verification, shards, the synthetic set."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline import fer_data, synthetic
from pipeline.fer_data import (AFFECTNET_CLASSES, RAFDB_CLASSES, FerLayoutError,
                               build_fer_shards, read_affectnet, read_fer_dataset, read_rafdb)
from pipeline.params import FerShardsParams, SyntheticFerParams, build
from pipeline.sources import ManualStepRequired, prepare_source


def _jpg(path: Path, value: int, size: tuple[int, int] = (40, 40)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (value, 255 - value, 90)).save(path)


RAF_LINES = [("train_00001.jpg", 5), ("train_00002.jpg", 1), ("train_00003.jpg", 7),
             ("test_0001.jpg", 4), ("test_0002.jpg", 2)]


def make_rafdb(root: Path, lines=RAF_LINES, skip: str | None = None,
               original: bool = False) -> Path:
    """RAF-DB's basic release layout: label list + aligned (optionally original) images."""
    lab = root / "basic" / "EmoLabel" / "list_patition_label.txt"
    lab.parent.mkdir(parents=True)
    lab.write_text("".join(f"{n} {k}\n" for n, k in lines))
    for i, (name, _) in enumerate(lines):
        stem = name[:-4]
        if name != skip:
            _jpg(root / "basic" / "Image" / "aligned" / f"{stem}_aligned.jpg", 20 * i)
        if original:
            _jpg(root / "basic" / "Image" / "original" / name, 20 * i, (80, 60))
    return root


def cfg(**kw) -> FerShardsParams:
    return build(FerShardsParams, {"image_size": 32, "samples_per_shard": 2, **kw},
                 "fer_shards.")


def read_shards(folder: Path) -> dict[str, dict]:
    """key -> json of every sample in ``folder``'s tars (checks each has its jpg)."""
    out = {}
    for tar in sorted(folder.glob("*.tar")):
        with tarfile.open(tar) as tf:
            names = tf.getnames()
            for n in names:
                if n.endswith(".json"):
                    key = n[:-5]
                    assert f"{key}.jpg" in names
                    img = Image.open(io.BytesIO(tf.extractfile(f"{key}.jpg").read()))
                    assert img.size == (32, 32)
                    out[key] = {**json.loads(tf.extractfile(n).read()), "tar": tar.name}
    return out


# --------------------------------------------------------------------------- RAF-DB
def test_rafdb_reader_labels_split_and_aligned_paths(tmp_path):
    recs = read_rafdb(make_rafdb(tmp_path))
    assert [(r.key, r.label, r.split) for r in recs] == [
        ("train_00001", 4, "train"), ("train_00002", 0, "train"), ("train_00003", 6, "train"),
        ("test_0001", 3, "test"), ("test_0002", 1, "test")]
    assert recs[0].path.name == "train_00001_aligned.jpg"
    assert RAFDB_CLASSES[recs[0].label] == "sadness"  # RAF-DB label 5
    assert RAFDB_CLASSES[recs[1].label] == "surprise"  # label 1
    assert RAFDB_CLASSES[recs[3].label] == "happiness"  # label 4
    # the basic/ folder's content placed directly works too
    assert read_rafdb(tmp_path / "basic") == recs


def test_rafdb_label_list_naming_a_missing_image_fails_with_its_name(tmp_path):
    root = make_rafdb(tmp_path / "rafdb", skip="train_00002.jpg")
    with pytest.raises(FerLayoutError, match=r"train_00002\.jpg.*train_00002_aligned\.jpg is "
                                             r"missing.*aligned/"):
        read_rafdb(root)
    # the download stage's check says the same, with the placement instructions
    with pytest.raises(ManualStepRequired, match=r"(?s)train_00002\.jpg.*Place in .*EmoLabel"):
        prepare_source("rafdb", root)


def test_rafdb_malformed_line_and_missing_list_are_named(tmp_path):
    root = make_rafdb(tmp_path / "a", lines=[("train_00001.jpg", 5), ("train_00002.jpg", 9)])
    with pytest.raises(FerLayoutError, match=r"line 2: 'train_00002\.jpg 9'"):
        read_rafdb(root)
    with pytest.raises(FerLayoutError, match=r"list_patition_label\.txt is missing"):
        read_rafdb(tmp_path / "empty")


def test_rafdb_verified_by_the_download_stage(tmp_path):
    m = prepare_source("rafdb", make_rafdb(tmp_path / "rafdb"))
    assert m["verified"] and m["role"] == "fer"
    assert m["counts"] == {"train_images": 3, "test_images": 2}
    assert m["details"]["per_class"]["train"]["surprise"] == 1
    assert json.loads((tmp_path / "rafdb" / "manifest.json").read_text())["verified"]


def test_rafdb_detect_reads_originals_through_the_face_front_end(tmp_path):
    root = make_rafdb(tmp_path / "rafdb", original=True)
    seen = []

    def cropper(im):  # a stand-in detector: no face in the second image it sees
        seen.append(im.size)
        return None if len(seen) == 2 else im.crop((10, 10, 50, 50))
    meta = build_fer_shards("rafdb", root, tmp_path / "out", cfg(face_crop={"rafdb": "detect"}),
                            cropper=cropper)
    assert all(s == (80, 60) for s in seen)  # the original images, not the aligned crops
    assert meta["face_crop"] == "detect" and meta["skipped"]["no_face"] == 1
    assert meta["splits"]["train"]["count"] + meta["splits"]["test"]["count"] == 4


# --------------------------------------------------------------------------- AffectNet
def make_affectnet(root: Path, names: dict[str, list[str]], n: int = 2) -> Path:
    for split, folders in names.items():
        for j, folder in enumerate(folders):
            for i in range(n):
                _jpg(root / split / folder / f"img.{i}.jpg", 30 * j + i)
    return root


def test_affectnet_numeric_folders(tmp_path):
    root = make_affectnet(tmp_path, {"train": [str(i) for i in range(8)], "val": ["0", "7"]})
    recs = read_affectnet(root)
    train = [r for r in recs if r.split == "train"]
    assert sorted({r.label for r in train}) == list(range(8)) and len(train) == 16
    assert {r.label for r in recs if r.split == "test"} == {0, 7}
    assert all(r.key.startswith(f"{r.split}_{r.label}_img_") for r in recs)


def test_affectnet_named_folders_any_case_map_to_affectnet_indices(tmp_path):
    named = ["Neutral", "happy", "Sadness", "surprised", "fear", "disgust", "Angry", "contempt"]
    root = make_affectnet(tmp_path, {"Train": named, "Test": ["anger", "HAPPINESS"]}, n=1)
    by_folder = {r.path.parent.name: r.label for r in read_affectnet(root)}
    for folder, idx in by_folder.items():
        assert AFFECTNET_CLASSES[idx].startswith(folder.lower()[:3])
    assert by_folder["Angry"] == by_folder["anger"] == 6 and by_folder["happy"] == 1


def test_affectnet_layout_errors_name_the_folder(tmp_path):
    root = make_affectnet(tmp_path / "a", {"train": ["0", "smile"], "test": ["0"]})
    with pytest.raises(FerLayoutError, match=r"'smile' is not an AffectNet-8 class"):
        read_affectnet(root)
    root = make_affectnet(tmp_path / "b", {"train": ["0", "neutral"], "test": ["0"]})
    with pytest.raises(FerLayoutError, match=r"both class neutral"):
        read_affectnet(root)
    root = make_affectnet(tmp_path / "c", {"train": ["0"]})
    with pytest.raises(FerLayoutError, match=r"no test split folder"):
        read_affectnet(root)
    with pytest.raises(ManualStepRequired, match=r"(?s)no test split.*Place in"):
        prepare_source("affectnet", root)


def test_affectnet_shards_with_a_corrupt_image_skipped_and_counted(tmp_path):
    root = make_affectnet(tmp_path / "affectnet", {"train": ["0", "1", "2"], "test": ["1"]}, n=3)
    (root / "train" / "2" / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    meta = build_fer_shards("affectnet", root, tmp_path / "out", cfg())
    assert meta["skipped"] == {"unreadable": 1, "no_face": 0}
    assert meta["splits"]["train"]["per_class"] == [3, 3, 3, 0, 0, 0, 0, 0]
    assert meta["splits"]["test"]["count"] == 3 and meta["classes"] == list(AFFECTNET_CLASSES)
    samples = read_shards(tmp_path / "out")
    assert len(samples) == 12
    assert all(s["tar"].startswith(s["split"]) for s in samples.values())
    assert {s["expression"] for s in samples.values() if s["label"] == 1} == {"happy"}
    listed = {f for v in meta["splits"].values() for f in v["shards"]}
    assert listed == {p.name for p in (tmp_path / "out").glob("*.tar")}


# --------------------------------------------------------------------------- synthetic
def test_prototypes_use_only_drawable_aus_and_dropped_aus_are_undrawable():
    drawable = set(synthetic.AUS)
    for e, aus in synthetic.FER_PROTOTYPES.items():
        assert aus <= drawable, e
        assert not set(synthetic.FER_DROPPED_AUS.get(e, ())) & drawable
    assert not set(synthetic.FER_DISTRACTOR_AUS) & set().union(
        *synthetic.FER_PROTOTYPES.values())
    assert len(set(synthetic.FER_PROTOTYPES.values())) == 7  # every expression distinct
    assert synthetic.expression_of({6: 0.8, 12: 0.9, 25: 1.0}) == "happiness"
    with pytest.raises(ValueError, match="no expression prototype"):
        synthetic.expression_of({6: 0.8})


def test_synthetic_expressions_follow_the_prototypes_split_by_subject(tmp_path):
    cfg_s = SyntheticFerParams(subjects=5, test_subjects=2, frames_per_expression=2,
                               frame_size=32, seed=3)
    m = synthetic.generate_fer(tmp_path, cfg_s)
    recs = read_fer_dataset("synthetic", tmp_path)
    assert len(recs) == m["counts"]["images"] == 5 * 7 * 2
    rows = (tmp_path / synthetic.FER_LABELS).read_text().splitlines()[1:]
    for row in rows:
        key, _img, _s, _split, label, expression, aus = row.split(",")
        active = {int(a) for a in aus.split(";") if a}
        assert synthetic.FER_EXPRESSIONS[int(label)] == expression
        assert synthetic.expression_of({a: 1.0 for a in active}) == expression
        assert synthetic.FER_PROTOTYPES[expression] <= active
    train = {r.subject for r in recs if r.split == "train"}
    test = {r.subject for r in recs if r.split == "test"}
    assert len(test) == 2 and len(train) == 3 and not train & test
    for split in ("train", "test"):  # every expression in both splits
        assert {r.label for r in recs if r.split == split} == set(range(7))
    # the same config is complete: nothing is redrawn
    before = (tmp_path / "images" / "E001" / "fear_000.jpg").stat().st_mtime_ns
    assert synthetic.generate_fer(tmp_path, cfg_s) == m
    assert (tmp_path / "images" / "E001" / "fear_000.jpg").stat().st_mtime_ns == before


def test_synthetic_expressions_are_visible(tmp_path):
    """Each expression's face differs from the same subject's neutral face."""
    synthetic.generate_fer(tmp_path, SyntheticFerParams(subjects=2, test_subjects=1,
                                                        frames_per_expression=1,
                                                        frame_size=64))
    root = tmp_path / "images" / "E001"
    neutral = np.asarray(Image.open(root / "neutral_000.jpg"), np.float32)
    for e in synthetic.FER_EXPRESSIONS[:-1]:
        diff = np.abs(np.asarray(Image.open(root / f"{e}_000.jpg"), np.float32) - neutral)
        assert (diff.max(-1) > 40).mean() > 0.01, e


def test_fer_sources_prepare_generates_synthetic_and_reports_pending(tmp_path):
    out = fer_data.prepare_fer_sources(
        ["synthetic", "rafdb"], tmp_path,
        SyntheticFerParams(subjects=2, test_subjects=1, frames_per_expression=1,
                           frame_size=32))
    assert "fer_synthetic" in out["sources"] and (tmp_path / "synthetic_fer" /
                                                  "labels.csv").is_file()
    assert list(out["pending"]) == ["rafdb"] and "Place in" in out["pending"]["rafdb"]
