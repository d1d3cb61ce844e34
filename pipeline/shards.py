"""Face9M-style pretraining shards: decode, aspect filter, resize, deterministic WebDataset tars.

Implements the data preparation of the paper's Section 3.1 ("Face9M", see
``docs/design.md`` and ``/work/shared/reference/method.md`` section 1):

- drop an image when width/height > ``max_aspect_ratio`` or height/width > ``max_aspect_ratio``
  (paper: 1.5; exactly 1.5 is kept, as img2dataset's ``--max_aspect_ratio``);
- with ``min_side`` > 0, drop an image whose shorter side is below it (the reference's
  pretraining filter drops w < 224 or h < 224);
- resize every kept image to ``image_size`` x ``image_size`` with a plain resize (no crop);
- the authors stored JPEG bytes in LMDB; we write WebDataset tars instead.

Per image (:func:`process_image`), codec ``turbo`` (``shards.codec: auto`` when simplejpeg and
torch import): RGB/greyscale JPEGs are decoded by libjpeg-turbo (simplejpeg) with DCT-domain
downscaling by 1/2 or 1/4 when ``draft`` is on and the shorter side stays >= 2 x
``image_size``, resized by torch's uint8 antialiased bicubic kernel (Pillow's filter) and
encoded by libjpeg-turbo (4:2:0, as Pillow); the EXIF transpose is applied to the small result.
Every other file (PNG, GIF, CMYK, ...) and any JPEG libjpeg-turbo reports an error for takes
the Pillow path, which is all of codec ``pillow``: Pillow decode, libjpeg DCT-domain
downscaling (``Image.draft``, 1/2 or 1/4) for JPEGs when ``draft`` is on, EXIF orientation,
conversion of every mode
(CMYK, L/LA, P, I;16/I, RGBA) to 8-bit RGB, **bicubic** resize, JPEG encode. GIFs (also
animated ones) give their first frame and are counted in ``gif_first_frame`` too. Images that
cannot be decoded are counted as ``failed`` and skipped; they never fail the stage.

Size limit (:data:`MAX_ENCODED_BYTES`, derived from Pillow's pixel limit): a file or archive
member whose header declares more bytes than one encoded image can hold is refused by name
*before* it is read; since headers can lie, files and archive members are read as streams of
at most the limit + 1 bytes (``read_item(..., max_bytes=)``) and refused beyond it. Both count as
``failed``, as does a zip member whose data does not match its header; the stage goes on.

Output (:func:`build_shards`), the on-disk contract of ``data/shards/``:

- ``face-%06d.tar``: ``samples_per_shard`` samples each, members ``<key>.jpg`` and
  ``<key>.json`` with ``{"source", "key", "width", "height", "identity"}`` (width/height: the
  original size after EXIF orientation). ``__key__`` is ``<source>-<index:09d>``, index = the
  item's position within its source (a tar-safe form of ``<source>/<index>``).
- ``stats.json``: ``{"sources": {name: {"seen", "kept", "dropped_aspect", "failed",
  "gif_first_frame"[, "dropped_small"]}}, "total": {...}, "shards": {"count",
  "samples_per_shard"}}`` -- the Face9M composition table for the sources used
  (``seen = kept + dropped_aspect + dropped_small + failed``; ``dropped_small``, the
  ``min_side`` drops, is present only when ``min_side`` > 0; ``gif_first_frame`` counts the
  kept GIFs), and the shards written: exactly
  ``face-000000.tar`` .. ``face-<count - 1>.tar`` (``pipeline.loader`` checks this before
  pretraining).

Determinism: items are processed in input order (the caller passes sorted items), the tar
headers are fixed (mtime 0, uid/gid 0, empty user/group names, mode 0444) and the per-image work
does not depend on the worker count, so shards are byte-identical across runs and worker counts
(for one codec: ``auto`` picks turbo only where simplejpeg is installed, and the two codecs'
bytes differ by JPEG rounding; the stage logs the codec used to MLflow).

Interruption: every shard is written to a ``.tmp-`` name and renamed when complete, so a killed
run never leaves a half shard. A re-run **redoes everything**: it first deletes earlier shards,
``stats.json`` and leftover temp files from ``out_dir`` (also the stale shards of an earlier,
larger run), then writes all shards again; ``stats.json`` is written last, so its presence marks
a complete run.
"""
from __future__ import annotations

