"""Stage finetune_fer: finetune the pretrained encoder on one expression dataset (Table 4).

    python -m stages.finetune_fer --params params.yaml --dataset rafdb \
        --fer-shards data/fer_shards/data --pretrained data/pretrain/model/checkpoint.pt \
        --out data/finetune_fer/rafdb

See pipeline/fer.py for the method; the schedule is ``finetune_fer.<dataset>``.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from pipeline.fer import finetune_fer
from pipeline.io import setup_logging, write_run_info
from pipeline.params import FER_DATASETS, load_params, to_dict
from pipeline.tracking import is_rank0, start_run

log = logging.getLogger("stages.finetune_fer")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--params", default="params.yaml", type=Path)
    ap.add_argument("--dataset", required=True, choices=FER_DATASETS)
    ap.add_argument("--fer-shards", required=True, type=Path,
                    help="folder holding <dataset>/ FER shards (data/fer_shards/data)")
    ap.add_argument("--pretrained", required=True, type=Path)
    ap.add_argument("--out", required=True, type=Path)
    args = ap.parse_args(argv)
    setup_logging()
    params = load_params(args.params)
    if args.dataset not in params.finetune_fer.datasets:
        ap.error(f"--dataset {args.dataset} is not in finetune_fer.datasets "
                 f"{params.finetune_fer.datasets}; add it there")
    cfg = params.finetune_fer
    run_params = {"dataset": args.dataset, "model_size": params.model_size,
                  "seed": params.seed, "pretrain": {"patch_size": params.pretrain.patch_size},
                  "finetune_fer": to_dict(cfg)}
    if is_rank0():
        args.out.mkdir(parents=True, exist_ok=True)
        write_run_info(args.out, run_params)
    with start_run("finetune_fer", run_params, run_name=f"fer/{args.dataset}",
                   tags={"dataset": args.dataset}) as tracker:
        finetune_fer(args.fer_shards / args.dataset, args.pretrained, args.out, cfg,
                     dataset=args.dataset, model_size=params.model_size,
                     patch_size=params.pretrain.patch_size, seed=params.seed, tracker=tracker)
    return 0


if __name__ == "__main__":
    sys.exit(main())
