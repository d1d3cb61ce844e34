"""FMAE pretraining: the MAE recipe on face shards (paper section 3.1; method.md section 2).

Recipe (MAE reference main_pretrain.py / engine_pretrain.py, as FMAE ran it):
- data: Resize(image_size) + random horizontal flip + ImageNet mean/std; no
  RandomResizedCrop (FMAE switched it off: the faces are already aligned crops);
- AdamW betas (0.9, 0.95), weight decay on matrices only (not on biases, norms, position
  embeddings, cls/mask tokens); lr = blr * batch * accum_iter * world_size / 256;
- per-optimizer-step linear warmup then half-cycle cosine to min_lr (:func:`lr_at`, a pure
  function of the step); gradient accumulation over ``accum_iter`` micro-batches;
- bf16 autocast where supported, fp16 with a GradScaler on GPUs without bf16.
- ``pretrain.decode``: ``cpu`` decodes, flips and normalises in the loader workers
  (:class:`MapSample`); ``gpu`` hands the JPEG bytes and the flip decision (same RNG draws)
  to this process, which decodes the batch with nvJPEG on its GPU
  (:mod:`pipeline.jpeg_batch`); the batches are the same, so is the data order.

What the reference code lacks and this adds (method.md section 8): the data order is a pure
function of (seed, epoch) for a given ``pretrain.num_workers``, batch size and world size,
not of (seed, epoch) alone: each DataLoader worker draws its own shard stream and shuffle from
(seed, rank, worker, epoch) and the cross-worker shuffle buffer's size depends on the number of
workers (pipeline/loader.py), so changing ``num_workers`` changes the batches, and a run
resumed with another ``num_workers`` continues, but not bit-for-bit; an atomic resume
checkpoint with every RNG of every rank, so a killed run continues bit-for-bit; a NaN/inf loss
stops the run naming the epoch and step; a per-epoch reconstruction figure of four fixed
images; metrics.json and loss.csv for DVC. A killed run's ``.tmp-*`` files (a partial resume
checkpoint is as large as the real one) are removed when the next run starts.
"""
from __future__ import annotations

import csv
import io
import logging
import math
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch
from torch import nn

from pipeline.distributed import (DistInfo, all_gather_objects, all_reduce_mean, barrier,
                                  unwrap, wrap_ddp)
from pipeline.io import (atomic_path, atomic_torch_save, atomic_write_json, atomic_write_text,
                         remove_stale_temporaries, seed_everything)
from pipeline.jpeg_batch import (IMAGENET_MEAN, IMAGENET_STD, CollateJpeg, JpegBatch,
                                 MapRawJpeg, check_device_decode, decode_batch)
from pipeline.models.mae import (MAE, check_finite_weights, encoder_state_dict, infer_config,
                                 is_decoder_key, load_checkpoint, mae_from_config,
                                 save_checkpoint)
from pipeline.schedule import lr_at
from pipeline.params import PretrainParams
from pipeline.tracking import Tracker

log = logging.getLogger(__name__)

STATE_FILE = "last.pt"
N_FIXED = 4  # images in the per-epoch reconstruction figure

# make_train_loader's keyword interface, with the shard URLs already bound:
# (*, batch_size, steps_per_epoch, num_workers, map_sample, seed, rank, world_size) -> iterable
LoaderFactory = Callable[..., Iterable]


