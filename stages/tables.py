"""Stage `tables`: the paper's tables and figures from our runs, plus report.html.

    python -m stages.tables --params params.yaml --finetune data/finetune \
        --probe data/probe --out data/tables
"""
from __future__ import annotations

import argparse
from pathlib import Path


from pipeline.io import setup_logging, write_run_info
from pipeline.params import load_params, to_dict
from pipeline.tables import build_tables
from pipeline.tracking import start_run


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml", type=Path)
    ap.add_argument("--finetune", default=Path("data/finetune"), type=Path,
                    help="finetune outputs (fmae/, iat/, optional sweep/)")
    ap.add_argument("--probe", default=Path("data/probe"), type=Path)
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
                           "sweep_runs": ft.sweep_runs}}
    write_run_info(args.out, logged)
    with start_run("tables", logged) as tracker:
        build_tables(args.finetune, args.probe, args.out, params, tracker)


if __name__ == "__main__":
    main()
