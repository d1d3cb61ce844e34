"""Stage `pretrain`: FMAE (masked autoencoder) pretraining on the face shards (paper 3.1).

    python -m stages.pretrain --params params.yaml --shards data/shards/face \
        --out data/pretrain/model [--state data/pretrain/state] \
        [--metrics data/pretrain/metrics.json] [--loss-csv data/pretrain/loss.csv]

Data-parallel on several GPUs (or CPU processes, gloo):

    torchrun --standalone --nproc_per_node=N -m stages.pretrain ...same arguments...

A killed run continues from the resume checkpoint in the state folder when it is restarted
with the same settings. With ``pretrain.checkpoint`` set, a released FMAE/MAE checkpoint is
validated and converted instead of training.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path


from pipeline.distributed import cleanup_distributed, init_distributed
from pipeline.io import setup_logging, write_run_info
from pipeline.params import load_params, to_dict
from pipeline.pretrain import pretrain
from pipeline.tracking import is_rank0, start_run


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml", type=Path)
    ap.add_argument("--shards", default=Path("data/shards/face"), type=Path,
                    help="the shards stage's face-NNNNNN.tar folder")
    ap.add_argument("--out", default=Path("data/pretrain"), type=Path,
                    help="checkpoint.pt and recon_epoch<N>.png go here")
    ap.add_argument("--state", default=None, type=Path,
                    help="resume checkpoints (default <out>/state)")
    ap.add_argument("--metrics", default=None, type=Path,
                    help="metrics file (default <out>/metrics.json)")
    ap.add_argument("--loss-csv", default=None, type=Path,
                    help="loss curve for DVC plots (default <out>/loss.csv)")
    args = ap.parse_args(argv)
    # Other ranks only warn: one rank's log is the run's log.
    setup_logging(logging.INFO if is_rank0() else logging.WARNING)
    params = load_params(args.params)
    info = init_distributed()
    logged = {"pretrain": to_dict(params.pretrain), "model_size": params.model_size,
              "seed": params.seed, "world_size": info.world_size}
    try:
        if info.is_main:
            # Beside the metrics, not inside the model folder: the git commit in run_info
            # would change that folder's DVC hash and re-run every finetuning stage.
            write_run_info((args.metrics or args.out / "metrics.json").parent, logged)
        with start_run("pretrain", logged) as tracker:
            pretrain(args.shards, args.out, params.pretrain, model_size=params.model_size,
                     seed=params.seed, tracker=tracker, dist_info=info, state_dir=args.state,
                     metrics_path=args.metrics, loss_csv_path=args.loss_csv)
    finally:
        cleanup_distributed()


if __name__ == "__main__":
    main()
