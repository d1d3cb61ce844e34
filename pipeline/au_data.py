"""AU datasets: label readers, AU sets, subject-exclusive folds and AU WebDataset shards.

Implements the data side of the paper's AU detection benchmarks (paper section 4.1, "AU
detection": BP4D, BP4D+ and DISFA with subject-exclusive 3/4/3-fold cross-validation) following
the public protocol facts in ``/work/shared/reference/protocols.md``:

- AU sets: BP4D and BP4D+ 12 AUs, DISFA 8 AUs (positive when intensity >= a threshold, 2 by
  default), the built-in synthetic set 15 AUs (written in the BP4D layout).
- Readers for each dataset's on-disk layout, yielding :class:`AuRecord` (one labelled frame;
  label -1 = not coded / unknown). BP4D's "9" is read as -1; whether unknown counts as absent
  or is masked out is the finetuning stage's choice (``finetune.unknown_labels``).
- DISFA frames are decoded straight from its videos (``Videos_<Left|Right>Camera/*.avi``, via
  :mod:`pipeline.video`), or read from extracted frames (``Images_<Left|Right>Camera``) where
  a subject has them.
- The published subject-exclusive parts; fold k tests on part k and trains on the others
  (folds are named by their test part because repositories number them differently).
- :func:`build_au_shards` writes the ``data/au_shards/<dataset>/`` contract of docs/design.md:
  per-subject deterministic tars, ``index.parquet`` and ``meta.json``; :func:`fold_shards`
  gives the finetuning code the shard URLs of one fold's split.

Face cropping: FMAE-IAT detects the face box, enlarges it by 5% per side and crops. No face
detector ships offline here, so readers take an optional ``crop(PIL.Image) -> PIL.Image``
(return ``None`` when no face is found: the frame is skipped and counted); without one the whole
frame is resized (a plain, aspect-changing resize, as the pretraining shards).
"""
from __future__ import annotations

import csv
import io
import json
import logging
import os
import pickle
import random
import re
import tarfile
from collections import Counter
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field, replace
from multiprocessing import get_context
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping

import numpy as np
import pandas as pd
from PIL import Image
from tqdm import tqdm

from pipeline.faces import BoxCrop
from pipeline.io import atomic_path, atomic_write_json, read_json, setup_logging
from pipeline.params import AuShardsParams

log = logging.getLogger(__name__)

Crop = Callable[[Image.Image], "Image.Image | None"]

# --------------------------------------------------------------------------- AU sets
BP4D_AUS: tuple[int, ...] = (1, 2, 4, 6, 7, 10, 12, 14, 15, 17, 23, 24)
DISFA_AUS: tuple[int, ...] = (1, 2, 4, 6, 9, 12, 25, 26)
SYNTHETIC_AUS: tuple[int, ...] = (1, 2, 4, 6, 7, 9, 10, 12, 14, 15, 17, 23, 24, 25, 26)
AU_SETS: dict[str, tuple[int, ...]] = {
    "synthetic": SYNTHETIC_AUS, "bp4d": BP4D_AUS, "bp4d_plus": BP4D_AUS, "disfa": DISFA_AUS,
}
DATASETS: tuple[str, ...] = tuple(AU_SETS)

# BP4D+ compact AU_OCC columns without a header: column 0 = 1-based frame, then these AUs
# (protocols.md); the 12 benchmark AUs sit at columns 1,2,3,5,6,8,10,12,13,15,20,21.
BP4D_PLUS_COMPACT_ORDER: tuple[int, ...] = (
    1, 2, 4, 5, 6, 7, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 22, 23, 24, 27)

# Labelled frames of a complete copy (protocols.md); only compared, as a logged warning.
PUBLISHED_FRAME_COUNTS: dict[str, int] = {"bp4d": 146_847, "bp4d_plus": 197_756,
                                          "disfa": 130_814}

# BP4D "9" = not coded; read as unknown (-1).
_NOT_CODED = 9
_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp"}