# --------------------------------------------------------------------------- pure pieces
def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: decayed tensors, and 1-D tensors and biases (no decay).

    As the MAE reference (timm 0.3.2's ``add_weight_decay``): only 1-D tensors (LayerNorm)
    and biases skip weight decay, so ``cls_token`` and ``mask_token`` (3-D) are decayed;
    frozen parameters (the fixed sin-cos position embeddings) are left out.
    """
    decay, no_decay = [], []
    for name, p in unwrap(model).named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim <= 1 or name.endswith(".bias"):
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def resolve_amp(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``pretrain.amp`` on ``device`` (None = full fp32).

    auto: bf16 on CUDA GPUs that support it, fp16 (with a GradScaler) on older GPUs, fp32 on
    CPU (CPU bf16 autocast is slower than fp32 on most CPUs, so only when asked for).
    """
    cuda = device.type == "cuda"
    if amp == "off":
        return None
    if amp == "auto":
        if not cuda:
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if amp == "bf16":
        if cuda and not torch.cuda.is_bf16_supported():
            raise ValueError("pretrain.amp: bf16 is not supported by this GPU; use fp16 or auto")
        return torch.bfloat16
    if amp == "fp16":
        if not cuda:
            raise ValueError("pretrain.amp: fp16 needs a CUDA GPU; use bf16, off or auto on CPU")
        return torch.float16
    raise ValueError(f"pretrain.amp: unknown value {amp!r}; use auto, bf16, fp16 or off")


class MapSample:
    """WebDataset sample -> ``(image,)`` with image (3, S, S) float, ImageNet-normalised.

    A class, not a closure, so DataLoader workers can pickle it. The flip draws from torch's
    RNG, which DataLoader seeds per worker and which the resume checkpoint restores.
    """

    def __init__(self, image_size: int, flip: bool):
        self.image_size = int(image_size)
        self.flip = bool(flip)

    def __call__(self, sample: dict) -> tuple[torch.Tensor]:
        from PIL import Image

        img = sample.get("jpg")
        if img is None or not hasattr(img, "convert"):
            raise ValueError(f"sample {sample.get('__key__', '?')!r}: no decoded 'jpg' image "
                             f"(keys: {sorted(sample)}); re-run the shards stage")
        img = img.convert("RGB")
        s = self.image_size
        if img.size != (s, s):
            img = img.resize((s, s), Image.BICUBIC)
        if self.flip and bool(torch.rand(()) < 0.5):
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
        mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
        return ((x - mean) / std,)  # (3, S, S)


def batch_to_device(batch: Any, device: torch.device) -> torch.Tensor:
    """The (N, 3, S, S) float images of a loader batch on ``device``.

    A :class:`JpegBatch` (``pretrain.decode: gpu``) is decoded, flipped and normalised on
    ``device``; a collated tensor batch (``pretrain.decode: cpu``) is copied there.
    """
    if isinstance(batch, JpegBatch):
        return decode_batch(batch, device)
    return images_from_batch(batch).to(device, non_blocking=True)


def loader_kwargs(cfg: PretrainParams) -> dict:
    """What the loader factory gets for ``pretrain.decode``: ``map_sample`` (and, for gpu,
    raw bytes and :class:`JpegBatch` collation)."""
    if cfg.decode == "gpu":
        return {"map_sample": MapRawJpeg(cfg.image_size, cfg.flip), "decode_images": False,
                "collate_fn": CollateJpeg(cfg.image_size)}
    return {"map_sample": MapSample(cfg.image_size, cfg.flip)}


def images_from_batch(batch: Any) -> torch.Tensor:
    """The (N, 3, S, S) image tensor of a collated batch (a tensor or a tuple/list)."""
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0]
    raise TypeError(f"loader yielded {type(batch).__name__}; expected a tensor or a tuple "
                    "whose first item is the (N, 3, S, S) image tensor")


