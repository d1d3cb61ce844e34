"""``fmae-iat predict``: action unit probabilities for images, folders and videos.

    fmae-iat predict clip.mp4 photos/ --model data/finetune/iat/bp4d-1 --out aus.csv

Inputs are image files, folders (searched recursively, files in sorted order; images and
videos by suffix, anything else ignored) and video files (by suffix, :data:`VIDEO_SUFFIXES`;
decoded with PyAV through :mod:`pipeline.video`). Each frame goes through the face front-end
of :mod:`pipeline.faces` (MTCNN; the largest face; the authors' crop: box + 5% per side,
resized to the model's input size) unless ``--no-crop`` (the whole frame, resized), then the
model's own preprocessing (the finetuning evaluation transform recorded in the model file,
:mod:`pipeline.au_export`) and the model, in batches; on the GPU when there is one.

The model is a finetuning run folder (its ``model.safetensors``), such a file, or one of the
authors' released finetuned checkpoints (``.pth``, :mod:`pipeline.released`).

Output: one CSV row per frame (and face: the largest only, so ``face_id`` is 0). The first
columns are OpenFace's ``frame, face_id, timestamp, confidence, success``, then ``input``
(the file), then a probability column per AU (``AU01``, ``AU02``, ... in the model's AU
order, values in [0, 1]) and a presence column per AU (``AU01_c``, ... 0/1: probability >=
the model's threshold, or ``--threshold``). ``frame`` is 1-based within a video (OpenFace)
and 1 for an image; ``timestamp`` is seconds from the video's start (0 for images);
``confidence`` is the detector's score (empty with ``--no-crop``). A frame without a face
gets ``success`` 0 and empty AU cells. A file that cannot be read is named on stderr and
skipped; the exit status is 1 only when no input could be read.

Memory does not grow with video length: frames are decoded, detected and classified in
batches while rows are written out; ``--plot`` reads the finished CSV back.
"""
from __future__ import annotations

import argparse
import csv
import logging
import math
import os
import queue
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps

log = logging.getLogger(__name__)

VIDEO_SUFFIXES = frozenset({".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg",
                            ".wmv", ".flv", ".ts", ".mts", ".m2ts", ".3gp", ".ogv", ".mxf"})
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif",
                            ".ppm", ".pgm", ".pbm", ".jfif"})
OPENFACE_COLUMNS = ("frame", "face_id", "timestamp", "confidence", "success")
PROGRESS_MIN_FRAMES = 64  # fewer frames: no progress bar
# Face detector defaults: au_shards' smallest face and detection size (params.yaml
# au_shards.face_min_size / face_max_side); the score MTCNN needs on photos (drawn faces: 0.5).
# A smaller min face grows MTCNN's image pyramid: 20 px is about 2x slower than 40 px.
FACE_THRESHOLD, MIN_FACE, DETECT_MAX_SIDE = 0.7, 40, 640


# --------------------------------------------------------------------------- columns
def au_columns(aus: Sequence[int]) -> tuple[list[str], list[str]]:
    """(probability columns ``AU01 ...``, presence columns ``AU01_c ...``)."""
    names = [f"AU{int(a):02d}" for a in aus]
    return names, [f"{n}_c" for n in names]


def csv_columns(aus: Sequence[int]) -> list[str]:
    probs, present = au_columns(aus)
    return [*OPENFACE_COLUMNS, "input", *probs, *present]


# --------------------------------------------------------------------------- the model
def load_model(spec: str | Path, device: str | torch.device = "cpu",
               aus: str | Sequence[int] | None = None) -> tuple[torch.nn.Module, dict]:
    """A model for prediction: a run folder, a ``model.safetensors`` or a released checkpoint.

    Returns:
        (the AU model in eval mode on ``device``, info: ``aus``, ``threshold``,
        ``preprocess``, ``image_size``, ``path`` and the rest of the model file's metadata).
    """
    from pipeline.au_export import MODEL_NAME, load_au_model, read_metadata
    from pipeline.released import load_released_au_model

    path = Path(spec)
    if path.is_dir():
        if not (path / MODEL_NAME).is_file():
            raise FileNotFoundError(
                f"{path}: a folder without {MODEL_NAME}; point --model at a finetuning run "
                f"folder (data/finetune/<variant>/<dataset>-<fold>) or a model file. Runs "
                f"finetuned before the model file existed lack it: re-run their stage "
                f"(`dvc repro finetune_iat`)")
        path = path / MODEL_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path}: model not found; give a finetuning run folder, its "
                                f"{MODEL_NAME}, or a released .pth checkpoint")
    if read_metadata(path) is not None:
        model, info = load_au_model(path, device)
        if aus is not None:
            from pipeline.released import au_set
            if au_set(aus) != info["aus"]:
                raise ValueError(f"{path}: the model's AUs are {info['aus']}, not --aus "
                                 f"{au_set(aus)}; leave --aus out for this model file")
        return model, info
    return load_released_au_model(path, device, aus=aus)


