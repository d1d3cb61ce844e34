"""Facial expression datasets (paper Table 4): readers, verification and WebDataset shards.

Three datasets, each placed in ``data/download/<folder>/`` (protocols.md, "RAF-DB" and
"AffectNet-8"; method.md section 5):

- ``rafdb``: RAF-DB's basic-emotion release as distributed (its ``basic/`` folder, or that
  folder's content): ``basic/EmoLabel/list_patition_label.txt`` (lines ``train_00001.jpg 5``;
  labels 1-7 = surprise, fear, disgust, happiness, sadness, anger, neutral) and the aligned
  crops ``basic/Image/aligned/train_00001_aligned.jpg``. The split is the name's prefix
  (``train_`` / ``test_``: 12,271 / 3,068). With ``fer_shards.face_crop.rafdb: detect`` the
  uncropped ``basic/Image/original/train_00001.jpg`` go through the face front-end instead.
- ``affectnet``: AffectNet-8 in the folder-per-class layout of the public subset the authors
  trained on (37,553 train / 4,000 test images, already face crops): a split folder
  (``train``/``Train``/``training``; ``test``/``Test``/``val``/``valid``/``validation``) with
  one folder per class, named by AffectNet's index (``0``-``7``) or by name (``neutral``,
  ``happy``/``happiness``, ``sad``/``sadness``, ``surprise``/``surprised``,
  ``fear``/``fearful``, ``disgust``/``disgusted``, ``anger``/``angry``, ``contempt``; any
  case). Class index = AffectNet's: 0 neutral, 1 happy, 2 sad, 3 surprise, 4 fear, 5
  disgust, 6 anger, 7 contempt.
- ``synthetic``: the built-in set (:func:`pipeline.synthetic.generate_fer`) in
  ``data/download/synthetic_fer/``: ``labels.csv`` + ``images/``; split by subject.

Shards (the ``fer_shards`` stage) in ``data/fer_shards/data/<dataset>/``:
``<split>-NNNNN.tar`` with ``<key>.jpg`` (a plain resize to ``image_size``) and
``<key>.json`` (``label``, ``expression``, ``split``, ``subject``), and ``meta.json``
(classes, per split the shard files, sample count and per-class counts; images skipped and
why). Unreadable images and
images without a detected face are skipped and counted, never silently lost.
"""
from __future__ import annotations

import csv
import io
import json
import logging
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from PIL import Image, ImageOps

from pipeline.au_data import write_tar
from pipeline.io import atomic_write_json, read_json
from pipeline.params import FER_DATASETS, FerShardsParams

log = logging.getLogger(__name__)

RAFDB_CLASSES = ("surprise", "fear", "disgust", "happiness", "sadness", "anger", "neutral")
AFFECTNET_CLASSES = ("neutral", "happy", "sad", "surprise", "fear", "disgust", "anger",
                     "contempt")
# Folder spellings of AffectNet's classes seen in public copies (lower-cased on lookup).
AFFECTNET_ALIASES: dict[str, int] = {
    **{str(i): i for i in range(8)},
    "neutral": 0, "happy": 1, "happiness": 1, "sad": 2, "sadness": 2, "surprise": 3,
    "surprised": 3, "fear": 4, "fearful": 4, "disgust": 5, "disgusted": 5, "anger": 6,
    "angry": 6, "contempt": 7,
}
SPLIT_FOLDERS = {"train": ("train", "training"), "test": ("test", "val", "valid", "validation")}
RAFDB_LABELS = "EmoLabel/list_patition_label.txt"  # in basic/; sic: the release's spelling
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")
SPLITS = ("train", "test")
META = "meta.json"


def classes(dataset: str) -> tuple[str, ...]:
    """Class names of ``dataset`` in label-index order."""
    if dataset == "synthetic":
        from pipeline.synthetic import FER_EXPRESSIONS
        return FER_EXPRESSIONS
    if dataset == "rafdb":
        return RAFDB_CLASSES
    if dataset == "affectnet":
        return AFFECTNET_CLASSES
    raise ValueError(f"unknown FER dataset {dataset!r}; known: {', '.join(FER_DATASETS)}")


def download_folder(dataset: str) -> str:
    """The dataset's folder name under ``data/download``."""
    return "synthetic_fer" if dataset == "synthetic" else dataset


@dataclass(frozen=True)
class FerRecord:
    """One labelled image: unique ``key``, file ``path``, class index, split, subject."""
    key: str
    path: Path
    label: int
    split: str
    subject: str = ""