import io
import itertools
import json
import logging
import multiprocessing as mp
import os
import re
import tarfile
import warnings
import zipfile
import zlib
from contextlib import ExitStack
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
from PIL import Image, ImageOps
from tqdm import tqdm

from pipeline.download import ARCHIVES, TooLargeError
from pipeline.io import atomic_path, atomic_write_json
from pipeline.params import ShardsParams
from pipeline.sources import container_kind, read_item

log = logging.getLogger(__name__)

SHARD_PATTERN = "face-%06d.tar"
SHARD_RE = re.compile(r"^face-\d{6}\.tar$")
STATS_FILE = "stats.json"
STATS_SHARDS_KEY = "shards"  # stats.json's {"count", "samples_per_shard"} of the shards written
TEMP_PREFIXES = (".tmp-face-", f".tmp-{STATS_FILE}")  # atomic_path's temp names for our files
STAT_KEYS = ("seen", "kept", "dropped_aspect", "failed", "gif_first_frame")
SMALL_KEY = "dropped_small"  # stats key of the min_side filter; present only when it is on
RESAMPLE = Image.Resampling.BICUBIC  # the paper's finetuning interpolation; antialiased in Pillow
# EXIF orientation -> the transpose that displays the image upright (as ImageOps.exif_transpose)
_ORIENT_OPS = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
               4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
               6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
               8: Image.Transpose.ROTATE_90}
_MAX_LOGGED_FAILURES = 10
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")

# --------------------------------------------------------------------------- size limit
MAX_DECODED_PIXELS = 2 * (Image.MAX_IMAGE_PIXELS or 89_478_485)
"""Most pixels an image may have: Pillow raises ``DecompressionBombError`` (counted as
``failed``) above twice its ``Image.MAX_IMAGE_PIXELS`` (89,478,485 by default), 178,956,970."""
MAX_BYTES_PER_PIXEL = 4
"""Widest pixel Pillow decodes into (RGBA, CMYK, I, F), so the largest uncompressed encoding
(32-bit BMP/TIFF) of the largest decodable image; compressed formats are smaller."""
ENCODED_SLACK_BYTES = 16 << 20
"""Room for headers and metadata (EXIF, ICC profile, XMP) beside the pixel data."""
MAX_ENCODED_BYTES = MAX_DECODED_PIXELS * MAX_BYTES_PER_PIXEL + ENCODED_SLACK_BYTES
"""Most bytes one encoded image file may have (about 732 MB by default); anything larger
would decode to more pixels than the limit above, so it is refused (counted as ``failed``):
a file or archive member that *declares* more (:func:`declared_size`, from its size on disk or
its zip/tar header) is never read, and one whose header lies is read as a stream of at most
this + 1 bytes (``pipeline.sources.read_item``'s ``max_bytes``) and refused there. This bounds the memory a worker
spends on one item to about this much plus the decoded pixels (Pillow's limit). Only a
16-bit-per-channel colour file (6-8 bytes per pixel) this large with fewer pixels than the
limit is refused although Pillow could decode it; face photos are far smaller."""


# --------------------------------------------------------------------------- one image
@dataclass(frozen=True)
class Processed:
    """Result of :func:`process_image`.

    ``status`` is ``"kept"`` (``jpeg``, ``width``, ``height`` set), ``"dropped_aspect"`` or
    ``"dropped_small"`` (``width``, ``height`` set) or ``"failed"`` (``error`` and ``reason``
    set: ``"undecodable"``, ``"too large"`` or ``"corrupt archive member"``). ``format`` is
    Pillow's name of the
    decoded file format (``"JPEG"``, ``"GIF"``, ...) when the header could be read.
    """
    status: str
    jpeg: bytes | None = None
    width: int | None = None
    height: int | None = None
    error: str | None = None
    reason: str | None = None
    format: str | None = None