# --------------------------------------------------------------------------- inputs
@dataclass(frozen=True)
class Source:
    path: Path
    kind: str  # "image" | "video" | "unknown" (a named file of another suffix: tried as both)


@dataclass
class FrameItem:
    input: str
    frame: int  # 1-based within a video; 1 for an image
    timestamp: float  # seconds; 0 for an image
    image: Image.Image


def _kind(path: Path) -> str:
    s = path.suffix.lower()
    return "video" if s in VIDEO_SUFFIXES else "image" if s in IMAGE_SUFFIXES else "unknown"


def expand_inputs(inputs: Iterable[str | Path], report: Callable[[str], None]
                  ) -> tuple[list[Source], int]:
    """The files to read, in order; (sources, number of inputs reported missing/empty).

    A folder contributes its image and video files (recursively, sorted by path, hidden
    files and folders skipped); a named file is used whatever its suffix.
    """
    sources, problems = [], 0
    for raw in inputs:
        p = Path(raw)
        if p.is_dir():
            found = []
            for root, dirs, files in os.walk(p):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                for f in files:
                    fp = Path(root) / f
                    if not f.startswith(".") and _kind(fp) != "unknown":
                        found.append(fp)
            if not found:
                report(f"{p}: no image or video files in this folder (looked for "
                       f"{', '.join(sorted(IMAGE_SUFFIXES | VIDEO_SUFFIXES))}); skipped")
                problems += 1
            sources += [Source(fp, _kind(fp)) for fp in sorted(found)]
        elif p.is_file():
            sources.append(Source(p, _kind(p)))
        else:
            report(f"{p}: no such file or folder; skipped")
            problems += 1
    return sources, problems


def _open_image(path: Path) -> Image.Image:
    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im)  # phone photos: upright as they are shown
        return im.convert("RGB")


def iter_source_frames(src: Source, report: Callable[[str], None]
                       ) -> Iterator[FrameItem]:
    """Frames of one input. A file that cannot be read is reported and yields nothing; a
    video that fails part-way is reported and keeps the frames decoded before."""
    from pipeline.video import iter_frames

    name = str(src.path)
    if src.kind in ("image", "unknown"):
        try:
            image = _open_image(src.path)
        except (OSError, ValueError, Image.DecompressionBombError, SyntaxError) as e:
            if src.kind == "image":
                report(f"{name}: cannot read it as an image ({type(e).__name__}: {e}); "
                       "skipped")
                return
        else:
            yield FrameItem(name, 1, 0.0, image)
            return
    try:
        for index, t, image in iter_frames(src.path):
            yield FrameItem(name, index + 1, float(t), image)
    except (OSError, ValueError) as e:
        what = "as an image or a video" if src.kind == "unknown" else "as a video"
        report(f"{name}: cannot read it {what} ({e}); skipped" if "frames 0.." not in str(e)
               else f"{name}: {e}; the frames before were kept")


def count_frames_of(sources: Sequence[Source]) -> int | None:
    """Total frames (videos demuxed, not decoded), for the progress bar; None if unknown."""
    from pipeline.video import count_frames

    total = 0
    for s in sources:
        if s.kind == "video":
            try:
                total += count_frames(s.path)
            except (OSError, ValueError):
                return None
        else:
            total += 1
    return total


