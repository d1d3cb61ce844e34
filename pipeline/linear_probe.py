"""The two identity probes of a frozen AU backbone (paper section 5.1, Figure 3).

A probe asks "can a linear classifier tell the subjects apart from these features?". How the
classifier is trained decides what the answer measures, so two probes run on every backbone:

1. **The authors' recipe** (``recipe_probe``), what the paper's Figure 3 measured (the
   ``BP4D_ID_linear_prob`` branch of their code): the backbone is frozen (features under
   ``no_grad``) but left in training mode, so drop path stays on; a bias-free
   ``Linear(D, n_subjects)`` starts at trunc-normal std 2e-5 and is trained on the pooled
   ``fc_norm`` features with BCE-with-logits on one-hot identity targets, AdamW with the
   finetuning optimiser settings (``lr = blr * batch / 256``, weight decay), per-iteration
   warmup + cosine to ``min_lr`` over 20 epochs, the finetuning augmentation, and the last
   partial batch dropped. It is a short, low-lr schedule: on features whose spread has
   collapsed during AU training it can underfit, which is why its training accuracy is
   reported beside its test accuracy.
2. **A converged probe** (``converged_probe``): the same frames' clean features, standardised
   per dimension with the training frames' mean and std (MAE's linear probe puts a BatchNorm
   without affine parameters before its head), a bias-free linear softmax classifier fitted
   by full-batch L-BFGS until its training accuracy stops rising. It answers whether identity
   is *linearly decodable* at all, whatever the feature scale.

Both are deterministic for a given backbone, frames and seed (seeded RNGs, no data-order
dependence on threads or workers beyond what ``seed`` fixes).
"""
from __future__ import annotations

import io
import logging
import random
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from pipeline.schedule import lr_at

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Recipe:
    """Training settings of the authors' identity probe.

    The optimiser, augmentation and drop path come from the finetuning params (the authors
    ran the probe with their finetuning script's settings); epochs and warmup are the probe's.
    """
    epochs: int
    warmup_epochs: int
    batch_size: int
    blr: float
    min_lr: float
    weight_decay: float

    @property
    def lr(self) -> float:
        return self.blr * self.batch_size / 256


class JpegFrames(Dataset):
    """(transform(image), label) for JPEG-encoded frames."""

    def __init__(self, jpegs: list[bytes], labels: np.ndarray, transform: Callable):
        if len(jpegs) != len(labels):
            raise ValueError(f"{len(jpegs)} frames but {len(labels)} labels")
        self.jpegs, self.labels, self.transform = jpegs, labels, transform

    def __len__(self) -> int:
        return len(self.jpegs)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        from PIL import Image
        img = Image.open(io.BytesIO(self.jpegs[i])).convert("RGB")
        return self.transform(img), int(self.labels[i])