# --------------------------------------------------------------------------- one epoch
def train_one_epoch(model: nn.Module, loader: Iterable, optimizer: torch.optim.Optimizer,
                    scaler: torch.amp.GradScaler, *, epoch: int, steps: int, accum_iter: int,
                    lr_fn: Callable[[int], float], global_step: int, device: torch.device,
                    amp_dtype: torch.dtype | None, log_every: int,
                    tracker: Tracker | None = None, show_progress: bool = True,
                    ) -> tuple[dict, int, list[dict]]:
    """Run ``steps`` micro-batches of epoch ``epoch`` (1-based, for messages).

    Returns ({"loss", "images_per_s", "seconds"}, new global optimizer step, loss rows
    {"epoch", "step", "loss", "lr"} logged every ``log_every`` optimizer steps and at the
    epoch's end). Losses are means over ranks.
    """
    from tqdm import tqdm

    model.train()
    tracker = tracker or Tracker(active=False)
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    rows: list[dict] = []
    epoch_sum = torch.zeros((), device=device, dtype=torch.float64)
    window_sum, window_n = 0.0, 0
    n_images, lr = 0, 0.0
    it = iter(loader)
    bar = tqdm(range(steps), desc=f"pretrain epoch {epoch}", disable=not show_progress,
               leave=False, dynamic_ncols=True)
    t0 = time.perf_counter()
    for i in bar:
        try:
            batch = next(it)
        except StopIteration:
            raise RuntimeError(f"epoch {epoch}: the loader stopped after {i} of {steps} "
                               "batches; it must yield steps_per_epoch batches on every "
                               "rank") from None
        imgs = batch_to_device(batch, device)  # (N, 3, S, S)
        group_start = (i // accum_iter) * accum_iter
        group_size = min(accum_iter, steps - group_start)  # the last group may be short
        last_in_group = i == group_start + group_size - 1
        if i == group_start:
            lr = lr_fn(global_step)
            for g in optimizer.param_groups:
                g["lr"] = lr
        # Skip DDP's gradient all-reduce on all but the last micro-batch of a group.
        sync = nullcontext() if last_in_group or not hasattr(model, "no_sync") \
            else model.no_sync()
        with sync:
            with torch.autocast(device_type=device.type, dtype=amp_dtype,
                                enabled=amp_dtype is not None):
                loss, _, _ = model(imgs)
            loss_value = float(loss.detach())
            if not math.isfinite(loss_value):
                raise FloatingPointError(
                    f"pretrain: loss is {loss_value} at epoch {epoch}, step {i + 1} of {steps} "
                    f"(optimizer step {global_step}, lr {lr:.3g}). Lower pretrain.blr, set "
                    "pretrain.amp to bf16 or off, or check the shards for broken images; "
                    "the resume checkpoint in the state folder holds the last saved epoch")
            # Mean over the group: divide each micro-batch's loss by the group's size.
            scaler.scale(loss / group_size).backward()
        epoch_sum += loss.detach().double()
        window_sum += loss_value
        window_n += 1
        n_images += imgs.shape[0]
        if last_in_group:
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            global_step += 1
            if global_step % log_every == 0 or i == steps - 1:
                mean = float(all_reduce_mean(torch.tensor(window_sum / window_n,
                                                          device=device)))
                rows.append({"epoch": epoch, "step": global_step, "loss": mean, "lr": lr})
                tracker.log_metrics({"train/loss": mean, "train/lr": lr}, step=global_step)
                window_sum, window_n = 0.0, 0
            bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}")
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    bar.close()
    mean_loss = float(all_reduce_mean(epoch_sum / steps))
    stats = {"loss": mean_loss, "images_per_s": n_images * world / max(seconds, 1e-9),
             "seconds": seconds}
    return stats, global_step, rows


# --------------------------------------------------------------------------- figures
@torch.no_grad()
def reconstruction_figure(model: MAE, images: torch.Tensor, noise: torch.Tensor, title: str):
    """A 3-row matplotlib Figure: masked input / reconstruction / original.

    Args:
        model: the (unwrapped) MAE.
        images: (K, 3, S, S) normalised images.
        noise: (K, L) fixed masking noise, so every epoch shows the same mask.
    The reconstruction pastes the visible patches over the prediction; with norm_pix_loss
    the prediction is mapped back with each original patch's mean and std.
    """
    from matplotlib.figure import Figure

    was_training = model.training
    model.eval()
    _, pred, mask = model(images, noise=noise)  # pred (K, L, p*p*3), mask (K, L)
    model.train(was_training)
    pred = pred.float()
    patches = model.patchify(images.float())  # (K, L, p*p*3)
    if model.norm_pix_loss:
        mean = patches.mean(dim=-1, keepdim=True)
        std = (patches.var(dim=-1, keepdim=True) + 1.0e-6) ** 0.5
        pred = pred * std + mean
    m = mask.unsqueeze(-1)  # (K, L, 1), 1 = removed
    recon = model.unpatchify(patches * (1 - m) + pred * m)
    masked = model.unpatchify(patches * (1 - m))

    def to_rgb(x: torch.Tensor) -> np.ndarray:  # (3, S, S) normalised -> (S, S, 3) in [0, 1]
        mean_ = torch.tensor(IMAGENET_MEAN, device=x.device).view(3, 1, 1)
        std_ = torch.tensor(IMAGENET_STD, device=x.device).view(3, 1, 1)
        return (x * std_ + mean_).clamp(0, 1).permute(1, 2, 0).cpu().numpy()

    k = images.shape[0]
    fig = Figure(figsize=(2.0 * k, 6.3))
    axes = fig.subplots(3, k, squeeze=False)
    for j in range(k):
        for row, (name, img) in enumerate((("masked", masked), ("reconstruction", recon),
                                           ("original", images))):
            ax = axes[row][j]
            ax.imshow(to_rgb(img[j]))
            ax.set_xticks([])
            ax.set_yticks([])
            if j == 0:
                ax.set_ylabel(name)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------- resume state
