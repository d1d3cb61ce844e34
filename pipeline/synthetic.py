"""Synthetic faces with identity-correlated Action Units: the pipeline's built-in default data.

The FMAE-IAT paper's central observation (Sec. 1, Sec. 3.2 and Sec. 5, "identity shortcut
learning") is that AU benchmarks hold few subjects with hundreds of frames each, so a network
can predict AUs from *who* is in the frame instead of *what the face does*. This module builds a
small data set in which that phenomenon is present by construction, so the whole pipeline
(MAE pretraining -> AU finetuning with and without IAT -> identity probing) can be run and
inspected offline in minutes:

* every subject has stable traits of the face and head (face shape, skin tone, eye spacing,
  nose and mouth geometry, hair, glasses, earrings) while the surroundings are shared, as in a
  lab recording: each task is filmed in one of a few scenes (background, clothes) and under
  lighting drawn from one distribution, so identity must be read from the face, and
* every subject has its own AU base rates (expression propensities drawn from Beta
  distributions, e.g. some subjects smile far more than others), with labels that form
  temporally smooth episodes within a task (like BP4D video segments),

so among training subjects identity predicts AUs, while held-out subjects gain nothing from it.
Each of the 15 AUs (1, 2, 4, 6, 7, 9, 10, 12, 14, 15, 17, 23, 24, 25, 26) is a visible,
localized geometric change of the drawn face (:data:`AU_REGIONS`) that survives downscaling to
64 px, the default finetuning resolution.

On disk (docs/design.md, "download: synthetic"; the AU part mirrors BP4D, see
reference/protocols.md):

* ``pool/NNNNNN.{jpg,png}``: "in the wild" pretraining images of varied size and aspect ratio
  (new identities, never the AU subjects), interleaved with odd files (truncated JPEG, a
  non-image named .jpg, a zero-byte file, CMYK JPEG, 8-bit and 16-bit grayscale PNG, an
  EXIF-rotated JPEG); ``pool/identities.csv`` maps ``key`` (the file name) to ``identity``.
* ``au/<subject>/<task>/<frame:04d>.jpg`` and ``au/AUCoding/AU_OCC/<subject>_<task>.csv``
  (header ``0,1,2,4,...,26``; values 0/1, 9 = not coded).
* ``contact_sheet.png`` and ``manifest.json``.

Everything is a pure function of ``SyntheticParams.seed`` (numpy ``SeedSequence`` streams keyed
by subject/task/frame, PIL drawing, fixed encoder settings): the same seed gives byte-identical
files.
"""
from __future__ import annotations

import functools
import io
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont
from tqdm import tqdm

from pipeline.io import atomic_path, atomic_write_bytes, atomic_write_json, read_json
from pipeline.params import SyntheticFerParams, SyntheticParams

log = logging.getLogger(__name__)

GENERATOR_VERSION = 4

# The 15 AUs drawn by the renderer, in BP4D column order (the 12 BP4D AUs plus DISFA's 9, 25, 26).
AUS: tuple[int, ...] = (1, 2, 4, 6, 7, 9, 10, 12, 14, 15, 17, 23, 24, 25, 26)
AU_NAMES: dict[int, str] = {
    1: "inner brow raiser", 2: "outer brow raiser", 4: "brow lowerer", 6: "cheek raiser",
    7: "lid tightener", 9: "nose wrinkler", 10: "upper lip raiser", 12: "lip corner puller",
    14: "dimpler", 15: "lip corner depressor", 17: "chin raiser", 23: "lip tightener",
    24: "lip pressor", 25: "lips part", 26: "jaw drop",
}
# First column header "0" is the frame number (BP4D AUCoding/AU_OCC convention).
BP4D_HEADER = "0," + ",".join(str(a) for a in AUS)
NOT_CODED = 9

# Where each AU changes the face, as boxes (x0, y0, x1, y1) in *face units*: the face centre
# is near (0, 0), x grows to the subject's left-to-right in the image, y grows downwards, and
# one unit is Shot.scale times half the shorter image side. The boxes are generous enough to
# hold the change for every subject the trait sampler can produce.
def _mirror(x0: float, y0: float, x1: float, y1: float) -> list[tuple[float, float, float, float]]:
    return [(-x1, y0, -x0, y1), (x0, y0, x1, y1)]


AU_REGIONS: dict[int, list[tuple[float, float, float, float]]] = {
    1: [(-0.50, -0.66, 0.50, -0.16)],   # the whole brow tilts, wrinkles sit mid-forehead
    2: _mirror(0.05, -0.66, 0.50, -0.16),
    4: [(-0.46, -0.52, 0.46, 0.00)],     # brows, glabella, and the slightly lowered lids
    6: [(-0.58, -0.24, 0.58, 0.20)],
    7: [(-0.42, -0.26, 0.42, 0.00)],
    9: [(-0.22, -0.16, 0.22, 0.24)],
    10: [(-0.38, 0.04, 0.38, 0.40)],
    12: [(-0.44, 0.04, 0.44, 0.46)],
    14: [(-0.42, 0.12, 0.42, 0.45)],
    15: [(-0.40, 0.12, 0.40, 0.64)],
    17: [(-0.32, 0.12, 0.32, 0.80)],
    23: [(-0.32, 0.12, 0.32, 0.48)],
    24: [(-0.34, 0.08, 0.34, 0.52)],
    25: [(-0.28, 0.12, 0.28, 0.48)],
    26: [(-0.62, 0.18, 0.62, 0.98)],
}

# Latent expressions drive correlated AUs (plausible co-occurrences: AU6 with AU12, AU25 with
# AU26, ...): {AU: probability that the AU joins an episode of the expression}.
EXPRESSIONS: dict[str, dict[int, float]] = {
    "smile": {12: 1.0, 6: 0.75, 25: 0.35, 10: 0.2},
    "surprise": {1: 0.95, 2: 0.9, 25: 0.8, 26: 0.6},
    "frown": {4: 1.0, 7: 0.75, 23: 0.45, 24: 0.35},
    "disgust": {9: 0.85, 10: 0.8, 4: 0.4, 17: 0.3},
    "sad": {1: 0.6, 4: 0.55, 15: 0.85, 17: 0.6},
    "suppress": {14: 0.8, 24: 0.55, 17: 0.5, 23: 0.3},
}
# BP4D's tasks elicit different emotions (T1 joke, T2 sad film, T3 startle, ...); each synthetic
# task boosts one expression a little, so tasks differ but subjects still dominate.
_TASK_EMPHASIS = ("smile", "sad", "surprise", "suppress", "frown", "disgust", "frown", "smile")

# Odd pool files, cycled through in this order. The first three must be skipped by the shard
# stage (undecodable), the last four are valid images it must convert.
ODD_KINDS: tuple[str, ...] = ("truncated_jpeg", "not_an_image", "empty_file", "cmyk_jpeg",
                              "grayscale_png", "gray16_png", "exif_rotated_jpeg")
UNDECODABLE_KINDS = frozenset(ODD_KINDS[:3])
_ODD_EXT = {"truncated_jpeg": "jpg", "not_an_image": "jpg", "empty_file": "jpg",
            "cmyk_jpeg": "jpg", "grayscale_png": "png", "gray16_png": "png",
            "exif_rotated_jpeg": "jpg"}

# Face size in AU frames: the face box (plus hair) nearly fills the frame, like a detector crop
# enlarged by 5% (protocols.md, "Face crop"), leaving some background at the sides.
AU_FRAME_SCALE = 1.65
# AU recordings share the lab, as in BP4D: every (subject, task) is filmed in one of a few
# scenes (background and clothes from one pool; lighting is drawn per task from one
# distribution), so nothing outside the face tells who is in the frame.
N_SCENES = 1
# Wild AU frames (``download.synthetic.wild``): a 4:3 frame of height ``frame_size`` with the
# face (one face unit = this x half the frame height) placed off-centre per task over a
# cluttered background, like a lab camera's full frame. The face box is known (see
# :func:`face_box`), so the detect-and-crop path of au_shards has a ground truth.
WILD_FACE_SCALE = 0.8
WILD_ASPECT = 4 / 3
_JPEG_QUALITY = 90

# SeedSequence stream ids: adding subjects or pool images never changes existing ones.
_S_SUBJECT, _S_LABELS, _S_FRAME, _S_POOL_ID, _S_POOL_IMG, _S_POOL_PLAN, _S_ODD, _S_SCENE = \
    range(1, 9)


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(k) for k in key]))


# --------------------------------------------------------------------------- identity traits
Color = tuple[int, int, int]

_SKIN_TONES: tuple[Color, ...] = ((255, 224, 196), (241, 194, 158), (224, 172, 125),
                                  (198, 134, 90), (160, 102, 66), (118, 74, 48), (95, 60, 40))
_HAIR_COLORS: tuple[Color, ...] = ((20, 16, 14), (60, 40, 25), (110, 72, 40), (170, 120, 60),
                                   (220, 190, 120), (150, 60, 30), (170, 170, 170), (90, 30, 90))
HAIR_STYLES = ("short", "bangs", "long", "bald", "afro", "bun", "side")
BACKGROUNDS = ("plain", "vstripes", "hstripes", "checker", "dots", "gradient")


@dataclass(frozen=True)
class FaceTraits:
    """Stable appearance of one identity (all lengths in face units, colours RGB)."""
    face_cy: float
    face_w: float            # half width of the face outline
    face_h: float            # half height of the face outline
    jaw_n: float             # superellipse exponent of the lower face: 2 round, 3+ square
    skin: Color
    eye_y: float
    eye_dx: float            # half the distance between the eye centres
    eye_rx: float
    eye_ry: float
    iris: Color
    brow_gap: float          # eye centre to brow, vertically
    brow_thick: float
    brow_arch: float
    brow_color: Color
    nose_tip_y: float
    nose_w: float
    nose_side: int           # which side the bridge shadow falls on (-1 or 1)
    mouth_y: float
    mouth_w: float           # half width of the mouth
    lip_u: float
    lip_l: float
    lip_color: Color
    mouth_rest: float        # resting corner lift (a neutral face is not perfectly flat)
    fold_rest: float         # resting nasolabial fold strength
    hair_style: str
    hair_color: Color
    background: str
    bg1: Color
    bg2: Color
    bg_period: float         # pattern period as a fraction of the shorter image side
    clothes: Color
    glasses: int             # 0 none, 1 round, 2 rectangular
    glasses_color: Color
    earrings: int            # 0 none, 1 studs, 2 hoops
    earring_color: Color
    mole: tuple[float, float] | None