def aspect_ok(width: int, height: int, max_ratio: float | Fraction) -> bool:
    """True when neither width/height nor height/width exceeds ``max_ratio``.

    Exact rational arithmetic: ``max_ratio`` is taken as the decimal the user wrote (1.5 ->
    3/2), so ``300x200`` (exactly 1.5) is kept and ``301x200`` is dropped, with no float
    rounding at the boundary.
    """
    r = max_ratio if isinstance(max_ratio, Fraction) else Fraction(repr(float(max_ratio)))
    long, short = max(width, height), min(width, height)
    if short <= 0:
        return False
    # long / short > num / den  <=>  long * den > num * short  (integers only)
    return long * r.denominator <= r.numerator * short


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB.

    - 16-bit grey (``I;16*``) and 32-bit ``I`` (taken as 16-bit data, as Pillow opens some
      16-bit files): values scaled from 0..65535 to 0..255 with rounding (not clipped at 255,
      which would turn most of a 16-bit image white).
    - Transparency (RGBA, LA, PA, palette with a transparent index): composited over white,
      as img2dataset does, so transparent areas do not become black or leftover colours.
    - CMYK, L, 1, P, YCbCr, ...: Pillow's conversion.
    """
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in _SIXTEEN_BIT_MODES:
        a = np.asarray(img).astype(np.int64)  # (H, W); '>u2' for I;16B is handled by astype
        a = np.clip(a, 0, 65535)
        a8 = ((a * 255 + 32767) // 65535).astype(np.uint8)
        return Image.fromarray(a8, "L").convert("RGB")
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        mode = img.mode
        if mode == "RGB":
            return img
    if mode in _ALPHA_MODES:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def process_image(data: bytes, cfg: ShardsParams, max_ratio: Fraction | None = None,
                  codec: str | None = None) -> Processed:
    """Decode ``data``, filter by aspect ratio and size, orient, convert to RGB, resize, encode.

    Args:
        data: the encoded image file's bytes.
        cfg: image_size, max_aspect_ratio, min_side, jpeg_quality, draft and codec are used.
        max_ratio: ``cfg.max_aspect_ratio`` as an exact fraction (computed once by callers
            that process many images).
        codec: ``"turbo"`` or ``"pillow"``, :func:`resolve_codec` of ``cfg.codec`` (resolved
            once by callers that process many images).

    Filters, on the header size before any pixel is decoded: the aspect ratio first
    (``dropped_aspect``), then ``cfg.min_side`` (``dropped_small``: shorter side below it).

    Codecs: ``"turbo"`` decodes baseline/progressive RGB and greyscale JPEGs (also MPO) with
    :func:`turbo_pixels`; every other file, and a JPEG libjpeg-turbo reports any error or
    warning for, goes through Pillow exactly as with ``"pillow"``.

    A GIF (also an animated one) gives its first frame: Pillow opens every multi-frame file
    at frame 0, and ``format`` tells the caller it was a GIF.

    Never raises for bad image data: returns ``Processed("failed", error=...)``.
    """
    size = cfg.image_size
    fmt = None
    if max_ratio is None:
        max_ratio = Fraction(repr(float(cfg.max_aspect_ratio)))
    if codec is None:
        codec = resolve_codec(cfg.codec)
    try:
        if not data:
            raise ValueError("empty file (0 bytes)")
        img = Image.open(io.BytesIO(data))
        fmt = img.format
        # Header size, before draft changes it. The ratio test is symmetric in w and h, so it
        # gives the same answer on the stored and on the EXIF-oriented size; testing it here
        # skips decoding pixels of images that are dropped anyway.
        w0, h0 = img.size
        if not aspect_ok(w0, h0, max_ratio):
            ow, oh = _oriented_header_size(img)
            return Processed("dropped_aspect", width=ow, height=oh, format=fmt)
        if min(w0, h0) < cfg.min_side:
            ow, oh = _oriented_header_size(img)
            return Processed(SMALL_KEY, width=ow, height=oh, format=fmt)
        if codec == "turbo" and fmt in ("JPEG", "MPO") and img.mode in ("RGB", "L"):
            orientation = _orientation(img)
            pixels = turbo_pixels(data, img, size, cfg.draft, orientation)
            if pixels is not None:
                ow, oh = (h0, w0) if orientation in (5, 6, 7, 8) else (w0, h0)
                jpeg = _turbo().encode_jpeg(pixels, quality=cfg.jpeg_quality, colorspace="RGB",
                                            colorsubsampling="420")  # Pillow's default
                return Processed("kept", jpeg=jpeg, width=ow, height=oh, format=fmt)
        if cfg.draft:
            # libjpeg DCT scaling by 1/2 or 1/4 while decoding: Pillow picks the largest
            # scale s with w0 // s >= size and h0 // s >= size, so the decoded image is still
            # at least size x size (no quality lost before the resize); asking for at least
            # a quarter of each side rules out 1/8 (MAX_DCT_SCALE). Non-JPEGs ignore it.
            img.draft("RGB", (max(size, w0 // MAX_DCT_SCALE), max(size, h0 // MAX_DCT_SCALE)))
        decoded = img.size
        img.load()
        # in place: with no orientation tag this is a no-op instead of a full-size copy
        ImageOps.exif_transpose(img, in_place=True)
        # A 90/270 degree orientation swaps the axes; report the original size oriented.
        swapped = img.size != decoded
        width, height = (h0, w0) if swapped else (w0, h0)
        img = to_rgb(img)
        if img.size != (size, size):
            img = img.resize((size, size), RESAMPLE)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=cfg.jpeg_quality)
        return Processed("kept", jpeg=buf.getvalue(), width=width, height=height, format=fmt)
    except Exception as e:  # noqa: BLE001 - any decoder error means "skip this image"
        return Processed("failed", error=f"{type(e).__name__}: {e}", reason="undecodable",
                         format=fmt)


def _orientation(img: Image.Image) -> int:
    """EXIF orientation tag (1..8) of an opened image; 1 (upright) when absent or malformed."""
    try:
        return img.getexif().get(0x0112, 1)  # 0x0112 = Orientation
    except Exception:  # noqa: BLE001 - malformed EXIF: treat as upright
        return 1


def _oriented_header_size(img: Image.Image) -> tuple[int, int]:
    """Image size after EXIF orientation, from the header (no pixel decoding)."""
    w, h = img.size
    return (h, w) if _orientation(img) in (5, 6, 7, 8) else (w, h)


# --------------------------------------------------------------------------- turbo codec
CODECS = ("auto", "turbo", "pillow")
TURBO_SCALE_MARGIN = 2
"""The turbo codec's DCT scaling keeps the decoded shorter side >= this x ``image_size``.
Measured on photo-like JPEGs (benchmarks/bench_shards.py): margin 1 (Pillow's draft rule) gave
a worst image at 39.4 dB PSNR against the full-resolution resize, margin 2 at 44 dB, for
~15-30% more CPU than margin 1."""
MAX_DCT_SCALE = 4
"""Largest DCT downscaling used by both codecs. libjpeg's 1/8 (DC coefficients only) put a
2100x1500 photo-like JPEG resized to 64 px at 30 dB PSNR against the full-resolution resize,
even with a 3x margin (1/4: 57 dB); entropy decoding dominates the cost anyway."""
_TURBO_MODULES: dict[str, Any] = {}


def turbo_missing() -> str | None:
    """None when the turbo codec's packages import, else a sentence naming the missing one.

    The turbo codec needs ``simplejpeg`` (libjpeg-turbo in its wheel) and ``torch`` (its uint8
    antialiased resize). Importing them here, in the parent, before the worker pool forks also
    spares every worker the import.
    """
    for name in ("simplejpeg", "torch"):
        if name not in _TURBO_MODULES:
            try:
                _TURBO_MODULES[name] = __import__(name)
            except ImportError as e:
                return f"{name} is not importable ({e})"
    return None


def resolve_codec(codec: str) -> str:
    """``shards.codec`` -> the codec used: ``"turbo"`` or ``"pillow"``.

    ``auto`` is turbo when :func:`turbo_missing` finds both packages, else pillow (logged).

    Raises:
        RuntimeError: ``codec`` is ``"turbo"`` but a package it needs is missing, or
            ``codec`` is not one of :data:`CODECS`.
    """
    if codec not in CODECS:
        raise RuntimeError(f"shards.codec is {codec!r}: use one of {', '.join(CODECS)}")
    if codec == "pillow":
        return "pillow"
    missing = turbo_missing()
    if missing is None:
        return "turbo"
    if codec == "turbo":
        raise RuntimeError(f"shards.codec is 'turbo' but {missing}: install it "
                           f"(`pip install simplejpeg`, listed in pyproject.toml) or set "
                           f"shards.codec to 'auto' (falls back to Pillow) or 'pillow'")
    log.warning("shards.codec auto: %s, using Pillow (slower; same output within JPEG error)",
                missing)
    return "pillow"


def _turbo() -> Any:
    """The imported simplejpeg module (call :func:`turbo_missing` first)."""
    if turbo_missing() is not None:
        raise RuntimeError("the turbo codec needs simplejpeg and torch: " + turbo_missing())
    return _TURBO_MODULES["simplejpeg"]


def resize_square(arr: np.ndarray, size: int) -> np.ndarray:
    """(H, W, 3) uint8 -> (size, size, 3) uint8 by antialiased bicubic resampling.

    torch's uint8 kernel for ``interpolate(mode="bicubic", antialias=True)`` computes Pillow's
    ``resize(..., BICUBIC)`` (same filter support and weights, vectorised; pixels equal within
    rounding), about 4x faster than Pillow on one core.
    """
    if arr.shape[:2] == (size, size):
        return arr
    torch = _TURBO_MODULES["torch"]
    x = torch.from_numpy(arr).permute(2, 0, 1).unsqueeze(0)  # (1, 3, H, W), channels-last
    y = torch.nn.functional.interpolate(x, size=(size, size), mode="bicubic", antialias=True)
    return np.ascontiguousarray(y[0].permute(1, 2, 0).numpy())


def dct_scale(width: int, height: int, size: int) -> int:
    """Largest s in (1, 2, 4) whose decoded shorter side ceil(min(w, h) / s) is still at
    least :data:`TURBO_SCALE_MARGIN` x ``size``; 1 when the image is smaller than that.

    Never 8 (:data:`MAX_DCT_SCALE`)."""
    short, target, s = min(width, height), TURBO_SCALE_MARGIN * size, 1
    while s < MAX_DCT_SCALE and -(-short // (2 * s)) >= target:
        s *= 2
    return s


def turbo_pixels(data: bytes, img: Image.Image, size: int, scale: bool,
                 orientation: int = 1) -> np.ndarray | None:
    """Pixels of the JPEG ``data`` as ``(size, size, 3)`` uint8, upright; None on any error.

    Args:
        data: the JPEG file; ``img``: it opened by Pillow (header only: its stored size).
        size: output side.
        orientation: its EXIF orientation tag (1..8), applied to the result.
        scale: decode with libjpeg-turbo's DCT scaling by 1/2 or 1/4 (:func:`dct_scale`:
            the shorter side stays >= :data:`TURBO_SCALE_MARGIN` x ``size``). Its other
            factors (3/8, 5/8, ...) are not used: they gave worst-case images 3-4 dB further
            from the full-resolution resize at no speed gain.

    Greyscale JPEGs are expanded to RGB by libjpeg (as Pillow's ``convert("RGB")``). The
    EXIF transpose is applied after the resize, to the small square image. Any decoder error
    or warning (``strict``: corrupt data, truncation) returns None, and the caller then
    decodes the file with Pillow, which keeps Pillow's behaviour for damaged files.
    """
    w, h = img.size  # as stored (before orientation), as libjpeg decodes it
    s = dct_scale(w, h, size) if scale else 1
    try:
        # simplejpeg picks the smallest scale factor giving at least these sizes: 1/s exactly
        arr = _turbo().decode_jpeg(data, colorspace="RGB", strict=True,
                                   min_height=-(-h // s), min_width=-(-w // s))
    except Exception:  # noqa: BLE001 - let Pillow decide: decode it or count it as failed
        return None
    out = resize_square(arr, size)
    op = _ORIENT_OPS.get(orientation)
    if op is not None:
        out = np.asarray(Image.fromarray(out, "RGB").transpose(op))
    return out


# --------------------------------------------------------------------------- reading
def declared_size(item: Any) -> int | None:
    """Bytes of ``item``'s encoded image as declared before reading it, or None if unknown.

    For items shaped like ``pipeline.sources.Item`` (``container``: a path, ``member``: None,
    an archive member name or a record offset): a loose file's size on disk, a zip member's
    uncompressed size (central directory) or a tar member's size (its header), looked up in the
    archive handles that ``pipeline.download.read_member`` keeps open in this process, so
    nothing is opened twice. None for RecordIO records (each part is under 512 MiB, below the
    default limit; the bytes read are still checked), for unknown members (the reader then
    raises its own error) and for items without these attributes.
    """
    container = getattr(item, "container", None)
    if container is None:
        return None
    member = getattr(item, "member", None)
    if member is None:
        return os.stat(container).st_size
    if container_kind(container) == "records":
        return None
    return ARCHIVES.use(str(container), lambda handle: _member_size(handle, member))


def _member_size(handle: Any, member: str) -> int | None:
    """Header size of ``member`` in an open ``pipeline.download`` archive handle."""
    try:
        return handle.size(member)
    except KeyError:  # no such regular-file member: the reader raises its own error
        return None


class TooLarge(Exception):
    """An item's encoded image exceeds :data:`MAX_ENCODED_BYTES`; it is skipped."""


def _read_checked(read: Callable[[Any], bytes], item: Any, limit: int) -> bytes:
    """``read(item)``, refusing an item over ``limit`` bytes before and while reading it.

    ``pipeline.sources.read_item`` is called with ``max_bytes=limit`` (a stream of at most
    ``limit + 1`` bytes); what other readers return is checked after reading.

    Raises:
        TooLarge: the declared size (:func:`declared_size`) or the bytes read exceed
            ``limit``; the declared size is checked first, so such an item is not read.
    """
    size = declared_size(item)
    if size is not None and size > limit:
        raise TooLarge(f"declares {size:,} bytes, more than the {limit:,}-byte limit for one "
                       f"encoded image (pipeline.shards.MAX_ENCODED_BYTES); not read")
    if read is read_item:
        try:
            data = read_item(item, max_bytes=limit)
        except TooLargeError as e:
            raise TooLarge(f"{e} (pipeline.shards.MAX_ENCODED_BYTES)") from None
    else:
        data = read(item)
    if len(data) > limit:
        raise TooLarge(f"holds more than the {limit:,}-byte limit for one encoded image "
                       f"(pipeline.shards.MAX_ENCODED_BYTES) although its header declares "
                       f"{'no size' if size is None else f'{size:,} bytes'}; not read further")
    return data


# --------------------------------------------------------------------------- workers
# Set once per worker process by _init_worker, so the reader and params are not pickled with
# every task; tasks carry only the (small) item, results carry only the 224px JPEG.
_WORKER: dict[str, Any] = {}
_REPLACE = "check or replace this file in the download folder"


def _init_worker(read: Callable[[Any], bytes], cfg: ShardsParams, max_bytes: int,
                 codec: str, pool: bool = True) -> None:
    # Huge photos are legitimate here; Pillow still raises DecompressionBombError (counted as
    # failed) above 2x its pixel limit, but the warning below it would flood the log.
    warnings.simplefilter("ignore", Image.DecompressionBombWarning)
    if pool and codec == "turbo":
        # one image per task: torch's intra-op threads would only compete with the other
        # workers (and this keeps the forked workers out of OpenMP)
        _TURBO_MODULES["torch"].set_num_threads(1)
    _WORKER.update(read=read, cfg=cfg, ratio=Fraction(repr(float(cfg.max_aspect_ratio))),
                   max_bytes=max_bytes, codec=codec)


def _work(item: Any) -> Processed:
    # Other read() errors propagate on purpose: an unreadable source file (missing archive
    # member, truncated archive, I/O error) is a problem with the download, not a bad image,
    # and must stop the stage.
    try:
        data = _read_checked(_WORKER["read"], item, _WORKER["max_bytes"])
    except TooLarge as e:
        return Processed("failed", error=f"{e}; {_REPLACE}", reason="too large")
    except (zipfile.BadZipFile, zlib.error) as e:
        # One member whose data does not match its zip header (bad CRC, more data than its
        # declared size, a broken deflate stream): the streamed read stopped at the
        # declared size (under the limit).
        return Processed("failed", error=f"{type(e).__name__}: {e}; the archive is damaged: "
                         f"download it again", reason="corrupt archive member")
    return process_image(data, _WORKER["cfg"], _WORKER["ratio"], _WORKER["codec"])


def resolve_workers(workers: int) -> int:
    """``workers`` if > 0, else the number of CPU cores this process may use."""
    if workers > 0:
        return workers
    try:
        return max(1, len(os.sched_getaffinity(0)))  # respects CPU pinning/cgroup cpusets
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def _processed_stream(items: Iterable[Any], read: Callable[[Any], bytes], cfg: ShardsParams,
                      workers: int, max_bytes: int, codec: str,
                      chunksize: int = 16) -> Iterator[tuple[Any, Processed]]:
    """Yield ``(item, result)`` in input order, decoding in ``workers`` processes."""
    if workers == 1:
        _init_worker(read, cfg, max_bytes, codec, pool=False)
        for item in items:
            yield item, _work(item)
        return
    # Pool.imap's feeder thread would read the whole input ahead (millions of items); feed it
    # in blocks instead so memory stays bounded. The pause at a block's end is one chunk.
    block_size = max(4096, workers * chunksize * 32)
    with mp.get_context().Pool(workers, initializer=_init_worker,
                               initargs=(read, cfg, max_bytes, codec)) as pool:
        it = iter(items)
        while True:
            block = list(itertools.islice(it, block_size))
            if not block:
                break
            yield from zip(block, pool.imap(_work, block, chunksize=chunksize))


# --------------------------------------------------------------------------- tar writing
def sample_key(source: str, index: int) -> str:
    """``<source>-<index:09d>``: tar-safe (no dots, no slashes) and sortable."""
    safe = re.sub(r"[^A-Za-z0-9_-]", "_", source)
    return f"{safe}-{index:09d}"


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.size = size
    ti.mtime = 0
    ti.mode = 0o444
    ti.uid = ti.gid = 0
    ti.uname = ti.gname = ""
    ti.type = tarfile.REGTYPE
    return ti


class _ShardSink:
    """Writes samples into ``face-%06d.tar`` files, each atomically (temp name, then rename)."""

    def __init__(self, out_dir: Path, samples_per_shard: int):
        self.out_dir = out_dir
        self.samples_per_shard = samples_per_shard
        self.n_shards = 0
        self._stack: ExitStack | None = None
        self._tar: tarfile.TarFile | None = None
        self._file = None
        self._count = 0

    def add(self, key: str, jpg: bytes, meta: dict) -> None:
        if self._tar is None:
            self._open()
        meta_bytes = json.dumps(meta, sort_keys=True, separators=(",", ":")).encode("utf-8")
        # Members in sorted extension order, as webdataset's TarWriter does.
        for ext, payload in (("jpg", jpg), ("json", meta_bytes)):
            self._tar.addfile(_tarinfo(f"{key}.{ext}", len(payload)), io.BytesIO(payload))
        self._count += 1
        if self._count == self.samples_per_shard:
            self.finish()

    def _open(self) -> None:
        path = self.out_dir / (SHARD_PATTERN % self.n_shards)
        self._stack = ExitStack()
        tmp = self._stack.enter_context(atomic_path(path))
        self._file = self._stack.enter_context(open(tmp, "wb"))
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.PAX_FORMAT)
        self._count = 0

    def finish(self) -> None:
        """Complete the open shard (if any): end-of-archive blocks, fsync, rename."""
        if self._tar is None:
            return
        self._tar.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._stack.close()  # closes the file, then renames the temp file into place
        self._tar = self._file = self._stack = None
        self.n_shards += 1

    def abort(self, exc: BaseException) -> None:
        """Drop the open shard: its temp file is deleted, nothing is renamed."""
        if self._tar is None:
            return
        stack = self._stack
        self._tar = self._file = self._stack = None
        try:
            stack.__exit__(type(exc), exc, exc.__traceback__)
        except BaseException:  # noqa: BLE001 - atomic_path re-raises exc after cleaning up
            pass