# --------------------------------------------------------------------------- folds
# The subject-exclusive parts everyone uses (protocols.md). Fold k = test on part k.
_BP4D_PARTS = {
    1: "F001 F002 F008 F009 F010 F016 F018 F023 M001 M004 M007 M008 M012 M014",
    2: "F003 F005 F011 F013 F020 F022 M002 M005 M010 M011 M013 M016 M017 M018",
    3: "F004 F006 F007 F012 F014 F015 F017 F019 F021 M003 M006 M009 M015",
}
_DISFA_PARTS = {
    1: "SN001 SN002 SN009 SN010 SN016 SN026 SN027 SN030 SN032",
    2: "SN006 SN011 SN012 SN013 SN018 SN021 SN024 SN028 SN031",
    3: "SN003 SN004 SN005 SN007 SN008 SN017 SN023 SN025 SN029",
}
# BP4D+: the random 4-part split published with the FMAE-IAT code (the only public list).
_BP4D_PLUS_PARTS = {
    1: "M040 F072 M015 M029 M003 F076 F053 F026 F044 F066 F057 F061 F071 M050 M033 F079 "
       "F020 M025 F014 F004 F013 M017 F033 M042 M004 F038 F019 M036 M026 M048 F039 F046 M051 "
       "F047 M020",
    2: "F074 F012 F034 M001 F056 F075 M009 M038 F024 M047 F016 M045 M034 M022 F060 M011 "
       "M044 M046 M005 M028 F077 F028 M055 M019 F032 F030 M037 M043 F031 F022 M023 M018 M016 "
       "F065 M052",
    3: "F029 F054 F064 F045 F009 F040 F008 M041 F063 M056 M024 F001 F080 M010 F062 F035 "
       "M054 F052 F027 F043 F042 F050 M057 F078 F058 F017 M035 M030 M027 F021 M031 F069 F002 "
       "M008 F068",
    4: "M058 F037 F010 F023 M007 M002 F025 F073 F048 F041 F051 F011 M032 F005 M021 F018 "
       "M013 M049 M014 F070 F006 F067 M039 M006 F059 F003 F007 F049 M053 F081 F055 M012 F082 "
       "F015 F036",
}
PUBLISHED_PARTS: dict[str, dict[int, list[str]]] = {
    name: {k: sorted(v.split()) for k, v in parts.items()}
    for name, parts in (("bp4d", _BP4D_PARTS), ("bp4d_plus", _BP4D_PLUS_PARTS),
                        ("disfa", _DISFA_PARTS))
}


def au_set(dataset: str) -> tuple[int, ...]:
    """The AU numbers a dataset is evaluated on (protocols.md)."""
    _check_dataset(dataset)
    return AU_SETS[dataset]


def _check_dataset(dataset: str) -> None:
    if dataset not in AU_SETS:
        raise ValueError(f"unknown AU dataset {dataset!r}; known: {', '.join(DATASETS)}")


def synthetic_parts(subjects: Iterable[str], n_parts: int) -> dict[int, list[str]]:
    """Deterministic subject-exclusive parts: sorted subjects dealt round-robin.

    Args:
        subjects: subject ids (duplicates are ignored).
        n_parts: number of parts (>= 2); every part gets at least one subject.
    """
    subs = sorted(set(subjects))
    if n_parts < 2:
        raise ValueError(f"synthetic_parts: n_parts must be >= 2, got {n_parts}")
    if len(subs) < n_parts:
        raise ValueError(f"synthetic_parts: {len(subs)} subjects cannot fill {n_parts} parts; "
                         "lower au_shards.synthetic_parts or raise download.synthetic.subjects")
    return {k + 1: subs[k::n_parts] for k in range(n_parts)}


def fold_subjects(meta_or_dataset: Mapping | str, fold: int, *, val_fraction: float = 0.0,
                  seed: int = 0) -> dict[str, list[str]]:
    """Subjects of fold ``fold`` (= test on part ``fold``), split into train / val / test.

    Args:
        meta_or_dataset: a ``meta.json`` dict (its ``parts``: the subjects actually present) or
            a published dataset name (``bp4d``, ``bp4d_plus``, ``disfa``: the full lists).
        fold: the test part, 1-based.
        val_fraction: share of the training subjects held out as a subject-exclusive
            validation set (0 = none); at least one subject when > 0.
        seed: seed of the deterministic validation draw.

    Returns:
        ``{"train": [...], "val": [...], "test": [...]}``, each sorted; ``val`` is a subset of
        the training subjects the fold would have without validation.
    """
    if isinstance(meta_or_dataset, str):
        dataset = meta_or_dataset
        _check_dataset(dataset)
        if dataset not in PUBLISHED_PARTS:
            raise ValueError(f"fold_subjects: the {dataset!r} parts depend on its subjects; pass "
                             "read_meta(<au_shards dir>) instead of the dataset name")
        parts = PUBLISHED_PARTS[dataset]
    else:
        dataset = str(meta_or_dataset.get("dataset", "?"))
        try:
            parts = {int(k): list(v) for k, v in meta_or_dataset["parts"].items()}
        except (KeyError, AttributeError, ValueError) as e:
            raise ValueError(f"fold_subjects: meta of {dataset!r} has no valid 'parts' ({e}); "
                             "rebuild it with the au_shards stage") from None
    if isinstance(fold, bool) or not isinstance(fold, (int, np.integer)) or int(fold) not in parts:
        raise ValueError(f"fold_subjects: {dataset} has no fold {fold!r}; valid folds: "
                         f"{', '.join(map(str, sorted(parts)))} (fold k tests on part k)")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"fold_subjects: val_fraction must be in [0, 1), got {val_fraction}")
    fold = int(fold)
    test = sorted(parts[fold])
    train = sorted({s for k, v in parts.items() if k != fold for s in v})
    if not test or not train:
        raise ValueError(f"fold_subjects: {dataset} fold {fold} has {len(train)} training and "
                         f"{len(test)} test subjects; a partial copy may lack a whole part")
    val: list[str] = []
    if val_fraction > 0:
        n_val = max(1, round(val_fraction * len(train)))
        if n_val >= len(train):
            raise ValueError(f"fold_subjects: val_fraction {val_fraction} leaves no training "
                             f"subjects ({len(train)} in {dataset} fold {fold})")
        val = sorted(random.Random(seed).sample(train, n_val))
        train = sorted(set(train) - set(val))
    return {"train": train, "val": val, "test": test}