def _prefetch(items: Iterator, depth: int = 2) -> Iterator:
    """Run ``items`` in a background thread (decoding overlaps detection and the model);
    at most ``depth`` items wait in between, so memory stays bounded."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def work():
        try:
            for it in items:
                while not stop.is_set():
                    try:
                        q.put(("item", it), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(("end", done))
        except BaseException as e:  # noqa: BLE001 - re-raised in the consumer
            q.put(("error", e))

    t = threading.Thread(target=work, name="predict-decode", daemon=True)
    t.start()
    try:
        while True:
            kind, value = q.get()
            if kind == "end":
                return
            if kind == "error":
                raise value
            yield value
    finally:
        stop.set()


def _batches(frames: Iterable[FrameItem], n: int) -> Iterator[list[FrameItem]]:
    batch: list[FrameItem] = []
    for f in frames:
        batch.append(f)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


# --------------------------------------------------------------------------- inference
class Predictor:
    """Face crop + preprocessing + model for batches of PIL images.

    Args:
        model, info: from :func:`load_model`.
        device: the model's device.
        crop: detect and crop the largest face (else the whole frame).
        detector: a :class:`pipeline.faces.Detector` (required when ``crop``).
    """

    def __init__(self, model: torch.nn.Module, info: dict, device: torch.device, *,
                 crop: bool = True, detector=None):
        from pipeline.au_export import eval_transform

        self.model = model
        self.info = info
        self.device = torch.device(device)
        self.crop = crop
        if crop and detector is None:
            raise ValueError("cropping needs a face detector")
        self.detector = detector
        self.transform = eval_transform(info["preprocess"])
        self.size = int(info["preprocess"]["resize"][0])
        self.n_aus = len(info["aus"])

    def faces(self, images: Sequence[Image.Image]
              ) -> tuple[list[Image.Image | None], list[float]]:
        """(face crop or None, detector score or NaN) per image; the whole frame when not
        cropping."""
        if not self.crop:
            return list(images), [math.nan] * len(images)
        from pipeline.faces import crop_face, largest

        crops, scores = [], []
        for im, found in zip(images, self.detector.detect(images)):
            face = largest(found)
            if face is None:
                crops.append(None)
                scores.append(math.nan)
            else:
                crops.append(crop_face(im, face.box, self.size))
                scores.append(face.score)
        return crops, scores

    @torch.no_grad()
    def probabilities(self, crops: Sequence[Image.Image]) -> np.ndarray:
        """(N, A) float64 AU probabilities of already-cropped faces (or whole frames)."""
        if not crops:
            return np.zeros((0, self.n_aus))
        x = torch.stack([self.transform(c.convert("RGB")) for c in crops])
        logits = self.model(x.to(self.device, non_blocking=True))["au_logits"]
        return torch.sigmoid(logits.float()).cpu().numpy().astype(np.float64)

    def __call__(self, images: Sequence[Image.Image]
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(probs (N, A) with NaN rows for no face, scores (N,), success (N,) bool)."""
        crops, scores = self.faces(images)
        ok = np.array([c is not None for c in crops], dtype=bool)
        probs = np.full((len(images), self.n_aus), np.nan)
        if ok.any():
            probs[ok] = self.probabilities([c for c in crops if c is not None])
        return probs, np.asarray(scores, dtype=np.float64), ok


def _fmt(v: float, digits: int) -> str:
    return "" if v is None or not math.isfinite(v) else f"{v:.{digits}f}"


def _rows(batch: Sequence[FrameItem], probs: np.ndarray, scores: np.ndarray, ok: np.ndarray,
          threshold: float) -> Iterator[list]:
    for item, p, s, good in zip(batch, probs, scores, ok):
        row = [item.frame, 0, _fmt(item.timestamp, 4), _fmt(s, 4), int(good), item.input]
        if good:
            row += [f"{v:.6f}" for v in p] + [int(v >= threshold) for v in p]
        else:
            row += [""] * (2 * len(p))
        yield row


# --------------------------------------------------------------------------- the command
@dataclass
class Summary:
    inputs: int = 0  # files found
    read: int = 0  # files that gave at least one frame
    skipped: int = 0  # files or arguments that gave none
    frames: int = 0
    faces: int = 0
    rows: int = 0


