"""Face front-end cost at BP4D's frame size: decode + detect + crop, frames/s.

BP4D frames are 1040 wide x 1392 high JPEGs with the face a fraction of the picture. With no
licensed frames here, the benchmark builds such frames from the real photo that ships inside
matplotlib (Grace Hopper's portrait, face ~200 px) scaled 2x and pasted at varying places on
a 1040x1392 canvas, so the face is ~400 px tall as in BP4D, then JPEG-encodes them.

Per frame, as au_shards does it (pipeline/au_faces.py, then the crop of pipeline/faces.py):
  decode  - JPEG decode at the DCT scale nearest face_max_side (libjpeg draft), as the
            detection pass does;
  detect  - MTCNN on the downscaled frame (batches of equal-size frames);
  crop    - full decode, reference crop (box + 5% per side), resize to 224.
It reports each step's ms/frame and the whole pipeline's frames/s, then what 146,847 BP4D
frames would cost. Run it on a quiet machine; on a shared one read the ratios.

    python benchmarks/bench_faces.py [--frames 48] [--max-side 640] [--threads 2] [--device cpu]
"""
from __future__ import annotations

import argparse
import io
import os
import platform
import time

import matplotlib.cbook as cbook
import numpy as np
import torch
from PIL import Image

from pipeline.faces import crop_face, largest, make_detector

BP4D_FRAMES = 146_847
W, H = 1040, 1392


def make_frames(n: int, seed: int = 0) -> list[bytes]:
    """``n`` BP4D-sized JPEGs, each with the portrait (2x) at a random place."""
    photo = Image.open(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)).convert("RGB")
    photo = photo.resize((photo.width * 2 * 9 // 10, photo.height * 2 * 9 // 10))
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        canvas = Image.new("RGB", (W, H), tuple(int(v) for v in rng.integers(40, 200, 3)))
        canvas.paste(photo, (int(rng.integers(0, W - photo.width)),
                             int(rng.integers(0, H - photo.height))))
        buf = io.BytesIO()
        canvas.save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=48)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--max-side", type=int, default=640)
    ap.add_argument("--min-face", type=int, default=40)
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--device", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    det = make_detector("mtcnn", device=args.device, min_face=args.min_face,
                        max_side=args.max_side, threshold=0.7)
    jpegs = make_frames(args.frames)
    det.detect([Image.new("RGB", (W, H))])  # warm-up (weights, allocator)

    t_dec = t_det = t_crop = 0.0
    found = 0
    for i in range(0, len(jpegs), args.batch):
        chunk = jpegs[i:i + args.batch]
        t0 = time.perf_counter()
        small, scale = [], []
        for b in chunk:
            im = Image.open(io.BytesIO(b))
            im.draft("RGB", (args.max_side, args.max_side))
            im = im.convert("RGB")
            small.append(im)
            scale.append(W / im.width)
        t1 = time.perf_counter()
        faces = det.detect(small)
        t2 = time.perf_counter()
        for b, f, s in zip(jpegs[i:i + args.batch], faces, scale):
            face = largest(f)
            if face is None:
                continue
            found += 1
            full = Image.open(io.BytesIO(b)).convert("RGB")
            crop_face(full, [v * s for v in face.box], 224)
        t3 = time.perf_counter()
        t_dec, t_det, t_crop = t_dec + t1 - t0, t_det + t2 - t1, t_crop + t3 - t2
    n = len(jpegs)
    total = t_dec + t_det + t_crop
    print(f"machine: {platform.node()} {os.cpu_count()} cores, torch threads {args.threads}, "
          f"device {det.device}; {n} frames {W}x{H}, detection at max side {args.max_side}")
    print(f"found a face in {found}/{n}")
    for name, t in (("decode (draft)", t_dec), ("detect", t_det), ("crop + resize 224", t_crop)):
        print(f"  {name:18s} {1000 * t / n:7.1f} ms/frame")
    fps = n / total
    print(f"  whole front-end   {1000 * total / n:7.1f} ms/frame = {fps:.1f} frames/s")
    print(f"BP4D ({BP4D_FRAMES:,} frames): {BP4D_FRAMES / fps / 3600:.1f} h at this rate")


if __name__ == "__main__":
    main()
