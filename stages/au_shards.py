"""Stage au_shards: AU datasets -> per-subject WebDataset shards, index, meta, stats.

    python -m stages.au_shards --params params.yaml --download data/download \
        --out data/au_shards [--stats data/au_shards/stats.json]

Builds ``<out>/<dataset>/`` (docs/design.md, au_shards contract) for every dataset in
``download.au_datasets``; the synthetic set is read from ``<download>/synthetic/au`` (BP4D
layout), the licensed ones from ``<download>/<dataset>``. Writes the per-dataset counts, the
unknown-label rate and the positive rate per AU to ``--stats`` and to MLflow.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from pipeline.au_data import build_au_shards, label_stats, load_index
from pipeline.io import atomic_write_json, setup_logging, write_run_info
from pipeline.params import load_params, to_dict
from pipeline.tracking import start_run

log = logging.getLogger("stages.au_shards")


def dataset_root(download: Path, dataset: str) -> Path:
    return download / "synthetic" / "au" if dataset == "synthetic" else download / dataset


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--download", type=Path, default=Path("data/download"),
                    help="the download stage's folder")
    ap.add_argument("--out", type=Path, default=Path("data/au_shards"))
    ap.add_argument("--stats", type=Path, default=None,
                    help="metrics file (default: <out>/stats.json)")
    args = ap.parse_args(argv)
    setup_logging()
    params = load_params(args.params)
    cfg = params.au_shards
    stats_path = args.stats or args.out / "stats.json"
    logged = {"au_shards": to_dict(cfg), "download": {"au_datasets": params.download.au_datasets}}

    with start_run("au_shards", logged) as tracker:
        stats: dict[str, dict] = {}
        for dataset in params.download.au_datasets:
            out = args.out / dataset
            meta = build_au_shards(dataset, dataset_root(args.download, dataset), out, cfg)
            ls = label_stats(load_index(out), meta["aus"])
            stats[dataset] = {**meta["counts"], **ls,
                              "parts": {k: len(v) for k, v in meta["parts"].items()}}
            flat = {f"{dataset}.{k}": v for k, v in meta["counts"].items()}
            flat[f"{dataset}.unknown_rate"] = ls["unknown_rate"]
            flat.update({f"{dataset}.positive_rate.{au}": r
                         for au, r in ls["positive_rate"].items()})
            tracker.log_metrics(flat)
            log.info("%s: unknown-label rate %.3f; positive rate %s", dataset,
                     ls["unknown_rate"], ", ".join(
                         f"{au} {r:.2f}" if r is not None else f"{au} n/a"
                         for au, r in ls["positive_rate"].items()))
        atomic_write_json(stats_path, stats)
        # beside the stats, not in the shard folder: the git commit in it would change the
        # folder's DVC hash on every run and re-run all finetuning
        write_run_info(stats_path.parent, logged)
        tracker.log_artifact(stats_path)


if __name__ == "__main__":
    main()