def clean_output(out_dir: Path) -> int:
    """Delete earlier shards, ``stats.json`` and temp files of this stage; return the count.

    Only names this stage writes are touched; other files in ``out_dir`` are left alone.
    """
    n = 0
    if not out_dir.is_dir():
        return 0
    for p in out_dir.iterdir():
        name = p.name
        if (SHARD_RE.match(name) or name == STATS_FILE or name.startswith(TEMP_PREFIXES)) \
                and p.is_file():
            p.unlink()
            n += 1
    return n


# --------------------------------------------------------------------------- the stage
def _empty_stats(keys: tuple[str, ...] = STAT_KEYS) -> dict[str, int]:
    return {k: 0 for k in keys}


def _log_failure(item: Any, res: Processed, n_logged: dict[str, int]) -> None:
    """Log a skipped item by name: the first ``_MAX_LOGGED_FAILURES`` of each reason."""
    reason = res.reason or "undecodable"
    n = n_logged.get(reason, 0)
    if n >= _MAX_LOGGED_FAILURES:
        return
    log.warning("skipped %s/%s (%s): %s", item.source, item.key, reason, res.error)
    n_logged[reason] = n + 1
    if n + 1 == _MAX_LOGGED_FAILURES:
        log.warning("further %s images are counted as failed in %s only", reason, STATS_FILE)


