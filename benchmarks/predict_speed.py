"""Speed of ``fmae-iat predict``: frames/s of the whole command and of each of its parts.

For each model size (random weights: speed does not depend on them) and device:

- **pipeline**: :func:`pipeline.predict.predict_files` on an H.264 video (``--width`` x
  ``--height``, Grace Hopper's portrait from matplotlib moving across a grey frame, so MTCNN
  finds one face in every frame): decode (PyAV) + detect (MTCNN) + crop + preprocess + model
  + CSV, as the command runs it (decoding in its background thread). One untimed run on a
  short clip first (weights loaded, kernels warmed);
- **decode**: :func:`pipeline.video.iter_frames` alone over the same video;
- **detect**: the MTCNN detector alone on batches of decoded frames;
- **model**: the AU model alone on preprocessed (3, S, S) batches (``--batch``), fp32, no
  autograd: the median of ``--rounds`` timed rounds after a warm-up.

    .venv/bin/python benchmarks/predict_speed.py                      # CPU, mini and ViT-B
    .venv/bin/python benchmarks/predict_speed.py --device cuda --frames 1000   # on a GPU

Prints one line per measurement and, with ``--json``, writes them all.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

SIZES = {"mini": 64, "base": 224}  # model size -> input size (the CPU default; the paper's)


def make_video(path: Path, n: int, width: int, height: int, fps: int = 30) -> Path:
    import av
    import matplotlib.cbook as cbook

    face = Image.open(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)).convert("RGB")
    face = face.resize((int(face.width * height * 0.7 / face.height), int(height * 0.7)))
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=fps)
        s.width, s.height, s.pix_fmt = width, height, "yuv420p"
        s.options = {"preset": "veryfast", "crf": "23"}
        for k in range(n):
            frame = Image.new("RGB", (width, height), (110, 110, 110))
            x = int((width - face.width) * (0.5 + 0.4 * np.sin(k / 15)))
            frame.paste(face, (x, int(height * 0.15)))
            for p in s.encode(av.VideoFrame.from_image(frame)):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path


def random_model_file(path: Path, size: str, img: int) -> Path:
    from pipeline.au_export import default_preprocess, save_au_model
    from pipeline.models.au_model import AUModel
    from pipeline.models.vit import build_vit

    torch.manual_seed(0)
    model = AUModel(build_vit(size, img, 16, global_pool="avg"), 12)
    save_au_model(path, model, aus=[1, 2, 4, 6, 7, 10, 12, 14, 15, 17, 23, 24],
                  preprocess=default_preprocess(img), dataset="bp4d", fold=None,
                  variant="random", lambda_=0.0, epoch=0, model_size=size, source="benchmark")
    return path


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def model_alone(model_path: Path, device: torch.device, batch: int, rounds: int) -> float:
    from pipeline.au_export import load_au_model

    model, info = load_au_model(model_path, device)
    S = info["image_size"]
    x = torch.randn(batch, 3, S, S, device=device)
    times = []
    with torch.no_grad():
        for r in range(rounds + 2):
            sync(device)
            t = time.perf_counter()
            model(x)
            sync(device)
            if r >= 2:  # two warm-up rounds
                times.append(time.perf_counter() - t)
    return batch / statistics.median(times)


def decode_alone(video: Path) -> tuple[float, int]:
    from pipeline.video import iter_frames
    t = time.perf_counter()
    n = sum(1 for _ in iter_frames(video))
    return n / (time.perf_counter() - t), n


def detect_alone(video: Path, device: torch.device, batch: int, limit: int) -> float:
    from pipeline.faces import make_detector
    from pipeline.predict import DETECT_MAX_SIDE, FACE_THRESHOLD, MIN_FACE
    from pipeline.video import iter_frames

    det = make_detector("mtcnn", device=str(device), min_face=MIN_FACE,
                        max_side=DETECT_MAX_SIDE, threshold=FACE_THRESHOLD)  # predict's
    frames = [im for i, _, im in iter_frames(video) if i < limit]
    det.detect(frames[:batch])  # warm-up
    t = time.perf_counter()
    found = 0
    for i in range(0, len(frames), batch):
        found += sum(bool(f) for f in det.detect(frames[i:i + batch]))
    rate = len(frames) / (time.perf_counter() - t)
    if found < len(frames) * 0.9:
        print(f"  warning: faces found in only {found} of {len(frames)} frames")
    return rate


def pipeline_run(video: Path, warm: Path, model_path: Path, device: torch.device, batch: int,
                 out: Path) -> tuple[float, dict]:
    from pipeline.predict import predict_files

    predict_files([warm], model_path, out, batch_size=batch, device=device.type,
                  progress=False)  # untimed warm-up
    t = time.perf_counter()
    s = predict_files([video], model_path, out, batch_size=batch, device=device.type,
                      progress=False)
    dt = time.perf_counter() - t
    return s.frames / dt, {"frames": s.frames, "faces": s.faces, "seconds": round(dt, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", choices=("cpu", "cuda", "all"), default="all",
                    help="all = cpu, and cuda when present")
    ap.add_argument("--sizes", default="mini,base")
    ap.add_argument("--frames", type=int, default=120, help="frames of the test video")
    ap.add_argument("--width", type=int, default=640)
    ap.add_argument("--height", type=int, default=480)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    devices = ["cpu", "cuda"] if args.device == "all" else [args.device]
    devices = [d for d in devices if d == "cpu" or torch.cuda.is_available()]
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo")
                   if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    print(f"machine: {os.cpu_count()} cores ({cpu}), torch {torch.__version__} with "
          f"{torch.get_num_threads()} threads, load average "
          f"{' '.join(f'{v:.1f}' for v in os.getloadavg())}"
          + (f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""))
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        video = make_video(tmp / "clip.mp4", args.frames, args.width, args.height)
        warm = make_video(tmp / "warm.mp4", 8, args.width, args.height)
        rate, n = decode_alone(video)
        print(f"decode (PyAV, {args.width}x{args.height} H.264, {n} frames): "
              f"{rate:.1f} frames/s")
        results.append({"what": "decode", "frames_per_s": rate})
        for dev_name in devices:
            dev = torch.device(dev_name)
            rate = detect_alone(video, dev, args.batch, limit=min(args.frames, 64))
            print(f"[{dev_name}] detect (MTCNN, batch {args.batch}): {rate:.1f} frames/s")
            results.append({"what": "detect", "device": dev_name, "frames_per_s": rate})
            for size in args.sizes.split(","):
                img = SIZES.get(size, 224)
                model_path = random_model_file(tmp / f"{size}.safetensors", size, img)
                m = model_alone(model_path, dev, args.batch, args.rounds)
                p, info = pipeline_run(video, warm, model_path, dev, args.batch, tmp / "aus.csv")
                print(f"[{dev_name}] ViT-{size} {img}px: model alone {m:.1f} frames/s "
                      f"(batch {args.batch}); whole pipeline {p:.1f} frames/s "
                      f"({info['frames']} frames, {info['faces']} faces, "
                      f"{info['seconds']} s)")
                results.append({"what": "model", "device": dev_name, "size": size,
                                "img": img, "frames_per_s": m})
                results.append({"what": "pipeline", "device": dev_name, "size": size,
                                "img": img, "frames_per_s": p, **info})
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