def _pick(rng: np.random.Generator, seq: Sequence):
    return seq[int(rng.integers(len(seq)))]


def _jitter_color(rng: np.random.Generator, c: Color, amount: int) -> Color:
    return tuple(int(np.clip(v + rng.integers(-amount, amount + 1), 0, 255)) for v in c)


def _mix(a: Color, b: Color, t: float) -> Color:
    """Linear blend a -> b; drawing a line in _mix(skin, dark, t) emulates alpha t over skin."""
    t = min(max(t, 0.0), 1.0)
    return tuple(int(round(x + (y - x) * t)) for x, y in zip(a, b))


def sample_traits(rng: np.random.Generator, sex: str = "F", cohort: bool = False) -> FaceTraits:
    """Draw one identity. ``sex`` ('F'/'M') only shifts hair, face width and earrings odds.

    ``cohort``: an AU-study participant rather than a face from the wild. Participants'
    skin tones, hair colours and styles come from a narrower shared palette and accessories
    are rare, so no single glance (hair colour, glasses) names a subject: identity has to be
    read from the combination of face geometry and tone, as a network must learn it on BP4D.
    The random draws are the same either way, so ``cohort`` changes only the palette.
    """
    u = rng.uniform
    skin_idx = u(0, len(_SKIN_TONES) - 1)
    if cohort:  # the middle tones, overlapping once lighting varies
        skin_idx = 1.5 + skin_idx / (len(_SKIN_TONES) - 1) * 2.0
    lo = int(skin_idx)
    skin = _mix(_SKIN_TONES[lo], _SKIN_TONES[min(lo + 1, len(_SKIN_TONES) - 1)], skin_idx - lo)
    skin = _jitter_color(rng, skin, 8)
    face_cy = u(-0.04, 0.0)
    face_h = u(0.62, 0.72)
    eye_y = face_cy + u(-0.14, -0.08)
    nose_tip_y = eye_y + u(0.22, 0.28)
    hair_color = _pick(rng, _HAIR_COLORS[:3] if cohort else _HAIR_COLORS)
    styles = HAIR_STYLES if sex == "F" else ("short", "bald", "side", "short", "afro", "bangs")
    if cohort:
        styles = ("short", "side", "bangs", "long") if sex == "F" else ("short", "side")
    bg1 = tuple(int(v) for v in rng.integers(30, 230, 3))
    bg2 = _mix(bg1, tuple(int(v) for v in rng.integers(0, 256, 3)), u(0.3, 0.8))
    return FaceTraits(
        face_cy=face_cy,
        face_w=u(0.44, 0.52) + (0.03 if sex == "M" else 0.0),
        face_h=face_h,
        jaw_n=u(2.0, 3.4),
        skin=skin,
        eye_y=eye_y,
        eye_dx=u(0.17, 0.24),
        eye_rx=u(0.075, 0.095),
        eye_ry=u(0.042, 0.056),
        iris=_jitter_color(rng, _pick(rng, ((70, 45, 25), (40, 90, 140), (60, 110, 70),
                                            (110, 80, 40), (30, 25, 20))), 15),
        brow_gap=u(0.13, 0.17),
        brow_thick=u(0.026, 0.05),
        brow_arch=u(0.0, 0.035),
        # Brows follow the hair colour but are always darker than the skin (AU1/2/4 are read
        # from them, also on dark skin with fair hair).
        brow_color=tuple(min(a, b) for a, b in zip(_mix(hair_color, (20, 15, 10), u(0.3, 0.7)),
                                                   _shadow(skin, 0.55))),
        nose_tip_y=nose_tip_y,
        nose_w=u(0.055, 0.095),
        nose_side=int(rng.choice((-1, 1))),
        mouth_y=nose_tip_y + u(0.14, 0.19),
        mouth_w=u(0.13, 0.18),
        lip_u=u(0.025, 0.042),
        lip_l=u(0.03, 0.052),
        # Lips always darker and redder than the skin, so lip shape changes stay visible.
        lip_color=_shadow(_mix(skin, (175, 60, 75), u(0.35, 0.7)), 0.3),
        mouth_rest=u(-0.015, 0.015),
        fold_rest=u(0.0, 0.25),
        hair_style=_pick(rng, styles),
        hair_color=hair_color,
        background=_pick(rng, BACKGROUNDS),
        bg1=bg1,
        bg2=bg2,
        bg_period=u(0.08, 0.3),
        clothes=tuple(int(v) for v in rng.integers(0, 256, 3)),
        glasses=int(rng.choice(3, p=(0.9, 0.05, 0.05) if cohort else (0.6, 0.2, 0.2))),
        glasses_color=_pick(rng, ((20, 20, 20), (120, 30, 30), (200, 170, 60), (40, 40, 120))),
        earrings=int(rng.choice(3, p=(0.9, 0.05, 0.05) if cohort else (0.5, 0.25, 0.25)
                                if sex == "F" else (0.85, 0.1, 0.05))),
        earring_color=_pick(rng, ((230, 200, 60), (210, 210, 220), (200, 40, 60))),
        mole=(float(u(-0.4, 0.4)), float(u(-0.05, 0.45))) if u() < 0.3 else None,
    )


@dataclass(frozen=True)
class Scene:
    """A recording set-up shared by many subjects: what surrounds the face."""
    background: str
    bg1: Color
    bg2: Color
    bg_period: float
    clothes: Color


def sample_scenes(seed: int, n: int = N_SCENES) -> list[Scene]:
    """The shared pool of AU recording scenes (drawn like a subject's own surroundings)."""
    scenes = []
    for i in range(n):
        t = sample_traits(_rng(seed, _S_SCENE, i))
        scenes.append(Scene(t.background, t.bg1, t.bg2, t.bg_period, t.clothes))
    return scenes


def in_scene(traits: FaceTraits, scene: Scene) -> FaceTraits:
    """The identity's face and hair in a shared scene's background and clothes."""
    return replace(traits, background=scene.background, bg1=scene.bg1, bg2=scene.bg2,
                   bg_period=scene.bg_period, clothes=scene.clothes)


def task_scene(seed: int, subject_idx: int, task_idx: int, n: int = N_SCENES) -> int:
    """Which shared scene a subject's task was recorded in (uniform, independent of identity)."""
    return int(_rng(seed, _S_SCENE, 1000 + subject_idx, task_idx).integers(n))


# --------------------------------------------------------------------------- per-image conditions
@dataclass(frozen=True)
class Shot:
    """Per-image capture conditions: pose jitter, lighting, blur, noise and its seed."""
    dx: float = 0.0           # face centre offset, in half shorter sides
    dy: float = 0.0
    angle: float = 0.0        # in-plane roll, degrees
    scale: float = AU_FRAME_SCALE  # one face unit = scale * half the shorter side
    gain: float = 1.0         # global brightness
    slope_x: float = 0.0      # brightness change across the image (side lighting)
    slope_y: float = 0.0
    blur: float = 0.0         # Gaussian blur radius, output pixels
    noise: float = 0.0        # Gaussian noise sigma, grey levels
    seed: int = 0             # noise (and clutter) seed
    clutter: int = 0          # random shapes in the background ("in the wild")
    clutter_seed: int = -1    # clutter layout seed; -1 = ``seed`` (static clutter in a video)


def _sample_au_shot(rng: np.random.Generator) -> Shot:
    """Small jitter of a cooperative, frontal recording (AU frames)."""
    return Shot(dx=rng.normal(0, 0.015), dy=rng.normal(0, 0.015), angle=rng.normal(0, 2.0),
                scale=AU_FRAME_SCALE * rng.uniform(0.97, 1.03), gain=rng.uniform(0.9, 1.1),
                slope_x=rng.normal(0, 0.08), slope_y=rng.normal(0, 0.04),
                blur=float(rng.choice((0.0, 0.0, 0.0, 0.4))), noise=rng.uniform(1.0, 4.0),
                seed=int(rng.integers(2**31)))


# Share of pool images that are aligned face crops. Face9M is mostly such crops (CelebA's
# aligned set, FFHQ, the VGGFace2 / CASIA / MegaFace / UMDFaces crops); the rest are looser,
# in-the-wild framings (LAION-Face).
POOL_ALIGNED = 0.8


def _sample_pool_shot(rng: np.random.Generator) -> Shot:
    """Framing of a pool image: an aligned face crop, or a wild one (:data:`POOL_ALIGNED`)."""
    if rng.uniform() >= POOL_ALIGNED:
        return _sample_wild_shot(rng)
    return Shot(dx=rng.normal(0, 0.04), dy=rng.normal(0, 0.04), angle=rng.normal(0, 4.0),
                scale=AU_FRAME_SCALE * rng.uniform(0.85, 1.15), gain=rng.uniform(0.75, 1.2),
                slope_x=rng.normal(0, 0.2), slope_y=rng.normal(0, 0.1),
                blur=float(rng.choice((0.0, 0.0, 0.5, 1.0))), noise=rng.uniform(0.0, 6.0),
                seed=int(rng.integers(2**31)))


def _sample_wild_shot(rng: np.random.Generator) -> Shot:
    """Larger pose and framing variation for the pretraining pool."""
    return Shot(dx=rng.normal(0, 0.15), dy=rng.normal(0, 0.1), angle=rng.normal(0, 8.0),
                scale=rng.uniform(0.55, 1.35), gain=rng.uniform(0.7, 1.25),
                slope_x=rng.normal(0, 0.25), slope_y=rng.normal(0, 0.15),
                blur=float(rng.choice((0.0, 0.0, 0.6, 1.2, 2.0))), noise=rng.uniform(0.0, 9.0),
                seed=int(rng.integers(2**31)), clutter=int(rng.integers(0, 6)))


# --------------------------------------------------------------------------- renderer
_UNIT_CIRCLE: dict[int, tuple[np.ndarray, np.ndarray]] = {}


def _circle(n: int) -> tuple[np.ndarray, np.ndarray]:
    if n not in _UNIT_CIRCLE:
        t = np.linspace(0, 2 * np.pi, n, endpoint=False)
        _UNIT_CIRCLE[n] = (np.cos(t), np.sin(t))
    return _UNIT_CIRCLE[n]