# --------------------------------------------------------------------------- records
@dataclass(frozen=True, eq=False)
class AuRecord:
    """One labelled frame.

    ``labels[i]`` is the label of ``au_set(dataset)[i]``: 1 present, 0 absent, -1 unknown.
    ``image`` is an image file, or a video file when ``video_frame`` (the frame's 0-based
    index in that video, see :mod:`pipeline.video`) is set; ``frame`` stays the dataset's own
    frame number (DISFA: 1-based, ``video_frame = frame - 1``).
    """
    dataset: str
    subject: str
    task: str
    frame: int
    image: Path
    labels: np.ndarray = field(repr=False)  # (n_aus,) int8
    crop: Crop | None = field(default=None, repr=False, compare=False)
    video_frame: int | None = None

    @property
    def key(self) -> str:
        """WebDataset key ``<subject>_<task>_<frame>`` (no dots: webdataset splits on them)."""
        return f"{self.subject}_{self.task}_{self.frame}"

    def load(self, draft: int | None = None) -> Image.Image | None:
        """Decode as RGB, apply the crop; None when the crop found no face.

        Args:
            draft: when set and no crop is used, let libjpeg decode at the smallest DCT scale
                that is still at least ``draft`` pixels on each side (much faster for BP4D's
                1040x1392 frames; the result is resized to ``draft`` anyway). Ignored for
                video frames.

        A video frame is decoded by :func:`pipeline.video.read_frame`, which keeps the last
        video open: loading the records of one video in frame order decodes it once.
        """
        if self.video_frame is not None:
            from pipeline.video import read_frame  # imported here: only video records need av
            im = read_frame(self.image, self.video_frame)
        else:
            with Image.open(self.image) as im:
                if draft and self.crop is None and im.format == "JPEG":
                    im.draft("RGB", (draft, draft))
                im = im.convert("RGB")
        if self.crop is not None:
            im = self.crop(im)
        return im


def _as_int(cell: str) -> int | None:
    s = cell.strip()
    try:
        return int(s)
    except ValueError:
        try:
            f = float(s)  # "2.0" in some exports
        except ValueError:
            return None
        return int(f) if f.is_integer() else None


def _au_number(cell: str) -> int | None:
    """Header cell -> AU number: "12", "AU12" and "au12" all give 12."""
    s = cell.strip()
    if s[:2].lower() == "au":
        s = s[2:]
    return int(s) if s.isdigit() else None


def _looks_like_header(row: list[str]) -> bool:
    """A header row has AU numbers (2, 4, 5...) or names; a data row only 0/1/9 after column 0."""
    first = row[0].strip()
    if first == "" or _as_int(first) is None:
        return True
    vals = [_as_int(c) for c in row[1:]]
    if any(v is None for v in vals):
        return True
    return any(v not in (0, 1, _NOT_CODED) for v in vals)


def _natural_key(s: str) -> tuple:
    """"T2" < "T10": sort tasks by their number parts."""
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s))


def _frame_files(folder: Path) -> dict[int, Path]:
    """Frame number -> image path for a folder of ``<frame>.jpg`` with any zero padding."""
    out: dict[int, Path] = {}
    if not folder.is_dir():
        return out
    for p in sorted(folder.iterdir()):
        if p.suffix.lower() in _IMAGE_SUFFIXES and p.stem.isdigit():
            n = int(p.stem)
            if n in out:
                log.warning("%s: frame %d has two files (%s, %s); using %s", folder, n,
                            out[n].name, p.name, out[n].name)
                continue
            out[n] = p
    return out


