"""Face9M-style pretraining shards: decode, aspect filter, resize, deterministic WebDataset tars.

Implements the data preparation of the paper's Section 3.1 ("Face9M", see
``docs/design.md`` and ``/work/shared/reference/method.md`` section 1):

- drop an image when width/height > ``max_aspect_ratio`` or height/width > ``max_aspect_ratio``
  (paper: 1.5; exactly 1.5 is kept, as img2dataset's ``--max_aspect_ratio``);
- resize every kept image to ``image_size`` x ``image_size`` with a plain resize (no crop);
- the authors stored JPEG bytes in LMDB; we write WebDataset tars instead.

Per image (:func:`process_image`): Pillow decode, libjpeg DCT-domain downscaling
(``Image.draft``) for JPEGs when ``draft`` is on, EXIF orientation, conversion of every mode
(CMYK, L/LA, P, I;16/I, RGBA) to 8-bit RGB, **bicubic** resize, JPEG encode. Images that cannot
be decoded are counted as ``failed`` and skipped; they never fail the stage.

Output (:func:`build_shards`), the on-disk contract of ``data/shards/``:

- ``face-%06d.tar``: ``samples_per_shard`` samples each, members ``<key>.jpg`` and
  ``<key>.json`` with ``{"source", "key", "width", "height", "identity"}`` (width/height: the
  original size after EXIF orientation). ``__key__`` is ``<source>-<index:09d>``, index = the
  item's position within its source (a tar-safe form of ``<source>/<index>``).
- ``stats.json``: ``{"sources": {name: {"seen", "kept", "dropped_aspect", "failed"}},
  "total": {...}}`` -- the Face9M composition table for the sources used.

Determinism: items are processed in input order (the caller passes sorted items), the tar
headers are fixed (mtime 0, uid/gid 0, empty user/group names, mode 0444) and the per-image work
does not depend on the worker count, so shards are byte-identical across runs and worker counts.

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
from contextlib import ExitStack
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
from PIL import Image, ImageOps
from tqdm import tqdm

from pipeline.io import atomic_path, atomic_write_json
from pipeline.params import ShardsParams

log = logging.getLogger(__name__)

SHARD_PATTERN = "face-%06d.tar"
SHARD_RE = re.compile(r"^face-\d{6}\.tar$")
STATS_FILE = "stats.json"
STAT_KEYS = ("seen", "kept", "dropped_aspect", "failed")
RESAMPLE = Image.Resampling.BICUBIC  # the paper's finetuning interpolation; antialiased in Pillow
_MAX_LOGGED_FAILURES = 10
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


# --------------------------------------------------------------------------- one image
@dataclass(frozen=True)
class Processed:
    """Result of :func:`process_image`.

    ``status`` is ``"kept"`` (``jpeg``, ``width``, ``height`` set), ``"dropped_aspect"``
    (``width``, ``height`` set) or ``"failed"`` (``error`` set).
    """
    status: str
    jpeg: bytes | None = None
    width: int | None = None
    height: int | None = None
    error: str | None = None


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


def process_image(data: bytes, cfg: ShardsParams,
                  max_ratio: Fraction | None = None) -> Processed:
    """Decode ``data``, filter by aspect ratio, orient, convert to RGB, resize, encode JPEG.

    Args:
        data: the encoded image file's bytes.
        cfg: image_size, max_aspect_ratio, jpeg_quality and draft are used.
        max_ratio: ``cfg.max_aspect_ratio`` as an exact fraction (computed once by callers
            that process many images).

    Never raises for bad image data: returns ``Processed("failed", error=...)``.
    """
    size = cfg.image_size
    if max_ratio is None:
        max_ratio = Fraction(repr(float(cfg.max_aspect_ratio)))
    try:
        if not data:
            raise ValueError("empty file (0 bytes)")
        img = Image.open(io.BytesIO(data))
        # Header size, before draft changes it. The ratio test is symmetric in w and h, so it
        # gives the same answer on the stored and on the EXIF-oriented size; testing it here
        # skips decoding pixels of images that are dropped anyway.
        w0, h0 = img.size
        if not aspect_ok(w0, h0, max_ratio):
            ow, oh = _oriented_header_size(img)
            return Processed("dropped_aspect", width=ow, height=oh)
        if cfg.draft:
            # libjpeg DCT scaling by 1/2, 1/4 or 1/8 while decoding: Pillow picks the largest
            # scale s with w0 // s >= size and h0 // s >= size, so the decoded image is still
            # at least size x size (no quality lost before the resize). Non-JPEGs ignore it.
            img.draft("RGB", (size, size))
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
        return Processed("kept", jpeg=buf.getvalue(), width=width, height=height)
    except Exception as e:  # noqa: BLE001 - any decoder error means "skip this image"
        return Processed("failed", error=f"{type(e).__name__}: {e}")


def _oriented_header_size(img: Image.Image) -> tuple[int, int]:
    """Image size after EXIF orientation, from the header (no pixel decoding)."""
    w, h = img.size
    try:
        orientation = img.getexif().get(0x0112, 1)  # 0x0112 = Orientation
    except Exception:  # noqa: BLE001 - malformed EXIF: treat as upright
        orientation = 1
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


# --------------------------------------------------------------------------- workers
# Set once per worker process by _init_worker, so the reader and params are not pickled with
# every task; tasks carry only the (small) item, results carry only the 224px JPEG.
_WORKER: dict[str, Any] = {}


def _init_worker(read: Callable[[Any], bytes], cfg: ShardsParams) -> None:
    # Huge photos are legitimate here; Pillow still raises DecompressionBombError (counted as
    # failed) above 2x its pixel limit, but the warning below it would flood the log.
    warnings.simplefilter("ignore", Image.DecompressionBombWarning)
    _WORKER.update(read=read, cfg=cfg, ratio=Fraction(repr(float(cfg.max_aspect_ratio))))


def _work(item: Any) -> Processed:
    # read() errors propagate on purpose: an unreadable source file (missing archive member,
    # I/O error) is a problem with the download, not a bad image, and must stop the stage.
    data = _WORKER["read"](item)
    return process_image(data, _WORKER["cfg"], _WORKER["ratio"])


def resolve_workers(workers: int) -> int:
    """``workers`` if > 0, else the number of CPU cores this process may use."""
    if workers > 0:
        return workers
    try:
        return max(1, len(os.sched_getaffinity(0)))  # respects CPU pinning/cgroup cpusets
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def _processed_stream(items: Iterable[Any], read: Callable[[Any], bytes], cfg: ShardsParams,
                      workers: int, chunksize: int = 16) -> Iterator[tuple[Any, Processed]]:
    """Yield ``(item, result)`` in input order, decoding in ``workers`` processes."""
    if workers == 1:
        _init_worker(read, cfg)
        for item in items:
            yield item, _work(item)
        return
    # Pool.imap's feeder thread would read the whole input ahead (millions of items); feed it
    # in blocks instead so memory stays bounded. The pause at a block's end is one chunk.
    block_size = max(4096, workers * chunksize * 32)
    with mp.get_context().Pool(workers, initializer=_init_worker,
                               initargs=(read, cfg)) as pool:
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
        if (SHARD_RE.match(name) or name == STATS_FILE or name.startswith(".tmp-face-")
                or name.startswith(f".tmp-{STATS_FILE}")) and p.is_file():
            p.unlink()
            n += 1
    return n


# --------------------------------------------------------------------------- the stage
def _empty_stats() -> dict[str, int]:
    return {k: 0 for k in STAT_KEYS}


def build_shards(items: Iterable[Any], read: Callable[[Any], bytes], out_dir: str | Path,
                 cfg: ShardsParams, *, progress: bool = True) -> dict:
    """Build the pretraining shards from ``items``; return the stats (also in ``stats.json``).

    Args:
        items: objects with attributes ``source``, ``key`` and ``identity`` (e.g.
            ``pipeline.sources.Item``), in the order they go into the shards (sorted by the
            caller). They are sent to worker processes, so they must be picklable.
        read: ``read(item) -> bytes`` of the encoded image; called inside the workers (a
            module-level function). Exceptions from ``read`` abort the build.
        out_dir: output folder; earlier shards, ``stats.json`` and temp files are replaced.
        cfg: the ``shards`` params section.
        progress: show a tqdm bar.

    Returns:
        ``{"sources": {source: {"seen", "kept", "dropped_aspect", "failed"}}, "total": {...}}``.

    Raises:
        RuntimeError: no image was kept (nothing to pretrain on); ``stats.json`` is not written.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    removed = clean_output(out_dir)
    if removed:
        log.info("removed %d shard/stats/temp files of an earlier run from %s", removed, out_dir)
    workers = resolve_workers(cfg.workers)
    log.info("building %dx%d shards in %s: %d worker process(es), draft=%s, quality %d, "
             "%d samples per shard, max aspect %.4g", cfg.image_size, cfg.image_size, out_dir,
             workers, cfg.draft, cfg.jpeg_quality, cfg.samples_per_shard, cfg.max_aspect_ratio)

    per_source: dict[str, dict[str, int]] = {}
    sink = _ShardSink(out_dir, cfg.samples_per_shard)
    n_failed_logged = 0
    total = len(items) if hasattr(items, "__len__") else None  # type: ignore[arg-type]
    bar = tqdm(total=total, unit="img", desc="shards", disable=not progress, mininterval=1.0,
               dynamic_ncols=True)
    stream = _processed_stream(items, read, cfg, workers)
    try:
        for item, res in stream:
            st = per_source.setdefault(item.source, _empty_stats())
            index = st["seen"]  # position of the item within its source
            st["seen"] += 1
            st[res.status] += 1
            if res.status == "kept":
                sink.add(sample_key(item.source, index), res.jpeg, {
                    "source": item.source, "key": item.key, "width": res.width,
                    "height": res.height, "identity": item.identity})
            elif res.status == "failed":
                if n_failed_logged < _MAX_LOGGED_FAILURES:
                    log.warning("skipped %s/%s (undecodable): %s", item.source, item.key,
                                res.error)
                    n_failed_logged += 1
                    if n_failed_logged == _MAX_LOGGED_FAILURES:
                        log.warning("further undecodable images are counted in %s only",
                                    STATS_FILE)
            bar.update(1)
        sink.finish()
    except BaseException as e:
        sink.abort(e)
        raise
    finally:
        stream.close()  # stops the worker pool now, also when an error is propagating
        bar.close()

    stats = {"sources": {s: per_source[s] for s in sorted(per_source)},
             "total": {k: sum(s[k] for s in per_source.values()) for k in STAT_KEYS}}
    t = stats["total"]
    log.info("shards: %d seen, %d kept, %d dropped by aspect ratio, %d failed -> %d shard(s)",
             t["seen"], t["kept"], t["dropped_aspect"], t["failed"], sink.n_shards)
    if t["kept"] == 0:
        raise RuntimeError(
            f"no image was kept ({t['seen']} seen, {t['dropped_aspect']} dropped by aspect "
            f"ratio, {t['failed']} undecodable): check the download folders of the sources "
            f"{sorted(per_source) or '(none yielded any item)'} and shards.max_aspect_ratio")
    atomic_write_json(out_dir / STATS_FILE, stats)
    return stats
