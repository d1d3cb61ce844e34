"""Stage finetune_fmae / finetune_iat: AU finetuning of one <dataset>-<fold> run.

    python -m stages.finetune --params params.yaml --run synthetic-1 --variant iat \
        --au-shards data/au_shards --pretrained data/pretrain/checkpoint.pt \
        --out data/finetune/iat/synthetic-1

``--lambda`` and ``--id-head-depth`` override the params for the ablation sweeps
(paper Tables 5-7); ``--seed`` and ``--no-backbones`` serve the extra-seed repeats
(``finetune.extra_seeds``). The run's lambda and recipe (epochs, warmup, blr) are resolved per
dataset and variant by pipeline/recipes.py and recorded in run_info.json, MLflow params and
metrics.json. See pipeline/finetune.py for the method.

Data-parallel on several GPUs (or CPU processes, gloo), as dvc.yaml launches it with
``finetune.nproc_per_node``:

    python -m torch.distributed.run --standalone --nproc_per_node=N -m stages.finetune \
        --params params.yaml --dataset-fold synthetic-1 ...

(``--dataset-fold`` is ``--run``; torchrun refuses a bare ``--run`` after the module name.)
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from pathlib import Path


from pipeline.distributed import cleanup_distributed, init_distributed
from pipeline.finetune import VARIANTS, finetune
from pipeline.io import setup_logging, write_run_info
from pipeline.params import load_params, parse_run, to_dict
from pipeline.recipes import effective_lambda, effective_recipe
from pipeline.tracking import is_rank0, start_run

log = logging.getLogger("stages.finetune")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--params", default="params.yaml", type=Path)
    # dvc.yaml spells it --dataset-fold: torchrun's own parser takes a bare --run for an
    # ambiguous abbreviation of its --run-path and stops before starting any process.
    ap.add_argument("--dataset-fold", "--run", dest="run", required=True,
                    help="<dataset>-<fold>, e.g. bp4d-1")
    ap.add_argument("--variant", required=True, choices=VARIANTS)
    ap.add_argument("--au-shards", required=True, type=Path,
                    help="folder holding <dataset>/ AU shards (data/au_shards)")
    ap.add_argument("--pretrained", required=True, type=Path)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--lambda", dest="lambda_", type=float, default=None,
                    help="override the dataset's lambda (iat only; Tables 5-6 sweeps)")
    ap.add_argument("--id-head-depth", type=int, choices=(1, 2, 3), default=None,
                    help="override finetune.id_head_depth (iat only; Table 7 sweep)")
    ap.add_argument("--seed", type=int, default=None,
                    help="override the top-level seed (finetune.extra_seeds repeats)")
    ap.add_argument("--no-backbones", action="store_true",
                    help="save no backbones for the identity probe (extra-seed repeats)")
    args = ap.parse_args(argv)

    # Other ranks only warn: one rank's log is the run's log.
    setup_logging(logging.INFO if is_rank0() else logging.WARNING)
    params = load_params(args.params)
    dataset, fold = parse_run(args.run)
    if args.variant == "fmae" and (args.lambda_ is not None or args.id_head_depth is not None):
        ap.error("--lambda and --id-head-depth only apply to --variant iat")
    if args.lambda_ is not None and args.lambda_ < 0:
        ap.error(f"--lambda must be >= 0, got {args.lambda_}")
    if args.seed is not None and args.seed < 0:
        ap.error(f"--seed must be >= 0, got {args.seed}")
    lam = effective_lambda(params, dataset) if args.lambda_ is None else args.lambda_
    seed = params.seed if args.seed is None else args.seed
    per_dataset = params.finetune.lambda_per_dataset
    if args.variant == "iat" and args.lambda_ is None and dataset in per_dataset:
        log.info("lambda %g from finetune.lambda_per_dataset.%s (top-level lambda %g unused)",
                 lam, dataset, params.lambda_)
    cfg = effective_recipe(params.finetune, dataset, args.variant)
    if args.id_head_depth is not None:
        cfg = dataclasses.replace(cfg, id_head_depth=args.id_head_depth)
    if args.no_backbones:
        cfg = dataclasses.replace(cfg, save_backbone_epochs=[])

    run_params = {"run": args.run, "variant": args.variant,
                  "lambda": lam if args.variant == "iat" else 0.0,
                  "model_size": params.model_size, "seed": seed,
                  # processes on all nodes: the global batch is finetune.batch_size x this
                  "world_size": int(os.environ.get("WORLD_SIZE", "1") or 1),
                  "pretrain": {"patch_size": params.pretrain.patch_size},
                  "finetune": to_dict(cfg)}
    _check_world_size(cfg.nproc_per_node)
    if is_rank0():
        args.out.mkdir(parents=True, exist_ok=True)
        write_run_info(args.out, run_params)
    name = f"{args.variant}/{args.run}"
    if args.lambda_ is not None or args.id_head_depth is not None:
        name += f"/lambda={lam:g},id_head_depth={cfg.id_head_depth}"
    if seed != params.seed:
        name += f"/seed={seed}"
    tags = {"dataset": dataset, "fold": fold, "variant": args.variant,
            "lambda": lam if args.variant == "iat" else 0.0,
            "id_head_depth": cfg.id_head_depth if args.variant == "iat" else "none",
            "seed": seed}
    info = init_distributed()
    try:
        with start_run(f"finetune_{args.variant}", run_params, run_name=name,
                       tags=tags) as tracker:
            finetune(args.au_shards / dataset, args.pretrained, args.out, cfg, dataset=dataset,
                     fold=fold, variant=args.variant, lambda_=lam,
                     model_size=params.model_size, patch_size=params.pretrain.patch_size,
                     seed=seed, tracker=tracker, dist_info=info)
    finally:
        cleanup_distributed()
    return 0


def _check_world_size(nproc_per_node: int) -> None:
    """Refuse a launch whose process count on this machine is not finetune.nproc_per_node.

    The lr and the steps per epoch depend on the number of processes, and DVC records the
    param: a mismatch (e.g. the stage started by hand without torchrun) would train another
    recipe than the one recorded. Multi-node launches check the processes per node.
    """
    local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")) or 1)
    if local != nproc_per_node:
        raise SystemExit(f"finetune.nproc_per_node is {nproc_per_node} but this launch runs "
                         f"{local} process(es) on this machine; start the stage with "
                         f"`python -m torch.distributed.run --standalone "
                         f"--nproc_per_node={nproc_per_node} -m stages.finetune ...` (as "
                         "dvc.yaml does) or set finetune.nproc_per_node")


if __name__ == "__main__":
    sys.exit(main())