def _read_occ_csv(path: Path, aus: tuple[int, ...], *, compact_order: tuple[int, ...] | None
                  ) -> tuple[dict[int, np.ndarray], int]:
    """Read a BP4D-style AU_OCC CSV into {frame: labels (n_aus,) int8}; returns also #duplicates.

    The header row (AU numbers, first column "0" = frame) selects the columns. Without a
    header, ``compact_order`` gives the AUs of columns 1.. (BP4D+); if it is None a header is
    required.
    """
    with open(path, newline="") as f:
        rows = [r for r in csv.reader(f) if r and any(c.strip() for c in r)]
    if not rows:
        raise ValueError(f"{path}: empty AU label file; delete it or restore it from your copy")
    if _looks_like_header(rows[0]):
        header = rows[0]
        col_of: dict[int, int] = {}
        for j, cell in enumerate(header[1:], start=1):
            n = _au_number(cell)
            if n is not None:
                col_of.setdefault(n, j)
        data, first_line = rows[1:], 2
    elif compact_order is not None:
        col_of = {au: j for j, au in enumerate(compact_order, start=1)}
        data, first_line = rows, 1
    else:
        raise ValueError(f"{path}: no header row (expected AU numbers, first column '0' = frame, "
                         f"got {rows[0][:6]}...); BP4D-layout files need one. A headerless "
                         "compact CSV is BP4D+: use dataset 'bp4d_plus'")
    missing = [au for au in aus if au not in col_of]
    if missing:
        raise ValueError(f"{path}: no column for AU{missing[0]} (missing AUs "
                         f"{missing}; the file has AUs {sorted(col_of)}); this dataset needs "
                         f"AUs {list(aus)}")
    cols = [col_of[au] for au in aus]
    need = max(cols) + 1
    out: dict[int, np.ndarray] = {}
    dups = 0
    for i, row in enumerate(data, start=first_line):
        if len(row) < need:
            raise ValueError(f"{path}, line {i}: {len(row)} columns, expected at least {need}")
        frame = _as_int(row[0])
        if frame is None:
            raise ValueError(f"{path}, line {i}: frame number {row[0]!r} is not an integer")
        labels = np.empty(len(cols), dtype=np.int8)
        for k, j in enumerate(cols):
            v = _as_int(row[j])
            if v == _NOT_CODED:
                labels[k] = -1
            elif v in (0, 1):
                labels[k] = v
            else:
                raise ValueError(f"{path}, line {i}, AU{aus[k]}: value {row[j]!r} is not 0, 1 "
                                 "or 9 (not coded)")
        if frame in out:
            dups += 1
            continue
        out[frame] = labels
    return out, dups


def _occ_csvs(root: Path) -> dict[str, list[tuple[str, Path]]]:
    """``AUCoding/AU_OCC/<subject>_<task>.csv`` -> {subject: [(task, path), ...]} (sorted)."""
    occ = root / "AUCoding" / "AU_OCC"
    if not occ.is_dir():
        raise FileNotFoundError(
            f"{occ}: label folder missing; expected the BP4D layout "
            f"<root>/AUCoding/AU_OCC/<subject>_<task>.csv with frames at "
            f"<root>/<subject>/<task>/<frame>.jpg (root = {root})")
    out: dict[str, list[tuple[str, Path]]] = {}
    for p in sorted(occ.glob("*.csv")):
        if "_" not in p.stem:
            log.warning("%s: not named <subject>_<task>.csv; skipped", p)
            continue
        subject, task = p.stem.split("_", 1)
        if "." in subject or "." in task:
            log.warning("%s: subject/task must not contain '.'; skipped", p)
            continue
        out.setdefault(subject, []).append((task, p))
    for v in out.values():
        v.sort(key=lambda t: _natural_key(t[0]))
    return out


def read_bp4d_layout(root: str | Path, dataset: str, *, subjects: Iterable[str] | None = None,
                     crop: Crop | None = None, counts: Counter | None = None
                     ) -> Iterator[AuRecord]:
    """Frames of a BP4D-layout dataset (``bp4d``, ``bp4d_plus`` or ``synthetic``).

    Labels: ``<root>/AUCoding/AU_OCC/<subject>_<task>.csv`` (BP4D+ may be headerless compact
    CSVs, see :data:`BP4D_PLUS_COMPACT_ORDER`); frames: ``<root>/<subject>/<task>/<frame>.jpg``
    matched by integer frame number. Frames listed but missing on disk are skipped, counted in
    ``counts["missing_frames"]`` and warned about once per file.

    Args:
        root: dataset root.
        dataset: which AU set and CSV dialect to use.
        subjects: only these subjects (default: all with label files).
        crop: optional face crop applied by :meth:`AuRecord.load`.
        counts: a Counter receiving ``label_rows``, ``missing_frames``, ``duplicate_rows``.
    """
    if dataset not in ("bp4d", "bp4d_plus", "synthetic"):
        raise ValueError(f"read_bp4d_layout: {dataset!r} is not a BP4D-layout dataset "
                         "(bp4d, bp4d_plus, synthetic)")
    root = Path(root)
    aus = AU_SETS[dataset]
    compact = BP4D_PLUS_COMPACT_ORDER if dataset == "bp4d_plus" else None
    counts = counts if counts is not None else Counter()
    csvs = _occ_csvs(root)
    wanted = sorted(csvs) if subjects is None else sorted(set(subjects))
    for subject in wanted:
        for task, path in csvs.get(subject, []):
            labels, dups = _read_occ_csv(path, aus, compact_order=compact)
            counts["label_rows"] += len(labels)
            if dups:
                counts["duplicate_rows"] += dups
                log.warning("%s: %d duplicated frame rows; kept the first of each", path, dups)
            files = _frame_files(root / subject / task)
            missing = [fr for fr in labels if fr not in files]
            if missing:
                counts["missing_frames"] += len(missing)
                log.warning("%s: %d of %d labelled frames have no image under %s (e.g. frame "
                            "%d); skipped", path.name, len(missing), len(labels),
                            root / subject / task, missing[0])
            for fr in sorted(labels):
                if fr in files:
                    yield AuRecord(dataset, subject, task, fr, files[fr], labels[fr], crop)