def _rng_state(device: torch.device) -> dict:
    """This process's RNG states as tensors and plain values (weights_only-loadable)."""
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)),
                       int(np_state[2]), int(np_state[3]), float(np_state[4])]}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), n[2], n[3], n[4]))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _run_config(model: MAE, cfg: PretrainParams, *, steps_per_epoch: int, seed: int,
                world_size: int, amp_dtype: torch.dtype | None) -> dict:
    """What must match for a resume to continue the same run."""
    return {"model": dict(model.config), "seed": seed, "world_size": world_size,
            "steps_per_epoch": steps_per_epoch,
            "amp": str(amp_dtype).replace("torch.", "") if amp_dtype else "off",
            **{k: getattr(cfg, k) for k in ("epochs", "warmup_epochs", "batch_size",
                                            "accum_iter", "blr", "min_lr", "weight_decay",
                                            "flip")}}


def _load_resume(path: Path, run_config: dict) -> dict | None:
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same advice
        raise ValueError(f"{path}: resume checkpoint is unreadable ({e}); delete "
                         f"{path.parent} to start pretraining from scratch") from e
    if state.get("config") != run_config:
        old = state.get("config") or {}
        diff = sorted(k for k in set(old) | set(run_config) if old.get(k) != run_config.get(k))
        raise ValueError(
            f"{path}: resume checkpoint was made with different settings ("
            + ", ".join(f"{k}: {old.get(k)!r} -> {run_config.get(k)!r}" for k in diff)
            + f"). Delete {path.parent} to start over with the new settings, or restore the "
              "old params to continue the interrupted run")
    return state


def _save_resume(path: Path, *, model: nn.Module, optimizer, scaler, epoch: int,
                 global_step: int, run_config: dict, history: list, epoch_stats: list,
                 info: DistInfo) -> None:
    """Gather every rank's RNG state and write the resume checkpoint from rank 0."""
    rng = all_gather_objects(_rng_state(info.device))  # collective: every rank calls it
    if not info.is_main:
        return
    payload = {"model": {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()},
               "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
               "epoch": epoch, "global_step": global_step, "rng": rng, "config": run_config,
               "history": history, "epoch_stats": epoch_stats}
    atomic_torch_save(path, payload)
    log.info("resume checkpoint: %s (epoch %d, step %d)", path, epoch, global_step)


# --------------------------------------------------------------------------- entry points
@dataclass(frozen=True)
class OutputPaths:
    """Where the stage writes. By default everything sits in ``out_dir`` (design.md); the
    state folder and the DVC metrics/plots files can live elsewhere (dvc.yaml decides)."""
    out_dir: Path  # checkpoint.pt, recon_epoch<N>.png
    state_dir: Path  # resume checkpoint
    metrics: Path  # metrics.json
    loss_csv: Path  # loss.csv

    @classmethod
    def make(cls, out_dir: Path, state_dir: Path | None = None, metrics: Path | None = None,
             loss_csv: Path | None = None) -> "OutputPaths":
        out_dir = Path(out_dir)
        return cls(out_dir, Path(state_dir) if state_dir else out_dir / "state",
                   Path(metrics) if metrics else out_dir / "metrics.json",
                   Path(loss_csv) if loss_csv else out_dir / "loss.csv")

    def remove_stale_temporaries(self) -> list[Path]:
        """Delete killed runs' ``.tmp-*`` files from the output and state folders.

        Call it on the writing rank before anything is written: a killed run leaves a
        ``.tmp-last.pt.*`` as large as the resume checkpoint (gigabytes at ViT-L).
        """
        return [p for d in dict.fromkeys((self.out_dir, self.state_dir))
                for p in remove_stale_temporaries(d)]