def pooled_features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) -> (B, D): mean of patch tokens, then fc_norm (the AU head's input)."""
    tokens = model.forward_features(x)  # (B, 1 + L, D); no final norm with global_pool="avg"
    return model.forward_head(tokens, pre_logits=True)


@torch.inference_mode()
def extract_features(model: nn.Module, frames: Dataset, batch_size: int, num_workers: int,
                     device: torch.device) -> torch.Tensor:
    """Clean (eval-mode, eval-transform) features of every frame: (N, D) float32 on the CPU."""
    model.eval().to(device)
    loader = DataLoader(frames, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    return torch.cat([pooled_features(model, x.to(device)).float().cpu() for x, _ in loader])


def _accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    return float((logits.argmax(1) == y).float().mean().item() * 100.0)


# --------------------------------------------------------------------------- 1. the recipe
def recipe_probe(model: nn.Module, train_frames: Dataset, n_classes: int, recipe: Recipe, *,
                 clean_train: torch.Tensor, y_train: torch.Tensor, clean_test: torch.Tensor,
                 y_test: torch.Tensor, seed: int, num_workers: int,
                 device: torch.device) -> dict[str, Any]:
    """Train the authors' identity probe on augmented frames; score it on clean features.

    Args:
        model: the frozen backbone (timm ViT, ``global_pool="avg"``), built with the
            finetuning drop path; put in training mode here, as the reference does.
        train_frames: the probe's training frames with the *training* transform.
        n_classes: number of subjects.
        recipe: optimiser and schedule.
        clean_train, clean_test: (N, D) eval-mode features of the training / test frames.
        y_train, y_test: (N,) subject indices.
        seed: head init, data order, augmentation and drop path.

    Returns:
        ``{"test_accuracy", "train_accuracy"}`` in percent, ``"loss"`` (mean training BCE of
        the last epoch) and ``"steps"``.
    """
    random.seed(seed)
    torch.manual_seed(seed)  # head init, drop path, RandomErasing
    gen = torch.Generator().manual_seed(seed)
    head = nn.Linear(clean_train.shape[1], n_classes, bias=False)
    nn.init.trunc_normal_(head.weight, std=2e-5)
    head.to(device)
    opt = torch.optim.AdamW(head.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    loader = DataLoader(train_frames, batch_size=recipe.batch_size, shuffle=True,
                        drop_last=True, num_workers=num_workers, generator=gen)
    steps = len(loader)
    if steps == 0:
        raise ValueError(f"identity probe: {len(train_frames)} training frames are fewer than "
                         f"one batch ({recipe.batch_size}); raise probe.frames_per_subject or "
                         "lower finetune.batch_size")
    model.to(device).train()  # the reference trains the probe with model.train(True)
    last_loss = float("nan")
    for epoch in range(recipe.epochs):
        total, n = 0.0, 0
        for step, (x, y) in enumerate(loader):
            lr = lr_at(epoch + step / steps, base_lr=recipe.lr, min_lr=recipe.min_lr,
                       warmup=recipe.warmup_epochs, total=recipe.epochs)
            for g in opt.param_groups:
                g["lr"] = lr
            with torch.no_grad():
                feats = pooled_features(model, x.to(device))  # (B, D)
            logits = head(feats.float())
            target = nn.functional.one_hot(y.to(device), n_classes).float()  # (B, C)
            loss = nn.functional.binary_cross_entropy_with_logits(logits, target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * len(y)
            n += len(y)
        last_loss = total / n
    model.eval()
    with torch.no_grad():
        w = head.weight.detach().cpu()
        return {"test_accuracy": _accuracy(clean_test @ w.T, y_test),
                "train_accuracy": _accuracy(clean_train @ w.T, y_train),
                "loss": last_loss, "steps": steps * recipe.epochs}


# --------------------------------------------------------------------------- 2. converged
def converged_probe(x_train: torch.Tensor, y_train: torch.Tensor, x_test: torch.Tensor,
                    y_test: torch.Tensor, n_classes: int, *, max_iter: int = 2000,
                    round_iter: int = 25, patience: int = 4) -> dict[str, Any]:
    """Fit a linear softmax classifier on standardised features until training accuracy
    stops rising.

    Args:
        x_train, x_test: (N, D) clean features; standardised with the training mean and std.
        y_train, y_test: (N,) class indices.
        n_classes: number of classes.
        max_iter: L-BFGS iteration cap.
        round_iter: iterations between training-accuracy checks.
        patience: stop after this many checks without a rise in training accuracy (or at
            100%).

    Returns:
        ``{"test_accuracy", "train_accuracy"}`` in percent and ``"iterations"``.
    """
    mean = x_train.mean(0, keepdim=True)
    std = x_train.std(0, keepdim=True).clamp_min(1e-6)
    xtr = ((x_train - mean) / std).double()
    xte = ((x_test - mean) / std).double()
    w = torch.zeros(xtr.shape[1], n_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w], lr=1.0, max_iter=round_iter, history_size=20,
                            tolerance_grad=1e-9, tolerance_change=1e-12,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(xtr @ w, y_train)
        loss.backward()
        return loss

    best, since, done = -1.0, 0, 0
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: threads cost more than they save
    try:
        while done < max_iter:
            opt.step(closure)
            done = opt.state[opt._params[0]]["n_iter"]
            with torch.no_grad():
                acc = _accuracy(xtr @ w, y_train)
            if acc > best:
                best, since = acc, 0
            else:
                since += 1
            if best >= 100.0 or since >= patience:
                break
    finally:
        torch.set_num_threads(threads)
    with torch.no_grad():
        return {"test_accuracy": _accuracy(xte @ w, y_test),
                "train_accuracy": _accuracy(xtr @ w, y_train), "iterations": int(done)}
