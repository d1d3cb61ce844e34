"""Stage `probe`: identity linear probing of the AU backbones (paper section 5.1, Figs 3-4).

    python -m stages.probe --params params.yaml --finetune data/finetune \
        --au-shards data/au_shards --out data/probe
"""
from __future__ import annotations

import argparse
from pathlib import Path


from pipeline.io import setup_logging, write_run_info
from pipeline.params import load_params, to_dict
from pipeline.probe import PROBE_FINETUNE_KEYS, probe_all
from pipeline.tracking import start_run


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml", type=Path)
    ap.add_argument("--finetune", default=Path("data/finetune"), type=Path,
                    help="finetune outputs (<variant>/<dataset>-<fold>/backbones)")
    ap.add_argument("--au-shards", default=Path("data/au_shards"), type=Path,
                    help="AU shards root (<dataset>/index.parquet and tars)")
    ap.add_argument("--out", default=Path("data/probe"), type=Path)
    args = ap.parse_args(argv)
    setup_logging()
    params = load_params(args.params)
    ft = params.finetune
    # what the probes read of the finetune section: the runs, and the authors' recipe's
    # optimiser, augmentation and drop path
    logged = {"probe": to_dict(params.probe), "seed": params.seed,
              "finetune": {k: to_dict(ft)[k] for k in PROBE_FINETUNE_KEYS}}
    write_run_info(args.out, logged)
    with start_run("probe", logged) as tracker:
        probe_all(args.finetune, args.au_shards, args.out, params.probe, ft,
                  list(ft.runs), params.seed, tracker)


if __name__ == "__main__":
    main()
