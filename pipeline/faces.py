"""Face front-end shared by ``au_shards`` and ``predict``: detect, pick, crop.

The crop is the FMAE-IAT authors' (faces-and-inference.md): the detector's box enlarged by
5% of its width and height on each side, no alignment, clipped to the frame, resized to the
model's input size. Optionally the box is first made square about its centre (off by
default, as the reference). When a frame holds several faces the largest is used.

Detection runs behind one small interface, :class:`Detector` (``detect(images) -> faces per
image``), so another detector can be added next to :class:`MTCNNDetector`. The MTCNN
weights ship inside the ``facenet-pytorch`` wheel (``facenet_pytorch/data/*.pt``, MIT):
nothing is downloaded at run time. Images of equal size are detected as one batch, on the
GPU when one is given. Large frames are downscaled to ``max_side`` for detection only (a
BP4D frame is 1040x1392 with a face of ~400 px; MTCNN's cost grows with the pixel count)
and the boxes are scaled back.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Protocol, Sequence

import numpy as np
import torch
from PIL import Image

log = logging.getLogger(__name__)

MARGIN = 0.05  # the reference: 5% of the box's width / height added on each side
DETECTORS = ("mtcnn",)


@dataclass(frozen=True)
class Face:
    """One detected face in image pixels.

    box: (x0, y0, x1, y1) floats, x to the right, y down, x1 > x0, y1 > y0.
    score: detector confidence in [0, 1].
    landmarks: (5, 2) array (eyes, nose, mouth corners) or None.
    """
    box: tuple[float, float, float, float]
    score: float
    landmarks: np.ndarray | None = None

    @property
    def area(self) -> float:
        x0, y0, x1, y1 = self.box
        return max(0.0, x1 - x0) * max(0.0, y1 - y0)


class Detector(Protocol):
    name: str

    def detect(self, images: Sequence[Image.Image]) -> list[list[Face]]:
        """Faces per image, in each image's own pixel coordinates (may be empty)."""


def largest(faces: Sequence[Face]) -> Face | None:
    """The face with the largest box area (None when there is none)."""
    return max(faces, key=lambda f: f.area) if faces else None


def crop_box(box: Sequence[float], width: int, height: int, margin: float = MARGIN,
             square: bool = False) -> tuple[int, int, int, int]:
    """Integer crop rectangle for ``box`` in a ``width`` x ``height`` frame.

    The box is (optionally) made square about its centre with side max(w, h), then enlarged
    by ``margin`` x its width on the left and right and ``margin`` x its height on top and
    bottom, then clipped to the frame. Returns (x0, y0, x1, y1) with x1 > x0, y1 > y0.
    """
    x0, y0, x1, y1 = (float(v) for v in box)
    if square:
        cx, cy, s = (x0 + x1) / 2, (y0 + y1) / 2, max(x1 - x0, y1 - y0)
        x0, x1, y0, y1 = cx - s / 2, cx + s / 2, cy - s / 2, cy + s / 2
    dx, dy = margin * (x1 - x0), margin * (y1 - y0)
    cx0 = int(np.clip(np.floor(x0 - dx), 0, width - 1))
    cy0 = int(np.clip(np.floor(y0 - dy), 0, height - 1))
    cx1 = int(np.clip(np.ceil(x1 + dx), cx0 + 1, width))
    cy1 = int(np.clip(np.ceil(y1 + dy), cy0 + 1, height))
    return cx0, cy0, cx1, cy1


def crop_face(image: Image.Image, box: Sequence[float], size: int, margin: float = MARGIN,
              square: bool = False) -> Image.Image:
    """The reference crop of ``box`` out of ``image``, resized to ``size`` x ``size`` RGB."""
    rect = crop_box(box, image.width, image.height, margin, square)
    return image.convert("RGB").crop(rect).resize((size, size), Image.BICUBIC)


@dataclass(frozen=True)
class BoxCrop:
    """A picklable ``crop(image) -> image | None`` for one known box (None = no face): the
    reference crop rectangle of :func:`crop_box`, not yet resized."""
    box: tuple[float, float, float, float] | None
    margin: float = MARGIN
    square: bool = False

    def __call__(self, image: Image.Image) -> Image.Image | None:
        if self.box is None:
            return None
        return image.crop(crop_box(self.box, image.width, image.height, self.margin,
                                   self.square))


def iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two (x0, y0, x1, y1) boxes."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


class MTCNNDetector:
    """MTCNN (Zhang et al. 2016) from ``facenet-pytorch``, weights from its wheel.

    Args:
        device: torch device ("cpu", "cuda"); None = CUDA when available.
        min_face: smallest face side in pixels *of the detection image* (after downscaling).
        max_side: frames whose longer side exceeds this are downscaled for detection.
        threshold: score a face needs at the last stage (ONet); the first two stages keep
            facenet-pytorch's 0.6 and 0.7.
    """
    name = "mtcnn"

    def __init__(self, device: str | None = None, min_face: int = 20, max_side: int = 640,
                 threshold: float = 0.7):
        try:
            from facenet_pytorch import MTCNN
        except ImportError as e:  # pragma: no cover - a declared dependency
            raise RuntimeError("face detection needs facenet-pytorch (pip install "
                               "'facenet-pytorch>=2.5.3'); it ships the MTCNN weights") from e
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.max_side = int(max_side)
        self._mtcnn = MTCNN(keep_all=True, min_face_size=int(min_face),
                            thresholds=[0.6, 0.7, float(threshold)], device=self.device)

    def _scaled(self, im: Image.Image) -> tuple[Image.Image, float]:
        s = min(1.0, self.max_side / max(im.size))
        if s >= 1.0:
            return im.convert("RGB"), 1.0
        size = (max(1, round(im.width * s)), max(1, round(im.height * s)))
        return im.convert("RGB").resize(size, Image.BILINEAR), s

    def detect(self, images: Sequence[Image.Image]) -> list[list[Face]]:
        """Faces per image; images of equal (scaled) size go through MTCNN as one batch."""
        scaled = [self._scaled(im) for im in images]
        out: list[list[Face]] = [[] for _ in images]
        groups: dict[tuple[int, int], list[int]] = {}
        for i, (im, _) in enumerate(scaled):
            groups.setdefault(im.size, []).append(i)
        for idx in groups.values():
            batch = np.stack([np.asarray(scaled[i][0]) for i in idx])  # (N, H, W, 3) uint8
            with torch.no_grad():
                boxes, probs, points = self._mtcnn.detect(batch, landmarks=True)
            for j, i in enumerate(idx):
                out[i] = _faces(boxes[j], probs[j], points[j], scaled[i][1])
        return out


def _faces(boxes, probs, points, scale: float) -> list[Face]:
    """facenet-pytorch's per-image arrays -> Faces in original-image pixels."""
    if boxes is None:
        return []
    faces = []
    for b, p, lm in zip(boxes, probs, points):
        faces.append(Face(tuple(float(v) / scale for v in b), float(p),
                          None if lm is None else np.asarray(lm, np.float32) / scale))
    return faces


def make_detector(name: str = "mtcnn", device: str | None = None, **kw) -> Detector:
    """A detector by name (``DETECTORS``)."""
    if name == "mtcnn":
        return MTCNNDetector(device=device, **kw)
    raise ValueError(f"face detector {name!r} unknown; choose one of {', '.join(DETECTORS)}")
