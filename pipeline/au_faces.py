"""The detection pass of ``au_shards``: one face box per labelled frame, cached per dataset.

Before a dataset is sharded with ``au_shards.face_crop: detect``, every labelled frame goes
through the face detector (:mod:`pipeline.faces`) once. Results are kept in
``<cache>/<dataset>.parquet``, one row per frame key (``<subject>_<task>_<frame>``) with the
frame's source (path relative to the dataset root, video index, file size), the detector
settings, whether a face was found, the largest face's box, score and 5 landmarks. A frame is
detected again only when its source or the detector settings change, so a new
``image_size``, fold list or crop margin re-shards without re-detecting. The cache is
written after every subject: an interrupted pass resumes where it stopped.

Frames without a face are left out of the shards by the caller and listed with
:func:`no_face_table`.
"""
from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import pandas as pd
from PIL import Image
from tqdm import tqdm

from pipeline.au_data import AuRecord, read_au_dataset
from pipeline.faces import Detector, iou, largest
from pipeline.io import atomic_path
from pipeline.params import AuShardsParams

log = logging.getLogger(__name__)

BOX = ["x0", "y0", "x1", "y1"]
LANDMARKS = [f"lm{i}" for i in range(10)]  # x, y of eyes, nose tip, mouth corners
COLUMNS = ["key", "subject", "image", "video_frame", "bytes", "detector", "found", *BOX,
           "score", *LANDMARKS]
BATCH = 16


def detector_tag(cfg: AuShardsParams) -> str:
    """What makes a cached detection valid: the detector and its settings."""
    return (f"{cfg.face_detector}:min{cfg.face_min_size}:max{cfg.face_max_side}"
            f":thr{cfg.face_threshold:g}")


def _source(rec: AuRecord, root: Path) -> tuple[str, int, int]:
    """(path relative to root, video frame or -1, file size): a frame's identity."""
    try:
        rel = str(Path(rec.image).relative_to(root))
    except ValueError:
        rel = str(rec.image)
    vf = getattr(rec, "video_frame", None)
    return rel, -1 if vf is None else int(vf), Path(rec.image).stat().st_size


def _load_for_detection(rec: AuRecord, max_side: int) -> tuple[Image.Image, float]:
    """(RGB image, factor from its pixels to the original frame's). JPEGs decode at a DCT
    scale near ``max_side`` (libjpeg draft), which is all the detector looks at."""
    if getattr(rec, "video_frame", None) is not None:
        return rec.load(), 1.0
    with Image.open(rec.image) as im:
        w0 = im.width
        if im.format == "JPEG":
            im.draft("RGB", (max_side, max_side))
        im = im.convert("RGB")
    return im, w0 / im.width


def _rows(recs: list[AuRecord], images: list[tuple[Image.Image, float]], det: Detector,
          root: Path, tag: str) -> list[dict]:
    faces = det.detect([im for im, _ in images])
    rows = []
    for rec, (_, f), found in zip(recs, images, faces):
        rel, vf, size = _source(rec, root)
        face = largest(found)
        row = {"key": rec.key, "subject": rec.subject, "image": rel, "video_frame": vf,
               "bytes": size, "detector": tag, "found": face is not None}
        box = [np.nan] * 4 if face is None else [v * f for v in face.box]
        lm = ([np.nan] * 10 if face is None or face.landmarks is None
              else (face.landmarks * f).reshape(-1).tolist())
        row.update(zip(BOX, box))
        row["score"] = np.nan if face is None else face.score
        row.update(zip(LANDMARKS, lm))
        rows.append(row)
    return rows


def read_cache(path: Path) -> pd.DataFrame:
    if not path.is_file():
        return pd.DataFrame(columns=COLUMNS)
    try:
        df = pd.read_parquet(path)
    except Exception as e:  # noqa: BLE001 - any unreadable cache is rebuilt
        log.warning("%s: unreadable face cache (%s); detecting again", path, e)
        return pd.DataFrame(columns=COLUMNS)
    if list(df.columns) != COLUMNS:
        log.warning("%s: face cache from another version; detecting again", path)
        return pd.DataFrame(columns=COLUMNS)
    return df


def _write_cache(path: Path, df: pd.DataFrame) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path, suffix=".parquet") as tmp:
        df.to_parquet(tmp, index=False)