def _disfa_images_dir(root: Path, camera: str) -> Path:
    """``Images_<Cam>Camera``: pre-extracted frames ``<SN>/<frame>.jpg`` (may not exist)."""
    if camera not in ("left", "right"):
        raise ValueError(f"DISFA camera must be 'left' or 'right', got {camera!r}")
    return root / f"Images_{camera.capitalize()}Camera"


def _disfa_video(root: Path, camera: str, subject: str) -> Path:
    """``Videos_<Cam>Camera/<Cam>Video<SN>_comp.avi``, e.g. ``RightVideoSN001_comp.avi``."""
    cam = camera.capitalize()
    return root / f"Videos_{cam}Camera" / f"{cam}Video{subject}_comp.avi"


def _read_disfa_au(path: Path) -> dict[int, int]:
    """``frame,intensity`` lines -> {frame: intensity 0-5}."""
    out: dict[int, int] = {}
    with open(path) as f:
        for i, line in enumerate(f, start=1):
            line = line.strip()
            if not line:
                continue
            parts = [p for p in re.split(r"[,\s]+", line) if p]
            vals = [_as_int(p) for p in parts[:2]]
            if len(vals) == 2 and None in vals and i == 1:
                continue  # a header line such as "frame,intensity"
            if len(vals) < 2 or None in vals:
                raise ValueError(f"{path}, line {i}: expected 'frame,intensity', got {line!r}")
            frame, inten = vals
            if not 0 <= inten <= 5:
                raise ValueError(f"{path}, line {i}: intensity {inten} is outside 0-5")
            out.setdefault(frame, inten)
    return out


def read_disfa(root: str | Path, *, camera: str = "right", threshold: int = 2,
               subjects: Iterable[str] | None = None, crop: Crop | None = None,
               counts: Counter | None = None) -> Iterator[AuRecord]:
    """Frames of DISFA: ``ActionUnit_Labels/<SN>/<SN>_au<k>.txt`` + extracted frames or videos.

    Labels are binarised as ``intensity >= threshold``; a frame absent from one AU's file gets
    -1 for that AU. The task is the camera name (``left``/``right``). Per subject, frames come
    from ``Images_<Cam>Camera/<SN>/<frame>.jpg`` (1-based frame numbers, any zero padding) when
    that folder holds frames, else straight from ``Videos_<Cam>Camera/<Cam>Video<SN>_comp.avi``:
    label frame k is video frame k-1 (records carry ``video_frame``; decoding happens in
    :meth:`AuRecord.load`). The video's frame count (:func:`pipeline.video.count_frames`) is
    checked against the labels: labelled frames past its end are skipped and counted in
    ``counts["missing_frames"]``, extra video frames are ignored; both are warned about with
    the file and both counts. A subject with neither frames nor video is warned about and all
    its frames are counted missing.

    Raises:
        FileNotFoundError: no label folder, or neither ``Images_<Cam>Camera`` nor
            ``Videos_<Cam>Camera`` exists.
        ValueError, OSError: a subject's video cannot be read.
    """
    root = Path(root)
    lab = root / "ActionUnit_Labels"
    if not lab.is_dir():
        raise FileNotFoundError(f"{lab}: DISFA label folder missing; expected "
                                f"ActionUnit_Labels/<SNxxx>/<SNxxx>_au<k>.txt under {root}")
    images = _disfa_images_dir(root, camera)
    cam = camera.capitalize()
    videos = root / f"Videos_{cam}Camera"
    if not images.is_dir() and not videos.is_dir():
        raise FileNotFoundError(
            f"DISFA {camera} camera: neither {videos} nor {images} exists. Place the DISFA "
            f"videos as {videos}/{cam}VideoSNxxx_comp.avi (read directly, label frame k = the "
            f"k-th video frame), or extracted frames as {images}/SNxxx/<frame>.jpg (1-based, as "
            f"the label files); or set au_shards.disfa_camera to the camera you have")
    counts = counts if counts is not None else Counter()
    on_disk = sorted(p.name for p in lab.iterdir() if p.is_dir())
    wanted = on_disk if subjects is None else sorted(set(subjects))
    for subject in wanted:
        per_au = []
        for au in DISFA_AUS:
            path = lab / subject / f"{subject}_au{au}.txt"
            if not path.is_file():
                raise FileNotFoundError(f"{path}: DISFA label file for AU{au} of {subject} "
                                        "missing; restore it from your copy")
            per_au.append(_read_disfa_au(path))
        frames = sorted(set().union(*per_au))
        counts["label_rows"] += len(frames)
        files = _frame_files(images / subject)
        video = _disfa_video(root, camera, subject)
        use_video = not files and video.is_file()
        if use_video:
            from pipeline.video import count_frames  # imported here: only videos need av
            n_video = count_frames(video)
            missing = [fr for fr in frames if not 1 <= fr <= n_video]
            extra = n_video - (frames[-1] if frames else 0)
            if missing or n_video != len(frames):
                what = ([f"{len(missing)} labelled frames are not in the video and are "
                         "skipped"] if missing else []) + (
                    [f"its last {extra} frames have no labels and are ignored"]
                    if extra > 0 else [])
                log.warning("DISFA %s: %s has %d frames but the labels have %d rows (frames "
                            "%d..%d; label frame k = the k-th video frame); %s", subject, video,
                            n_video, len(frames), frames[0] if frames else 0,
                            frames[-1] if frames else 0,
                            "; ".join(what) or "frames matched by number")
        elif not files:
            missing = frames
            if frames:
                log.warning("DISFA %s: no frames under %s and no video %s; its %d labelled "
                            "frames are skipped", subject, images / subject, video, len(frames))
        else:
            missing = [fr for fr in frames if fr not in files]
            if missing:
                log.warning("DISFA %s: %d of %d labelled frames have no image under %s (e.g. "
                            "frame %d); skipped", subject, len(missing), len(frames),
                            images / subject, missing[0])
        counts["missing_frames"] += len(missing)
        skip = set(missing)
        for fr in frames:
            if fr in skip:
                continue
            labels = np.array([(-1 if fr not in a else int(a[fr] >= threshold)) for a in per_au],
                              dtype=np.int8)
            if use_video:
                yield AuRecord("disfa", subject, camera, fr, video, labels, crop,
                               video_frame=fr - 1)
            else:
                yield AuRecord("disfa", subject, camera, fr, files[fr], labels, crop)