class _Canvas:
    """Maps face units to pixels (scale, roll, offset) and draws polygons/lines through it."""

    def __init__(self, img: Image.Image, shot: Shot):
        self.draw = ImageDraw.Draw(img)
        w, h = img.size
        self.s = shot.scale * min(w, h) / 2.0   # pixels per face unit
        self.cx = w / 2.0 + shot.dx * min(w, h) / 2.0
        self.cy = h / 2.0 + shot.dy * min(w, h) / 2.0
        a = math.radians(shot.angle)
        self.ca, self.sa = math.cos(a), math.sin(a)

    def pts(self, xs, ys) -> list[float]:
        """Face units -> flat pixel list [x0, y0, x1, y1, ...] (what ImageDraw takes)."""
        xs, ys = np.asarray(xs, np.float64), np.asarray(ys, np.float64)
        flat = np.empty(2 * xs.size)
        flat[0::2] = self.cx + self.s * (self.ca * xs - self.sa * ys)
        flat[1::2] = self.cy + self.s * (self.sa * xs + self.ca * ys)
        return flat.tolist()

    def width(self, w: float) -> int:
        return max(1, int(round(w * self.s)))

    def poly(self, xs, ys, fill: Color) -> None:
        p = self.pts(xs, ys)
        if len(p) >= 6:
            self.draw.polygon(p, fill=fill)

    def line(self, xs, ys, color: Color, w: float, closed: bool = False) -> None:
        p = self.pts(xs, ys)
        self.draw.line(p + p[:2] if closed else p, fill=color, width=self.width(w),
                       joint="curve")

    def ellipse(self, cx: float, cy: float, rx: float, ry: float, fill: Color | None,
                outline: Color | None = None, w: float = 0.0, n: int = 28) -> None:
        ct, st = _circle(n)
        xs, ys = cx + rx * ct, cy + ry * st
        if fill is not None:
            self.poly(xs, ys, fill)
        if outline is not None:
            self.line(xs, ys, outline, w, closed=True)


_DARK: Color = (45, 25, 20)


def _shadow(c: Color, k: float) -> Color:
    """Darken ``c`` multiplicatively by strength ``k`` in [0, 1]: wrinkles and folds are
    shadows, and a multiplicative shadow keeps its contrast on dark skin too."""
    f = 1.0 - 0.7 * min(max(k, 0.0), 1.0)
    return tuple(int(round(v * f)) for v in c)
_SCLERA: Color = (238, 236, 230)


def _au(aus: Mapping[int, float], k: int) -> float:
    return float(min(max(aus.get(k, 0.0), 0.0), 1.0))


