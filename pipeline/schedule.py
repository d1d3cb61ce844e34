"""The learning-rate schedule of MAE pretraining and finetuning (method.md sections 2-3).

Linear warmup from 0, then a half-cycle cosine down to ``min_lr``, as a pure function of the
position in training. Pretraining evaluates it per optimizer step, finetuning per fractional
epoch: ``t``, ``warmup`` and ``total`` only need the same unit.
"""
from __future__ import annotations

import math


def lr_at(t: float, *, base_lr: float, min_lr: float, warmup: float, total: float) -> float:
    """Learning rate at position ``t`` (0 = start) of a run of length ``total``."""
    if warmup > 0 and t < warmup:
        return base_lr * t / warmup
    progress = min(1.0, (t - warmup) / max(total - warmup, 1e-12))
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
