"""AU finetuning training-step throughput (pipeline/finetune.py) for ViT-B and ViT-L.

    python benchmarks/bench_finetune.py --device cuda --amp bf16 --json bench_finetune.json
    python benchmarks/bench_finetune.py --models tiny --img-size 64 --batch 8 --steps 2 \\
        --rounds 1 --warmup 1                                   # a CPU smoke run

Times the finetuning stage's own epoch loop, ``pipeline.finetune.train_one_epoch`` (per-step
lr with layer decay, autocast, AU BCE + ID-adversarial loss through the gradient reversal,
AdamW step, loss read back every step) on the model the stage builds: a timm ViT with mean
pooling (``build_vit(..., global_pool="avg")``, drop path 0.1, trainable position embedding),
the AU head and, with ``--variant iat`` (default), the linear ID head -- BP4D's 12 AUs and 41
identities. The batches are random (B, 3, S, S) images already in memory (data loading is
measured by bench_loader.py), so this is the GPU's side of a finetuning epoch.

Models alternate within each of ``--rounds`` rounds (each round: ``--steps`` steps per
model after ``--warmup`` untimed steps in the first round); the median round is reported as
images/s, with the peak memory on CUDA and the time one epoch of a BP4D training fold (two
of the three subject-exclusive parts, ~97,000 frames, protocols.md) would take.
"""
from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import time
from pathlib import Path

import torch

from pipeline.finetune import autocast_dtype, param_groups_lrd, train_one_epoch
from pipeline.io import setup_logging
from pipeline.models.au_model import AUModel
from pipeline.models.vit import build_vit
from pipeline.params import FinetuneParams

log = logging.getLogger("bench_finetune")
BP4D_TRAIN_FOLD_FRAMES = (146_847 * 2) // 3  # two of the three parts, rounded
N_AUS, N_IDS = 12, 41  # BP4D


def build_model(model_size: str, img: int, patch: int, variant: str,
                device: torch.device) -> AUModel:
    """The finetuning model as pipeline.finetune.finetune builds it (random weights)."""
    encoder = build_vit(model_size, img, patch, 0.1, global_pool="avg")
    encoder.pos_embed.requires_grad_(True)
    iat = variant == "iat"
    return AUModel(encoder, N_AUS, n_ids=N_IDS if iat else 0, id_head_depth=1,
                   lambda_=1.0 if iat else 0.0).to(device)


def fake_batches(n: int, batch: int, img: int, seed: int) -> list[tuple]:
    """``n`` loader batches (x (B, 3, S, S), AU labels (B, 12), ids (B,), keys, subjects)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, img, img, generator=g)
    labels = torch.randint(0, 2, (batch, N_AUS), generator=g).float()
    ids = torch.randint(0, N_IDS, (batch,), generator=g)
    keys, subjects = [f"k{i}" for i in range(batch)], [f"s{i}" for i in range(batch)]
    return [(x, labels, ids, keys, subjects)] * n


def run_epoch(model: AUModel, optimizer, batches: list, cfg: FinetuneParams,
              device: torch.device, amp) -> float:
    """Seconds of one ``train_one_epoch`` over ``batches``."""
    scaler = torch.amp.GradScaler("cuda") if amp == torch.float16 else None
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    train_one_epoch(model, batches, optimizer, epoch=1, steps_per_epoch=len(batches), cfg=cfg,
                    base_lr=cfg.blr * cfg.batch_size / 256, device=device, amp=amp,
                    scaler=scaler)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="base,large", help="comma-separated ViT sizes")
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--patch", type=int, default=16)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--variant", default="iat", choices=("iat", "fmae"))
    ap.add_argument("--steps", type=int, default=20, help="timed steps per model and round")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--amp", default="auto", choices=("auto", "bf16", "fp16", "off"),
                    help="resolved like finetune.amp")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    setup_logging()
    device = torch.device(args.device)
    amp = autocast_dtype(args.amp, device)
    cfg = FinetuneParams(image_size=args.img_size, batch_size=args.batch, epochs=30,
                         warmup_epochs=3, blr=5e-4, amp=args.amp)
    torch.manual_seed(0)
    sizes = args.models.split(",")
    models, opts = {}, {}
    for size in sizes:
        models[size] = build_model(size, args.img_size, args.patch, args.variant, device)
        opts[size] = torch.optim.AdamW(param_groups_lrd(models[size], cfg.weight_decay,
                                                        cfg.layer_decay), lr=1e-4)
        run_epoch(models[size], opts[size], fake_batches(args.warmup, args.batch,
                                                         args.img_size, 0), cfg, device, amp)
    speeds: dict[str, list[float]] = {s: [] for s in sizes}
    peak: dict[str, float] = {}
    for r in range(args.rounds):
        for size in sizes:
            batches = fake_batches(args.steps, args.batch, args.img_size, r + 1)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            sec = run_epoch(models[size], opts[size], batches, cfg, device, amp)
            if device.type == "cuda":
                peak[size] = torch.cuda.max_memory_allocated(device) / 2**30
            speeds[size].append(args.steps * args.batch / sec)
            log.info("round %d ViT-%s: %.1f images/s", r + 1, size, speeds[size][-1])
    res = {"device": torch.cuda.get_device_name(device) if device.type == "cuda"
           else f"CPU {platform.processor() or platform.machine()}, "
                f"{torch.get_num_threads()} threads",
           "torch": torch.__version__, "amp": str(amp).replace("torch.", "") if amp else "fp32",
           "config": vars(args) | {"json": None}, "models": {}}
    for size in sizes:
        ips = statistics.median(speeds[size])
        res["models"][size] = {"images_per_s": ips, "rounds": speeds[size],
                               "peak_mem_gib": peak.get(size),
                               "bp4d_fold_epoch_min": BP4D_TRAIN_FOLD_FRAMES / ips / 60}
        log.info("ViT-%s %s, batch %d, %d px: %.1f images/s%s; a BP4D training-fold epoch "
                 "(%d frames): %.1f min", size, args.variant, args.batch, args.img_size, ips,
                 f", peak {peak[size]:.2f} GiB" if size in peak else "", BP4D_TRAIN_FOLD_FRAMES,
                 res["models"][size]["bp4d_fold_epoch_min"])
    if args.json:
        args.json.write_text(json.dumps(res, indent=2) + "\n")
    return res


if __name__ == "__main__":
    main()
