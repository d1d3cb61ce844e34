"""Stage `tables`: the paper's tables and figures from our runs, plus report.html.

    python -m stages.tables --params params.yaml --finetune data/finetune \
        --probe data/probe --fer data/finetune_fer --out data/tables

Table 4 (expression recognition, pipeline/fer_tables.py) is added for the datasets in
``finetune_fer.datasets``: its files, a report section and ``fer`` in ``metrics.json``.
"""
from __future__ import annotations

import argparse
from pathlib import Path


from pipeline.fer_tables import build_fer_tables
from pipeline.io import atomic_write_json, read_json, setup_logging, write_run_info
from pipeline.params import load_params, to_dict
from pipeline.report import append_sections
from pipeline.tables import build_tables
from pipeline.tracking import start_run


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml", type=Path)
    ap.add_argument("--finetune", default=Path("data/finetune"), type=Path,
                    help="finetune outputs (fmae/, iat/, optional sweep/)")
    ap.add_argument("--probe", default=Path("data/probe"), type=Path)
    ap.add_argument("--fer", default=Path("data/finetune_fer"), type=Path,
                    help="finetune_fer outputs (<dataset>/ per finetune_fer.datasets)")
    ap.add_argument("--out", default=Path("data/tables"), type=Path)
    args = ap.parse_args(argv)
    setup_logging()
    params = load_params(args.params)
    ft = params.finetune
    logged = {"tables": to_dict(params.tables), "lambda": params.lambda_,
              "finetune": {"runs": ft.runs, "id_head_depth": ft.id_head_depth,
                           "unknown_labels": ft.unknown_labels,
                           "sweep_lambdas": ft.sweep_lambdas,
                           "sweep_id_head_depths": ft.sweep_id_head_depths,
                           "sweep_runs": ft.sweep_runs},
              "finetune_fer": {"datasets": params.finetune_fer.datasets}}
    write_run_info(args.out, logged)
    with start_run("tables", logged) as tracker:
        build_tables(args.finetune, args.probe, args.out, params, tracker)
        add_fer(args.fer, args.out, params, tracker)


def add_fer(fer_dir: Path, out: Path, params, tracker) -> dict:
    """Table 4 files, its report.html section and ``fer`` in metrics.json."""
    written, headline, section = build_fer_tables(
        fer_dir, out, list(params.finetune_fer.datasets), params.tables.show_published)
    append_sections(out / "report.html", [section])
    metrics = read_json(out / "metrics.json")
    metrics["fer"] = headline
    atomic_write_json(out / "metrics.json", metrics)
    for p in written:
        tracker.log_artifact(p, "figures" if p.suffix == ".png" else "tables")
    tracker.log_artifact(out / "report.html")
    tracker.log_artifact(out / "metrics.json")
    tracker.log_metrics({f"fer/{ds}/{k}": v for ds, h in headline.items()
                         for k, v in h.items() if v is not None})
    return headline


if __name__ == "__main__":
    main()
