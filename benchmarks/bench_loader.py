"""Pretraining loader throughput at 224 px: images/s and CPU seconds per image.

    python benchmarks/bench_loader.py                       # CPU: both decode paths, 0/1/2 workers
    python benchmarks/bench_loader.py --device cuda         # on a GPU machine: nvJPEG decode
    python benchmarks/bench_loader.py --n-images 64 --batches 2 --rounds 1   # a smoke run

1. Builds seeded WebDataset shards in a temp dir with the real shards stage
   (:func:`pipeline.shards.build_shards`): ``--n-images`` seeded photo-like images (gradients,
   shapes, a face-like ellipse, blur, sensor noise: ``bench_shards.make_image``, plus
   ``--extra-noise`` grey levels of pixel noise so that a 224 px q95 JPEG is ~24 kB, like a
   real face photo's: matplotlib's grace_hopper.jpg face crop at 224 px q95 is 28 kB) at
   224 px, JPEG quality 95, as the shards stage writes face crops.
2. Reads them through the real loader (:func:`pipeline.loader.make_train_loader`: resampled
   shards, shuffle buffers, ``--batch`` per batch) with each of ``--workers`` and each decode
   path of ``pretrain.decode``:

   - ``cpu``: Pillow decode + random flip + normalise to float in the workers
     (:class:`pipeline.pretrain.MapSample`), collated to an (N, 3, 224, 224) float batch;
   - ``gpu``: the workers hand over the JPEG bytes and the flip decision
     (:class:`pipeline.jpeg_batch.MapRawJpeg`); the training process decodes, flips and
     normalises the batch on ``--device`` (:func:`pipeline.jpeg_batch.decode_batch`: batched
     nvJPEG on CUDA; on CPU libjpeg in the main process, which shows what the worker side
     of this path costs and what the decode costs when it stays on a CPU core);
   - ``raw``: the ``gpu`` path's loader alone, its :class:`JpegBatch` not decoded: what the
     CPU pays per image for ``pretrain.decode: gpu`` on a GPU machine (nvJPEG's hardware
     decoder on A100/H100 does the Huffman decoding too; not measured here).

   Each measurement skips ``--warmup`` batches (worker start, buffer fill), then times
   ``--batches`` batches. The configurations alternate within each of ``--rounds`` rounds so
   that other load on the machine hits them alike; the median round is reported.

Reported per configuration: images/s (wall clock) and CPU seconds per image (user + system
of the main process and its worker processes over the timed batches; on a loaded machine this
is the reliable figure, and its inverse is the images/s one core delivers).
"""
from __future__ import annotations

import argparse
import io
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil  # installed with dvc (a dependency in pyproject.toml), which requires it
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_shards, next to this file
from bench_shards import make_image  # noqa: E402

from pipeline.io import setup_logging  # noqa: E402
from pipeline.jpeg_batch import CollateJpeg, MapRawJpeg, decode_batch  # noqa: E402
from pipeline.loader import make_train_loader, shard_urls  # noqa: E402
from pipeline.params import ShardsParams  # noqa: E402
from pipeline.pretrain import MapSample, images_from_batch  # noqa: E402
from pipeline.shards import build_shards  # noqa: E402

log = logging.getLogger("bench_loader")


@dataclass(frozen=True)
class _Item:
    """What build_shards reads: an index into the generated images."""
    source: str
    key: str
    index: int
    identity: str | None = None


class _Reader:
    """``read(item)`` for build_shards: a seeded photo-like JPEG with extra pixel noise."""

    def __init__(self, side: int, noise: float):
        self.side, self.noise = side, noise

    def __call__(self, item: _Item) -> bytes:
        img = Image.open(io.BytesIO(make_image(item.index, self.side))).convert("RGB")
        arr = np.asarray(img).astype(np.float32)
        arr += np.random.default_rng(item.index).normal(0, self.noise, arr.shape)
        buf = io.BytesIO()
        Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(buf, "JPEG", quality=95)
        return buf.getvalue()


