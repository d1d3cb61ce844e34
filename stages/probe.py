"""Stage `probe`: identity linear probing of the AU backbones (paper section 5.1, Figs 3-4).

    python -m stages.probe --params params.yaml --finetune data/finetune \
        --au-shards data/au_shards --out data/probe

On several GPUs (or CPU processes), as dvc.yaml launches it with ``probe.nproc_per_node``,
the distinct backbones are shared out across the processes and rank 0 writes the results
(which do not depend on the number of processes):

    python -m torch.distributed.run --standalone --nproc_per_node=N -m stages.probe ...
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path


from pipeline.distributed import cleanup_distributed, init_distributed
from pipeline.io import setup_logging, write_run_info
from pipeline.params import load_params, to_dict
from pipeline.probe import PROBE_FINETUNE_KEYS, probe_all
from pipeline.tracking import is_rank0, start_run


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml", type=Path)
    ap.add_argument("--finetune", default=Path("data/finetune"), type=Path,
                    help="finetune outputs (<variant>/<dataset>-<fold>/backbones)")
    ap.add_argument("--au-shards", default=Path("data/au_shards"), type=Path,
                    help="AU shards root (<dataset>/index.parquet and tars)")
    ap.add_argument("--out", default=Path("data/probe"), type=Path)
    args = ap.parse_args(argv)
    # Other ranks only warn: one rank's log is the run's log.
    setup_logging(logging.INFO if is_rank0() else logging.WARNING)
    params = load_params(args.params)
    ft = params.finetune
    # what the probes read of the finetune section: the runs, and the authors' recipe's
    # optimiser, augmentation and drop path
    logged = {"probe": to_dict(params.probe), "seed": params.seed,
              "finetune": {k: to_dict(ft)[k] for k in PROBE_FINETUNE_KEYS}}
    if is_rank0():
        write_run_info(args.out, logged)
    info = init_distributed()
    try:
        with start_run("probe", logged) as tracker:
            probe_all(args.finetune, args.au_shards, args.out, params.probe, ft,
                      list(ft.runs), params.seed, tracker, dist_info=info)
    finally:
        cleanup_distributed()


if __name__ == "__main__":
    main()
