"""AU readers, AU sets, folds and AU shards on tiny fixtures in each dataset's on-disk format."""
from __future__ import annotations

import io
import json
import logging
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline import au_data
from pipeline.au_data import (BP4D_AUS, BP4D_PLUS_COMPACT_ORDER, DISFA_AUS, PUBLISHED_PARTS,
                              SYNTHETIC_AUS, build_au_shards, fold_shards, fold_subjects,
                              load_index, read_au_dataset, read_bp4d_layout, read_disfa,
                              read_meta, synthetic_parts)
from pipeline.params import AU_DATASET_PARTS, AuShardsParams


def _jpg(path: Path, seed: int, size: tuple[int, int] = (20, 16)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)


def _csv(path: Path, rows: list[list]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(",".join(map(str, r)) for r in rows) + "\n")


def _bp4d_subject(root: Path, subject: str, task: str, frames: list[int], aus, seed: int,
                  missing: tuple[int, ...] = (), pad: int = 4) -> dict[int, list[int]]:
    """Header + one row per frame with labels drawn from {0, 1, 9}; returns {frame: row}."""
    rng = np.random.default_rng(seed)
    table = {f: [int(v) for v in rng.choice([0, 1, 9], size=len(aus))] for f in frames}
    _csv(root / "AUCoding" / "AU_OCC" / f"{subject}_{task}.csv",
         [[0, *aus]] + [[f, *table[f]] for f in frames])
    for f in frames:
        if f not in missing:
            _jpg(root / subject / task / f"{f:0{pad}d}.jpg", seed * 1000 + f)
    return table