def list_subjects(dataset: str, root: str | Path) -> list[str]:
    """Subjects with label files on disk (sorted)."""
    _check_dataset(dataset)
    root = Path(root)
    if dataset == "disfa":
        lab = root / "ActionUnit_Labels"
        if not lab.is_dir():
            raise FileNotFoundError(f"{lab}: DISFA label folder missing; expected "
                                    f"ActionUnit_Labels/<SNxxx>/<SNxxx>_au<k>.txt under {root}")
        return sorted(p.name for p in lab.iterdir() if p.is_dir())
    return sorted(_occ_csvs(root))


def read_au_dataset(dataset: str, root: str | Path, cfg: AuShardsParams | None = None, *,
                    subjects: Iterable[str] | None = None, crop: Crop | None = None,
                    counts: Counter | None = None) -> Iterator[AuRecord]:
    """Records of any supported dataset; ``cfg`` gives the DISFA camera and threshold."""
    _check_dataset(dataset)
    cfg = cfg or AuShardsParams()
    if dataset == "disfa":
        return read_disfa(root, camera=cfg.disfa_camera, threshold=cfg.disfa_threshold,
                          subjects=subjects, crop=crop, counts=counts)
    return read_bp4d_layout(root, dataset, subjects=subjects, crop=crop, counts=counts)


# --------------------------------------------------------------------------- shards
def _tar_add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    # Fixed metadata so the same samples give the same bytes on every machine and run.
    ti = tarfile.TarInfo(name)
    ti.size, ti.mtime, ti.mode = len(data), 0, 0o644
    ti.uid = ti.gid = 0
    ti.uname = ti.gname = ""
    tf.addfile(ti, io.BytesIO(data))


def _encode(rec: AuRecord, size: int, quality: int) -> bytes | None:
    im = rec.load(draft=size)
    if im is None:
        return None
    im = im.resize((size, size), Image.BICUBIC)  # plain (aspect-changing) resize
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def write_tar(path: Path, samples: list[tuple[str, bytes, bytes]]) -> None:
    """Write ``(key, jpg, json)`` samples to ``path`` atomically (temp file + rename)."""
    with atomic_path(path, suffix=".tar") as tmp:
        with tarfile.open(tmp, "w", format=tarfile.GNU_FORMAT) as tf:
            for key, jpg, js in samples:
                _tar_add(tf, f"{key}.jpg", jpg)
                _tar_add(tf, f"{key}.json", js)


def _build_subject(dataset: str, root: str, subject: str, out_dir: str, cfg: AuShardsParams,
                   crop: Crop | None, boxes: Mapping[str, tuple | None] | None = None) -> dict:
    """Shard one subject (runs in a worker). Returns index rows, shard names and counts.

    ``boxes`` (frame key -> face box or None) replaces ``crop`` by the reference face crop of
    each frame's own box (:class:`pipeline.faces.BoxCrop`); a frame without a box is skipped
    and counted as ``no_face``.
    """
    counts: Counter = Counter()
    aus = list(AU_SETS[dataset])
    rows: list[tuple] = []
    shards: list[str] = []
    buf: list[tuple[str, bytes, bytes]] = []

    def flush() -> None:
        name = f"{subject}-{len(shards):06d}.tar"
        write_tar(Path(out_dir) / name, buf)
        shards.append(name)
        buf.clear()

    for rec in read_au_dataset(dataset, root, cfg, subjects=[subject], crop=crop,
                               counts=counts):
        if boxes is not None:
            rec = replace(rec, crop=BoxCrop(boxes.get(rec.key), square=cfg.face_square))
        try:
            jpg = _encode(rec, cfg.image_size, cfg.jpeg_quality)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            counts["unreadable_frames"] += 1
            log.warning("%s: unreadable frame (%s: %s); skipped", rec.image,
                        type(e).__name__, e)
            continue
        if jpg is None:
            counts["no_face"] += 1
            continue
        labels = [int(v) for v in rec.labels]
        js = json.dumps({"dataset": dataset, "subject": subject, "task": rec.task,
                         "frame": rec.frame, "aus": aus, "labels": labels},
                        sort_keys=True, separators=(",", ":")).encode()
        buf.append((rec.key, jpg, js))
        rows.append((rec.key, subject, rec.task, rec.frame,
                     f"{subject}-{len(shards):06d}.tar", *labels))
        if len(buf) >= cfg.samples_per_shard:
            flush()
    if buf:
        flush()
    counts["frames"] += len(rows)
    return {"subject": subject, "rows": rows, "shards": shards, "counts": dict(counts)}


