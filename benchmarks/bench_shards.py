"""Benchmark of the shards stage (pipeline/shards.py) against a naive one-image-at-a-time loop.

    python benchmarks/bench_shards.py --n 2000 --rounds 3 --cache /tmp/fmae-bench-shards-cache

Two seeded input sets of ``--n`` photo-like JPEGs (smooth gradients, overlapping shapes, a soft
"face" ellipse, blur, sensor-like noise, so the files compress like real photos), generated
into ``--cache`` once and reused:

- ``large``: ``--size`` x ``--size`` (default 1024), quality 92;
- ``web``: the size mix of web photos: shorter side log-normal with median 400 px (sigma 0.8,
  clipped to 100..5000 px; about a quarter below 224 px, so draft decoding does little),
  aspect ratio 1..1.5 either way (all pass the 1.5 filter), quality 70..95.

Per set, ``--rounds`` alternating rounds of
  (naive) the reference loop, one process: ``Image.open(p).convert("RGB").resize((224, 224),
          BICUBIC)``, save JPEG at the same quality (kept exactly as before, as the baseline);
  (ours)  ``build_shards`` with the params' defaults: codec auto (turbo), draft, all cores;
  (pillow) ``build_shards`` with ``codec: pillow`` (the stage before the turbo codec).
Reports images/s (wall clock), CPU ms per image (process + reaped workers), the per-round and
median ratios ours/naive and pillow/naive, and the mean and min PSNR of each variant's 224 px
outputs against the naive outputs. An untimed warm-up build of a few images imports the codec
packages first (the naive loop's Pillow is imported already).

All input files are read once before timing, so every variant reads from the page cache.
Results go to the log and, with ``--json``, to a file.
"""
from __future__ import annotations

import argparse
import io
import logging
import multiprocessing as mp
import os
import platform
import resource
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter


from pipeline.io import atomic_write_json, setup_logging
from pipeline.params import ShardsParams
from pipeline.shards import RESAMPLE, build_shards, resolve_workers

log = logging.getLogger("bench_shards")
GEN_VERSION = 1  # bump when the synthetic content changes, to invalidate caches


@dataclass(frozen=True)
class BenchItem:
    """Item-like record (the fields build_shards uses) pointing at one cached file."""
    source: str
    key: str
    container: str
    member: str | None = None
    identity: str | None = None


def read_path(item: BenchItem) -> bytes:
    with open(item.container, "rb") as f:
        return f.read()


# --------------------------------------------------------------------------- inputs
CONTENT_MAX_SIDE = 1024  # larger: content drawn at this side and upsampled, noise at full size
WEB_MEDIAN, WEB_SIGMA, WEB_MIN, WEB_MAX = 400, 0.8, 100, 5000


