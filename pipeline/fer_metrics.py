"""Expression-recognition metrics and the confusion-matrix figure (paper Table 4).

All rates are percentages. The confusion matrix counts true classes in rows and predicted
classes in columns, so its diagonal over the row sums is each class's accuracy (recall) and
its trace over the total is top-1 accuracy.
"""
from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Sequence

import numpy as np

from pipeline.io import atomic_write_text, save_figure


def confusion_matrix(labels: np.ndarray, preds: np.ndarray, n_classes: int) -> np.ndarray:
    """(C, C) int64 counts: ``[true, predicted]``.

    Args:
        labels: (N,) true class indices in [0, C).
        preds: (N,) predicted class indices in [0, C).
    """
    labels, preds = np.asarray(labels, np.int64), np.asarray(preds, np.int64)
    if labels.shape != preds.shape or labels.ndim != 1:
        raise ValueError(f"labels {labels.shape} and predictions {preds.shape} must be equal "
                         "1-D arrays")
    for name, x in (("labels", labels), ("predictions", preds)):
        if x.size and (x.min() < 0 or x.max() >= n_classes):
            raise ValueError(f"{name} outside 0..{n_classes - 1}")
    cm = np.zeros((n_classes, n_classes), np.int64)
    np.add.at(cm, (labels, preds), 1)
    return cm


def _pct(num: float, den: float) -> float | None:
    return None if den == 0 else round(100.0 * float(num) / float(den), 4)


def fer_report(labels: np.ndarray, preds: np.ndarray, classes: Sequence[str]) -> dict:
    """Top-1, per-class accuracy, macro F1 and the confusion matrix of one evaluation.

    Args:
        labels, preds: (N,) true and predicted class indices.
        classes: C class names in index order.

    Returns:
        ``{"n", "top1", "mean_class_accuracy", "macro_f1", "per_class_accuracy": {name: %
        or None}, "per_class_f1": {name: %}, "confusion_matrix": [[C ints] x C]}``. A class
        absent from the labels has accuracy None; macro F1 averages the classes that occur
        in the labels or the predictions (F1 of a class with neither is undefined).
    """
    c = len(classes)
    cm = confusion_matrix(labels, preds, c)
    support, predicted, tp = cm.sum(1), cm.sum(0), np.diag(cm)
    acc = {classes[i]: _pct(tp[i], support[i]) for i in range(c)}
    f1 = {classes[i]: _pct(2 * tp[i], support[i] + predicted[i]) for i in range(c)}
    present = [v for v in f1.values() if v is not None]
    class_acc = [v for v in acc.values() if v is not None]
    return {"n": int(cm.sum()), "top1": _pct(tp.sum(), cm.sum()),
            "mean_class_accuracy": round(float(np.mean(class_acc)), 4) if class_acc else None,
            "macro_f1": round(float(np.mean(present)), 4) if present else None,
            "per_class_accuracy": acc, "per_class_f1": f1,
            "confusion_matrix": cm.tolist()}


def write_confusion_csv(path: str | Path, cm: Sequence[Sequence[int]],
                        classes: Sequence[str]) -> None:
    """``true\\predicted,<class>...`` header, one row of counts per true class."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["true\\predicted", *classes])
    for name, row in zip(classes, cm):
        w.writerow([name, *(int(v) for v in row)])
    atomic_write_text(path, buf.getvalue())


def plot_confusion(path: str | Path, cm: Sequence[Sequence[int]], classes: Sequence[str],
                   title: str) -> None:
    """Row-normalised confusion matrix (% of each true class) with the counts, as PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cm = np.asarray(cm, np.float64)
    rows = cm.sum(1, keepdims=True)
    pct = np.divide(100 * cm, rows, out=np.zeros_like(cm), where=rows > 0)
    c = len(classes)
    fig, ax = plt.subplots(figsize=(1.0 + 0.75 * c, 0.8 + 0.7 * c))
    im = ax.imshow(pct, cmap="Blues", vmin=0, vmax=100)
    for i in range(c):
        for j in range(c):
            ax.text(j, i, f"{pct[i, j]:.0f}\n({int(cm[i, j])})", ha="center", va="center",
                    fontsize=7, color="white" if pct[i, j] > 60 else "black")
    ax.set_xticks(range(c), classes, rotation=45, ha="right")
    ax.set_yticks(range(c), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046, label="% of true class")
    fig.tight_layout()
    save_figure(fig, path)