def pretrain(shard_dir: Path | None, out_dir: Path, cfg: PretrainParams, *, model_size: str,
             seed: int, tracker: Tracker | None = None, dist_info: DistInfo | None = None,
             state_dir: Path | None = None, metrics_path: Path | None = None,
             loss_csv_path: Path | None = None, loader_factory: LoaderFactory | None = None,
             stop_after_epoch: int | None = None) -> dict:
    """Pretrain an FMAE (or import ``cfg.checkpoint``) and write ``out_dir``.

    Args:
        shard_dir: WebDataset face shards (the shards stage's output).
        out_dir: gets checkpoint.pt and recon_epoch<N>.png (and, by default, the rest).
        cfg: the ``pretrain`` params section.
        model_size, seed: top-level params.
        tracker: MLflow tracker from ``pipeline.tracking.start_run`` (None = no logging).
        dist_info: from ``pipeline.distributed.init_distributed`` (None = one process).
        state_dir, metrics_path, loss_csv_path: default ``out_dir/state``,
            ``out_dir/metrics.json``, ``out_dir/loss.csv``.
        loader_factory: replaces ``pipeline.loader.make_train_loader`` bound to the shards
            (tests inject an in-memory loader); needs ``cfg.steps_per_epoch`` > 0.
        stop_after_epoch: stop (after saving the resume state) once this many epochs are
            done, as a killed run would; for tests of resuming.
    Returns:
        The metrics written to metrics.json.
    """
    paths = OutputPaths.make(out_dir, state_dir, metrics_path, loss_csv_path)
    info = dist_info or _single_process()
    if cfg.checkpoint:
        if not info.is_main:
            barrier()
            return {}
        metrics = import_checkpoint(Path(cfg.checkpoint), paths, cfg, model_size=model_size,
                                    tracker=tracker)
        barrier()
        return metrics
    _, metrics = train_mae(shard_dir, paths, cfg, model_size=model_size, seed=seed,
                           tracker=tracker, dist_info=info, loader_factory=loader_factory,
                           stop_after_epoch=stop_after_epoch)
    return metrics