def build_shards(items: Iterable[Any], read: Callable[[Any], bytes], out_dir: str | Path,
                 cfg: ShardsParams, *, progress: bool = True) -> dict:
    """Build the pretraining shards from ``items``; return the stats (also in ``stats.json``).

    Args:
        items: objects with attributes ``source``, ``key`` and ``identity`` (e.g.
            ``pipeline.sources.Item``), in the order they go into the shards (sorted by the
            caller). They are sent to worker processes, so they must be picklable.
        read: ``read(item) -> bytes`` of the encoded image; called inside the workers (a
            module-level function); ``pipeline.sources.read_item`` is called with
            ``max_bytes``. Exceptions from ``read`` abort the build, except a zip
            member's ``BadZipFile``/``zlib.error`` (counted as failed: one damaged member).
        out_dir: output folder; earlier shards, ``stats.json`` and temp files are replaced.
        cfg: the ``shards`` params section.
        progress: show a tqdm bar.

    Each item's size is checked against :data:`MAX_ENCODED_BYTES` before ``read`` (its
    header, :func:`declared_size`) and after (what was read; ``pipeline.sources.read_item``
    gets ``max_bytes`` and reads at most the limit + 1 bytes): a
    larger item is logged by name and counted as ``failed``, and the build goes on.

    Returns:
        ``{"sources": {source: {"seen", "kept", "dropped_aspect", "failed", "gif_first_frame"}},
        "total": {...}, "shards": {"count", "samples_per_shard"}}``.

    Raises:
        RuntimeError: no image was kept (nothing to pretrain on); ``stats.json`` is not written.
            Also ``cfg.codec`` is ``"turbo"`` and simplejpeg or torch is missing: raised
            before anything in ``out_dir`` is touched.
    """
    codec = resolve_codec(cfg.codec)  # first: a forced but missing codec fails before any work
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    removed = clean_output(out_dir)
    if removed:
        log.info("removed %d shard/stats/temp files of an earlier run from %s", removed, out_dir)
    workers = resolve_workers(cfg.workers)
    keys = STAT_KEYS + ((SMALL_KEY,) if cfg.min_side else ())
    log.info("building %dx%d shards in %s: %d worker process(es), codec %s, draft=%s, "
             "quality %d, %d samples per shard, max aspect %.4g, min side %d", cfg.image_size,
             cfg.image_size, out_dir, workers, codec, cfg.draft, cfg.jpeg_quality,
             cfg.samples_per_shard, cfg.max_aspect_ratio, cfg.min_side)

    per_source: dict[str, dict[str, int]] = {}
    sink = _ShardSink(out_dir, cfg.samples_per_shard)
    n_logged: dict[str, int] = {}  # failures logged per reason
    total = len(items) if hasattr(items, "__len__") else None  # type: ignore[arg-type]
    bar = tqdm(total=total, unit="img", desc="shards", disable=not progress, mininterval=1.0,
               dynamic_ncols=True)
    stream = _processed_stream(items, read, cfg, workers, MAX_ENCODED_BYTES, codec)
    try:
        for item, res in stream:
            st = per_source.setdefault(item.source, _empty_stats(keys))
            index = st["seen"]  # position of the item within its source
            st["seen"] += 1
            st[res.status] += 1
            if res.status == "kept":
                st["gif_first_frame"] += int(res.format == "GIF")
                sink.add(sample_key(item.source, index), res.jpeg, {
                    "source": item.source, "key": item.key, "width": res.width,
                    "height": res.height, "identity": item.identity})
            elif res.status == "failed":
                _log_failure(item, res, n_logged)
            bar.update(1)
        sink.finish()
    except BaseException as e:
        sink.abort(e)
        raise
    finally:
        stream.close()  # stops the worker pool now, also when an error is propagating
        bar.close()

    stats = {"sources": {s: per_source[s] for s in sorted(per_source)},
             "total": {k: sum(s[k] for s in per_source.values()) for k in keys},
             STATS_SHARDS_KEY: {"count": sink.n_shards,
                                "samples_per_shard": cfg.samples_per_shard}}
    t = stats["total"]
    log.info("shards: %d seen, %d kept (%d GIF first frames), %d dropped by aspect ratio, "
             "%s%d failed -> %d shard(s)", t["seen"], t["kept"], t["gif_first_frame"],
             t["dropped_aspect"], f"{t[SMALL_KEY]} dropped by min_side, " if cfg.min_side
             else "", t["failed"], sink.n_shards)
    if t["kept"] == 0:
        raise RuntimeError(
            f"no image was kept ({t['seen']} seen, {t['dropped_aspect']} dropped by aspect "
            f"ratio, {t.get(SMALL_KEY, 0)} by min_side, {t['failed']} undecodable): check the "
            f"download folders of the sources {sorted(per_source) or '(none yielded any item)'}"
            f", shards.max_aspect_ratio and shards.min_side")
    atomic_write_json(out_dir / STATS_FILE, stats)
    return stats