def _content(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    """Gradient background, 6-13 shapes, a face-like ellipse with eyes, blur: (h, w) RGB."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    x, y = x / w, y / h
    c0, c1 = rng.uniform(30, 220, 3), rng.uniform(30, 220, 3)
    t = (np.cos(rng.uniform(0, np.pi)) * x + np.sin(rng.uniform(0, np.pi)) * y)[..., None]
    base = c0 * (1 - t) + c1 * t  # (h, w, 3) linear gradient
    img = Image.fromarray(base.clip(0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(6, 14))):
        x0, y0 = rng.uniform(-0.2, 1.0, 2) * (w, h)
        sw, sh = rng.uniform(0.05, 0.5, 2) * (w, h)
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        if rng.random() < 0.5:
            draw.ellipse([x0, y0, x0 + sw, y0 + sh], fill=colour)
        else:
            draw.rectangle([x0, y0, x0 + sw, y0 + sh], fill=colour)
    skin = tuple(int(v) for v in rng.integers([150, 100, 80], [240, 190, 160]))
    cx, cy = rng.uniform(0.35, 0.65, 2) * (w, h)
    draw.ellipse([cx - 0.2 * w, cy - 0.27 * h, cx + 0.2 * w, cy + 0.27 * h], fill=skin)
    for dx in (-0.08, 0.08):  # eyes
        draw.ellipse([cx + (dx - 0.03) * w, cy - 0.08 * h,
                      cx + (dx + 0.03) * w, cy - 0.04 * h], fill=(40, 30, 30))
    return img.filter(ImageFilter.GaussianBlur(radius=max(w, h) / 400))


def make_image(index: int, w: int, h: int | None = None, quality: int = 92) -> bytes:
    """A deterministic photo-like ``w`` x ``h`` JPEG (``h`` defaults to ``w``): content from
    :func:`_content` (drawn at most :data:`CONTENT_MAX_SIDE` px and upsampled), then sensor
    noise (sigma 4 grey levels) at full size, which keeps the compressed size realistic."""
    h = w if h is None else h
    rng = np.random.default_rng(index)
    k = min(1.0, CONTENT_MAX_SIDE / max(w, h))
    img = _content(rng, max(1, round(w * k)), max(1, round(h * k)))
    if img.size != (w, h):
        img = img.resize((w, h), Image.Resampling.BICUBIC)
    arr = np.asarray(img).astype(np.float32)
    arr += rng.normal(0, 4.0, arr.shape).astype(np.float32)  # sensor noise
    buf = io.BytesIO()
    Image.fromarray(arr.clip(0, 255).astype(np.uint8), "RGB").save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def web_spec(index: int) -> tuple[int, int, int]:
    """(width, height, quality) of web-mix image ``index``: shorter side log-normal (median
    :data:`WEB_MEDIAN`, sigma :data:`WEB_SIGMA`), aspect 1..1.5 either way, sides clipped to
    :data:`WEB_MIN`..:data:`WEB_MAX`, quality 70..95; seeded by ``index``."""
    rng = np.random.default_rng([7, index])
    short = WEB_MEDIAN * np.exp(WEB_SIGMA * rng.standard_normal())
    long = short * rng.uniform(1.0, 1.5)
    short, long = (int(np.clip(round(v), WEB_MIN, WEB_MAX)) for v in (short, long))
    long = min(long, (short * 3) // 2)  # clipping must not push the ratio over 1.5
    w, h = (long, short) if rng.random() < 0.5 else (short, long)
    return w, h, int(rng.integers(70, 96))


def _write_one(args: tuple[int, int, int, int, str]) -> None:
    index, w, h, quality, path = args
    data = make_image(index, w, h, quality)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def ensure_inputs(cache: Path, name: str, specs: list[tuple[int, int, int]],
                  workers: int) -> list[Path]:
    """The cached images of set ``name`` (specs: (w, h, quality) per index), generating the
    missing ones."""
    d = cache / f"v{GEN_VERSION}-{name}"
    d.mkdir(parents=True, exist_ok=True)
    paths = [d / f"img_{i:06d}.jpg" for i in range(len(specs))]
    todo = [(i, w, h, q, str(p)) for i, ((w, h, q), p) in enumerate(zip(specs, paths))
            if not p.is_file()]
    if todo:
        log.info("generating %d of %d JPEGs of set %s in %s", len(todo), len(specs), name, d)
        t0 = time.perf_counter()
        with mp.get_context().Pool(workers) as pool:
            for k, _ in enumerate(pool.imap_unordered(_write_one, todo, chunksize=4), 1):
                if k % 500 == 0:
                    log.info("  %d / %d generated", k, len(todo))
        log.info("generated in %.1f s", time.perf_counter() - t0)
    else:
        log.info("using %d cached JPEGs of set %s in %s", len(specs), name, d)
    return paths


# --------------------------------------------------------------------------- variants
def cpu_seconds() -> float:
    """CPU time of this process plus its reaped children (the pool's workers)."""
    ch = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + ch.ru_utime + ch.ru_stime


def run_build(items: list[BenchItem], out: Path, cfg: ShardsParams
              ) -> tuple[float, float, list]:
    t0, c0 = time.perf_counter(), cpu_seconds()
    build_shards(items, read_path, out, cfg, progress=False)  # joins its pool before returning
    dt, cpu = time.perf_counter() - t0, cpu_seconds() - c0
    jpgs = []
    for shard in sorted(out.glob("face-*.tar")):
        with tarfile.open(shard) as tar:
            jpgs += [tar.extractfile(m).read() for m in tar if m.name.endswith(".jpg")]
    return dt, cpu, jpgs


def run_naive(paths: list[Path], image_size: int, quality: int) -> tuple[float, float, list]:
    """The baseline: one process, one image at a time, Pillow only (do not change)."""
    t0, c0 = time.perf_counter(), cpu_seconds()
    out = []
    for p in paths:
        img = Image.open(p).convert("RGB").resize((image_size, image_size), RESAMPLE)
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=quality)
        out.append(buf.getvalue())
    return time.perf_counter() - t0, cpu_seconds() - c0, out


def psnr_stats(a: list[bytes], b: list[bytes]) -> tuple[float, float]:
    """(mean, min) PSNR in dB of the decoded JPEGs ``a`` against ``b``, pairwise."""
    vals = []
    for x, y in zip(a, b, strict=True):
        xa = np.asarray(Image.open(io.BytesIO(x)).convert("RGB"), dtype=np.float64)
        ya = np.asarray(Image.open(io.BytesIO(y)).convert("RGB"), dtype=np.float64)
        mse = ((xa - ya) ** 2).mean()
        vals.append(99.0 if mse == 0 else 10 * np.log10(255.0 ** 2 / mse))
    return float(np.mean(vals)), float(np.min(vals))


def machine() -> dict:
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"nproc": resolve_workers(0), "cpu_model": model, "python": platform.python_version(),
            "pillow": Image.__version__, "loadavg_1m_at_start": os.getloadavg()[0]}


