"""Stage fer_shards: expression datasets -> WebDataset shards with class labels and splits.

    python -m stages.fer_shards --params params.yaml --download data/download \
        --out data/fer_shards/data --stats data/fer_shards/stats.json

Builds ``<out>/<dataset>/`` (``train-NNNNN.tar``, ``test-NNNNN.tar``, ``meta.json``; see
pipeline/fer_data.py) for every dataset in ``download.fer_datasets``, read from
``<download>/<folder>`` (``synthetic_fer``, ``rafdb``, ``affectnet``). Images that are not
aligned crops go through the face front-end where ``fer_shards.face_crop.<dataset>`` is
``detect``. Counts per split and class, and skipped images, go to ``--stats`` and MLflow.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from pipeline.fer_data import build_fer_shards, download_folder
from pipeline.io import atomic_write_json, setup_logging, write_run_info
from pipeline.params import load_params, to_dict
from pipeline.tracking import start_run

log = logging.getLogger("stages.fer_shards")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--download", type=Path, default=Path("data/download"))
    ap.add_argument("--out", type=Path, default=Path("data/fer_shards/data"))
    ap.add_argument("--stats", type=Path, default=None)
    args = ap.parse_args(argv)
    setup_logging()
    params = load_params(args.params)
    cfg = params.fer_shards
    datasets = list(params.download.fer_datasets)
    logged = {"fer_shards": to_dict(cfg), "download": {"fer_datasets": datasets}}
    stats: dict[str, dict] = {}
    with start_run("fer_shards", logged) as tracker:
        for ds in datasets:
            meta = build_fer_shards(ds, args.download / download_folder(ds), args.out / ds, cfg)
            stats[ds] = {**{f"{s}_images": v["count"] for s, v in meta["splits"].items()},
                         **{f"skipped_{k}": v for k, v in meta["skipped"].items()},
                         "per_class": {s: dict(zip(meta["classes"], v["per_class"]))
                                       for s, v in meta["splits"].items()}}
            log.info("%s: %s", ds, ", ".join(f"{k}={v}" for k, v in stats[ds].items()
                                             if k != "per_class"))
            tracker.log_metrics({f"{ds}.{k}": v for k, v in stats[ds].items()
                                 if k != "per_class"})
    # beside the stats, not in the shard folder: a git commit there would re-run finetune_fer
    write_run_info(args.stats.parent if args.stats else args.out, logged)
    if args.stats:
        atomic_write_json(args.stats, stats)
    return 0


if __name__ == "__main__":
    sys.exit(main())