def _init_worker(level: int) -> None:
    """Spawned workers start with no logging config: give them the stage's format and level."""
    setup_logging(level)


def _parts_for(dataset: str, subjects: list[str], n_synthetic: int
               ) -> tuple[dict[int, list[str]], list[str], list[str]]:
    """(parts restricted to ``subjects``, subjects in no part, part subjects not on disk)."""
    if dataset == "synthetic":
        return synthetic_parts(subjects, n_synthetic), [], []
    published = PUBLISHED_PARTS[dataset]
    listed = {s for v in published.values() for s in v}
    have = set(subjects)
    parts = {k: sorted(set(v) & have) for k, v in published.items()}
    return parts, sorted(have - listed), sorted(listed - have)


def build_au_shards(dataset: str, root: Path, out_dir: Path, cfg: AuShardsParams, *,
                    crop: Crop | None = None, boxes: Mapping[str, tuple | None] | None = None,
                    progress: bool = True) -> dict:
    """Write the ``au_shards`` contract of docs/design.md for one dataset; returns meta.json.

    Per subject ``<subject>-%06d.tar`` (``cfg.samples_per_shard`` samples each), then
    ``index.parquet`` and ``meta.json``. Output bytes depend only on the inputs and ``cfg``
    (sorted subjects/tasks/frames, fixed tar metadata), not on ``cfg.workers``.

    Args:
        dataset: ``synthetic``, ``bp4d``, ``bp4d_plus`` or ``disfa``.
        root: the dataset's root folder (see the readers for the layouts).
        out_dir: output folder; stale ``*.tar`` from earlier runs are removed.
        cfg: the ``au_shards`` params section.
        crop: optional face crop; must be picklable (a module-level function) when more than
            one worker runs.
        boxes: frame key -> face box (None = no face), from the detection pass
            (:func:`pipeline.au_faces.detect_dataset`): each frame is cropped to its box
            enlarged by 5% per side (the reference) before the resize.
        progress: show a tqdm bar over subjects.
    """
    _check_dataset(dataset)
    root, out_dir = Path(root), Path(out_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: {dataset} root missing; place your copy of the "
                                "dataset there (see docs/design.md, download stage)")
    on_disk = list_subjects(dataset, root)
    if not on_disk:
        raise FileNotFoundError(f"{root}: no {dataset} label files found")
    parts, not_in_parts, absent = _parts_for(dataset, on_disk, cfg.synthetic_parts)
    if not_in_parts:
        log.warning("%s: %d subjects on disk are in no published part and are skipped: %s",
                    dataset, len(not_in_parts), " ".join(not_in_parts))
    if absent:
        log.warning("%s: %d subjects of the published parts are not on disk (partial copy?): "
                    "%s", dataset, len(absent), " ".join(absent))
    subjects = sorted({s for v in parts.values() for s in v})

    workers = cfg.workers or os.cpu_count() or 1
    workers = max(1, min(workers, len(subjects)))
    if workers > 1 and crop is not None:
        try:
            pickle.dumps(crop)
        except Exception as e:  # noqa: BLE001 - any pickling failure means the same fix
            raise TypeError(f"crop {crop!r} cannot be sent to worker processes ({e}); use a "
                            "module-level function or set au_shards.workers: 1") from None
    out_dir.mkdir(parents=True, exist_ok=True)
    log.info("%s: sharding %d subjects from %s with %d worker(s)", dataset, len(subjects),
             root, workers)
    args = [(dataset, str(root), s, str(out_dir), cfg, crop,
             None if boxes is None else {k: v for k, v in boxes.items()
                                         if k.startswith(f"{s}_")})
            for s in subjects]
    results: dict[str, dict] = {}
    bar = tqdm(total=len(subjects), desc=f"au_shards {dataset}", unit="subject",
               disable=not progress)
    if workers == 1:
        for a in args:
            results[a[2]] = _build_subject(*a)
            bar.update()
    else:
        # spawn, not fork: the parent may hold MLflow/SQLite threads that fork would copy.
        with ProcessPoolExecutor(workers, mp_context=get_context("spawn"),
                                 initializer=_init_worker,
                                 initargs=(logging.getLogger().getEffectiveLevel(),)) as ex:
            futs = [ex.submit(_build_subject, *a) for a in args]
            for fut in as_completed(futs):
                r = fut.result()
                results[r["subject"]] = r
                bar.update()
    bar.close()

    counts: Counter = Counter()
    rows: list[tuple] = []
    written: set[str] = set()
    for s in subjects:  # merge in subject order so the index does not depend on scheduling
        r = results[s]
        counts.update(r["counts"])
        rows.extend(r["rows"])
        written.update(r["shards"])
    for p in out_dir.glob("*.tar"):  # shards of an earlier, larger run
        if p.name not in written:
            p.unlink()

    aus = list(AU_SETS[dataset])
    index = pd.DataFrame(rows, columns=["key", "subject", "task", "frame", "shard",
                                        *[f"AU{a}" for a in aus]])
    index["frame"] = index["frame"].astype("int64")
    for a in aus:
        index[f"AU{a}"] = index[f"AU{a}"].astype("int8")
    with atomic_path(out_dir / "index.parquet", suffix=".parquet") as tmp:
        index.to_parquet(tmp, index=False)

    present = sorted(set(index["subject"]))
    empty = sorted(set(subjects) - set(present))
    if empty:
        log.warning("%s: %d subjects have no usable frame: %s", dataset, len(empty),
                    " ".join(empty))
    meta_parts = {str(k): sorted(set(v) & set(present)) for k, v in sorted(parts.items())}
    for k, v in meta_parts.items():
        if not v:
            log.warning("%s: part %s has no subjects on disk; fold %s cannot be run", dataset,
                        k, k)
    full_counts = {
        "frames": int(len(index)), "subjects": len(present), "shards": len(written),
        "label_rows": int(counts["label_rows"]), "missing_frames": int(counts["missing_frames"]),
        "unreadable_frames": int(counts["unreadable_frames"]), "no_face": int(counts["no_face"]),
        "duplicate_rows": int(counts["duplicate_rows"]),
        "subjects_not_in_parts": len(not_in_parts), "part_subjects_missing": len(absent),
    }
    expected = PUBLISHED_FRAME_COUNTS.get(dataset)
    if expected is not None and full_counts["frames"] != expected:
        log.warning("%s: %d frames sharded, a complete copy has %d labelled frames "
                    "(protocols.md); expected for a partial copy, otherwise check the frames",
                    dataset, full_counts["frames"], expected)
    meta = {"dataset": dataset, "aus": aus, "subjects": present, "parts": meta_parts,
            "counts": full_counts}
    atomic_write_json(out_dir / "meta.json", meta)
    log.info("%s: %d frames of %d subjects in %d shards (%d missing, %d unreadable)", dataset,
             full_counts["frames"], full_counts["subjects"], full_counts["shards"],
             full_counts["missing_frames"], full_counts["unreadable_frames"])
    return meta