def bench_set(name: str, paths: list[Path], base: dict, rounds: int, tmp: Path) -> dict:
    """Alternating rounds of naive / ours / pillow on one input set; timings and PSNR."""
    n = len(paths)
    items = [BenchItem(name, p.name, str(p)) for p in paths]
    variants = {"ours": dict(base), "pillow": dict(base, codec="pillow")}
    run_build(items[:16], tmp / f"warm-{name}", ShardsParams(**variants["ours"]))  # imports
    res: dict = {"n": n, "mean_input_kb": float(np.mean([p.stat().st_size for p in paths])) / 1024,
                 "rounds": []}
    outputs: dict[str, list] = {}
    for r in range(rounds):
        row = {}
        dt, cpu, outputs["naive"] = run_naive(paths, base["image_size"], base["jpeg_quality"])
        row["naive"] = (dt, cpu)
        for v, kw in variants.items():
            dt, cpu, jpgs = run_build(items, tmp / f"{name}-{v}", ShardsParams(**kw))
            if len(jpgs) != n:
                raise RuntimeError(f"{name}/{v}: {len(jpgs)} outputs for {n} inputs")
            outputs[v], row[v] = jpgs, (dt, cpu)
        rec = {v: {"seconds": dt, "images_per_s": n / dt, "cpu_ms_per_image": 1000 * cpu / n}
               for v, (dt, cpu) in row.items()}
        for v in variants:
            rec[f"{v}_over_naive"] = row["naive"][0] / row[v][0]
        log.info("%s round %d: naive %.1f img/s (%.2f CPU ms), ours %.1f img/s (%.2f CPU ms) "
                 "= %.2fx, pillow codec %.1f img/s (%.2f CPU ms) = %.2fx; load %.2f", name, r + 1,
                 rec["naive"]["images_per_s"], rec["naive"]["cpu_ms_per_image"],
                 rec["ours"]["images_per_s"], rec["ours"]["cpu_ms_per_image"],
                 rec["ours_over_naive"], rec["pillow"]["images_per_s"],
                 rec["pillow"]["cpu_ms_per_image"], rec["pillow_over_naive"], os.getloadavg()[0])
        res["rounds"].append(rec)
    for v in ("naive", *variants):
        for k in ("images_per_s", "cpu_ms_per_image"):
            res[f"{v}_{k}_median"] = float(np.median([rec[v][k] for rec in res["rounds"]]))
    for v in variants:
        res[f"{v}_over_naive_median"] = float(np.median([rec[f"{v}_over_naive"]
                                                         for rec in res["rounds"]]))
        res[f"{v}_psnr_mean_db"], res[f"{v}_psnr_min_db"] = psnr_stats(outputs[v],
                                                                       outputs["naive"])
    log.info("%s: median ours/naive %.2fx (pillow codec %.2fx); PSNR vs naive: ours mean %.2f "
             "min %.2f dB, pillow codec mean %.2f min %.2f dB", name,
             res["ours_over_naive_median"], res["pillow_over_naive_median"],
             res["ours_psnr_mean_db"], res["ours_psnr_min_db"], res["pillow_psnr_mean_db"],
             res["pillow_psnr_min_db"])
    return res