def train_mae(shard_dir: Path | None, out: Path | OutputPaths, cfg: PretrainParams, *,
              model_size: str, seed: int, tracker: Tracker | None = None,
              dist_info: DistInfo | None = None, loader_factory: LoaderFactory | None = None,
              stop_after_epoch: int | None = None) -> tuple[MAE, dict]:
    """The training loop behind :func:`pretrain`; returns (unwrapped model, metrics).

    ``out`` is an output folder or :class:`OutputPaths`. Every rank returns its own replica
    (the DDP test compares them); only rank 0 writes.
    """
    paths = out if isinstance(out, OutputPaths) else OutputPaths.make(Path(out))
    out_dir = paths.out_dir
    info = dist_info or _single_process()
    if info.is_main:  # only rank 0 writes
        paths.remove_stale_temporaries()
    tracker = tracker if (tracker is not None and info.is_main) else Tracker(active=False)
    device = info.device
    check_device_decode(cfg.decode, device)  # pretrain.decode: gpu without CUDA stops here
    factory, steps = _resolve_data(shard_dir, cfg, loader_factory, info.world_size)
    amp_dtype = resolve_amp(cfg.amp, device)
    accum = cfg.accum_iter
    opt_steps_per_epoch = math.ceil(steps / accum)
    eff_batch = cfg.batch_size * accum * info.world_size
    base_lr = cfg.blr * eff_batch / 256
    lr_fn = partial(lr_at, base_lr=base_lr, min_lr=cfg.min_lr,
                    warmup=cfg.warmup_epochs * opt_steps_per_epoch,
                    total=cfg.epochs * opt_steps_per_epoch)

    # Same seed on every rank for the weights (DDP also broadcasts rank 0's at wrapping).
    seed_everything(seed)
    model = MAE(model_size=model_size, img_size=cfg.image_size, patch_size=cfg.patch_size,
                decoder_dim=cfg.decoder_dim, decoder_depth=cfg.decoder_depth,
                decoder_heads=cfg.decoder_heads, norm_pix_loss=cfg.norm_pix_loss,
                mask_ratio=cfg.mask_ratio).to(device)
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=base_lr,
                                  betas=(0.9, 0.95), fused=True)  # fused: ~2x faster on CPU too
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    run_config = _run_config(model, cfg, steps_per_epoch=steps, seed=seed,
                             world_size=info.world_size, amp_dtype=amp_dtype)

    # Four fixed images and a fixed mask for the figures, fetched before any RNG is restored
    # so they do not shift the training stream. Only rank 0 draws figures.
    fixed = noise = None
    if info.is_main:
        first = next(iter(factory(batch_size=N_FIXED, steps_per_epoch=1, num_workers=0,
                                  map_sample=MapSample(cfg.image_size, flip=False),
                                  seed=seed, rank=0, world_size=1)), None)
        if first is None:
            raise RuntimeError("the loader yielded no batch for the reconstruction figures; "
                               "check the shards")
        fixed = images_from_batch(first)[:N_FIXED].to(device)  # (4, 3, S, S)
        gen = torch.Generator().manual_seed(seed)
        noise = torch.rand(fixed.shape[0], model.patch_embed.num_patches,
                           generator=gen).to(device)

    state_path = paths.state_dir / STATE_FILE
    resume = _load_resume(state_path, run_config)
    start_epoch, global_step, history, epoch_stats = 0, 0, [], []
    if resume is not None:
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        scaler.load_state_dict(resume["scaler"])
        start_epoch, global_step = int(resume["epoch"]), int(resume["global_step"])
        history, epoch_stats = list(resume["history"]), list(resume["epoch_stats"])
        _set_rng_state(resume["rng"][info.rank], device)
        log.info("resuming from %s after epoch %d of %d", state_path, start_epoch, cfg.epochs)
        del resume
    else:
        # Per-rank seed for masking noise and flips: replicas must see different masks.
        seed_everything(seed + info.rank)
    ddp_model = wrap_ddp(model, info)

    log.info("pretrain: ViT-%s MAE, %d px / patch %d, %.1fM params; %d steps/epoch x %d "
             "epochs, global batch %d, lr %.3g, amp %s, device %s x %d", model_size,
             cfg.image_size, cfg.patch_size, sum(p.numel() for p in model.parameters()) / 1e6,
             steps, cfg.epochs, eff_batch, base_lr, run_config["amp"], device, info.world_size)
    tracker.log_params({"derived": {"lr": base_lr, "global_batch": eff_batch,
                                    "steps_per_epoch": steps, "world_size": info.world_size,
                                    "amp": run_config["amp"]}})

    last_epoch = cfg.epochs if stop_after_epoch is None else min(cfg.epochs, stop_after_epoch)
    for epoch in range(start_epoch, last_epoch):
        loader = factory(batch_size=cfg.batch_size, steps_per_epoch=steps,
                         num_workers=cfg.num_workers, **loader_kwargs(cfg),
                         # data order: a pure function of (seed, epoch) and num_workers
                         seed=seed + epoch,
                         rank=info.rank, world_size=info.world_size)
        stats, global_step, rows = train_one_epoch(
            ddp_model, loader, optimizer, scaler, epoch=epoch + 1, steps=steps,
            accum_iter=accum, lr_fn=lr_fn, global_step=global_step, device=device,
            amp_dtype=amp_dtype, log_every=cfg.log_every, tracker=tracker,
            show_progress=info.is_main)
        del loader  # shut its workers down before the next epoch starts new ones
        history.extend(rows)
        epoch_stats.append({"epoch": epoch + 1, **stats})
        if info.is_main:
            log.info("epoch %d/%d: loss %.4f, %.1f images/s, %.1f s", epoch + 1, cfg.epochs,
                     stats["loss"], stats["images_per_s"], stats["seconds"])
            tracker.log_metrics({"epoch/loss": stats["loss"],
                                 "epoch/images_per_s": stats["images_per_s"]}, step=epoch + 1)
            fig = reconstruction_figure(model, fixed, noise,
                                        f"epoch {epoch + 1}: loss {stats['loss']:.4f}")
            png = out_dir / f"recon_epoch{epoch + 1}.png"
            buf = io.BytesIO()
            fig.savefig(buf, format="png", dpi=100)
            with atomic_path(png) as tmp:
                tmp.write_bytes(buf.getvalue())
            tracker.log_figure(fig, f"recon/recon_epoch{epoch + 1}.png")
        done = epoch + 1
        if done % cfg.save_every == 0 or done == last_epoch:
            _save_resume(state_path, model=model, optimizer=optimizer, scaler=scaler,
                         epoch=done, global_step=global_step, run_config=run_config,
                         history=history, epoch_stats=epoch_stats, info=info)

    metrics = _metrics(epoch_stats, steps=steps, eff_batch=eff_batch, base_lr=base_lr)
    if last_epoch < cfg.epochs:
        log.info("stopped after epoch %d of %d (resume state kept)", last_epoch, cfg.epochs)
        barrier()
        return model, metrics
    if info.is_main:
        save_checkpoint(out_dir / "checkpoint.pt", model, model.config, cfg.epochs)
        atomic_write_json(paths.metrics, metrics)
        _write_loss_csv(paths.loss_csv, history)
        tracker.log_metrics({f"final/{k}": v for k, v in metrics.items()
                             if isinstance(v, (int, float))})
        tracker.log_artifact(paths.metrics)
        # A finished run's state would only block the next run with new settings (config
        # mismatch) or resume stale weights after a code change: drop the file, keep the dir.
        state_path.unlink(missing_ok=True)
        log.info("pretraining done: %s (final loss %.4f, first epoch %.4f)",
                 out_dir / "checkpoint.pt", metrics["final_loss"], metrics["first_epoch_loss"])
    barrier()
    return model, metrics