def detect_dataset(dataset: str, root: Path, subjects: Iterable[str], cfg: AuShardsParams,
                   cache_path: Path, make_detector: Callable[[], Detector], *,
                   progress: bool = True) -> tuple[pd.DataFrame, dict]:
    """Face boxes of every labelled frame of ``subjects``, from the cache or the detector.

    Args:
        dataset, root: as :func:`pipeline.au_data.read_au_dataset`.
        subjects: the subjects to cover.
        cfg: the ``au_shards`` params (detector settings, DISFA camera).
        cache_path: ``<cache>/<dataset>.parquet``; rows of other frames are kept.
        make_detector: builds the detector (called only when something must be detected).
    Returns:
        (one row per labelled frame, columns :data:`COLUMNS`; counts ``detected``, ``cached``,
        ``no_face``).
    """
    root = Path(root)
    tag = detector_tag(cfg)
    cache = read_cache(cache_path)
    known = {r.key: r for r in cache.itertuples(index=False)}
    det: Detector | None = None
    counts: Counter = Counter()
    keep: list[dict] = []
    subjects = list(subjects)
    bar = tqdm(subjects, desc=f"faces {dataset}", unit="subject", disable=not progress)
    for subject in bar:
        todo: list[AuRecord] = []
        for rec in read_au_dataset(dataset, root, cfg, subjects=[subject], counts=Counter()):
            hit = known.get(rec.key)
            if hit is not None and hit.detector == tag and \
                    (hit.image, hit.video_frame, hit.bytes) == _source(rec, root):
                keep.append(hit._asdict())
                counts["cached"] += 1
            else:
                todo.append(rec)
        new: list[dict] = []
        for i in range(0, len(todo), BATCH):
            chunk = todo[i:i + BATCH]
            det = det or make_detector()
            new += _rows(chunk, [_load_for_detection(r, cfg.face_max_side) for r in chunk],
                         det, root, tag)
        counts["detected"] += len(new)
        keep += new
        if new:  # after every subject, so an interrupted pass resumes here
            added = pd.DataFrame(new, columns=COLUMNS)
            kept = cache[~cache["key"].isin(added["key"])]
            cache = pd.concat([kept, added], ignore_index=True) if len(kept) else added
            _write_cache(cache_path, cache)
    df = pd.DataFrame(keep, columns=COLUMNS)
    df["found"] = df["found"].astype(bool)
    counts["no_face"] = int((~df["found"]).sum())
    log.info("%s: faces of %d frames (%d detected, %d from %s); no face in %d", dataset,
             len(df), counts["detected"], counts["cached"], cache_path, counts["no_face"])
    return df, dict(counts)


def boxes_by_key(df: pd.DataFrame) -> dict[str, tuple[float, float, float, float] | None]:
    """Frame key -> face box (None = no face)."""
    out: dict = {}
    for r in df.itertuples(index=False):
        out[r.key] = (r.x0, r.y0, r.x1, r.y1) if r.found else None
    return out


def no_face_table(df: pd.DataFrame) -> pd.DataFrame:
    """The frames left out for want of a face: key, subject, image, video_frame."""
    return df.loc[~df["found"], ["key", "subject", "image", "video_frame"]].reset_index(drop=True)


def no_face_per_subject(df: pd.DataFrame) -> dict[str, int]:
    """Subject -> frames without a face (subjects with none are left out)."""
    s = (~df["found"]).groupby(df["subject"]).sum()
    return {k: int(v) for k, v in s.items() if v}


def agreement_with_truth(df: pd.DataFrame, truth_csv: Path) -> dict:
    """Detected boxes against known ones (the synthetic set's ``au/face_boxes.csv``).

    Returns: frames compared, share of frames with IoU >= 0.7 (a miss counts as IoU 0) and the
    median IoU.
    """
    gt = pd.read_csv(truth_csv)
    gt["key"] = gt["subject"] + "_" + gt["task"] + "_" + gt["frame"].astype(str)
    m = df.merge(gt[["key", *BOX]], on="key", suffixes=("", "_gt"))
    vals = np.array([iou((r.x0, r.y0, r.x1, r.y1), (r.x0_gt, r.y0_gt, r.x1_gt, r.y1_gt))
                     if r.found else 0.0 for r in m.itertuples(index=False)])
    if not len(vals):
        return {"frames": 0}
    return {"frames": int(len(vals)), "iou_ge_0_7": round(float((vals >= 0.7).mean()), 4),
            "iou_median": round(float(np.median(vals)), 4)}