class FerLayoutError(ValueError):
    """The placed files do not form the dataset's layout; the message says what to fix."""


# --------------------------------------------------------------------------- RAF-DB
def _rafdb_basic(root: Path) -> Path:
    """The release's ``basic/`` folder: ``root/basic`` or ``root`` itself."""
    for basic in (root / "basic", root):
        if (basic / RAFDB_LABELS).is_file():
            return basic
    raise FerLayoutError(f"label list {root / 'basic' / RAFDB_LABELS} is missing (RAF-DB's "
                         "basic release: basic/EmoLabel/list_patition_label.txt)")


def read_rafdb(root: str | Path, *, original: bool = False) -> list[FerRecord]:
    """RAF-DB basic-emotion records from its label list.

    Args:
        root: ``data/download/rafdb`` (holding ``basic/``).
        original: read ``basic/Image/original/<name>`` (for the face front-end) instead of
            the aligned crops ``basic/Image/aligned/<stem>_aligned.jpg``.

    Raises:
        FerLayoutError: the list is missing or malformed (naming the line), or names an image
            that is not there (naming it and where it should be).
    """
    basic = _rafdb_basic(Path(root))
    labels = basic / RAFDB_LABELS
    images = basic / "Image" / ("original" if original else "aligned")
    out: list[FerRecord] = []
    for n, line in enumerate(labels.read_text(encoding="utf-8-sig").splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        m = re.fullmatch(r"(train|test)_\d+", Path(parts[0]).stem) if len(parts) == 2 else None
        if m is None or not parts[1].isdigit() or not 1 <= int(parts[1]) <= 7:
            raise FerLayoutError(f"{labels} line {n}: {line.strip()!r} is not '<train|test>_"
                                 "<number>.jpg <label 1-7>'; restore the file from the "
                                 "RAF-DB release")
        stem = Path(parts[0]).stem
        path = images / (parts[0] if original else f"{stem}_aligned.jpg")
        if not path.is_file():
            raise FerLayoutError(
                f"{labels} line {n} names {parts[0]}, but {path} is missing; place the "
                f"release's basic/Image/{'original' if original else 'aligned'}/ folder "
                f"complete in {basic / 'Image'}/")
        out.append(FerRecord(stem, path, int(parts[1]) - 1, m[1]))
    if not out:
        raise FerLayoutError(f"{labels} lists no images")
    return out


# --------------------------------------------------------------------------- AffectNet
def _split_dirs(root: Path) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for d in sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []:
        for split, names in SPLIT_FOLDERS.items():
            if d.name.lower() in names:
                if split in found:
                    raise FerLayoutError(f"{found[split]} and {d} are both a {split} split "
                                         "folder; keep one")
                found[split] = d
    return found


def _class_dirs(split_dir: Path) -> dict[int, Path]:
    out: dict[int, Path] = {}
    for d in sorted(p for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
        idx = AFFECTNET_ALIASES.get(d.name.lower())
        if idx is None:
            raise FerLayoutError(
                f"{d}: class folder {d.name!r} is not an AffectNet-8 class; name the class "
                f"folders 0-7 or {', '.join(AFFECTNET_CLASSES)}")
        if idx in out:
            raise FerLayoutError(f"{out[idx]} and {d} are both class {AFFECTNET_CLASSES[idx]}"
                                 f" (index {idx}); merge them")
        out[idx] = d
    return out


def read_affectnet(root: str | Path) -> list[FerRecord]:
    """AffectNet-8 records from ``<split>/<class>/<image>`` folders (see module docstring).

    Keys are ``<split>_<class index>_<file stem>`` (dots and spaces made ``_``).

    Raises:
        FerLayoutError: a split folder or class folder is missing or unknown, or a split holds
            no image; the message names the folder and the accepted names.
    """
    root = Path(root)
    splits = _split_dirs(root)
    for split in SPLITS:
        if split not in splits:
            raise FerLayoutError(
                f"no {split} split folder in {root} (accepted names: "
                f"{', '.join(SPLIT_FOLDERS[split])}, any case), each with one folder per class")
    out: list[FerRecord] = []
    for split in SPLITS:
        dirs = _class_dirs(splits[split])
        if not dirs:
            raise FerLayoutError(f"{splits[split]} has no class folders (0-7 or "
                                 f"{', '.join(AFFECTNET_CLASSES)})")
        n_before = len(out)
        for idx, d in sorted(dirs.items()):
            for p in sorted(d.rglob("*")):
                if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES:
                    stem = re.sub(r"[^A-Za-z0-9_-]", "_", str(p.relative_to(d).with_suffix("")))
                    out.append(FerRecord(f"{split}_{idx}_{stem}", p, idx, split))
        if len(out) == n_before:
            raise FerLayoutError(f"{splits[split]}: the class folders hold no images "
                                 f"({', '.join(IMAGE_SUFFIXES)})")
    return out


# --------------------------------------------------------------------------- synthetic
def read_synthetic(root: str | Path) -> list[FerRecord]:
    """The synthetic set's ``labels.csv`` (split by subject at generation)."""
    from pipeline.synthetic import FER_LABELS
    root = Path(root)
    path = root / FER_LABELS
    if not path.is_file():
        raise FerLayoutError(f"{path} is missing; run the download stage with "
                             "download.fer_datasets listing synthetic")
    out = []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            img = root / row["image"]
            if not img.is_file():
                raise FerLayoutError(f"{path} names {row['image']}, but {img} is missing; "
                                     "delete the folder and re-run the download stage")
            out.append(FerRecord(row["key"], img, int(row["label"]), row["split"],
                                 row["subject"]))
    return out


def read_fer_dataset(dataset: str, root: str | Path, *, original: bool = False
                     ) -> list[FerRecord]:
    """Records of ``dataset`` placed in ``root``, sorted by key; keys checked unique."""
    if dataset == "rafdb":
        recs = read_rafdb(root, original=original)
    elif dataset == "affectnet":
        recs = read_affectnet(root)
    elif dataset == "synthetic":
        recs = read_synthetic(root)
    else:
        raise ValueError(f"unknown FER dataset {dataset!r}; known: {', '.join(FER_DATASETS)}")
    seen: dict[str, Path] = {}
    for r in recs:
        if r.key in seen:
            raise FerLayoutError(f"{seen[r.key]} and {r.path} get the same key {r.key!r}; "
                                 "rename one")
        seen[r.key] = r.path
    return sorted(recs, key=lambda r: r.key)


def verify_fer(dataset: str, root: str | Path) -> dict:
    """The download stage's check of a placed FER dataset: ``{"files", "counts", "details"}``.

    Raises:
        ManualStepRequired: what is missing, with the placement instructions.
    """
    from pipeline.sources import ManualStepRequired
    root = Path(root)
    try:
        recs = read_fer_dataset(dataset, root)
    except (FerLayoutError, OSError) as e:
        raise ManualStepRequired(dataset, root, str(e)) from None
    counts = {f"{s}_images": sum(r.split == s for r in recs) for s in SPLITS}
    names = classes(dataset)
    per_class = {s: {names[i]: sum(r.split == s and r.label == i for r in recs)
                     for i in range(len(names))} for s in SPLITS}
    return {"files": [], "counts": counts, "details": {"per_class": per_class}}


def prepare_fer_sources(names: Iterable[str], out_dir: str | Path, synthetic_cfg) -> dict:
    """Generate (synthetic) or verify (placed) each FER dataset into ``out_dir/<folder>``.

    Returns:
        ``{"sources": {name: manifest}, "pending": {name: instructions}}``, like
        :func:`pipeline.sources.prepare_sources`.
    """
    from pipeline.sources import ManualStepRequired, prepare_source
    out: dict[str, dict] = {"sources": {}, "pending": {}}
    for name in dict.fromkeys(names):
        root = Path(out_dir) / download_folder(name)
        if name == "synthetic":
            from pipeline.synthetic import generate_fer
            out["sources"][f"fer_{name}"] = generate_fer(root, synthetic_cfg)
            continue
        try:
            out["sources"][f"fer_{name}"] = prepare_source(name, root)
        except ManualStepRequired as e:
            log.error("%s is not ready:\n%s", name, e)
            out["pending"][name] = str(e)
    return out


# --------------------------------------------------------------------------- shards
def _load(path: Path) -> Image.Image | None:
    """RGB image upright (EXIF), or None when unreadable."""
    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)
            return im.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        log.warning("%s: unreadable image skipped (%s)", path, e)
        return None


def _jpeg(im: Image.Image, size: int, quality: int) -> bytes:
    buf = io.BytesIO()
    im.resize((size, size), Image.BICUBIC).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


Cropper = Callable[[Image.Image], "Image.Image | None"]


def detector_cropper(cfg: FerShardsParams) -> Cropper:
    """The shared face front-end: the largest detected face, box + 5% per side, or None."""
    from pipeline.faces import crop_box, largest, make_detector
    det = make_detector(cfg.face_detector, min_face=cfg.face_min_size,
                        max_side=cfg.face_max_side, threshold=cfg.face_threshold)

    def crop(im: Image.Image) -> Image.Image | None:
        face = largest(det.detect([im])[0])
        return None if face is None else im.crop(crop_box(face.box, im.width, im.height))
    return crop


def build_fer_shards(dataset: str, root: Path, out_dir: Path, cfg: FerShardsParams, *,
                     cropper: Cropper | None = None) -> dict:
    """Write ``out_dir`` (``data/fer_shards/data/<dataset>``): shards per split, meta.json.

    Args:
        dataset, root: the dataset and its download folder.
        cfg: the ``fer_shards`` params; ``cfg.face_crop.<dataset>`` picks aligned crops
            (``none``) or the face front-end (``detect``: RAF-DB then reads its original
            images).
        cropper: the face front-end to use when detecting (default: :func:`detector_cropper`).

    Returns:
        the meta dict (also ``out_dir/meta.json``).
    """
    out_dir = Path(out_dir)
    detect = getattr(cfg.face_crop, dataset) == "detect"
    recs = read_fer_dataset(dataset, root, original=detect and dataset == "rafdb")
    if detect and cropper is None:
        cropper = detector_cropper(cfg)
    names = classes(dataset)
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in list(out_dir.glob("*.tar")) + [out_dir / META]:
        old.unlink(missing_ok=True)
    skipped: dict[str, list[str]] = {"unreadable": [], "no_face": []}
    splits: dict[str, dict] = {}
    for split in SPLITS:
        shards, batch, per_class = [], [], [0] * len(names)
        subjects: set[str] = set()

        def flush() -> None:
            if batch:
                name = f"{split}-{len(shards):05d}.tar"
                write_tar(out_dir / name, batch)
                shards.append(name)
                batch.clear()

        todo = [r for r in recs if r.split == split]
        if split == "train":  # mixed classes in every shard (AffectNet's files are by class)
            random.Random(0).shuffle(todo)
        for r in todo:
            im = _load(r.path)
            if im is None:
                skipped["unreadable"].append(str(r.path))
                continue
            if detect:
                im = cropper(im)
                if im is None:
                    skipped["no_face"].append(str(r.path))
                    continue
            info = {"label": r.label, "expression": names[r.label], "split": split,
                    "subject": r.subject}
            batch.append((r.key, _jpeg(im, cfg.image_size, cfg.jpeg_quality),
                          json.dumps(info, sort_keys=True).encode()))
            per_class[r.label] += 1
            subjects.add(r.subject)
            if len(batch) >= cfg.samples_per_shard:
                flush()
        flush()
        n = sum(per_class)
        if n == 0:
            raise ValueError(f"{dataset}: the {split} split has no usable image after "
                             f"skipping {sum(map(len, skipped.values()))}; check {root}")
        splits[split] = {"shards": shards, "count": n, "per_class": per_class,
                         "subjects": sorted(s for s in subjects if s)}
    for why, paths in skipped.items():
        if paths:
            log.warning("%s: %d images skipped (%s), e.g. %s", dataset, len(paths), why,
                        paths[0])
    meta = {"dataset": dataset, "classes": list(names), "image_size": cfg.image_size,
            "face_crop": "detect" if detect else "none", "splits": splits,
            "skipped": {k: len(v) for k, v in skipped.items()},
            "skipped_examples": {k: v[:20] for k, v in skipped.items()}}
    atomic_write_json(out_dir / META, meta)
    return meta


def read_fer_meta(fer_dir: str | Path, dataset: str) -> dict:
    """``meta.json`` of ``data/fer_shards/data/<dataset>``, checked to be ``dataset``'s."""
    path = Path(fer_dir) / META
    meta = read_json(path)
    if meta.get("dataset") != dataset or "splits" not in meta or "classes" not in meta:
        raise ValueError(f"{path}: does not describe FER shards of {dataset!r}; rebuild them "
                         "(`dvc repro fer_shards`)")
    for split in SPLITS:
        if split not in meta["splits"]:
            raise ValueError(f"{path}: no {split} split; rebuild (`dvc repro fer_shards`)")
    return meta
