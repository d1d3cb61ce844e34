"""Tests for pipeline/synthetic.py: the built-in synthetic faces (tiny configs, CPU, offline)."""
from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from pipeline import synthetic as S
from pipeline.params import SyntheticParams

TINY = dict(subjects=12, tasks=2, frames_per_task=20, frame_size=32, pool_images=20,
            pool_broken=7)


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two runs with seed 3 and one with seed 4, into fresh folders."""
    base = tmp_path_factory.mktemp("synthetic")
    out = {}
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        out[name] = (base / name, S.generate(base / name, SyntheticParams(**TINY, seed=seed),
                                             progress=False))
    return out


def _read_labels(csv_path: Path) -> tuple[list[str], np.ndarray]:
    with open(csv_path, newline="") as f:
        rows = list(csv.reader(f))
    return rows[0], np.array(rows[1:], dtype=np.int64)


def test_same_seed_gives_identical_bytes_and_another_seed_differs(runs):
    (a, man_a), (b, man_b), (c, man_c) = runs["a"], runs["b"], runs["c"]
    tree_a, tree_b, tree_c = _tree(a), _tree(b), _tree(c)
    assert tree_a.keys() == tree_b.keys()
    assert [k for k in tree_a if tree_a[k] != tree_b[k]] == []
    assert man_a == man_b == json.loads(tree_a["manifest.json"])
    # Another seed: other labels, other faces, other pool.
    assert man_c["base_rates"] != man_a["base_rates"]
    csv_name = "au/AUCoding/AU_OCC/F001_T1.csv"
    assert tree_c[csv_name] != tree_a[csv_name]
    pool_a = {k: v for k, v in tree_a.items() if k.startswith("pool/") and len(v) > 1000}
    assert sum(tree_c.get(k) == v for k, v in pool_a.items()) == 0
    frame_a = next(k for k in tree_a if k.startswith("au/F001/T1/"))
    frame_c = next(k for k in tree_c if k.startswith("au/F001/T1/"))
    assert tree_a[frame_a] != tree_c[frame_c]


def test_au_layout_matches_bp4d(runs):
    root, man = runs["a"]
    cfg = SyntheticParams(**TINY, seed=3)
    assert man["subjects"] == S.subject_ids(cfg.subjects)
    assert {s[0] for s in man["subjects"]} == {"F", "M"}
    assert man["aus"] == list(S.AUS)
    assert man["counts"]["au_frames"] == cfg.subjects * cfg.tasks * cfg.frames_per_task
    n_nine = 0
    for sid in man["subjects"]:
        for t in range(1, cfg.tasks + 1):
            frames = sorted((root / "au" / sid / f"T{t}").iterdir())
            assert len(frames) == cfg.frames_per_task
            assert all(re.fullmatch(r"\d{4,}\.jpg", p.name) for p in frames)
            header, lab = _read_labels(root / "au" / "AUCoding" / "AU_OCC" / f"{sid}_T{t}.csv")
            assert ",".join(header) == "0,1,2,4,6,7,9,10,12,14,15,17,23,24,25,26"
            # Column "0" holds the frame numbers, which name the frame files.
            assert [f"{n:04d}.jpg" for n in lab[:, 0]] == [p.name for p in frames]
            assert set(np.unique(lab[:, 1:])) <= {0, 1, 9}
            n_nine += int((lab[:, 1:] == 9).sum())
    assert n_nine > 0
    assert n_nine == man["counts"]["not_coded_cells"]
    with Image.open(frames[0]) as im:
        assert (im.format, im.mode, im.size) == ("JPEG", "RGB", S.au_frame_size(cfg))
    assert S.au_frame_size(cfg) == ((43, 32) if cfg.wild else (32, 32))  # 4:3 wild frames
    boxes = (root / "au" / S.FACE_BOXES).read_text().splitlines()
    assert boxes[0] == "subject,task,frame,x0,y0,x1,y1"
    assert len(boxes) == 1 + man["counts"]["au_frames"]


def test_subject_base_rates_differ_and_labels_form_episodes(runs):
    root, man = runs["a"]
    rates, flips, expected_flips = [], 0.0, 0.0
    for sid in man["subjects"]:
        labs = [_read_labels(p)[1][:, 1:] for p in
                sorted((root / "au" / "AUCoding" / "AU_OCC").glob(f"{sid}_T*.csv"))]
        allv = np.concatenate(labs).astype(float)
        coded = allv != 9
        r = np.where(coded, allv == 1, 0).sum(0) / np.maximum(coded.sum(0), 1)
        rates.append(r)
        # The manifest reports the same rates.
        assert np.allclose(r, [man["base_rates"][sid][f"AU{a}"] for a in S.AUS], atol=1e-4)
        for lab in labs:
            for j in range(lab.shape[1]):
                v = lab[:, j][lab[:, j] != 9]
                if len(v) > 1:
                    p = v.mean()
                    flips += np.count_nonzero(np.diff(v))
                    expected_flips += 2 * p * (1 - p) * (len(v) - 1)
    rates = np.array(rates)                                   # [subjects, AUs]
    spread = rates.max(0) - rates.min(0)
    assert np.median(spread) > 0.3, spread                    # identity predicts AUs
    assert spread.max() > 0.6, spread
    # Episodes: far fewer on/off switches than independent per-frame labels would give.
    assert flips < 0.5 * expected_flips, (flips, expected_flips)


@pytest.mark.parametrize("au", S.AUS)
def test_each_au_changes_its_own_face_region_at_64px(au):
    shot = S.Shot()  # frontal, no noise: only the AU differs between the two renders
    mask = S.region_mask(au, shot, 64)
    for k in range(3):
        traits = S.sample_traits(np.random.default_rng(100 + k), "FM"[k % 2])

        def at64(aus):
            img = S.render_face(traits, aus, shot, 128).resize((64, 64), Image.Resampling.BILINEAR)
            return np.asarray(img, dtype=np.float64)

        off = at64({})
        diff = np.abs(at64({au: 1.0}) - off).mean(axis=2)     # [64, 64]
        half = np.abs(at64({au: 0.5}) - off).mean(axis=2)
        inside, outside = diff[mask].mean(), diff[~mask].mean()
        assert diff.max() > 8.0, (au, k, diff.max())          # visible after downscaling
        assert diff[mask].sum() >= 0.95 * diff.sum(), (au, k)  # localized
        assert inside > 10 * outside + 0.1, (au, k, inside, outside)
        assert 0 < half.sum() < diff.sum(), (au, k)           # intensity is graded


def test_render_ignores_other_aus_outside_their_regions():
    """The renderer's AU parameters are independent: switching AU12 on in a face that already
    shows AU1 changes only the mouth region."""
    shot = S.Shot()
    traits = S.sample_traits(np.random.default_rng(7), "F")
    a = np.asarray(S.render_face(traits, {1: 1.0}, shot, 96), dtype=np.float64)
    b = np.asarray(S.render_face(traits, {1: 1.0, 12: 1.0}, shot, 96), dtype=np.float64)
    diff = np.abs(a - b).mean(axis=2)
    assert diff[~S.region_mask(12, shot, 96)].max() == 0
    assert diff.max() > 20


def test_pool_has_aspect_variety_odd_files_and_identities(runs):
    root, man = runs["a"]
    pool = root / "pool"
    odd = man["pool_odd_files"]
    assert sorted(odd.values()) == sorted(S.ODD_KINDS)
    by_kind = {k: pool / n for n, k in odd.items()}
    for kind in ("truncated_jpeg", "not_an_image", "empty_file"):
        with pytest.raises(OSError):  # UnidentifiedImageError is an OSError too
            with Image.open(by_kind[kind]) as im:
                im.load()
    assert by_kind["empty_file"].stat().st_size == 0
    modes = {}
    for kind in ("cmyk_jpeg", "grayscale_png", "gray16_png", "exif_rotated_jpeg"):
        with Image.open(by_kind[kind]) as im:
            im.load()
            modes[kind] = im.mode
            if kind == "exif_rotated_jpeg":
                assert im.getexif().get(0x0112) == 6
                stored = im.size
                upright = ImageOps.exif_transpose(im).size
    assert modes == {"cmyk_jpeg": "CMYK", "grayscale_png": "L", "gray16_png": "I;16",
                     "exif_rotated_jpeg": "RGB"}
    assert stored[0] > stored[1] and upright == stored[::-1]   # stored sideways

    ratios, formats = [], set()
    for p in sorted(pool.iterdir()):
        if p.name in odd or p.suffix == ".csv":
            continue
        with Image.open(p) as im:
            formats.add(im.format)
            ratios.append(max(im.size) / min(im.size))
            assert min(im.size) >= 96 and max(im.size) <= 640
    assert len(ratios) == TINY["pool_images"]
    assert formats == {"JPEG", "PNG"}
    assert any(r > 1.5 for r in ratios) and any(r == 1.5 for r in ratios)
    assert any(r < 1.5 for r in ratios)
    assert sum(r > 1.5 for r in ratios) == man["counts"]["pool_aspect_over_1_5"]

    with open(pool / "identities.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    keyed = {r["key"]: r["identity"] for r in rows}
    regular = [p.name for p in pool.iterdir() if p.name not in odd and p.suffix != ".csv"]
    assert set(regular) <= set(keyed)
    assert all(re.fullmatch(r"W\d{5}", v) for v in keyed.values())
    assert not set(keyed.values()) & set(man["subjects"])    # pool never shows AU subjects


def test_contact_sheet_is_a_valid_png(runs):
    root, _ = runs["a"]
    path = root / "contact_sheet.png"
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG" and im.width > 600 and im.height > 600
        arr = np.asarray(im.convert("L"))
    assert arr.std() > 20  # not blank


def test_rerun_is_cheap_repairs_missing_files_and_drops_stale_ones(tmp_path):
    small = dict(tasks=1, frames_per_task=3, frame_size=32, pool_images=10, pool_broken=0)
    out = tmp_path / "syn"
    S.generate(out, SyntheticParams(subjects=4, **small), progress=False)
    assert (out / "au" / "M002").is_dir()
    man = S.generate(out, SyntheticParams(subjects=3, **small), progress=False)
    assert not (out / "au" / "M002").exists()                 # stale subject removed
    assert not list((out / "au" / "AUCoding" / "AU_OCC").glob("M002_*"))
    frame = sorted((out / "au" / "F002" / "T1").iterdir())[0]
    before, stamp = frame.read_bytes(), frame.stat().st_mtime_ns
    assert S.generate(out, SyntheticParams(subjects=3, **small), progress=False) == man
    assert frame.stat().st_mtime_ns == stamp                  # complete: nothing rewritten
    frame.unlink()
    assert S.generate(out, SyntheticParams(subjects=3, **small), progress=False) == man
    assert frame.read_bytes() == before                       # repaired, same bytes
    assert not list(out.rglob(".tmp-*"))