def _single_process() -> DistInfo:
    return DistInfo(0, 1, 0, torch.device("cuda" if torch.cuda.is_available() else "cpu"), None)


def _resolve_data(shard_dir: Path | None, cfg: PretrainParams,
                  loader_factory: LoaderFactory | None, world_size: int
                  ) -> tuple[LoaderFactory, int]:
    """The loader factory bound to the shards, and the steps per epoch."""
    global_batch = cfg.batch_size * world_size
    if loader_factory is not None:
        if cfg.steps_per_epoch <= 0:
            raise ValueError("pretrain.steps_per_epoch must be > 0 when a loader_factory is "
                             "given (there are no shards to count)")
        return loader_factory, cfg.steps_per_epoch
    from pipeline import loader as shard_loader

    if shard_dir is None or not Path(shard_dir).is_dir():
        raise FileNotFoundError(f"{shard_dir}: shard directory not found; run the shards "
                                "stage first (`dvc repro shards`)")
    urls = shard_loader.shard_urls(Path(shard_dir))
    steps = cfg.steps_per_epoch
    if steps <= 0:
        n = shard_loader.count_samples(Path(shard_dir))
        if n <= 0:
            raise ValueError(f"{shard_dir}: the shards hold no samples; check the shards "
                             "stage's stats.json")
        steps = max(1, n // global_batch)
        log.info("%d samples / global batch %d -> %d steps per epoch", n, global_batch, steps)
    return partial(shard_loader.make_train_loader, urls), steps


def _metrics(epoch_stats: list[dict], *, steps: int, eff_batch: int, base_lr: float) -> dict:
    if not epoch_stats:
        return {"trained": True, "epochs": 0}
    # The first epoch of a process includes start-up (worker spawn, allocator warm-up):
    # report throughput over the later epochs when there are any.
    speed = [s["images_per_s"] for s in epoch_stats[1:]] or [epoch_stats[0]["images_per_s"]]
    return {"trained": True, "epochs": len(epoch_stats),
            "final_loss": epoch_stats[-1]["loss"], "first_epoch_loss": epoch_stats[0]["loss"],
            "images_per_s": float(np.mean(speed)), "steps_per_epoch": steps,
            "global_batch": eff_batch, "lr": base_lr,
            "epoch_loss": [round(s["loss"], 6) for s in epoch_stats]}


def _write_loss_csv(path: Path, rows: list[dict]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=["epoch", "step", "loss", "lr"], lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({"epoch": r["epoch"], "step": r["step"], "loss": f"{r['loss']:.6f}",
                    "lr": f"{r['lr']:.6g}"})
    atomic_write_text(path, buf.getvalue())


# --------------------------------------------------------------------------- import
def _check_serves_params(src: Path, config: dict, cfg: PretrainParams) -> None:
    """Refuse a checkpoint whose image or patch size differs from the params'.

    Finetuning builds its encoder with ``pretrain.patch_size`` at ``finetune.image_size``
    (meant to equal ``pretrain.image_size``) and loads the position embeddings as they are.
    """
    img, patch = config["img_size"], config["patch_size"]
    if (img, patch) != (cfg.image_size, cfg.patch_size):
        raise ValueError(
            f"{src}: pretrained on {img} px images with {patch} px patches, but "
            f"pretrain.image_size is {cfg.image_size} and pretrain.patch_size is "
            f"{cfg.patch_size}; finetuning would build a different encoder (position "
            f"embeddings are not interpolated). Set pretrain.image_size: {img}, "
            f"pretrain.patch_size: {patch} and finetune.image_size: {img} in params.yaml, or "
            "use a checkpoint of the configured size")


def import_checkpoint(src: Path, out: Path | OutputPaths, cfg: PretrainParams, *,
                      model_size: str, tracker: Tracker | None = None) -> dict:
    """Validate a released FMAE/MAE checkpoint and write it as <out_dir>/checkpoint.pt.

    The encoder must load into a timm ViT of ``model_size`` with strict key matching; decoder
    keys, when present, must load into an MAE too. Its image and patch size must be
    ``pretrain.image_size`` and ``pretrain.patch_size`` (finetuning builds its encoder from
    them and does not interpolate position embeddings) and every weight must be finite, so a
    checkpoint that cannot serve finetuning is refused here, not stages later. The output
    carries a plain config (no pickled argparse namespace), so downstream stages read it with
    weights_only=True.
    """
    from pipeline.models.vit import build_vit

    src = Path(src)
    paths = out if isinstance(out, OutputPaths) else OutputPaths.make(Path(out))
    out_dir = paths.out_dir
    paths.remove_stale_temporaries()
    ck = load_checkpoint(src)
    state = ck["model"]
    config = ck["config"]
    if config is None:
        args = ck["args"] or {}
        dec_dim = state["decoder_embed.weight"].shape[0] if "decoder_embed.weight" in state \
            else cfg.decoder_dim
        # Head counts are not in the weights: ours when the width matches, else MAE's 16.
        heads = cfg.decoder_heads if dec_dim == cfg.decoder_dim else 16
        config = infer_config(state, decoder_heads=heads,
                              norm_pix_loss=bool(args.get("norm_pix_loss", cfg.norm_pix_loss)),
                              mask_ratio=float(args.get("mask_ratio", cfg.mask_ratio)))
    if config.get("model_size") != model_size:
        raise ValueError(f"{src}: the checkpoint holds a ViT-{config.get('model_size')} but "
                         f"model_size is {model_size!r}; set model_size: "
                         f"{config.get('model_size')} in params.yaml")
    try:
        vit = build_vit(model_size, config["img_size"], config["patch_size"],
                        global_pool="token")
        vit.load_state_dict(encoder_state_dict(state), strict=True)
    except RuntimeError as e:
        raise ValueError(f"{src}: the encoder weights do not fit a timm ViT-{model_size} "
                         f"({config['img_size']} px, patch {config['patch_size']}): {e}") from e
    _check_serves_params(src, config, cfg)
    check_finite_weights(state, src)
    model = mae_from_config(config)
    has_decoder = any(is_decoder_key(k) for k in state)
    if has_decoder:
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise ValueError(f"{src}: decoder weights do not fit an MAE with {config}: "
                             f"{e}") from e
        save_checkpoint(out_dir / "checkpoint.pt", model, config, ck["epoch"] or 0)
    else:
        log.warning("%s holds an encoder only; checkpoint.pt will too (enough for finetuning)",
                    src)
        save_checkpoint(out_dir / "checkpoint.pt", state, config, ck["epoch"] or 0)
    metrics = {"trained": False, "epochs": 0, "source_checkpoint": str(src),
               "source_epoch": ck["epoch"], "has_decoder": has_decoder}
    atomic_write_json(paths.metrics, metrics)
    _write_loss_csv(paths.loss_csv, [])
    paths.state_dir.mkdir(parents=True, exist_ok=True)  # a DVC output: must exist
    if tracker is not None:
        tracker.set_tags({"pretrain.source_checkpoint": str(src)})
    log.info("imported %s -> %s (ViT-%s, %d px, patch %d)", src, out_dir / "checkpoint.pt",
             model_size, config["img_size"], config["patch_size"])
    return metrics
