"""AU detection metrics: per-AU F1 and AUC, the global-threshold search, epoch selection.

Follows the AU benchmark protocol (method.md section 7): per AU, binary F1 over all test
frames of a fold pooled; the headline is the mean over AUs. Labels of -1 (not coded) are
masked per AU. Three summaries are kept apart because they answer different questions:

- ``final``: threshold 0.5 at the last epoch -- the honest number;
- ``paper_protocol``: the single global threshold (0.01..0.99) *and* the epoch that maximise
  mean F1 on the test fold, as the FMAE-IAT reference code reports -- comparable with the
  published tables, optimistic by construction;
- ``val_selected``: threshold 0.5 at the epoch with the best *validation* F1 (only when a
  validation split of training subjects exists).

Library functions return fractions in [0, 1]; :func:`au_report` converts F1 to percent for
the on-disk ``metrics.json`` (AUC stays a fraction).
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

DEFAULT_GRID = np.round(np.arange(1, 100) / 100.0, 2)  # 0.01 .. 0.99


def _check(probs: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels)
    if probs.ndim == 1:
        probs, labels = probs[:, None], labels[:, None]
    if probs.shape != labels.shape or probs.ndim != 2:
        raise ValueError(f"probs {probs.shape} and labels {labels.shape} must both be (N, A)")
    return probs, labels.astype(np.int64)


def f1_per_au(probs: np.ndarray, labels: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """Binary F1 per AU, pooled over frames.

    Args:
        probs: (N, A) predicted probabilities.
        labels: (N, A) in {0, 1, -1}; -1 entries are ignored for that AU.
        threshold: predict positive when prob >= threshold.

    Returns:
        (A,) F1 in [0, 1]. 0 when an AU has no positive label and no positive prediction
        (scikit-learn's zero_division default); NaN when an AU has no known label at all.
    """
    probs, labels = _check(probs, labels)
    known = labels >= 0  # (N, A)
    pred = (probs >= threshold) & known
    pos = (labels == 1)
    tp = (pred & pos).sum(0).astype(np.float64)
    fp = (pred & ~pos).sum(0)
    fn = (~pred & pos).sum(0)
    denom = 2 * tp + fp + fn
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.where(denom > 0, 2 * tp / np.maximum(denom, 1), 0.0)
    f1[known.sum(0) == 0] = np.nan
    return f1


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of ``x`` with ties given their average rank."""
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    # Boundaries of runs of equal values in the sorted array.
    starts = np.r_[0, np.flatnonzero(np.diff(xs)) + 1]
    ends = np.r_[starts[1:], len(xs)]
    avg = (starts + ends + 1) / 2.0  # mean of 1-based ranks start+1 .. end
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = np.repeat(avg, ends - starts)
    return ranks


def auc_per_au(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """ROC AUC per AU via the rank-sum (Mann-Whitney U) identity, ties counted half.

    Returns:
        (A,) AUC in [0, 1]; NaN for an AU whose known labels contain a single class.
    """
    probs, labels = _check(probs, labels)
    out = np.full(probs.shape[1], np.nan)
    for a in range(probs.shape[1]):
        known = labels[:, a] >= 0
        y, s = labels[known, a], probs[known, a]
        n_pos = int((y == 1).sum())
        n_neg = len(y) - n_pos
        if n_pos == 0 or n_neg == 0:
            continue
        r = _average_ranks(s)
        out[a] = (r[y == 1].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)
    return out


def nanmean(x: np.ndarray) -> float:
    """Mean over the finite entries; NaN when there is none (no warning)."""
    x = np.asarray(x, dtype=np.float64)
    ok = np.isfinite(x)
    return float(x[ok].mean()) if ok.any() else math.nan


def best_global_threshold(probs: np.ndarray, labels: np.ndarray,
                          grid: Sequence[float] = DEFAULT_GRID) -> tuple[float, float]:
    """The single threshold, shared by all AUs, that maximises mean F1 (paper protocol).

    Args:
        probs, labels: (N, A) as in :func:`f1_per_au`.
        grid: candidate thresholds (default 0.01, 0.02, ..., 0.99).

    Returns:
        (threshold, mean F1 at that threshold); ties go to the threshold closest to 0.5, so
        a flat optimum does not drift to an extreme.
    """
    best_t, best_f = 0.5, -math.inf
    for t in grid:
        f = nanmean(f1_per_au(probs, labels, float(t)))
        better = f > best_f + 1e-12
        tie = abs(f - best_f) <= 1e-12 and abs(t - 0.5) < abs(best_t - 0.5)
        if better or tie:
            best_t, best_f = float(t), f
    return best_t, best_f


def au_report(probs: np.ndarray, labels: np.ndarray, aus: Sequence[int],
              threshold: float = 0.5) -> dict:
    """Per-AU F1 (percent) and AUC (fraction) with their means, keyed ``AU<k>``."""
    f1 = f1_per_au(probs, labels, threshold)
    auc = auc_per_au(probs, labels)
    names = [f"AU{k}" for k in aus]
    return {
        "f1_mean": _pct(nanmean(f1)),
        "auc_mean": _num(nanmean(auc)),
        "f1": {n: _pct(v) for n, v in zip(names, f1)},
        "auc": {n: _num(v) for n, v in zip(names, auc)},
        "threshold": float(threshold),
    }


def _num(x: float) -> float | None:
    return None if not np.isfinite(x) else round(float(x), 6)


def _pct(x: float) -> float | None:
    return None if not np.isfinite(x) else round(100.0 * float(x), 4)


def _argmax_first(values: Sequence[float | None]) -> int:
    """Index of the largest value (earliest on ties); None/NaN never win."""
    best, idx = -math.inf, -1
    for i, v in enumerate(values):
        if v is not None and np.isfinite(v) and v > best:
            best, idx = v, i
    if idx < 0:
        raise ValueError("no epoch has a finite score to select on")
    return idx


def final_summary(epochs: list[dict]) -> dict:
    """``final``: the last epoch's test report at threshold 0.5.

    Args:
        epochs: per epoch (in order) ``{"epoch": E, "test": au_report(...)}``.
    """
    last = epochs[-1]
    return {**_strip(last["test"]), "epoch": last["epoch"]}


def paper_protocol_summary(epochs: list[dict]) -> dict:
    """``paper_protocol``: best global threshold and best epoch, both chosen on the test fold.

    Args:
        epochs: per epoch ``{"epoch": E, "test_best": au_report(..., threshold=t*)}``.
    """
    i = _argmax_first([e["test_best"]["f1_mean"] for e in epochs])
    best = epochs[i]["test_best"]
    return {"f1_mean": best["f1_mean"], "f1": best["f1"], "threshold": best["threshold"],
            "epoch": epochs[i]["epoch"]}


def val_selected_summary(epochs: list[dict]) -> dict | None:
    """``val_selected``: test report at 0.5 of the epoch with the best validation mean F1.

    Returns None when the epochs carry no ``"val"`` report (no validation split).
    """
    if not epochs or epochs[0].get("val") is None:
        return None
    i = _argmax_first([e["val"]["f1_mean"] for e in epochs])
    return {**_strip(epochs[i]["test"]), "epoch": epochs[i]["epoch"],
            "val_f1_mean": epochs[i]["val"]["f1_mean"]}


def convergence_epoch(epochs: list[dict]) -> int:
    """The epoch of best test mean F1 at threshold 0.5 (earliest on ties)."""
    return int(epochs[_argmax_first([e["test"]["f1_mean"] for e in epochs])]["epoch"])


def _strip(report: dict) -> dict:
    return {k: report[k] for k in ("f1_mean", "auc_mean", "f1", "auc")}