@functools.lru_cache(maxsize=32)
def _background(w: int, h: int, tr: FaceTraits) -> Image.Image:
    """The subject's background (pixel space, unaffected by pose). Cached: all frames of a
    subject share it; callers draw on a copy."""
    if tr.background == "plain":
        return Image.new("RGB", (w, h), tr.bg1)
    period = max(4.0, tr.bg_period * min(w, h))
    # 1-D coordinates broadcast to [h, w]: far cheaper than a full mesh grid.
    xs = np.arange(w, dtype=np.float32)[None, :]
    ys = np.arange(h, dtype=np.float32)[:, None]
    palette = np.array([tr.bg1, tr.bg2], np.uint8)
    if tr.background == "gradient":
        t = ys / max(h - 1, 1)                                            # [h, 1]
        rows = (palette[0] * (1 - t) + palette[1] * t).astype(np.uint8)   # [h, 3]
        return Image.fromarray(np.ascontiguousarray(np.repeat(rows[:, None, :], w, axis=1)))
    if tr.background == "vstripes":
        mask = np.broadcast_to((xs // period) % 2 == 1, (h, w))
    elif tr.background == "hstripes":
        mask = np.broadcast_to((ys // period) % 2 == 1, (h, w))
    elif tr.background == "checker":
        mask = ((xs // period) + (ys // period)) % 2 == 1
    else:  # dots
        mask = (xs % period - period / 2) ** 2 + (ys % period - period / 2) ** 2 \
            < (period * 0.22) ** 2
    return Image.fromarray(palette[mask.astype(np.uint8)])


def _draw_hair_back(c: _Canvas, tr: FaceTraits) -> None:
    top = tr.face_cy - tr.face_h
    hw = tr.face_w
    if tr.hair_style == "long":
        xs = [-hw - 0.12, -hw - 0.1, -hw * 0.6, 0, hw * 0.6, hw + 0.1, hw + 0.12]
        ys = [tr.face_cy + tr.face_h + 0.25, top + 0.25, top - 0.08, top - 0.1, top - 0.08,
              top + 0.25, tr.face_cy + tr.face_h + 0.25]
        c.poly(xs, ys, tr.hair_color)
    elif tr.hair_style == "afro":
        t = np.linspace(0, 2 * np.pi, 40, endpoint=False)
        r = 1.0 + 0.05 * np.cos(9 * t)
        c.poly(hw * 1.55 * r * np.cos(t), tr.face_cy - 0.22 + tr.face_h * 1.05 * r * np.sin(t),
               tr.hair_color)
    elif tr.hair_style == "bun":
        c.ellipse(0.0, top - 0.12, 0.17, 0.14, tr.hair_color)
    if tr.hair_style != "bald":
        # The skull cap behind the face outline.
        c.ellipse(0.0, tr.face_cy - 0.08, hw + 0.06, tr.face_h + 0.06, tr.hair_color)


def _draw_hair_front(c: _Canvas, tr: FaceTraits) -> None:
    """Hairline over the upper forehead. It stays above the AU1/AU2 forehead wrinkles."""
    if tr.hair_style == "bald":
        return
    hw = tr.face_w + 0.07
    top = tr.face_cy - tr.face_h - 0.08
    x = np.linspace(-hw, hw, 17)
    q = (x / hw) ** 2
    if tr.hair_style == "bangs":
        edge = np.full_like(x, tr.face_cy - tr.face_h * 0.70) + 0.02 * np.cos(x * 60)
    elif tr.hair_style == "side":
        edge = tr.face_cy - tr.face_h * 0.78 + 0.1 * q + 0.06 * np.clip(x / hw, 0, 1)
    else:
        edge = tr.face_cy - tr.face_h * 0.80 + 0.16 * q
    # Temples follow the face sides down to the ears.
    edge = np.minimum(edge, tr.eye_y - 0.16)
    arc = np.linspace(np.pi, 2 * np.pi, 17)
    xs = np.concatenate([hw * np.cos(arc), x[::-1]])
    centre = tr.face_cy - 0.06
    ys = np.concatenate([centre + (centre - top) * np.sin(arc), edge[::-1]])
    c.poly(xs, ys, tr.hair_color)
    if tr.hair_style == "long":  # locks falling over the ears
        for s in (-1, 1):
            c.poly([s * (tr.face_w - 0.02), s * (tr.face_w + 0.1), s * (tr.face_w + 0.12),
                    s * (tr.face_w + 0.02)],
                   [tr.eye_y - 0.2, tr.eye_y - 0.2, tr.face_cy + tr.face_h + 0.2,
                    tr.face_cy + tr.face_h * 0.5], tr.hair_color)


def _face_outline(tr: FaceTraits, jaw_drop: float) -> tuple[np.ndarray, np.ndarray]:
    t = np.linspace(0, 2 * np.pi, 48, endpoint=False)
    ct, st = np.cos(t), np.sin(t)
    lower = st > 0
    n = np.where(lower, tr.jaw_n, 2.2)
    xs = tr.face_w * np.sign(ct) * np.abs(ct) ** (2 / n)
    ys = np.sign(st) * np.abs(st) ** (2 / n)
    # AU26 lengthens the lower face: the jaw opens downwards.
    ys = tr.face_cy + np.where(lower, ys * (tr.face_h + jaw_drop), ys * tr.face_h)
    return xs, ys


def _draw_shading(c: _Canvas, tr: FaceTraits) -> None:
    """Soft relief under the features: darker face sides and eye sockets, the shadow under
    the nose. Drawn faces without it are flat, and photo-trained detectors miss more of
    them (MTCNN keys on the dark eye band over a lighter cheek line)."""
    side, socket = _shadow(tr.skin, 0.14), _shadow(tr.skin, 0.2)
    for s in (-1, 1):
        c.ellipse(s * tr.face_w * 0.8, tr.face_cy + 0.04, tr.face_w * 0.2, tr.face_h * 0.62,
                  side)
        c.ellipse(s * tr.eye_dx, tr.eye_y - tr.eye_ry * 0.4, tr.eye_rx * 1.55,
                  tr.eye_ry * 2.3, socket)
    c.ellipse(0.0, tr.nose_tip_y + 0.045, tr.nose_w * 0.8, 0.022, socket)


def _draw_eye(c: _Canvas, tr: FaceTraits, side: int, aus: Mapping[int, float]) -> None:
    """Eye aperture = ellipse minus skin-coloured lids; AU6/AU7 raise the lower lid, AU7 and
    AU4 lower the upper lid. (Widening the eye would be AU5, which is not drawn.)"""
    ex, ey, rx, ry = side * tr.eye_dx, tr.eye_y, tr.eye_rx, tr.eye_ry
    a6, a7, a4 = (_au(aus, k) for k in (6, 7, 4))
    upper = 0.08 + 0.45 * a7 + 0.25 * a4
    lower = 0.05 + 0.4 * a6 + 0.5 * a7
    shut = upper + lower  # never fully closed: the eye stays a visible slit (AU43 is not drawn)
    if shut > 0.75:
        upper, lower = upper * 0.75 / shut, lower * 0.75 / shut
    c.ellipse(ex, ey, rx, ry, _SCLERA)
    c.ellipse(ex, ey, ry * 0.95, ry * 0.95, tr.iris)
    c.ellipse(ex, ey, ry * 0.42, ry * 0.42, (15, 12, 12))
    x = np.linspace(-rx * 1.08, rx * 1.08, 15)
    q = np.clip(1 - (x / rx) ** 2, 0, 1)
    top_e = ey - ry * np.sqrt(q)            # ellipse top edge
    bot_e = ey + ry * np.sqrt(q)
    lid_t = np.maximum(ey - ry + 2 * ry * upper * np.sqrt(q) - 0.004, top_e - 0.01)
    lid_b = np.minimum(ey + ry - 2 * ry * lower * np.sqrt(q) + 0.004, bot_e + 0.01)
    c.poly(np.concatenate([ex + x, ex + x[::-1]]),
           np.concatenate([top_e - 0.012, lid_t[::-1]]), tr.skin)
    c.poly(np.concatenate([ex + x, ex + x[::-1]]),
           np.concatenate([bot_e + 0.012, lid_b[::-1]]), tr.skin)
    inside = q > 0
    c.line(ex + x[inside], lid_t[inside], (35, 22, 20), 0.014)
    c.line(ex + x[inside], lid_b[inside], _shadow(tr.skin, 0.45), 0.008)
    if a6 > 0:  # crow's feet and the raised-cheek bulge under the eye
        col = _shadow(tr.skin, 0.9 * a6)
        for k in (-1, 0, 1):
            c.line([ex + side * (rx + 0.015), ex + side * (rx + 0.075)],
                   [ey + k * 0.025, ey + k * 0.045], col, 0.02)
        c.line(ex + x * 0.8, ey + ry + 0.03 - 0.01 * q, col, 0.02)
    if a7 > 0:  # tightened lower lid: a tense line just below the aperture
        c.line(ex + x[inside] * 0.9, lid_b[inside] + 0.018,
               _shadow(tr.skin, 1.0 * a7), 0.05)


def _draw_brows(c: _Canvas, tr: FaceTraits, aus: Mapping[int, float]) -> None:
    """Brows (AU1 inner end up, AU2 outer end up, AU4 down and together) plus the forehead
    and glabella wrinkles that come with them."""
    a1, a2, a4 = _au(aus, 1), _au(aus, 2), _au(aus, 4)
    by = tr.eye_y - tr.brow_gap
    for s in (-1, 1):
        xi = tr.eye_dx - tr.eye_rx * 1.0 - 0.09 * a4           # AU4 pulls the brows together
        xo = tr.eye_dx + tr.eye_rx * 1.3
        yi = by + 0.005 - 0.14 * a1 + 0.12 * a4                 # AU1 lifts the inner end
        yo = by + 0.012 - 0.14 * a2 + 0.07 * a4                # AU2 lifts the outer end
        t = np.linspace(0, 1, 7)
        cx = xi + (xo - xi) * t
        cy = yi + (yo - yi) * t - (tr.brow_arch + 0.02 * (a1 + a2)) * np.sin(np.pi * t) * 1.2
        th = tr.brow_thick * (1.0 - 0.45 * t)
        c.poly(s * np.concatenate([cx, cx[::-1]]),
               np.concatenate([cy - th / 2, (cy + th / 2)[::-1]]), tr.brow_color)
    wr = 0.022
    if a1 > 0:  # central forehead wrinkles above the raised inner brows
        col = _shadow(tr.skin, 0.85 * a1)
        x = np.linspace(-0.15, 0.15, 7)
        for dy in (0.05, 0.10):
            c.line(x, by - 0.12 * a1 - dy + 0.025 * (x / 0.15) ** 2, col, wr)
    if a2 > 0:  # lateral forehead wrinkles above the raised outer brows
        col = _shadow(tr.skin, 0.85 * a2)
        for s in (-1, 1):
            x = np.linspace(0.13, 0.36, 6)
            for dy in (0.055, 0.105):
                c.line(s * x, by - 0.1 * a2 - dy - 0.02 * np.sin((x - 0.13) / 0.23 * np.pi),
                       col, wr)
    if a4 > 0:  # vertical glabella furrows between the lowered brows
        col = _shadow(tr.skin, 0.9 * a4)
        for s in (-1, 1):
            c.line([s * 0.035, s * 0.024], [by - 0.06, by + 0.1], col, 0.05)


def _draw_nose(c: _Canvas, tr: FaceTraits, aus: Mapping[int, float]) -> None:
    a9, a10 = _au(aus, 9), _au(aus, 10)
    shade = _shadow(tr.skin, 0.22)
    s = tr.nose_side
    c.line([s * tr.nose_w * 0.35, s * tr.nose_w * 0.6], [tr.eye_y + 0.05, tr.nose_tip_y - 0.03],
           shade, 0.012)
    c.ellipse(0.0, tr.nose_tip_y - 0.01, tr.nose_w * 0.55, 0.035, _shadow(tr.skin, 0.08))
    lift = 0.05 * a9 + 0.015 * a10                             # AU9/AU10 raise the nostrils
    flare = 1.0 + 0.8 * a9
    for side in (-1, 1):
        nx, ny = side * tr.nose_w * 0.62 * flare, tr.nose_tip_y + 0.022 - lift
        c.ellipse(nx, ny, 0.022 * flare, 0.012, (60, 35, 35))
        c.ellipse(side * (tr.nose_w * 0.95 * flare), ny - 0.008, 0.03 * flare, 0.034, None,
                  outline=shade, w=0.009, n=16)
    if a9 > 0:  # horizontal wrinkles across the bridge
        col = _shadow(tr.skin, 0.9 * a9)
        for dy in (0.035, 0.075, 0.115):
            x = np.linspace(-tr.nose_w * 1.1, tr.nose_w * 1.1, 5)
            c.line(x, tr.eye_y + dy - 0.012 * (1 - (x / tr.nose_w) ** 2), col, 0.045)


def _draw_mouth(c: _Canvas, tr: FaceTraits, aus: Mapping[int, float], jaw_drop: float) -> None:
    """Mouth from three curves over x in [-w, w]: the lip junction, the inner edges of the
    upper and lower lip (apart when AU10/25/26 open the mouth) and the outer lip edges."""
    a = {k: _au(aus, k) for k in (10, 12, 14, 15, 17, 23, 24, 25, 26)}
    w = tr.mouth_w * (1 + 0.35 * a[12] - 0.5 * a[23] - 0.1 * a[24] - 0.25 * a[14]
                      - 0.08 * a[26])
    lift = tr.mouth_rest + 0.13 * a[12] - 0.22 * a[15] + 0.01 * a[14]  # + = corners up
    ut = max(0.006, tr.lip_u * (1 - 0.75 * a[23] - 0.8 * a[24]) * (1 - 0.25 * a[12]))
    lt = max(0.006, tr.lip_l * (1 - 0.75 * a[23] - 0.8 * a[24]) * (1 - 0.2 * a[12])
             + 0.012 * a[17])
    raise_u = 0.13 * a[10]                       # AU10 lifts the upper lip, baring teeth
    gap = 0.05 * a[25] + 0.06 * a[26]             # AU25 parts the lips, AU26 drops the jaw
    x = np.linspace(-w, w, 17)
    q = (x / w) ** 2
    junction = tr.mouth_y - lift * q - 0.018 * a[17] * (1 - q)   # AU17 pushes the centre up
    upper_in = junction - raise_u * (1 - 0.7 * q) - 0.35 * gap * (1 - q)
    lower_in = junction + (0.65 * gap + jaw_drop) * (1 - q)
    upper_out = upper_in - ut * (1 - 0.75 * q) + 0.007 * np.exp(-(x / 0.03) ** 2)
    lower_out = lower_in + lt * (1 - 0.8 * q)
    # AU14 dimples and AU24 pressing bulges sit just outside the lips.
    if a[14] > 0:
        col = _shadow(tr.skin, 1.0 * a[14])
        for s in (-1, 1):
            t = np.linspace(-1, 1, 5)
            c.line(s * (w + 0.05 - 0.025 * (1 - t ** 2)), junction[0] + 0.1 * t, col, 0.075)
    if a[23] > 0:  # tightened lips: pale, tense ridges along the thinned lips
        col = _mix(tr.skin, (255, 255, 255), 1.0 * a[23])
        c.line(x * 0.85, upper_out - 0.022, col, 0.05)
        c.line(x * 0.85, lower_out + 0.022, col, 0.05)
    if a[24] > 0:
        col = _shadow(tr.skin, 1.0 * a[24])
        c.line(x * 0.8, upper_out - 0.03 - 0.006 * (1 - q), col, 0.05)
        c.line(x * 0.8, lower_out + 0.03 + 0.006 * (1 - q), col, 0.05)
    opening = gap + raise_u + jaw_drop
    if opening > 0:
        c.poly(np.concatenate([x, x[::-1]]), np.concatenate([upper_in, lower_in[::-1]]),
               (70, 22, 30))
        teeth_h = np.minimum(0.032, lower_in - upper_in)
        k = q < 0.6
        c.poly(np.concatenate([x[k], x[k][::-1]]),
               np.concatenate([upper_in[k], (upper_in + teeth_h)[k][::-1]]), (240, 238, 228))
    lip_dark = _mix(tr.lip_color, _DARK, 0.25)
    c.poly(np.concatenate([x, x[::-1]]), np.concatenate([upper_out, upper_in[::-1]]),
           tr.lip_color)
    c.poly(np.concatenate([x, x[::-1]]), np.concatenate([lower_in, lower_out[::-1]]),
           _mix(tr.lip_color, (255, 255, 255), 0.08))
    # The lip contour: shape changes (AU12/15/23) read as a moving edge, even at 64 px.
    c.line(x, upper_out, _shadow(tr.lip_color, 0.55), 0.01)
    c.line(x, lower_out, _shadow(tr.lip_color, 0.55), 0.01)
    if a[15] > 0:  # the depressor's short folds running down from the lowered corners
        col = _shadow(tr.skin, 0.9 * a[15])
        for s in (-1, 1):
            c.line([s * (w + 0.005), s * (w + 0.04)], [junction[0] + 0.01, junction[0] + 0.09],
                   col, 0.04)
    if opening <= 0:
        c.line(x, junction, _mix(lip_dark, _DARK, 0.5 * a[24] + 0.6 * a[23]),
               0.011 + 0.008 * a[24] + 0.012 * a[23])
    if a[17] > 0:  # chin boss: shading, "orange peel" dimples, and the deepened sulcus
        chin_y = tr.face_cy + tr.face_h + jaw_drop - 0.12
        c.ellipse(0.0, chin_y, 0.13, 0.07, _shadow(tr.skin, 0.35 * a[17]))
        col = _shadow(tr.skin, 0.8 * a[17])
        for dx, dy in ((-0.05, -0.015), (0.0, 0.01), (0.05, -0.015), (-0.025, 0.03),
                       (0.03, 0.032)):
            c.ellipse(dx, chin_y + dy, 0.016, 0.013, col, n=10)
        xs = np.linspace(-0.1, 0.1, 7)
        c.line(xs, lower_out.max() + 0.03 + 0.012 * (xs / 0.1) ** 2, col, 0.022)


def _draw_folds(c: _Canvas, tr: FaceTraits, aus: Mapping[int, float]) -> None:
    """Nasolabial folds deepen with AU10 and AU12 (and are part of some faces at rest)."""
    a10, a12 = _au(aus, 10), _au(aus, 12)
    strength = tr.fold_rest + 0.75 * a12 + 0.6 * a10
    if strength <= 0.02:
        return
    col = _shadow(tr.skin, 0.5 * min(strength, 1.0))
    for s in (-1, 1):
        x0, y0 = s * (tr.nose_w + 0.04), tr.nose_tip_y - 0.005
        x1 = s * (tr.mouth_w * (1 + 0.22 * a12) + 0.05)
        y1 = tr.mouth_y + 0.07 - 0.04 * a12
        t = np.linspace(0, 1, 7)
        c.line(x0 + (x1 - x0) * t + s * 0.03 * np.sin(np.pi * t), y0 + (y1 - y0) * t, col, 0.024)


def _draw_clutter(draw: ImageDraw.ImageDraw, rng: np.random.Generator, w: int, h: int,
                  n: int) -> None:
    for _ in range(n):
        x0, y0 = rng.uniform(0, w), rng.uniform(0, h)
        x1, y1 = x0 + rng.uniform(0.05, 0.4) * w, y0 + rng.uniform(0.05, 0.4) * h
        col = tuple(int(v) for v in rng.integers(0, 256, 3))
        if rng.uniform() < 0.5:
            draw.rectangle((x0, y0, x1, y1), fill=col)
        else:
            draw.ellipse((x0, y0, x1, y1), fill=col)


def render_face(traits: FaceTraits, aus: Mapping[int, float], shot: Shot, width: int,
                height: int | None = None) -> Image.Image:
    """Draw one face. Pure: the same arguments give the same pixels.

    Args:
        traits: the identity (:func:`sample_traits`).
        aus: AU number -> intensity in [0, 1]; missing AUs are 0 (off).
        shot: pose, lighting, blur and noise (``Shot()`` = frontal, clean, AU-frame framing).
        width, height: output size in pixels (height defaults to width).
    Returns:
        an RGB image of ``width x height``.
    """
    height = width if height is None else height
    # Supersample small images so thin lines and 1-2 px AU shifts are anti-aliased.
    ss = 2 if max(width, height) <= 320 else 1
    W, H = width * ss, height * ss
    img = _background(W, H, traits).copy()
    rng = np.random.default_rng(shot.seed)
    if shot.clutter:
        crng = rng if shot.clutter_seed < 0 else np.random.default_rng(shot.clutter_seed)
        _draw_clutter(ImageDraw.Draw(img), crng, W, H, shot.clutter)
    c = _Canvas(img, shot)
    tr = traits
    jaw_drop = 0.1 * _au(aus, 26)

    # Behind the face: hair mass, neck and clothes, ears.
    _draw_hair_back(c, tr)
    neck_w = tr.face_w * 0.55
    neck_top = tr.face_cy + tr.face_h * 0.5
    c.poly([-neck_w, neck_w, neck_w, -neck_w], [neck_top, neck_top, 1.6, 1.6],
           _shadow(tr.skin, 0.12))
    sh_y = tr.face_cy + tr.face_h + 0.2
    t = np.linspace(np.pi, 2 * np.pi, 17)
    c.poly(np.concatenate([1.15 * np.cos(t), [1.3, -1.3]]),
           np.concatenate([sh_y + 0.35 + 0.3 * np.sin(t), [2.0, 2.0]]), tr.clothes)
    for s in (-1, 1):
        c.ellipse(s * (tr.face_w + 0.02), tr.eye_y + 0.07, 0.055, 0.095, _shadow(tr.skin, 0.07))

    # The face and its features, front to back in the order occlusion requires.
    c.poly(*_face_outline(tr, jaw_drop), tr.skin)
    _draw_shading(c, tr)
    a6 = _au(aus, 6)
    if a6 > 0:  # AU6 raises the cheeks: rounder, rosier cheek apples
        for s in (-1, 1):
            c.ellipse(s * (tr.eye_dx + 0.04), tr.eye_y + 0.17 - 0.04 * a6, 0.11, 0.08,
                      _mix(tr.skin, (210, 70, 80), 0.55 * a6))
    if tr.mole is not None:
        c.ellipse(tr.mole[0], tr.mole[1], 0.012, 0.012, (70, 45, 35), n=10)
    _draw_folds(c, tr, aus)
    for s in (-1, 1):
        _draw_eye(c, tr, s, aus)
    _draw_brows(c, tr, aus)
    _draw_nose(c, tr, aus)
    _draw_mouth(c, tr, aus, jaw_drop)
    _draw_hair_front(c, tr)
    if tr.glasses:
        for s in (-1, 1):
            ex, ey = s * tr.eye_dx, tr.eye_y + 0.005
            rx, ry = tr.eye_rx + 0.05, tr.eye_ry + 0.05
            if tr.glasses == 1:
                c.ellipse(ex, ey, rx, ry, None, outline=tr.glasses_color, w=0.016)
            else:
                c.line([ex - rx, ex + rx, ex + rx, ex - rx, ex - rx],
                       [ey - ry, ey - ry, ey + ry, ey + ry, ey - ry], tr.glasses_color, 0.016)
            c.line([s * (tr.eye_dx + rx), s * (tr.face_w + 0.02)], [ey - 0.01, ey - 0.03],
                   tr.glasses_color, 0.014)
        c.line([-tr.eye_dx + tr.eye_rx + 0.05, tr.eye_dx - tr.eye_rx - 0.05],
               [tr.eye_y - 0.01, tr.eye_y - 0.01], tr.glasses_color, 0.014)
    if tr.earrings:
        for s in (-1, 1):
            ex, ey = s * (tr.face_w + 0.01), tr.eye_y + 0.19
            if tr.earrings == 1:
                c.ellipse(ex, ey, 0.022, 0.022, tr.earring_color, n=12)
            else:
                c.ellipse(ex, ey + 0.035, 0.035, 0.04, None, outline=tr.earring_color, w=0.012,
                          n=16)

    if ss > 1:
        img = img.resize((width, height), Image.Resampling.BOX)
    if shot.blur > 0:
        img = img.filter(ImageFilter.GaussianBlur(shot.blur))
    # Lighting (a linear ramp, like a lamp on one side) and sensor noise, in float. The noise
    # is mostly luminance (one channel broadcast to three), which is also a third the cost.
    arr = np.asarray(img, dtype=np.float32)                              # [H, W, 3]
    if shot.gain != 1.0 or shot.slope_x or shot.slope_y:
        gx = np.linspace(-0.5, 0.5, width, dtype=np.float32)[None, :] * np.float32(shot.slope_x)
        gy = np.linspace(-0.5, 0.5, height, dtype=np.float32)[:, None] * np.float32(shot.slope_y)
        arr *= (np.float32(shot.gain) + gx + gy)[..., None]
    if shot.noise > 0:
        arr += rng.standard_normal((height, width, 1), dtype=np.float32) * np.float32(shot.noise)
    arr += 0.5
    np.clip(arr, 0, 255, out=arr)
    return Image.fromarray(arr.astype(np.uint8))


def face_box(traits: FaceTraits, shot: Shot, width: int, height: int | None = None
             ) -> tuple[float, float, float, float]:
    """Pixel box (x0, y0, x1, y1) of the visible face in ``render_face(traits, ..., shot,
    width, height)``: cheek to cheek, hairline to chin at rest, roll ignored (a few degrees in
    AU frames). The hairline is put at 85% of the way up the face outline, since face
    detection annotations (WIDER FACE, which MTCNN learnt from) mark the visible face."""
    height = width if height is None else height
    s = shot.scale * min(width, height) / 2.0
    cx = width / 2.0 + shot.dx * min(width, height) / 2.0
    cy = height / 2.0 + shot.dy * min(width, height) / 2.0
    return (cx - s * traits.face_w, cy + s * (traits.face_cy - 0.85 * traits.face_h),
            cx + s * traits.face_w, cy + s * (traits.face_cy + traits.face_h))


def _sample_wild_frame_shot(rng: np.random.Generator) -> Shot:
    """A task's framing in wild mode: the AU shot, smaller and off-centre, over clutter."""
    base = _sample_au_shot(rng)
    return replace(base, scale=WILD_FACE_SCALE * rng.uniform(0.92, 1.08),
                   dx=rng.uniform(-0.55, 0.55), dy=rng.uniform(-0.12, 0.12),
                   clutter=int(rng.integers(2, 7)), clutter_seed=int(rng.integers(2**31)))


def region_mask(au: int, shot: Shot, width: int, height: int | None = None) -> np.ndarray:
    """Boolean ``[height, width]`` mask of the pixels inside ``AU_REGIONS[au]`` under ``shot``."""
    height = width if height is None else height
    m = Image.new("L", (width, height), 0)
    c = _Canvas(m, shot)
    for x0, y0, x1, y1 in AU_REGIONS[au]:
        c.draw.polygon(c.pts([x0, x1, x1, x0], [y0, y0, y1, y1]), fill=255)
    return np.asarray(m) > 0


# --------------------------------------------------------------------------- labels
def _markov(rng: np.random.Generator, p: float, n: int, mean_on: float) -> np.ndarray:
    """A two-state chain with stationary on-probability ``p`` and mean episode length
    ``mean_on`` frames: temporally smooth labels like AU episodes in a video. [n] bool."""
    p = float(np.clip(p, 1e-3, 0.97))
    off = 1.0 / mean_on                     # P(on -> off)
    on = p * off / (1 - p)                  # P(off -> on), from p = on / (on + off)
    if on > 1.0:
        on, off = 1.0, (1 - p) / p
    u = rng.uniform(size=n)
    out = np.empty(n, bool)
    state = rng.uniform() < p
    for i in range(n):
        out[i] = state
        state = (u[i] >= off) if state else (u[i] < on)
    return out


def _runs(x: np.ndarray) -> list[tuple[int, int]]:
    """[(start, stop)] of the True runs of a bool vector."""
    d = np.diff(np.concatenate([[0], x.astype(np.int8), [0]]))
    return list(zip(np.flatnonzero(d == 1), np.flatnonzero(d == -1)))


def _subject_propensities(seed: int, s: int) -> dict:
    """Per-subject expression rates (Beta: wide spread across subjects) and per-AU rates."""
    rng = _rng(seed, _S_LABELS, s)
    return {"expr": {e: float(rng.beta(3.0, 12.0)) for e in EXPRESSIONS},
            "au": {a: float(rng.beta(2.0, 40.0)) for a in AUS}}


def _simulate_task(rng: np.random.Generator, prop: dict, task_idx: int,
                   n: int) -> np.ndarray:
    """AU intensities [n, len(AUS)] in [0, 1] for one task; > 0 means the AU occurs."""
    mean_on = float(np.clip(n / 3.0, 4.0, 60.0))   # a few episodes per task
    inten = np.zeros((n, len(AUS)), np.float32)
    col = {a: i for i, a in enumerate(AUS)}
    emphasis = _TASK_EMPHASIS[task_idx % len(_TASK_EMPHASIS)]

    def add(a: int, start: int, stop: int) -> None:
        level = np.full(stop - start, rng.uniform(0.55, 1.0), np.float32)
        if stop - start >= 3:  # onset and offset frames are weaker
            level[0] *= 0.65
            level[-1] *= 0.65
        inten[start:stop, col[a]] = np.maximum(inten[start:stop, col[a]], level)

    for e, members in EXPRESSIONS.items():
        p = prop["expr"][e] * (1.6 if e == emphasis else 1.0)
        for start, stop in _runs(_markov(rng, p, n, mean_on)):
            for a, q in members.items():
                if rng.uniform() < q:
                    add(a, start, stop)
    for a in AUS:
        for start, stop in _runs(_markov(rng, prop["au"][a], n, mean_on * 0.6)):
            add(a, start, stop)
    # Plausible coupling: a dropped jaw parts the lips; most smiles raise the cheeks.
    for src, dst, q in ((26, 25, 0.9), (12, 6, 0.5)):
        for start, stop in _runs(inten[:, col[src]] > 0):
            if rng.uniform() < q:
                add(dst, start, stop)
    return inten


def _not_coded(rng: np.random.Generator, n: int) -> np.ndarray:
    """Mask [n, len(AUS)] of cells coded 9: ~2% of cells plus, now and then, a whole column."""
    mask = rng.uniform(size=(n, len(AUS))) < 0.02
    mask[:, rng.uniform(size=len(AUS)) < 0.025] = True
    return mask


# --------------------------------------------------------------------------- plan
@dataclass(frozen=True)
class _Task:
    subject: str
    task: str
    frames: tuple[int, ...]         # BP4D frame numbers
    intensity: np.ndarray           # [n, 15] float32
    not_coded: np.ndarray           # [n, 15] bool


@dataclass(frozen=True)
class _PoolItem:
    name: str
    kind: str                       # "image" or one of ODD_KINDS
    width: int
    height: int
    identity: str | None
    identity_idx: int
    index: int


def subject_ids(n: int) -> list[str]:
    """BP4D-style ids, alternating F and M: F001, M001, F002, M002, ..."""
    return [f"{'FM'[i % 2]}{i // 2 + 1:03d}" for i in range(n)]


def _plan_au(cfg: SyntheticParams) -> tuple[list[str], list[_Task]]:
    subjects = subject_ids(cfg.subjects)
    tasks = []
    for s, sid in enumerate(subjects):
        prop = _subject_propensities(cfg.seed, s)
        for t in range(cfg.tasks):
            rng = _rng(cfg.seed, _S_LABELS, s, 1000 + t)
            # Labelled segments of BP4D videos start mid-video: frame numbers are offset.
            first = int(rng.integers(1, 400))
            n = cfg.frames_per_task
            tasks.append(_Task(sid, f"T{t + 1}", tuple(range(first, first + n)),
                               _simulate_task(rng, prop, t, n), _not_coded(rng, n)))
    # Guarantee the "not coded" case exists at all (readers must handle it): if no cell is 9,
    # un-code one whole AU column of the first task.
    if not any(t.not_coded.any() for t in tasks):
        tasks[0].not_coded[:, len(AUS) - 1] = True
    return subjects, tasks


def _aspect_sizes(rng: np.random.Generator, category: str) -> tuple[int, int]:
    """(width, height) for one pool image of an aspect-ratio category."""
    # Long side in [128, 640], skewed to small (median ~190 px) so generation stays fast while
    # the shard stage still meets large images and its JPEG draft path.
    long_side = int(128 * 5.0 ** (rng.uniform() ** 2))
    if category == "square":
        return long_side, long_side
    if category in ("exact_wide", "exact_tall"):      # exactly 1.5: kept by the shard filter
        k = max(48, long_side // 3)
        w, h = 3 * k, 2 * k
    elif category in ("over_wide", "over_tall"):      # > 1.5: dropped by the shard filter
        r = rng.uniform(1.55, 2.4)
        w, h = long_side, max(96, int(long_side / r))
        if w / h <= 1.5:
            w = int(h * r) + 1
    else:                                             # mild: within [1, 1.5)
        r = rng.uniform(1.05, 1.45)
        w, h = long_side, max(96, int(round(long_side / r)))
    w, h = max(w, 96), max(h, 96)
    return (w, h) if category.endswith("wide") or category == "mild_wide" else (h, w)


_ASPECT_CYCLE = ("square", "square", "square", "mild_wide", "mild_tall", "exact_wide",
                 "exact_tall", "over_wide", "over_tall", "mild_wide")
_ODD_SIZES = {"truncated_jpeg": (200, 180), "cmyk_jpeg": (160, 200), "grayscale_png": (180, 180),
              "gray16_png": (200, 160), "exif_rotated_jpeg": (160, 240)}


def _plan_pool(cfg: SyntheticParams) -> list[_PoolItem]:
    rng = _rng(cfg.seed, _S_POOL_PLAN)
    total = cfg.pool_images + cfg.pool_broken
    # Odd files sit at random positions so a reader meets them mid-stream, not only at the end.
    odd_pos = sorted(rng.choice(total, size=cfg.pool_broken, replace=False).tolist())
    odd_kind = {p: ODD_KINDS[i % len(ODD_KINDS)] for i, p in enumerate(odd_pos)}
    n_ids = max(1, cfg.pool_images // 8)
    cats: list[str] = []
    items = []
    for i in range(total):
        if not cats:  # each block of 10 images covers every aspect category once
            cats = [_ASPECT_CYCLE[j] for j in rng.permutation(len(_ASPECT_CYCLE))]
        ident_idx = int(rng.integers(n_ids))
        ident = f"W{ident_idx:05d}"
        if i in odd_kind:
            kind = odd_kind[i]
            w, h = _ODD_SIZES.get(kind, (0, 0))
            has_face = kind not in ("not_an_image", "empty_file")
            items.append(_PoolItem(f"{i:06d}.{_ODD_EXT[kind]}", kind, w, h,
                                   ident if has_face else None, ident_idx, i))
        else:
            w, h = _aspect_sizes(rng, cats.pop())
            ext = "png" if rng.uniform() < 0.3 else "jpg"
            items.append(_PoolItem(f"{i:06d}.{ext}", "image", w, h, ident, ident_idx, i))
    return items


# --------------------------------------------------------------------------- encoding helpers
def _jpeg(img: Image.Image, quality: int = _JPEG_QUALITY, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality, **kw)
    return buf.getvalue()


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG", compress_level=1)   # fast; PNG has no timestamps, so bytes are stable
    return buf.getvalue()


def _write(path: Path, data: bytes) -> None:
    """Atomic (rename) but without fsync: thousands of small files, and manifest.json (written
    last, with fsync) is what marks the folder complete."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def _odd_file(item: _PoolItem, face: Image.Image | None) -> bytes:
    if item.kind == "empty_file":
        return b""
    if item.kind == "not_an_image":  # what a failed download often leaves behind
        return b"<!DOCTYPE html>\n<html><body><h1>404 Not Found</h1></body></html>\n"
    assert face is not None
    if item.kind == "truncated_jpeg":
        data = _jpeg(face)
        return data[: int(len(data) * 0.55)]
    if item.kind == "cmyk_jpeg":
        return _jpeg(face.convert("CMYK"))
    if item.kind == "grayscale_png":
        return _png(face.convert("L"))
    if item.kind == "gray16_png":
        arr16 = np.asarray(face.convert("L"), dtype=np.uint16) * 257   # full 16-bit range
        return _png(Image.fromarray(arr16))   # uint16 2-D -> mode "I;16"
    if item.kind == "exif_rotated_jpeg":
        # Orientation 6 = "rotate 90 degrees clockwise to display": store the face sideways
        # (rotated counter-clockwise) so only a reader honouring EXIF sees it upright.
        exif = Image.Exif()
        exif[0x0112] = 6
        return _jpeg(face.transpose(Image.Transpose.ROTATE_90), exif=exif.tobytes())
    raise ValueError(f"unknown odd pool file kind {item.kind!r}; known: {ODD_KINDS}")


def _random_expression(rng: np.random.Generator) -> dict[int, float]:
    """Pool faces show expressions too, so pretraining sees every AU's appearance."""
    aus: dict[int, float] = {}
    if rng.uniform() < 0.6:
        e = _pick(rng, list(EXPRESSIONS))
        for a, q in EXPRESSIONS[e].items():
            if rng.uniform() < q:
                aus[a] = float(rng.uniform(0.4, 1.0))
    for a in AUS:
        if rng.uniform() < 0.06:
            aus[a] = max(aus.get(a, 0.0), float(rng.uniform(0.3, 1.0)))
    return aus


# --------------------------------------------------------------------------- contact sheet
def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):  # Pillow without FreeType: the bitmap font
        return ImageFont.load_default()


def _wrap(d: ImageDraw.ImageDraw, text: str, font, width: int) -> str:
    """Greedy word wrap to ``width`` pixels (captions under thumbnails)."""
    lines, cur = [], ""
    for word in text.split():
        cand = f"{cur} {word}".strip()
        if cur and d.textlength(cand, font=font) > width:
            lines.append(cur)
            cur = word
        else:
            cur = cand
    return "\n".join(lines + [cur])


def _thumb(img: Image.Image, box: int) -> Image.Image:
    img = img.copy()
    img.thumbnail((box, box), Image.Resampling.LANCZOS)
    return img


def _contact_sheet(rows: list[tuple[str, str, list[tuple[Image.Image, str]]]],
                   au_demo: tuple[str, list[tuple[int, Image.Image, Image.Image]]],
                   pool: list[tuple[Image.Image, str]], note: str) -> bytes:
    """Three panels: samples per subject (rows), each AU off/on/|diff| for one subject, and
    pool samples; every thumbnail is labelled."""
    th, pad, label_w = 88, 6, 150
    f_title, f_lab, f_small = _font(18), _font(12), _font(10)
    n_cols = max(len(r[2]) for r in rows) if rows else 0
    demo_cols = 5
    demo_w = 3 * th + 2 * pad
    width = max(label_w + n_cols * (th + pad), demo_cols * (demo_w + 2 * pad),
                len(pool) * (th + pad)) + 2 * pad
    row_h = th + 30 + pad
    demo_rows = math.ceil(len(au_demo[1]) / demo_cols)
    height = (40 + len(rows) * row_h + 44 + demo_rows * (th + 34) + 44 + th + 24 + 30)
    sheet = Image.new("RGB", (width, height), (255, 255, 255))
    d = ImageDraw.Draw(sheet)
    y = pad
    d.text((pad, y), "A. Synthetic AU subjects (rows): frames across tasks; active AUs below",
           fill=(0, 0, 0), font=f_title)
    y += 34
    for sid, desc, frames in rows:
        d.text((pad, y + 4), sid, fill=(0, 0, 0), font=f_title)
        d.multiline_text((pad, y + 28), desc, fill=(70, 70, 70), font=f_small, spacing=2)
        for j, (img, cap) in enumerate(frames):
            x = label_w + j * (th + pad)
            sheet.paste(_thumb(img, th), (x, y))
            d.multiline_text((x, y + th + 1), _wrap(d, cap, f_small, th), fill=(0, 0, 0),
                             font=f_small, spacing=1)
        y += row_h
    y += 8
    d.text((pad, y), f"B. Each AU off | on | 4x |difference|, subject {au_demo[0]}, "
                     "frontal, no noise", fill=(0, 0, 0), font=f_title)
    y += 34
    for i, (au, off, on) in enumerate(au_demo[1]):
        x = pad + (i % demo_cols) * (demo_w + 2 * pad)
        yy = y + (i // demo_cols) * (th + 34)
        diff = np.abs(np.asarray(on, np.int16) - np.asarray(off, np.int16)).max(axis=2)
        heat = Image.fromarray(np.clip(diff * 4, 0, 255).astype(np.uint8)).convert("RGB")
        for k, im in enumerate((off, on, heat)):
            sheet.paste(_thumb(im, th), (x + k * (th + pad), yy))
        d.text((x, yy + th + 2), f"AU{au} {AU_NAMES[au]}", fill=(0, 0, 0), font=f_lab)
    y += demo_rows * (th + 34) + 10
    d.text((pad, y), "C. Pretraining pool samples (size w x h)", fill=(0, 0, 0), font=f_title)
    y += 34
    for j, (img, cap) in enumerate(pool):
        x = pad + j * (th + pad)
        t = _thumb(img, th)
        sheet.paste(t, (x + (th - t.width) // 2, y + (th - t.height) // 2))
        d.text((x, y + th + 2), cap, fill=(0, 0, 0), font=f_small)
    d.text((pad, height - 22), note, fill=(90, 90, 90), font=f_small)
    buf = io.BytesIO()
    sheet.save(buf, "PNG", compress_level=6)
    return buf.getvalue()


# --------------------------------------------------------------------------- generate
def _labels_matrix(task: _Task) -> np.ndarray:
    lab = (task.intensity > 0).astype(np.int64)
    lab[task.not_coded] = NOT_CODED
    return lab


def _csv_text(task: _Task) -> str:
    lab = _labels_matrix(task)
    lines = [BP4D_HEADER]
    lines += [",".join([str(f)] + [str(v) for v in row]) for f, row in zip(task.frames, lab)]
    return "\n".join(lines) + "\n"


def _expected_files(subjects: list[str], tasks: list[_Task], pool: list[_PoolItem]) -> set[str]:
    files = {"manifest.json", "contact_sheet.png", "pool/identities.csv", f"au/{FACE_BOXES}"}
    files |= {f"pool/{it.name}" for it in pool}
    for t in tasks:
        files.add(f"au/AUCoding/AU_OCC/{t.subject}_{t.task}.csv")
        files |= {f"au/{t.subject}/{t.task}/{f:04d}.jpg" for f in t.frames}
    return files


def _build_manifest(cfg: SyntheticParams, subjects: list[str], tasks: list[_Task],
                    pool: list[_PoolItem]) -> dict:
    rates: dict[str, dict[str, float]] = {}
    n_coded = n_not = 0
    for sid in subjects:
        labs = np.concatenate([_labels_matrix(t) for t in tasks if t.subject == sid])
        coded = labs != NOT_CODED
        n_coded += int(coded.sum())
        n_not += int((~coded).sum())
        rates[sid] = {f"AU{a}": round(float((labs[:, i] == 1).sum() / max(coded[:, i].sum(), 1)),
                                      4) for i, a in enumerate(AUS)}
    images = [it for it in pool if it.kind == "image"]
    ratio = [max(it.width, it.height) / min(it.width, it.height) for it in images]
    odd = {it.name: it.kind for it in pool if it.kind != "image"}
    return {
        "generator": "pipeline.synthetic", "version": GENERATOR_VERSION, "seed": cfg.seed,
        "config": asdict(cfg),
        "aus": list(AUS), "au_names": {str(a): n for a, n in AU_NAMES.items()},
        "subjects": subjects, "tasks": [f"T{t + 1}" for t in range(cfg.tasks)],
        "frame_size": cfg.frame_size, "frame_wh": list(au_frame_size(cfg)),
        "face_boxes": f"au/{FACE_BOXES}",
        "label_header": BP4D_HEADER, "not_coded_value": NOT_CODED,
        "counts": {
            "au_frames": sum(len(t.frames) for t in tasks),
            "au_label_files": len(tasks),
            "coded_cells": n_coded, "not_coded_cells": n_not,
            "pool_files": len(pool), "pool_images": len(images),
            "pool_odd_files": len(odd),
            "pool_undecodable": sum(k in UNDECODABLE_KINDS for k in odd.values()),
            "pool_identities": len({it.identity for it in pool if it.identity}),
            "pool_aspect_over_1_5": sum(r > 1.5 for r in ratio),
            "pool_aspect_exactly_1_5": sum(r == 1.5 for r in ratio),
        },
        "pool_odd_files": odd,
        "base_rates": rates,
    }


def _complete(out_dir: Path, manifest: dict, files: set[str]) -> bool:
    path = out_dir / "manifest.json"
    if not path.is_file():
        return False
    try:
        old = read_json(path)
    except ValueError:
        return False
    return old == manifest and all((out_dir / f).is_file() for f in files)


def _remove_stale(out_dir: Path, files: set[str]) -> int:
    """Delete files under pool/ and au/ that this config does not produce (e.g. an earlier run
    with more subjects), so readers that list folders see exactly this data set."""
    removed = 0
    for sub in ("pool", "au"):
        root = out_dir / sub
        if not root.is_dir():
            continue
        for dirpath, dirnames, filenames in os.walk(root, topdown=False):
            for fn in filenames:
                p = Path(dirpath) / fn
                if p.relative_to(out_dir).as_posix() not in files:
                    p.unlink()
                    removed += 1
            if Path(dirpath) != root and not any(Path(dirpath).iterdir()):
                Path(dirpath).rmdir()
    return removed


def _active(aus_row: np.ndarray) -> str:
    on = [str(a) for a, v in zip(AUS, aus_row) if v > 0]
    return " ".join(on) if on else "-"


FACE_BOXES = "face_boxes.csv"  # under au/: subject,task,frame,x0,y0,x1,y1 (pixels)


def au_frame_size(cfg: SyntheticParams) -> tuple[int, int]:
    """(width, height) of the AU frames: square, or 4:3 wild frames of height frame_size."""
    if cfg.wild:
        return int(round(cfg.frame_size * WILD_ASPECT)), cfg.frame_size
    return cfg.frame_size, cfg.frame_size


def generate(out_dir: Path, cfg: SyntheticParams, *, progress: bool = True) -> dict:
    """Write the synthetic pretraining pool and BP4D-layout AU data set into ``out_dir``.

    Re-running into a complete folder with the same config only re-plans labels (no
    rendering) and returns the stored manifest. Files from another config are replaced and
    stale ones removed.

    Args:
        out_dir: the source folder, e.g. ``data/download/synthetic``; created if missing.
        cfg: ``params.download.synthetic``.
        progress: show tqdm bars (logging happens regardless).
    Returns:
        the manifest (also written to ``out_dir/manifest.json``): counts, subjects, AUs,
        per-subject AU base rates (over coded frames), the odd pool files and the seed.
    """
    out_dir = Path(out_dir)
    t0 = time.perf_counter()
    subjects, tasks = _plan_au(cfg)
    pool = _plan_pool(cfg)
    manifest = _build_manifest(cfg, subjects, tasks, pool)
    files = _expected_files(subjects, tasks, pool)
    if _complete(out_dir, manifest, files):
        log.info("%s: synthetic data already complete for this config (seed %d); skipping",
                 out_dir, cfg.seed)
        return manifest
    out_dir.mkdir(parents=True, exist_ok=True)
    # An interrupted or differently configured earlier run must not look complete.
    (out_dir / "manifest.json").unlink(missing_ok=True)
    # ---- AU data set (BP4D layout)
    traits = {sid: sample_traits(_rng(cfg.seed, _S_SUBJECT, s), sid[0], cohort=True)
              for s, sid in enumerate(subjects)}
    scenes = sample_scenes(cfg.seed)
    n_cols = 8
    n_per_subject = cfg.tasks * cfg.frames_per_task
    pick = set(np.linspace(0, n_per_subject - 1, min(n_cols, n_per_subject)).round().astype(int))
    sheet_rows_max = 24
    samples: dict[str, list[tuple[Image.Image, str]]] = {sid: [] for sid in subjects}
    width, height = au_frame_size(cfg)
    box_rows = ["subject,task,frame,x0,y0,x1,y1"]
    bar = tqdm(total=len(tasks) * cfg.frames_per_task, desc="synthetic AU frames",
               disable=not progress, unit="frame")
    for ti, task in enumerate(tasks):
        s = subjects.index(task.subject)
        t_idx = int(task.task[1:]) - 1
        # Pose and lighting drift smoothly within a task (a video), noise is per frame.
        shot_rng = _rng(cfg.seed, _S_FRAME, s, t_idx)
        base = _sample_wild_frame_shot(shot_rng) if cfg.wild else _sample_au_shot(shot_rng)
        face = in_scene(traits[task.subject], scenes[task_scene(cfg.seed, s, t_idx)])
        drift_rng = _rng(cfg.seed, _S_FRAME, s, t_idx, 1)
        n = len(task.frames)
        drift = np.cumsum(drift_rng.normal(0, 0.006, size=(n, 3)), axis=0)
        for i, frame in enumerate(task.frames):
            fr = _rng(cfg.seed, _S_FRAME, s, t_idx, 2, i)
            shot = replace(base, dx=base.dx + float(np.clip(drift[i, 0], -0.05, 0.05)),
                           dy=base.dy + float(np.clip(drift[i, 1], -0.05, 0.05)),
                           angle=base.angle + float(np.clip(drift[i, 2] * 60, -3, 3)),
                           seed=int(fr.integers(2**31)))
            aus = {a: float(v) for a, v in zip(AUS, task.intensity[i]) if v > 0}
            img = render_face(face, aus, shot, width, height)
            _write(out_dir / "au" / task.subject / task.task / f"{frame:04d}.jpg", _jpeg(img))
            box = face_box(face, shot, width, height)
            box_rows.append(f"{task.subject},{task.task},{frame},"
                            + ",".join(f"{v:.2f}" for v in box))
            k = t_idx * cfg.frames_per_task + i
            if k in pick and s < sheet_rows_max:
                samples[task.subject].append(
                    (img, f"{task.task} {_active(task.intensity[i])}"))
            bar.update(1)
        _write(out_dir / "au" / "AUCoding" / "AU_OCC" / f"{task.subject}_{task.task}.csv",
               _csv_text(task).encode())
        if (ti + 1) % cfg.tasks == 0:
            log.info("AU subject %s done (%d/%d)", task.subject, s + 1, len(subjects))
    bar.close()
    _write(out_dir / "au" / FACE_BOXES, ("\n".join(box_rows) + "\n").encode())

    # ---- pretraining pool
    ids_rows = ["key,identity"]
    pool_samples: list[tuple[Image.Image, str]] = []
    pool_traits: dict[int, FaceTraits] = {}
    for it in tqdm(pool, desc="synthetic pool", disable=not progress, unit="img"):
        face = None
        if it.identity is not None:
            if it.identity_idx not in pool_traits:
                r = _rng(cfg.seed, _S_POOL_ID, it.identity_idx)
                pool_traits[it.identity_idx] = sample_traits(r, "FM"[int(r.integers(2))])
            rng = _rng(cfg.seed, _S_POOL_IMG, it.index)
            shot = _sample_pool_shot(rng)
            face = render_face(pool_traits[it.identity_idx], _random_expression(rng), shot,
                               it.width, it.height)
            ids_rows.append(f"{it.name},{it.identity}")
        if it.kind == "image":
            data = _png(face) if it.name.endswith(".png") else _jpeg(face)
            if len(pool_samples) < 10:
                pool_samples.append((face, f"{it.width}x{it.height}"))
        else:
            data = _odd_file(it, face)
        _write(out_dir / "pool" / it.name, data)
    _write(out_dir / "pool" / "identities.csv", ("\n".join(ids_rows) + "\n").encode())
    log.info("pool: %d images, %d odd files, %d identities", manifest["counts"]["pool_images"],
             manifest["counts"]["pool_odd_files"], manifest["counts"]["pool_identities"])

    # ---- contact sheet
    rows = []
    for sid in subjects[:sheet_rows_max]:
        top = sorted(manifest["base_rates"][sid].items(), key=lambda kv: -kv[1])[:3]
        rows.append((sid, "highest AU rates:\n" + "\n".join(f"{k} {v:.2f}" for k, v in top),
                     samples[sid]))
    demo_sid = subjects[0]
    demo = []
    neutral = Shot()
    for a in AUS:
        off = render_face(traits[demo_sid], {}, neutral, cfg.frame_size)
        on = render_face(traits[demo_sid], {a: 1.0}, neutral, cfg.frame_size)
        demo.append((a, off, on))
    note = (f"seed {cfg.seed}; {len(subjects)} subjects x {cfg.tasks} tasks x "
            f"{cfg.frames_per_task} frames at {cfg.frame_size}px; pool {len(pool)} files"
            + (f"; first {sheet_rows_max} subjects shown" if len(subjects) > sheet_rows_max
               else ""))
    atomic_write_bytes(out_dir / "contact_sheet.png",
                       _contact_sheet(rows, (demo_sid, demo), pool_samples, note))

    removed = _remove_stale(out_dir, files)
    if removed:
        log.warning("%s: removed %d stale files from an earlier, different config",
                    out_dir, removed)
    # Written last: its presence (and equality) marks the folder complete.
    atomic_write_json(out_dir / "manifest.json", manifest)
    log.info("synthetic data written to %s in %.1f s (%d AU frames, %d pool files)", out_dir,
             time.perf_counter() - t0, manifest["counts"]["au_frames"], len(pool))
    return manifest


# --------------------------------------------------------------------------- expressions (FER)
# The seven basic expressions in RAF-DB's label order (labels 1-7 there, indices 0-6 here),
# each drawn as its EMFACS prototype (Friesen & Ekman 1983) restricted to the AUs the renderer
# draws. Prototype AUs it cannot draw, left out: surprise AU5; fear AU5, AU20; anger AU5;
# disgust AU16 (AU9 + AU10 + AU15 + AU17 stand for the disgust variants 9/10 + 15/16/17).
FER_EXPRESSIONS: tuple[str, ...] = ("surprise", "fear", "disgust", "happiness", "sadness",
                                    "anger", "neutral")
FER_PROTOTYPES: dict[str, frozenset[int]] = {
    "surprise": frozenset({1, 2, 26}),
    "fear": frozenset({1, 2, 4, 7, 26}),
    "disgust": frozenset({9, 10, 15, 17}),
    "happiness": frozenset({6, 12}),
    "sadness": frozenset({1, 4, 15}),
    "anger": frozenset({4, 7, 23}),
    "neutral": frozenset(),
}
FER_DROPPED_AUS: dict[str, tuple[int, ...]] = {"surprise": (5,), "fear": (5, 20),
                                               "anger": (5,), "disgust": (16,)}
# AUs of no prototype, switched on at random as expression-neutral distractors.
FER_DISTRACTOR_AUS: tuple[int, ...] = (14, 24, 25)
FER_DISTRACTOR_P = 0.15
FER_LABELS = "labels.csv"  # key,image,subject,split,label,expression,aus
_S_FER_SUBJECT, _S_FER_FRAME = 20, 21
FER_GENERATOR_VERSION = 2


def expression_of(aus: Mapping[int, float]) -> str:
    """The basic expression an AU combination shows: the prototype whose AU set equals the
    active (> 0) prototype AUs; distractor AUs are ignored. Raises ValueError otherwise."""
    active = frozenset(a for a, v in aus.items() if v > 0)
    proto_aus = frozenset().union(*FER_PROTOTYPES.values())
    found = [e for e, p in FER_PROTOTYPES.items() if p == active & proto_aus]
    if not found:
        raise ValueError(f"AUs {sorted(active)} match no expression prototype")
    return found[0]


def _fer_aus(rng: np.random.Generator, expression: str) -> dict[int, float]:
    """Intensities (AU -> [0.55, 1]) of one frame showing ``expression``, with distractors."""
    aus = {a: float(rng.uniform(0.55, 1.0)) for a in sorted(FER_PROTOTYPES[expression])}
    for a in FER_DISTRACTOR_AUS:
        if rng.uniform() < FER_DISTRACTOR_P:
            aus[a] = float(rng.uniform(0.4, 1.0))
    return aus


def generate_fer(out_dir: Path, cfg: SyntheticFerParams) -> dict:
    """Write the synthetic expression set: aligned face crops labelled by expression.

    ``cfg.subjects`` new identities (``E001``...; the last ``cfg.test_subjects`` are the test
    split, so test faces are unseen identities) each show every expression of
    :data:`FER_EXPRESSIONS` ``cfg.frames_per_expression`` times, with per-frame pose,
    lighting and noise (the AU frames' jitter). The label is :func:`expression_of` of the
    drawn AUs. Skips a complete folder of the same config.

    Writes ``images/<subject>/<expression>_<k>.jpg``, ``labels.csv`` (key, image, subject,
    split, label index, expression, active AUs ``1;2;26``) and ``manifest.json`` (last).
    Returns the manifest.
    """
    out_dir = Path(out_dir)
    subjects = [f"E{i + 1:03d}" for i in range(cfg.subjects)]
    test = set(subjects[cfg.subjects - cfg.test_subjects:])
    manifest = {"generator": "synthetic_fer", "version": FER_GENERATOR_VERSION,
                "config": asdict(cfg), "classes": list(FER_EXPRESSIONS),
                "prototypes": {e: sorted(p) for e, p in FER_PROTOTYPES.items()},
                "dropped_prototype_aus": {e: list(v) for e, v in FER_DROPPED_AUS.items()},
                "test_subjects": sorted(test),
                "counts": {"subjects": cfg.subjects,
                           "images": cfg.subjects * len(FER_EXPRESSIONS)
                           * cfg.frames_per_expression}}
    try:
        if read_json(out_dir / "manifest.json") == manifest:
            log.info("%s: synthetic expressions already complete (seed %d); skipping",
                     out_dir, cfg.seed)
            return manifest
    except (FileNotFoundError, ValueError):
        pass
    (out_dir / "manifest.json").unlink(missing_ok=True)
    if (out_dir / "images").is_dir():  # another config's frames: never mix them in
        import shutil
        shutil.rmtree(out_dir / "images")
    t0 = time.perf_counter()
    scene = sample_scenes(cfg.seed)[0]
    rows = ["key,image,subject,split,label,expression,aus"]
    for s, sid in enumerate(subjects):
        r = _rng(cfg.seed, _S_FER_SUBJECT, s)
        face = in_scene(sample_traits(r, "FM"[int(r.integers(2))], cohort=True), scene)
        for li, expression in enumerate(FER_EXPRESSIONS):
            for k in range(cfg.frames_per_expression):
                fr = _rng(cfg.seed, _S_FER_FRAME, s, li, k)
                aus = _fer_aus(fr, expression)
                label = FER_EXPRESSIONS.index(expression_of(aus))
                img = render_face(face, aus, _sample_au_shot(fr), cfg.frame_size)
                rel = f"images/{sid}/{expression}_{k:03d}.jpg"
                _write(out_dir / rel, _jpeg(img))
                rows.append(f"{sid}_{expression}_{k:03d},{rel},{sid},"
                            f"{'test' if sid in test else 'train'},{label},{expression},"
                            + ";".join(str(a) for a in sorted(aus)))
    _write(out_dir / FER_LABELS, ("\n".join(rows) + "\n").encode())
    atomic_write_json(out_dir / "manifest.json", manifest)
    log.info("synthetic expressions: %d images of %d subjects (%d test) in %s, %.1f s",
             len(rows) - 1, cfg.subjects, len(test), out_dir, time.perf_counter() - t0)
    return manifest
