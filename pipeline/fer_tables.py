"""Table 4 (facial expression recognition) for the ``tables`` stage and report.html.

Reads ``data/finetune_fer/<dataset>/`` for every dataset of ``finetune_fer.datasets`` and
writes, next to the AU tables in ``data/tables/``:

- ``table4_fer.{md,csv,tex}``: our top-1 accuracy (final epoch, and the best test epoch as
  the reference's "max accuracy" reporting), macro F1 and mean class accuracy per dataset,
  beside the published FMAE numbers (RAF-DB 93.45, AffectNet-8 64.79);
- ``table4_<dataset>_per_class.{md,csv,tex}``: per-class support, accuracy and F1;
- ``table4_confusion_<dataset>.png``: the final epoch's confusion matrix (copied);

and a report section with all of it. The final-epoch top-1 in each ``metrics.json`` is
recomputed from ``predictions.parquet``; a mismatch becomes a warning in the report.
"""
from __future__ import annotations

import logging
from pathlib import Path

from pipeline.io import atomic_write_bytes, read_json
from pipeline.published import FER_TABLE, FER_TOP1
from pipeline.report import Section, Table, write_table

log = logging.getLogger(__name__)

FER_NAMES = {"synthetic": "synthetic (built-in)", "rafdb": "RAF-DB", "affectnet": "AffectNet-8"}
PUBLISHED = "FMAE, published (ViT-L, Face9M)"


def load_fer_runs(fer_dir: str | Path, datasets: list[str]) -> dict[str, dict]:
    """``metrics.json`` of each dataset's run; a missing run names the stage to run."""
    out = {}
    for ds in datasets:
        path = Path(fer_dir) / ds / "metrics.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: FER run missing (finetune_fer.datasets lists "
                                    f"{ds!r}); run `dvc repro finetune_fer`")
        out[ds] = read_json(path)
    return out


def check_fer_predictions(fer_dir: str | Path, ds: str, metrics: dict) -> str | None:
    """A warning when predictions.parquet's top-1 differs from metrics.json's final top-1."""
    import pandas as pd
    path = Path(fer_dir) / ds / "predictions.parquet"
    if not path.is_file():
        return f"{ds}: {path} is missing; the final top-1 could not be checked"
    df = pd.read_parquet(path, columns=["label", "pred"])
    top1 = 100.0 * float((df["label"] == df["pred"]).mean()) if len(df) else float("nan")
    if abs(top1 - float(metrics["final"]["top1"])) > 1e-3:
        return (f"{ds}: predictions.parquet gives top-1 {top1:.3f}% but metrics.json says "
                f"{metrics['final']['top1']}%; re-run `dvc repro finetune_fer`")
    return None


def fer_table(runs: dict[str, dict], show_published: bool) -> Table:
    """Table 4: our rows per dataset, the paper's beside them."""
    t = Table("table4_fer", f"Table {FER_TABLE}: facial expression recognition, top-1 accuracy "
              "(%) on the test split", ["dataset", "method", "classes", "train", "test",
                                        "top-1 (final epoch)", "top-1 (best epoch)",
                                        "macro F1", "mean class acc.", "chance"], digits=2)
    order = [d for d in ("synthetic", "rafdb", "affectnet") if d in runs or (
        show_published and d in FER_TOP1)] + [d for d in runs if d not in FER_NAMES]
    for ds in order:
        name = FER_NAMES.get(ds, ds)
        if ds in runs:
            m = runs[ds]
            t.add([name, f"ours (ViT-{m.get('model_size', '?')})", len(m["classes"]),
                   m["n_train"], m["n_test"], m["final"]["top1"], m["best_epoch"]["top1"],
                   m["final"]["macro_f1"], m["final"]["mean_class_accuracy"],
                   m["chance_top1"]])
        if show_published and ds in FER_TOP1:
            t.add([name, PUBLISHED, 7 if ds == "rafdb" else 8, None, None, None, FER_TOP1[ds],
                   None, None, round(100 / (7 if ds == "rafdb" else 8), 2)])
    t.notes = [
        "Top-1 (final epoch) is the last epoch's test accuracy; top-1 (best epoch) is the "
        "highest test accuracy over epochs, what the authors' MAE finetuning code prints as "
        "'max accuracy'; the paper does not say which it reports, so its numbers are shown in "
        "that column. Macro F1 and mean class accuracy average the classes equally (final "
        "epoch). Chance = 1 / classes.",
    ]
    if not runs:
        t.notes.append("No FER run: finetune_fer.datasets is empty.")
    return t


def per_class_table(ds: str, m: dict) -> Table:
    """Support, accuracy and F1 per class of the final epoch."""
    t = Table(f"table4_{ds}_per_class", f"{FER_NAMES.get(ds, ds)}: per-class results, final "
              f"epoch ({m['final']['epoch']})", ["class", "test images", "accuracy", "F1"],
              digits=1)
    cm = m["final"]["confusion_matrix"]
    for i, c in enumerate(m["classes"]):
        t.add([c, int(sum(cm[i])), m["final"]["per_class_accuracy"][c],
               m["final"]["per_class_f1"][c]])
    return t


def build_fer_tables(fer_dir: str | Path, out_dir: str | Path, datasets: list[str],
                     show_published: bool) -> tuple[list[Path], dict, Section]:
    """Write Table 4, the per-class tables and the confusion figures into ``out_dir``.

    Returns:
        (written files, headline metrics ``{dataset: {top1, best_top1, macro_f1}}``, the
        report section).
    """
    out_dir = Path(out_dir)
    runs = load_fer_runs(fer_dir, datasets)
    written: list[Path] = []
    section = Section(f"Facial expression recognition (Table {FER_TABLE})")
    main = fer_table(runs, show_published)
    written += write_table(main, out_dir)
    section.table(main)
    headline = {}
    for ds, m in runs.items():
        warning = check_fer_predictions(fer_dir, ds, m)
        if warning:
            log.warning("%s", warning)
            section.warning(warning)
        t = per_class_table(ds, m)
        written += write_table(t, out_dir)
        section.table(t)
        src = Path(fer_dir) / ds / "confusion_matrix.png"
        if src.is_file():
            fig = out_dir / f"table4_confusion_{ds}.png"
            atomic_write_bytes(fig, src.read_bytes())
            written.append(fig)
            section.figure(fig, f"{FER_NAMES.get(ds, ds)}: confusion matrix of the final "
                                f"epoch (% of each true class, counts in brackets)")
        headline[ds] = {"top1": m["final"]["top1"], "best_top1": m["best_epoch"]["top1"],
                        "macro_f1": m["final"]["macro_f1"]}
    return written, headline, section