# --------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2000, help="images per set (>= 1)")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds per set (>= 1)")
    ap.add_argument("--sets", default="large,web", help="comma-separated: large, web")
    ap.add_argument("--workers", type=int, default=0, help="processes for ours; 0 = all cores")
    ap.add_argument("--cache", type=Path,
                    default=Path(tempfile.gettempdir()) / "fmae-bench-shards-cache",
                    help="where generated inputs are kept across runs")
    ap.add_argument("--size", type=int, default=1024, help="side of the large set's JPEGs")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--quality", type=int, default=95)
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args(argv)
    sets = [s for s in args.sets.split(",") if s]
    if args.n < 1 or args.rounds < 1 or not set(sets) <= {"large", "web"} or not sets:
        ap.error("--n and --rounds must be >= 1; --sets takes large and/or web")
    setup_logging()
    info = machine()
    workers = resolve_workers(args.workers)
    log.info("machine: %d cores, %s; load average %.2f (shared with other jobs)",
             info["nproc"], info["cpu_model"], info["loadavg_1m_at_start"])
    specs = {"large": [(args.size, args.size, 92)] * args.n,
             "web": [web_spec(i) for i in range(args.n)]}
    base = dict(image_size=args.image_size, jpeg_quality=args.quality, samples_per_shard=1000,
                max_aspect_ratio=1.5, workers=workers)
    results: dict = {"machine": info, "workers": workers, "params": base,
                     "command": " ".join([Path(sys.argv[0]).as_posix()] + (argv or sys.argv[1:]))}
    with tempfile.TemporaryDirectory(prefix="bench-shards-") as tmp:
        for name in sets:
            set_name = f"{args.size}px" if name == "large" else "web"
            paths = ensure_inputs(args.cache, set_name, specs[name], workers)
            for p in paths:  # page cache warm for every variant
                p.read_bytes()
            if name == "web":
                shorts = [min(w, h) for w, h, _ in specs[name]]
                results["web_sizes"] = {"shorter_side_median": float(np.median(shorts)),
                                        "below_224": float(np.mean(np.less(shorts, 224))),
                                        "max_side": max(max(w, h) for w, h, _ in specs[name])}
                log.info("web set: shorter side median %.0f px, %.0f%% below 224 px, max %d px",
                         results["web_sizes"]["shorter_side_median"],
                         100 * results["web_sizes"]["below_224"],
                         results["web_sizes"]["max_side"])
            results[name] = bench_set(name, paths, base, args.rounds, Path(tmp))
    results["machine"]["loadavg_1m_at_end"] = os.getloadavg()[0]
    if args.json:
        atomic_write_json(args.json, results)
    return results


if __name__ == "__main__":
    main()