def predict_files(inputs: Sequence[str | Path], model: str | Path, out: str | Path, *,
                  batch_size: int = 32, device: str | None = None, crop: bool = True,
                  plot: str | Path | None = None, threshold: float | None = None,
                  aus: str | None = None, face_threshold: float = FACE_THRESHOLD,
                  min_face: int = MIN_FACE, max_side: int = DETECT_MAX_SIDE,
                  progress: bool = True,
                  report: Callable[[str], None] | None = None) -> Summary:
    """Run the model over ``inputs`` and write the CSV ``out`` (atomically).

    Args: as the command's options (see :func:`main`); ``report`` receives the messages
    about skipped files (default: stderr).

    Raises:
        ValueError / FileNotFoundError: a bad model, option or output; RuntimeError when no
        input could be read (no CSV is written then).
    """
    from tqdm import tqdm

    from pipeline.io import atomic_path

    if report is None:
        def report(msg: str) -> None:
            tqdm.write(f"fmae-iat predict: {msg}", file=sys.stderr)
    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    if threshold is not None and not 0.0 <= threshold <= 1.0:
        raise ValueError(f"--threshold must be in [0, 1], got {threshold}")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available here; use --device cpu")
    net, info = load_model(model, dev, aus=aus)
    thr = float(info["threshold"] if threshold is None else threshold)
    detector = None
    if crop:
        from pipeline.faces import make_detector
        detector = make_detector("mtcnn", device=str(dev), min_face=min_face,
                                 max_side=max_side, threshold=face_threshold)
    predictor = Predictor(net, info, dev, crop=crop, detector=detector)
    log.info("model %s: %s, AUs %s, %d px, threshold %.2f, device %s, %s", info["path"],
             info.get("variant"), info["aus"], predictor.size, thr, dev,
             "face crop (MTCNN, largest face)" if crop else "whole frames (--no-crop)")

    sources, problems = expand_inputs(inputs, report)
    summary = Summary(inputs=len(sources), skipped=problems)
    total = count_frames_of(sources) if progress else None
    show = progress and (total is None or total >= PROGRESS_MIN_FRAMES)
    read_ok: set[str] = set()
    videos: list[str] = []

    def frames() -> Iterator[FrameItem]:
        for src in sources:
            n = 0
            for item in iter_source_frames(src, report):
                n += 1
                yield item
            if n:
                read_ok.add(str(src.path))
                if src.kind == "video" or n > 1:
                    videos.append(str(src.path))
            else:
                summary.skipped += 1

    out = Path(out)
    columns = csv_columns(info["aus"])
    with atomic_path(out, suffix=".csv") as tmp, open(tmp, "w", newline="") as f, \
            tqdm(total=total, disable=not show, unit="frame", desc="predict",
                 dynamic_ncols=True) as bar:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(columns)
        for batch in _prefetch(_batches(frames(), batch_size)):
            probs, scores, ok = predictor([b.image for b in batch])
            for row in _rows(batch, probs, scores, ok, thr):
                w.writerow(row)
            summary.frames += len(batch)
            summary.faces += int(ok.sum())
            summary.rows += len(batch)
            bar.update(len(batch))
        summary.read = len(read_ok)
        if not read_ok:
            raise RuntimeError(f"none of the {len(sources)} input file(s) could be read"
                               if sources else "no input files found")
    log.info("wrote %s: %d rows, %d with a face, from %d file(s); %d skipped", out,
             summary.rows, summary.faces, summary.read, summary.skipped)
    if plot is not None:
        plot_videos(out, videos, Path(plot), info["aus"], thr, report)
    return summary