# --------------------------------------------------------------------------- reading shards
def read_meta(au_dir: str | Path) -> dict:
    """``<au_dir>/meta.json`` as a dict (clear error when the stage has not run)."""
    return read_json(Path(au_dir) / "meta.json")


def load_index(au_dir: str | Path) -> pd.DataFrame:
    """``<au_dir>/index.parquet``: key, subject, task, frame, shard, AU<k> (int8, -1 unknown)."""
    path = Path(au_dir) / "index.parquet"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; run the au_shards stage (`dvc repro "
                                "au_shards`)")
    return pd.read_parquet(path)


def label_stats(index: pd.DataFrame, aus: Iterable[int], *,
                unknown_as_negative: bool = False) -> dict:
    """Unknown-label rate over all labels and positive rate per AU over known labels (or,
    with ``unknown_as_negative``, over all labels, not-coded ones counted as absent)."""
    cols = [f"AU{a}" for a in aus]
    lab = index[cols].to_numpy(dtype=np.int8) if len(index) else np.zeros((0, len(cols)),
                                                                           np.int8)
    known = lab >= 0
    pos = {}
    for j, c in enumerate(cols):
        n = len(lab) if unknown_as_negative else int(known[:, j].sum())
        pos[c] = float((lab[:, j] == 1).sum() / n) if n else None  # None: never coded
    return {"unknown_rate": float((~known).mean()) if lab.size else 0.0, "positive_rate": pos}


def fold_shards(au_dir: str | Path, fold: int, split: str, *, val_fraction: float = 0.0,
                seed: int = 0) -> tuple[list[str], list[str], int]:
    """Shard URLs, subjects and sample count of one split of one fold.

    Args:
        au_dir: ``data/au_shards/<dataset>``.
        fold: test part (1-based).
        split: ``train``, ``val`` or ``test``.
        val_fraction, seed: as :func:`fold_subjects`; train and val must use the same values.

    Returns:
        (sorted shard paths, sorted subjects, number of samples); shards are per subject, so
        they hold only this split's subjects.
    """
    if split not in ("train", "val", "test"):
        raise ValueError(f"fold_shards: split {split!r} unknown; use train, val or test")
    au_dir = Path(au_dir)
    subs = fold_subjects(read_meta(au_dir), fold, val_fraction=val_fraction, seed=seed)[split]
    index = load_index(au_dir)
    sel = index[index["subject"].isin(subs)]
    urls = [str(au_dir / s) for s in sorted(set(sel["shard"]))]
    return urls, subs, int(len(sel))
