"""Benchmark of the shards stage (pipeline/shards.py) against a naive one-image-at-a-time loop.

    python benchmarks/bench_shards.py --n 2000 --workers 0 --cache /tmp/bench-shards-cache

1. Generates ``--n`` large (``--size`` x ``--size``, default 1024) JPEGs with realistic content
   (smooth gradients, overlapping shapes, a soft "face" ellipse, sensor-like noise, so the JPEG
   sizes are like real photos: ~150-300 kB) into ``--cache``; they are reused across runs.
2. Measures images/s of
   (a) ``build_shards`` with JPEG draft decoding on ``--workers`` processes (0 = all cores);
   (b) a naive loop: one image at a time, PIL open, convert RGB, bicubic resize to 224, save JPEG;
   with ``--ablation`` also (c) ``build_shards`` without draft on all workers and
   (d) ``build_shards`` with draft on one worker, to separate the two speed-ups.
3. Reports the ratio (a)/(b) and the mean PSNR of (a)'s outputs against (b)'s (both decoded
   at 224), i.e. what the draft shortcut costs in pixels.

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
def make_image(index: int, size: int) -> bytes:
    """A deterministic photo-like JPEG: gradient background, shapes, a face-like ellipse,
    blur and noise (noise keeps the compressed size realistic)."""
    rng = np.random.default_rng(index)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    c0, c1 = rng.uniform(30, 220, 3), rng.uniform(30, 220, 3)
    t = (np.cos(rng.uniform(0, np.pi)) * x + np.sin(rng.uniform(0, np.pi)) * y)[..., None]
    base = c0 * (1 - t) + c1 * t  # (size, size, 3) linear gradient
    img = Image.fromarray(base.clip(0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(6, 14))):
        x0, y0 = rng.uniform(-0.2, 1.0, 2) * size
        w, h = rng.uniform(0.05, 0.5, 2) * size
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        if rng.random() < 0.5:
            draw.ellipse([x0, y0, x0 + w, y0 + h], fill=colour)
        else:
            draw.rectangle([x0, y0, x0 + w, y0 + h], fill=colour)
    skin = tuple(int(v) for v in rng.integers([150, 100, 80], [240, 190, 160]))
    cx, cy = rng.uniform(0.35, 0.65, 2) * size
    draw.ellipse([cx - 0.2 * size, cy - 0.27 * size, cx + 0.2 * size, cy + 0.27 * size],
                 fill=skin)
    for dx in (-0.08, 0.08):  # eyes
        draw.ellipse([cx + (dx - 0.03) * size, cy - 0.08 * size,
                      cx + (dx + 0.03) * size, cy - 0.04 * size], fill=(40, 30, 30))
    img = img.filter(ImageFilter.GaussianBlur(radius=size / 400))
    arr = np.asarray(img).astype(np.float32)
    arr += rng.normal(0, 4.0, arr.shape).astype(np.float32)  # sensor noise
    buf = io.BytesIO()
    Image.fromarray(arr.clip(0, 255).astype(np.uint8), "RGB").save(buf, "JPEG", quality=92)
    return buf.getvalue()


def _write_one(args: tuple[int, int, str]) -> None:
    index, size, path = args
    data = make_image(index, size)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def ensure_inputs(cache: Path, n: int, size: int, workers: int) -> list[Path]:
    """The first ``n`` cached images of side ``size``, generating the missing ones."""
    d = cache / f"v{GEN_VERSION}-{size}px"
    d.mkdir(parents=True, exist_ok=True)
    paths = [d / f"img_{i:06d}.jpg" for i in range(n)]
    todo = [(i, size, str(p)) for i, p in enumerate(paths) if not p.is_file()]
    if todo:
        log.info("generating %d of %d %dx%d JPEGs in %s", len(todo), n, size, size, d)
        t0 = time.perf_counter()
        with mp.get_context().Pool(workers) as pool:
            for k, _ in enumerate(pool.imap_unordered(_write_one, todo, chunksize=8), 1):
                if k % 500 == 0:
                    log.info("  %d / %d generated", k, len(todo))
        log.info("generated in %.1f s", time.perf_counter() - t0)
    else:
        log.info("using %d cached %dx%d JPEGs in %s", n, size, size, d)
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
    t0, c0 = time.perf_counter(), cpu_seconds()
    out = []
    for p in paths:
        img = Image.open(p).convert("RGB").resize((image_size, image_size), RESAMPLE)
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=quality)
        out.append(buf.getvalue())
    return time.perf_counter() - t0, cpu_seconds() - c0, out


def _timing(name: str, n: int, seconds: float, cpu: float) -> dict:
    # CPU ms per image is what the work costs; images/s also depends on the machine's load.
    out = {"seconds": seconds, "images_per_s": n / seconds, "cpu_ms_per_image": 1000 * cpu / n}
    log.info("%-22s %7.1f s  %8.1f images/s  %6.2f CPU ms/image", name, seconds,
             out["images_per_s"], out["cpu_ms_per_image"])
    return out


def mean_psnr(a: list[bytes], b: list[bytes]) -> float:
    vals = []
    for x, y in zip(a, b, strict=True):
        xa = np.asarray(Image.open(io.BytesIO(x)).convert("RGB"), dtype=np.float64)
        ya = np.asarray(Image.open(io.BytesIO(y)).convert("RGB"), dtype=np.float64)
        mse = ((xa - ya) ** 2).mean()
        vals.append(99.0 if mse == 0 else 10 * np.log10(255.0 ** 2 / mse))
    return float(np.mean(vals))


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


# --------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2000, help="number of images (>= 1)")
    ap.add_argument("--workers", type=int, default=0, help="processes for (a); 0 = all cores")
    ap.add_argument("--cache", type=Path,
                    default=Path(tempfile.gettempdir()) / "fmae-bench-shards-cache",
                    help="where generated inputs are kept across runs")
    ap.add_argument("--size", type=int, default=1024, help="side of the generated JPEGs")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--quality", type=int, default=95)
    ap.add_argument("--ablation", action="store_true",
                    help="also time build_shards without draft, and with draft on 1 worker")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args(argv)
    if args.n < 1:
        ap.error("--n must be >= 1")
    setup_logging()
    info = machine()
    workers = resolve_workers(args.workers)
    log.info("machine: %d cores, %s; load average %.2f (shared with other jobs)",
             info["nproc"], info["cpu_model"], info["loadavg_1m_at_start"])

    paths = ensure_inputs(args.cache, args.n, args.size, workers)
    sizes = [p.stat().st_size for p in paths]
    for p in paths:  # page cache warm for every variant
        p.read_bytes()
    items = [BenchItem("bench", p.name, str(p)) for p in paths]
    base = dict(image_size=args.image_size, jpeg_quality=args.quality, samples_per_shard=1000,
                max_aspect_ratio=1.5)
    results: dict = {"machine": info, "n": args.n, "input_size": args.size,
                     "mean_input_kb": float(np.mean(sizes)) / 1024, "workers": workers,
                     "command": " ".join([Path(sys.argv[0]).as_posix()] + (argv or sys.argv[1:]))}

    with tempfile.TemporaryDirectory(prefix="bench-shards-") as tmp:
        tmp = Path(tmp)
        runs = [("a_draft_all_workers", dict(draft=True, workers=workers))]
        if args.ablation:
            runs += [("c_nodraft_all_workers", dict(draft=False, workers=workers)),
                     ("d_draft_1_worker", dict(draft=True, workers=1))]
        outputs = {}
        for name, kw in runs:
            dt, cpu, jpgs = run_build(items, tmp / name, ShardsParams(**base, **kw))
            if len(jpgs) != args.n:
                raise RuntimeError(f"{name}: {len(jpgs)} outputs for {args.n} inputs")
            outputs[name] = jpgs
            results[name] = _timing(name, args.n, dt, cpu)
        dt, cpu, naive = run_naive(paths, args.image_size, args.quality)
        results["b_naive_loop"] = _timing("b_naive_loop", args.n, dt, cpu)

    a, b = results["a_draft_all_workers"], results["b_naive_loop"]
    results["speedup_a_over_b"] = a["images_per_s"] / b["images_per_s"]
    results["psnr_a_vs_b_db"] = mean_psnr(outputs["a_draft_all_workers"], naive)
    if args.ablation:
        results["psnr_c_vs_b_db"] = mean_psnr(outputs["c_nodraft_all_workers"], naive)
    results["machine"]["loadavg_1m_at_end"] = os.getloadavg()[0]
    log.info("speed-up (a)/(b): %.2fx; mean PSNR of (a) vs (b) at %d px: %.2f dB",
             results["speedup_a_over_b"], args.image_size, results["psnr_a_vs_b_db"])
    if args.json:
        atomic_write_json(args.json, results)
    return results


if __name__ == "__main__":
    main()