def build_bench_shards(out: Path, n: int, size: int, quality: int, source_side: int,
                       noise: float) -> None:
    """``n`` seeded photo-like images as ``size`` px JPEG shards (quality ``quality``)."""
    items = [_Item("bench", f"img{i:06d}", i) for i in range(n)]
    cfg = ShardsParams(image_size=size, samples_per_shard=max(1, n // 8), workers=0,
                       jpeg_quality=quality)
    build_shards(items, _Reader(source_side, noise), out, cfg, progress=False)


def _cpu_seconds(proc: psutil.Process) -> tuple[float, float]:
    """User + system CPU seconds of ``proc`` and of its live children (the loader workers)."""
    t = proc.cpu_times()
    children = 0.0
    for p in proc.children(recursive=True):
        try:
            c = p.cpu_times()
            children += c.user + c.system
        except psutil.NoSuchProcess:  # a worker that exited in between
            pass
    return t.user + t.system, children


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def measure(urls: list[str], *, decode: str, workers: int, batch: int, warmup: int,
            batches: int, device: torch.device, seed: int, size: int) -> dict:
    """images/s and CPU s/image of ``batches`` batches after ``warmup`` batches."""
    if decode == "cpu":
        kw = {"map_sample": MapSample(size, flip=True)}
    else:
        kw = {"map_sample": MapRawJpeg(size, flip=True), "decode_images": False,
              "collate_fn": CollateJpeg(size)}
    loader = make_train_loader(urls, batch_size=batch, steps_per_epoch=warmup + batches + 1,
                               num_workers=workers, seed=seed, shuffle_buffer=1000, **kw)

    def images(b) -> torch.Tensor:  # what the training step receives: (N, 3, S, S) float
        if decode == "raw":
            return b.flip  # (N,): the batch as the training process gets it, undecoded
        x = images_from_batch(b).to(device) if decode == "cpu" else decode_batch(b, device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return x

    proc = psutil.Process()
    it = iter(loader)
    for _ in range(warmup):
        images(next(it))
    (main0, work0), t0 = _cpu_seconds(proc), time.perf_counter()
    n = 0
    for _ in range(batches):
        n += images(next(it)).shape[0]
    wall = time.perf_counter() - t0
    main1, work1 = _cpu_seconds(proc)
    del it, loader  # stops the workers
    main_cpu, work_cpu = main1 - main0, work1 - work0
    return {"images_per_s": n / wall, "cpu_s_per_image": (main_cpu + work_cpu) / n,
            "main_cpu_s_per_image": main_cpu / n, "worker_cpu_s_per_image": work_cpu / n,
            "images": n}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-images", type=int, default=512, help="images in the shards")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--quality", type=int, default=95)
    ap.add_argument("--source-side", type=int, default=224,
                    help="side of the generated source images the shards stage resizes")
    ap.add_argument("--extra-noise", type=float, default=7.0,
                    help="std of the pixel noise added to the generated images (grey levels)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--workers", default="0,1,2", help="comma-separated worker counts")
    ap.add_argument("--decode", default="cpu,gpu,raw", help="comma-separated: cpu, gpu, raw")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                    help="where the gpu path decodes (and where batches are delivered)")
    ap.add_argument("--warmup", type=int, default=2, help="batches skipped per measurement")
    ap.add_argument("--batches", type=int, default=6, help="timed batches per measurement")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--shards", type=Path, default=None,
                    help="reuse/keep the shards here (default: a temp dir, deleted)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    setup_logging()
    device = torch.device(args.device)
    workers = [int(w) for w in args.workers.split(",")]
    decodes = args.decode.split(",")
    if not set(decodes) <= {"cpu", "gpu", "raw"}:
        raise SystemExit(f"--decode: {args.decode!r}; use a comma-separated subset of "
                         "cpu,gpu,raw")

    with tempfile.TemporaryDirectory(prefix="bench-loader-") as tmp:
        shard_dir = args.shards or Path(tmp) / "shards"
        if not (shard_dir / "stats.json").is_file():
            t = time.perf_counter()
            build_bench_shards(shard_dir, args.n_images, args.size, args.quality,
                               args.source_side, args.extra_noise)
            log.info("built %d images of %d px (q%d) in %.1f s", args.n_images, args.size,
                     args.quality, time.perf_counter() - t)
        urls = shard_urls(shard_dir)
        per_image = sum(Path(u).stat().st_size for u in urls) / args.n_images
        log.info("%d shards, %.1f kB of tar per image", len(urls), per_image / 1e3)
        configs = [(d, w) for d in decodes for w in workers]
        runs: dict[str, list[dict]] = {f"{d}/{w}": [] for d, w in configs}
        for r in range(args.rounds):
            for d, w in configs:
                res = measure(urls, decode=d, workers=w, batch=args.batch, warmup=args.warmup,
                              batches=args.batches, device=device, seed=r, size=args.size)
                runs[f"{d}/{w}"].append(res)
                log.info("round %d decode=%s workers=%d: %7.1f images/s, %.2f CPU ms/image",
                         r + 1, d, w, res["images_per_s"], 1e3 * res["cpu_s_per_image"])

    result = {"machine": {"cpu": _cpu_name(),
                          "cores": os.cpu_count(), "device": str(device),
                          "gpu": torch.cuda.get_device_name(device)
                          if device.type == "cuda" else None,
                          "load_avg_1m": os.getloadavg()[0]},
              "torch": torch.__version__, "config": vars(args) | {"json": None,
                                                                  "shards": None},
              "tar_bytes_per_image": per_image, "results": {}}
    log.info("%-6s %-7s %10s %14s %10s %10s %16s", "decode", "workers", "images/s",
             "CPU ms/image", "main ms", "worker ms", "images/s/core")
    for (d, w), key in zip(configs, runs):
        ips = statistics.median(x["images_per_s"] for x in runs[key])
        cpu, main_cpu, work_cpu = (statistics.median(x[k] for x in runs[key]) for k in (
            "cpu_s_per_image", "main_cpu_s_per_image", "worker_cpu_s_per_image"))
        result["results"][key] = {"decode": d, "workers": w, "images_per_s": ips,
                                  "cpu_s_per_image": cpu, "main_cpu_s_per_image": main_cpu,
                                  "worker_cpu_s_per_image": work_cpu,
                                  "images_per_s_per_core": 1 / max(cpu, 1e-9),
                                  "rounds": runs[key]}
        log.info("%-6s %-7d %10.1f %14.2f %10.2f %10.2f %16.1f", d, w, ips, 1e3 * cpu,
                 1e3 * main_cpu, 1e3 * work_cpu, 1 / max(cpu, 1e-9))
    log.info("load average (1 min) at the end: %.1f on %d cores", os.getloadavg()[0],
             os.cpu_count())
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
