"""Stage finetune_fmae / finetune_iat: AU finetuning of one <dataset>-<fold> run.

    python -m stages.finetune --params params.yaml --run synthetic-1 --variant iat \
        --au-shards data/au_shards --pretrained data/pretrain/checkpoint.pt \
        --out data/finetune/iat/synthetic-1

``--lambda`` and ``--id-head-depth`` override the params for the ablation sweeps
(paper Tables 5-7). See pipeline/finetune.py for the method.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from pathlib import Path


from pipeline.finetune import VARIANTS, finetune
from pipeline.io import setup_logging, write_run_info
from pipeline.params import load_params, parse_run, to_dict
from pipeline.tracking import start_run

log = logging.getLogger("stages.finetune")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--params", default="params.yaml", type=Path)
    ap.add_argument("--run", required=True, help="<dataset>-<fold>, e.g. bp4d-1")
    ap.add_argument("--variant", required=True, choices=VARIANTS)
    ap.add_argument("--au-shards", required=True, type=Path,
                    help="folder holding <dataset>/ AU shards (data/au_shards)")
    ap.add_argument("--pretrained", required=True, type=Path)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--lambda", dest="lambda_", type=float, default=None,
                    help="override params 'lambda' (iat only; Tables 5-6 sweeps)")
    ap.add_argument("--id-head-depth", type=int, choices=(1, 2, 3), default=None,
                    help="override finetune.id_head_depth (iat only; Table 7 sweep)")
    args = ap.parse_args(argv)

    setup_logging()
    params = load_params(args.params)
    dataset, fold = parse_run(args.run)
    if args.variant == "fmae" and (args.lambda_ is not None or args.id_head_depth is not None):
        ap.error("--lambda and --id-head-depth only apply to --variant iat")
    if args.lambda_ is not None and args.lambda_ < 0:
        ap.error(f"--lambda must be >= 0, got {args.lambda_}")
    lam = params.lambda_ if args.lambda_ is None else args.lambda_
    cfg = params.finetune
    if args.id_head_depth is not None:
        cfg = dataclasses.replace(cfg, id_head_depth=args.id_head_depth)

    run_params = {"run": args.run, "variant": args.variant, "lambda": lam,
                  "model_size": params.model_size, "seed": params.seed,
                  "pretrain": {"patch_size": params.pretrain.patch_size},
                  "finetune": to_dict(cfg)}
    args.out.mkdir(parents=True, exist_ok=True)
    write_run_info(args.out, run_params)
    name = f"{args.variant}/{args.run}"
    if args.lambda_ is not None or args.id_head_depth is not None:
        name += f"/lambda={lam:g},id_head_depth={cfg.id_head_depth}"
    tags = {"dataset": dataset, "fold": fold, "variant": args.variant,
            "lambda": lam if args.variant == "iat" else 0.0,
            "id_head_depth": cfg.id_head_depth if args.variant == "iat" else "none"}
    with start_run(f"finetune_{args.variant}", run_params, run_name=name, tags=tags) as tracker:
        finetune(args.au_shards / dataset, args.pretrained, args.out, cfg, dataset=dataset,
                 fold=fold, variant=args.variant, lambda_=lam, model_size=params.model_size,
                 patch_size=params.pretrain.patch_size, seed=params.seed, tracker=tracker)
    return 0


if __name__ == "__main__":
    sys.exit(main())