# --------------------------------------------------------------------------- readers
def test_bp4d_reader_unknown_and_missing_frames(tmp_path, caplog):
    root = tmp_path / "bp4d"
    header = [0, 1, 2, 4, 6, 7, 10, 12, 14, 15, 17, 23, 24]
    _csv(root / "AUCoding/AU_OCC/F001_T1.csv", [
        header,
        [1, 1, 0, 9, 0, 0, 0, 1, 0, 0, 0, 0, 9],
        [2, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1],
        [3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        [10, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9],
    ])
    # zero padding of different widths in one folder; frame 3 has no image
    _jpg(root / "F001/T1/001.jpg", 1)
    _jpg(root / "F001/T1/0002.jpg", 2)
    _jpg(root / "F001/T1/10.jpg", 3)
    counts: Counter = Counter()
    with caplog.at_level(logging.WARNING):
        recs = list(read_bp4d_layout(root, "bp4d", counts=counts))
    assert [r.frame for r in recs] == [1, 2, 10]
    assert counts["missing_frames"] == 1 and counts["label_rows"] == 4
    assert any("have no image" in m for m in caplog.messages)
    assert recs[0].labels.dtype == np.int8
    assert recs[0].labels.tolist() == [1, 0, -1, 0, 0, 0, 1, 0, 0, 0, 0, -1]
    assert recs[2].labels.tolist() == [-1] * 12
    assert recs[1].key == "F001_T1_2" and recs[1].image.name == "0002.jpg"
    assert recs[0].load().size == (20, 16)


def test_columns_selected_by_header_and_missing_au(tmp_path):
    root = tmp_path / "bp4d"
    # shuffled AU order with extra AUs (3, 5, 27): values must follow the header, not position
    header = [0, 24, 3, 1, 2, 4, 5, 6, 7, 10, 12, 14, 15, 17, 23, 27]
    row = [7, 1, 1, 0, 1, 0, 1, 1, 0, 1, 0, 1, 0, 1, 0, 1]
    _csv(root / "AUCoding/AU_OCC/M002_T3.csv", [header, row])
    _jpg(root / "M002/T3/7.jpg", 0)
    (rec,) = read_bp4d_layout(root, "bp4d")
    by_au = dict(zip(header[1:], row[1:]))
    assert rec.labels.tolist() == [by_au[a] for a in BP4D_AUS]

    _csv(root / "AUCoding/AU_OCC/M002_T3.csv",
         [[0, *[a for a in BP4D_AUS if a != 24]], [7, *[0] * 11]])
    with pytest.raises(ValueError, match=r"M002_T3\.csv.*AU24"):
        list(read_bp4d_layout(root, "bp4d"))

    _csv(root / "AUCoding/AU_OCC/M002_T3.csv", [[7, *[0] * 12]])
    with pytest.raises(ValueError, match="no header row.*bp4d_plus"):
        list(read_bp4d_layout(root, "bp4d"))


def test_bp4d_plus_compact_and_header_csv(tmp_path):
    root = tmp_path / "bp4d_plus"
    # headerless compact: 1-based frame then 22 AUs in the published order; column j holds j%2
    # for frames 1 and 1-(j%2) for frame 2, so every selected column is checked
    row1 = [1, *[j % 2 for j in range(1, 23)]]
    row2 = [2, *[1 - j % 2 for j in range(1, 23)]]
    _csv(root / "AUCoding/AU_OCC/F040_T1.csv", [row1, row2])
    _jpg(root / "F040/T1/1.jpg", 1)
    _jpg(root / "F040/T1/2.jpg", 2)
    # a second subject whose file has a header: read by header
    _csv(root / "AUCoding/AU_OCC/M040_T6.csv",
         [["", *BP4D_AUS], [5, *[1] * 6, *[9] * 6]])
    _jpg(root / "M040/T6/00005.jpg", 3)
    recs = list(read_au_dataset("bp4d_plus", root))
    assert [(r.subject, r.frame) for r in recs] == [("F040", 1), ("F040", 2), ("M040", 5)]
    cols = [BP4D_PLUS_COMPACT_ORDER.index(a) + 1 for a in BP4D_AUS]
    assert cols == [1, 2, 3, 5, 6, 8, 10, 12, 13, 15, 20, 21]
    assert recs[0].labels.tolist() == [row1[c] for c in cols]
    assert recs[1].labels.tolist() == [row2[c] for c in cols]
    assert recs[2].labels.tolist() == [1] * 6 + [-1] * 6


def _disfa(root: Path, subject: str, intens: dict[int, list[int]], frames: list[int],
           rows: int = 4) -> None:
    """intens: AU -> intensity per frame (frames 1..n, other AUs: ``rows`` zeros); images for
    ``frames``."""
    for au in DISFA_AUS:
        vals = intens.get(au, [0] * rows)
        lines = [f"{i},{v}" for i, v in enumerate(vals, start=1)]
        p = root / "ActionUnit_Labels" / subject / f"{subject}_au{au}.txt"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("\n".join(lines) + "\n")
    for f in frames:
        _jpg(root / "Images_RightCamera" / subject / f"{f}.jpg", f)


def test_disfa_intensity_threshold(tmp_path):
    root = tmp_path / "disfa"
    _disfa(root, "SN001", {1: [0, 1, 2, 5], 12: [3, 2, 1, 0], 26: [1, 1, 1]}, [1, 2, 3, 4])
    counts: Counter = Counter()
    recs = list(read_disfa(root, camera="right", threshold=2, counts=counts))
    assert [r.frame for r in recs] == [1, 2, 3, 4] and recs[0].task == "right"
    i1, i12, i26 = DISFA_AUS.index(1), DISFA_AUS.index(12), DISFA_AUS.index(26)
    assert [r.labels[i1] for r in recs] == [0, 0, 1, 1]
    assert [r.labels[i12] for r in recs] == [1, 1, 0, 0]
    # AU26's file has no line for frame 4: unknown, not negative
    assert [r.labels[i26] for r in recs] == [0, 0, 0, -1]
    # a higher threshold flips intensity 2 to negative
    recs3 = list(read_disfa(root, threshold=3))
    assert [r.labels[i1] for r in recs3] == [0, 0, 0, 1]
    with pytest.raises(FileNotFoundError, match="Videos_LeftCamera.*LeftVideoSNxxx_comp.avi"
                       ".*Images_LeftCamera/SNxxx/<frame>.jpg"):
        list(read_disfa(root, camera="left"))


def _shade(k: int) -> np.ndarray:
    """Video frame k's (0 <= k < 30) solid RGB colour; neighbours differ by 7 levels."""
    return np.array([20 + 7 * k, 220 - 7 * k, 60 + 5 * (k % 20)], dtype=np.uint8)


def _shade_of(im: Image.Image, tol: float = 3) -> int:
    """Which video frame a (decoded, maybe resized and re-encoded) image shows."""
    mean = np.asarray(im.convert("RGB"), dtype=np.float64).reshape(-1, 3).mean(0)
    d = [np.abs(mean - _shade(k)).max() for k in range(30)]
    assert min(d) < tol, mean
    return int(np.argmin(d))


def _disfa_video(root: Path, subject: str, n: int, camera: str = "Right") -> Path:
    """``Videos_<camera>Camera/<camera>Video<subject>_comp.avi``: n mjpeg frames of 32x24,
    frame k (0-based) a solid ``_shade(k)``."""
    import av
    path = root / f"Videos_{camera}Camera" / f"{camera}Video{subject}_comp.avi"
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as c:
        s = c.add_stream("mjpeg", rate=25)
        s.width, s.height, s.pix_fmt = 32, 24, "yuvj444p"
        for k in range(n):
            a = np.broadcast_to(_shade(k), (24, 32, 3)).copy()
            for p in s.encode(av.VideoFrame.from_ndarray(a, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path


def test_disfa_from_video(tmp_path):
    root = tmp_path / "disfa"
    _disfa(root, "SN001", {1: [0, 1, 2, 5, 3, 0], 12: [3, 2, 1, 0, 0, 4]}, [], rows=6)
    video = _disfa_video(root, "SN001", 6)
    assert not (root / "Images_RightCamera").exists()
    counts: Counter = Counter()
    recs = list(read_disfa(root, counts=counts))
    assert [r.frame for r in recs] == [1, 2, 3, 4, 5, 6]
    assert [r.video_frame for r in recs] == [0, 1, 2, 3, 4, 5]
    assert all(r.image == video and r.task == "right" for r in recs)
    assert counts["label_rows"] == 6 and counts["missing_frames"] == 0
    i1, i12 = DISFA_AUS.index(1), DISFA_AUS.index(12)
    assert [r.labels[i1] for r in recs] == [0, 0, 1, 1, 1, 0]
    assert [r.labels[i12] for r in recs] == [1, 1, 0, 0, 0, 1]
    # label frame k shows the video's k-th frame: in order, the video is decoded once ...
    from pipeline import video as video_mod
    video_mod.close_cached()
    assert [_shade_of(r.load()) for r in recs] == [0, 1, 2, 3, 4, 5]
    assert (video_mod._cached[1].opens, video_mod._cached[1].decoded) == (1, 6)
    # ... and going back re-reads it
    assert _shade_of(recs[1].load(draft=16)) == 1 and recs[1].load().size == (32, 24)
    assert recs[2].load().size == (32, 24)
    cropped = au_data.AuRecord("disfa", "SN001", "right", 4, video, recs[3].labels,
                               crop=lambda im: im.crop((0, 0, 8, 8)), video_frame=3)
    assert cropped.load().size == (8, 8) and _shade_of(cropped.load()) == 3

    # through the shards: each sample's image is its labelled video frame
    out = tmp_path / "out"
    meta = build_au_shards("disfa", root, out, AuShardsParams(image_size=16, workers=1),
                           progress=False)
    assert meta["counts"]["frames"] == 6 and meta["counts"]["missing_frames"] == 0
    index = load_index(out)
    assert list(index["key"]) == [f"SN001_right_{k}" for k in range(1, 7)]
    (tar,) = sorted(set(index["shard"]))
    samples = _read_tar(out / tar)
    for k in range(1, 7):
        im = Image.open(io.BytesIO(samples[f"SN001_right_{k}"]["jpg"]))
        assert im.size == (16, 16) and _shade_of(im, tol=5) == k - 1


def test_disfa_video_length_mismatch(tmp_path, caplog):
    root = tmp_path / "disfa"
    _disfa(root, "SN001", {}, [], rows=8)
    _disfa_video(root, "SN001", 6)  # 2 labelled frames short
    _disfa(root, "SN002", {}, [], rows=8)
    _disfa_video(root, "SN002", 10)  # 2 unlabelled frames at the end
    counts: Counter = Counter()
    with caplog.at_level(logging.WARNING):
        recs = list(read_disfa(root, counts=counts))
    assert [(r.subject, r.frame) for r in recs] == (
        [("SN001", k) for k in range(1, 7)] + [("SN002", k) for k in range(1, 9)])
    assert counts["label_rows"] == 16 and counts["missing_frames"] == 2
    short = [m for m in caplog.messages if "RightVideoSN001_comp.avi" in m]
    long = [m for m in caplog.messages if "RightVideoSN002_comp.avi" in m]
    assert len(short) == len(long) == 1
    assert "has 6 frames but the labels have 8 rows" in short[0]
    assert "2 labelled frames are not in the video" in short[0]
    assert "has 10 frames but the labels have 8 rows" in long[0]
    assert "last 2 frames have no labels and are ignored" in long[0]
    assert _shade_of(recs[-1].load()) == 7


def test_disfa_extracted_frames_win_and_missing_subject(tmp_path, caplog):
    root = tmp_path / "disfa"
    _disfa(root, "SN001", {}, [1, 2, 3, 4])  # extracted frames ...
    _disfa_video(root, "SN001", 4)  # ... and the video: frames are used, as before
    _disfa(root, "SN002", {}, [])
    _disfa_video(root, "SN002", 4)  # only the video
    _disfa(root, "SN003", {}, [])  # neither
    counts: Counter = Counter()
    with caplog.at_level(logging.WARNING):
        recs = list(read_disfa(root, counts=counts))
    by = {s: [r for r in recs if r.subject == s] for s in ("SN001", "SN002", "SN003")}
    assert [(r.image.name, r.video_frame) for r in by["SN001"]] == [
        (f"{k}.jpg", None) for k in range(1, 5)]
    assert [(r.image.name, r.video_frame) for r in by["SN002"]] == [
        ("RightVideoSN002_comp.avi", k) for k in range(4)]
    assert by["SN003"] == [] and counts["missing_frames"] == 4
    assert any("SN003" in m and "no video" in m and "RightVideoSN003_comp.avi" in m
               for m in caplog.messages)
    (root / "Videos_RightCamera" / "RightVideoSN002_comp.avi").write_bytes(b"garbage" * 20)
    with pytest.raises(ValueError, match=r"RightVideoSN002_comp\.avi: cannot open"):
        list(read_disfa(root, subjects=["SN002"]))


# --------------------------------------------------------------------------- folds
@pytest.mark.parametrize("dataset,n_subjects", [("bp4d", 41), ("bp4d_plus", 140),
                                                ("disfa", 27)])
def test_published_parts(dataset, n_subjects):
    parts = PUBLISHED_PARTS[dataset]
    assert sorted(parts) == list(range(1, AU_DATASET_PARTS[dataset] + 1))
    everyone = [s for v in parts.values() for s in v]
    assert len(everyone) == len(set(everyone)) == n_subjects  # disjoint and complete
    for k in parts:
        f = fold_subjects(dataset, k, val_fraction=0.2, seed=3)
        plain = fold_subjects(dataset, k)
        assert f["test"] == parts[k] == plain["test"]
        assert not set(f["train"]) & set(f["test"]) and not set(f["val"]) & set(f["train"])
        assert set(f["val"]) < set(plain["train"]) and f["val"]
        assert set(f["train"]) | set(f["val"]) == set(plain["train"])
        assert set(plain["train"]) | set(plain["test"]) == set(everyone)
        assert plain["val"] == []
        assert fold_subjects(dataset, k, val_fraction=0.2, seed=3) == f


def test_fold_errors():
    with pytest.raises(ValueError, match="unknown AU dataset 'ckplus'.*bp4d"):
        fold_subjects("ckplus", 1)
    with pytest.raises(ValueError, match=r"bp4d has no fold 4.*1, 2, 3"):
        fold_subjects("bp4d", 4)
    with pytest.raises(ValueError, match="bp4d_plus has no fold 0"):
        fold_subjects("bp4d_plus", 0)
    with pytest.raises(ValueError, match="read_meta"):
        fold_subjects("synthetic", 1)
    meta = {"dataset": "synthetic", "parts": {"1": ["F001"], "2": ["M001"]}}
    with pytest.raises(ValueError, match="synthetic has no fold 3.*1, 2"):
        fold_subjects(meta, 3)


def test_synthetic_parts_round_robin():
    subs = ["M002", "F001", "M001", "F002", "F003"]
    parts = synthetic_parts(subs, 2)
    assert parts == {1: ["F001", "F003", "M002"], 2: ["F002", "M001"]}
    assert synthetic_parts(reversed(subs), 2) == parts
    with pytest.raises(ValueError, match="cannot fill"):
        synthetic_parts(subs, 6)


# --------------------------------------------------------------------------- shards
def _synthetic_root(root: Path) -> None:
    """6 subjects x 2 tasks x 3 frames in the synthetic BP4D layout; one frame missing on
    disk, one corrupt."""
    for i, subject in enumerate(["F001", "F002", "F003", "M001", "M002", "M003"]):
        for t in ("T1", "T2"):
            _bp4d_subject(root, subject, t, [1, 2, 3], SYNTHETIC_AUS, seed=i * 10 + int(t[1]),
                          missing=(3,) if (subject, t) == ("M002", "T2") else ())
    (root / "F003/T2/0002.jpg").write_bytes(b"not a jpeg")


def _read_tar(path: Path) -> dict[str, dict[str, bytes]]:
    out: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tf:
        for m in tf.getmembers():
            assert m.mtime == 0 and m.uid == 0
            key, ext = m.name.split(".", 1)
            out.setdefault(key, {})[ext] = tf.extractfile(m).read()
    return out


def test_au_shards_contract_determinism_and_folds(tmp_path):
    root = tmp_path / "au"
    _synthetic_root(root)
    cfg = AuShardsParams(image_size=24, jpeg_quality=90, samples_per_shard=4,
                         synthetic_parts=3, workers=1)
    meta = build_au_shards("synthetic", root, tmp_path / "a", cfg, progress=False)
    # same bytes from a second run with two worker processes
    build_au_shards("synthetic", root, tmp_path / "b", AuShardsParams(
        image_size=24, jpeg_quality=90, samples_per_shard=4, synthetic_parts=3, workers=2),
        progress=False)
    files_a = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files_a == sorted(p.name for p in (tmp_path / "b").iterdir())
    for name in files_a:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name

    out = tmp_path / "a"
    assert read_meta(out) == meta
    assert meta["aus"] == list(SYNTHETIC_AUS)
    assert meta["counts"]["frames"] == 36 - 2
    assert meta["counts"]["missing_frames"] == 1 and meta["counts"]["unreadable_frames"] == 1
    assert meta["parts"] == {"1": ["F001", "M001"], "2": ["F002", "M002"],
                             "3": ["F003", "M003"]}
    index = load_index(out)
    assert len(index) == 34 and index["AU1"].dtype == np.int8
    assert index["key"].is_unique
    # every index row is in the named tar, with the same labels as the sample's json
    tars = {name: _read_tar(out / name) for name in sorted(set(index["shard"]))}
    assert sorted(p.name for p in out.glob("*.tar")) == sorted(tars)
    assert sum(len(t) for t in tars.values()) == len(index)
    assert max(len(t) for t in tars.values()) == 4
    for row in index.itertuples(index=False):
        sample = tars[row.shard][row.key]
        assert row.shard.startswith(f"{row.subject}-")
        js = json.loads(sample["json"])
        assert (js["subject"], js["task"], js["frame"]) == (row.subject, row.task, row.frame)
        assert js["labels"] == [getattr(row, f"AU{a}") for a in SYNTHETIC_AUS]
        assert Image.open(io.BytesIO(sample["jpg"])).size == (24, 24)
    assert "F003_T2_2" not in set(index["key"]) and "M002_T2_3" not in set(index["key"])
    # labels survive from CSV to index (9 -> -1)
    table = _bp4d_subject(tmp_path / "check", "F001", "T1", [1, 2, 3], SYNTHETIC_AUS, seed=1)
    got = index.set_index("key").loc["F001_T1_2", [f"AU{a}" for a in SYNTHETIC_AUS]].tolist()
    assert got == [-1 if v == 9 else v for v in table[2]]

    for fold in (1, 2, 3):
        urls, subs, n = fold_shards(out, fold, "test")
        assert subs == meta["parts"][str(fold)]
        assert {Path(u).name.split("-")[0] for u in urls} == set(subs)
        assert n == int(index["subject"].isin(subs).sum())
        tr_urls, tr_subs, tr_n = fold_shards(out, fold, "train")
        assert not set(tr_urls) & set(urls) and tr_n + n == len(index)
    urls, subs, n = fold_shards(out, 1, "val", val_fraction=0.25, seed=0)
    tr_urls, tr_subs, _ = fold_shards(out, 1, "train", val_fraction=0.25, seed=0)
    assert len(subs) == 1 and not set(subs) & set(tr_subs) and set(subs) <= {
        "F002", "M002", "F003", "M003"}
    with pytest.raises(ValueError, match="split 'dev'"):
        fold_shards(out, 1, "dev")


def test_au_shards_partial_bp4d_copy(tmp_path, caplog):
    root = tmp_path / "bp4d"
    for i, s in enumerate(["F001", "F003", "F004", "X999"]):
        _bp4d_subject(root, s, "T1", [1, 2], BP4D_AUS, seed=i)
    cfg = AuShardsParams(image_size=16, samples_per_shard=10, workers=1)
    with caplog.at_level(logging.WARNING):
        meta = build_au_shards("bp4d", root, tmp_path / "out", cfg, progress=False)
    assert meta["parts"] == {"1": ["F001"], "2": ["F003"], "3": ["F004"]}
    assert meta["subjects"] == ["F001", "F003", "F004"]
    assert meta["counts"]["subjects_not_in_parts"] == 1
    assert meta["counts"]["part_subjects_missing"] == 41 - 3
    text = "\n".join(caplog.messages)
    assert "X999" in text and "not on disk" in text and "146847" in text
    assert fold_subjects(meta, 2) == {"train": ["F001", "F004"], "val": [], "test": ["F003"]}


def test_missing_root_is_explained(tmp_path):
    with pytest.raises(FileNotFoundError, match="AUCoding/AU_OCC"):
        list(au_data.read_bp4d_layout(tmp_path, "bp4d"))
    with pytest.raises(FileNotFoundError, match="bp4d root missing"):
        build_au_shards("bp4d", tmp_path / "nope", tmp_path / "out", AuShardsParams())