def plot_videos(csv_path: Path, videos: Sequence[str], plot: Path, aus: Sequence[int],
                threshold: float, report: Callable[[str], None]) -> list[Path]:
    """One PNG per video input: every AU's probability over time (a row per AU).

    With one video the figure is ``plot``; with several, ``<plot stem>_<video stem>.png``.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    from pipeline.io import save_figure

    if not videos:
        report("--plot: no video among the inputs (it plots probabilities over time); "
               "no plot written")
        return []
    probs, _ = au_columns(aus)
    df = pd.read_csv(csv_path, usecols=["input", "timestamp", "frame", "success", *probs])
    written = []
    for i, video in enumerate(videos):
        if len(videos) == 1:
            path = plot
        else:
            path = plot.with_name(f"{plot.stem}_{Path(video).stem}{plot.suffix or '.png'}")
            if path in written:
                path = path.with_name(f"{path.stem}-{i}{path.suffix}")
        d = df[df["input"] == video]
        x = d["timestamp"].to_numpy()
        xlabel = "time (s)"
        if not np.isfinite(x).all():
            x, xlabel = d["frame"].to_numpy(), "frame"
        fig, axes = plt.subplots(len(probs), 1, sharex=True, squeeze=False,
                                 figsize=(10, 0.75 * len(probs) + 1.2))
        no_face = d["success"].to_numpy() == 0
        for ax, col in zip(axes[:, 0], probs):
            if no_face.any():  # grey where no face was found
                ax.fill_between(x, 0, 1, where=no_face, step="mid", color="0.88", lw=0)
            ax.plot(x, d[col].to_numpy(), lw=1.0, color="tab:blue")
            ax.axhline(threshold, color="tab:red", lw=0.6, ls="--")
            ax.set_ylim(-0.02, 1.02)
            ax.set_yticks([0, 1])
            ax.set_ylabel(col, rotation=0, ha="right", va="center", fontsize=8)
            ax.tick_params(labelsize=7)
        axes[-1, 0].set_xlabel(xlabel)
        missing = int(no_face.sum())
        fig.suptitle(f"{Path(video).name}: AU probabilities (dashed: threshold {threshold:.2f}"
                     f"{f'; grey: {missing} frames without a face' if missing else ''})",
                     fontsize=9)
        fig.tight_layout()
        save_figure(fig, path)
        written.append(path)
        log.info("wrote %s", path)
    return written


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="fmae-iat", description="FMAE-IAT facial action units")
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser(
        "predict", help="AU probabilities of images, folders and videos",
        description="Facial action unit probabilities of images, folders of images and "
                    "videos, written to a CSV: frame, face_id, timestamp, confidence, success "
                    "(as OpenFace), input, then one probability column per AU (AU01, ...) "
                    "and one presence column per AU (AU01_c, ...).",
        epilog="example: fmae-iat predict clip.mp4 --model data/finetune/iat/bp4d-1 "
               "--out clip_aus.csv --plot clip_aus.png")
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="image files, folders (recursive) and video files")
    p.add_argument("--model", required=True,
                   help="a finetuning run folder, its model.safetensors, or a released "
                        "FMAE-IAT .pth checkpoint")
    p.add_argument("--out", required=True, type=Path, help="the CSV to write")
    p.add_argument("--batch-size", type=int, default=32, help="frames per batch (default 32)")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help="default: cuda when available, else cpu")
    p.add_argument("--no-crop", action="store_true",
                   help="no face detection: the whole frame, resized, is the model input")
    p.add_argument("--plot", type=Path, default=None,
                   help="PNG of every AU's probability over time (video inputs)")
    p.add_argument("--threshold", type=float, default=None,
                   help="presence threshold for the AUxx_c columns (default: the model's, "
                        "0.5 or the validation-selected one)")
    p.add_argument("--aus", default=None,
                   help="AUs of a released checkpoint's head: bp4d, disfa, ... or 1,2,4,... "
                        "(default: 12 outputs = BP4D)")
    p.add_argument("--face-threshold", type=float, default=FACE_THRESHOLD,
                   help=f"MTCNN last-stage score a face needs (default {FACE_THRESHOLD}; "
                        "drawn faces: 0.5)")
    p.add_argument("--min-face", type=int, default=MIN_FACE,
                   help=f"smallest face side in pixels of the detection image (default "
                        f"{MIN_FACE}; smaller is slower)")
    p.add_argument("--detect-max-side", type=int, default=DETECT_MAX_SIDE,
                   help=f"frames are downscaled to this longer side for detection only "
                        f"(default {DETECT_MAX_SIDE})")
    p.add_argument("--quiet", action="store_true", help="no progress bar, warnings only")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point ``fmae-iat``; returns the exit status."""
    ap = build_parser()
    args = ap.parse_args(argv)
    from pipeline.io import setup_logging
    setup_logging(logging.WARNING if args.quiet else logging.INFO)
    try:
        summary = predict_files(
            args.inputs, args.model, args.out, batch_size=args.batch_size, device=args.device,
            crop=not args.no_crop, plot=args.plot, threshold=args.threshold, aus=args.aus,
            face_threshold=args.face_threshold, min_face=args.min_face,
            max_side=args.detect_max_side, progress=not args.quiet)
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"fmae-iat predict: error: {e}", file=sys.stderr)
        return 1
    print(f"{args.out}: {summary.rows} rows ({summary.faces} with a face) from "
          f"{summary.read} file(s)" + (f"; {summary.skipped} skipped" if summary.skipped
                                       else ""), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
