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

from pipeline.au_data import build_au_shards, label_stats, list_subjects, load_index
from pipeline.au_faces import (agreement_with_truth, boxes_by_key, detect_dataset, detector_tag,
                               no_face_per_subject, no_face_table)
from pipeline.faces import make_detector
from pipeline.io import atomic_path, atomic_write_json, setup_logging, write_run_info
from pipeline.synthetic import FACE_BOXES
from pipeline.params import load_params, to_dict
from pipeline.tracking import start_run

log = logging.getLogger("stages.au_shards")


def dataset_root(download: Path, dataset: str) -> Path:
    return download / "synthetic" / "au" if dataset == "synthetic" else download / dataset


def detect_faces(dataset: str, root: Path, out: Path, cfg, cache_dir: Path) -> dict | None:
    """The detection pass (``au_shards.face_crop: detect``): boxes per frame key, stats, and
    ``<out>/no_face.csv`` listing the frames left out. None when cropping is off."""
    if cfg.face_crop != "detect":
        return None
    subjects = list_subjects(dataset, root)
    df, counts = detect_dataset(
        dataset, root, subjects, cfg, cache_dir / f"{dataset}.parquet",
        lambda: make_detector(cfg.face_detector, min_face=cfg.face_min_size,
                              max_side=cfg.face_max_side, threshold=cfg.face_threshold))
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "no_face.csv", suffix=".csv") as tmp:
        no_face_table(df).to_csv(tmp, index=False)
    st = {**counts, "no_face_per_subject": no_face_per_subject(df),
          "detector": detector_tag(cfg), "square": cfg.face_square}
    truth = root / FACE_BOXES
    if dataset == "synthetic" and truth.is_file():
        st["truth"] = agreement_with_truth(df, truth)
        log.info("synthetic faces against the known boxes: %s", st["truth"])
        st.update({f"truth_{k}": v for k, v in st["truth"].items()})
    return {"boxes": boxes_by_key(df), "stats": st}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--download", type=Path, default=Path("data/download"),
                    help="the download stage's folder")
    ap.add_argument("--out", type=Path, default=Path("data/au_shards"))
    ap.add_argument("--stats", type=Path, default=None,
                    help="metrics file (default: <out>/stats.json)")
    ap.add_argument("--faces", type=Path, default=Path("data/au_shards/faces"),
                    help="face detection cache, one <dataset>.parquet (kept across runs)")
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
            root = dataset_root(args.download, dataset)
            faces = detect_faces(dataset, root, out, cfg, args.faces)
            meta = build_au_shards(dataset, root, out, cfg,
                                   boxes=None if faces is None else faces["boxes"])
            ls = label_stats(load_index(out), meta["aus"])
            stats[dataset] = {**meta["counts"], **ls,
                              "parts": {k: len(v) for k, v in meta["parts"].items()}}
            flat = {f"{dataset}.{k}": v for k, v in meta["counts"].items()}
            if faces is not None:
                stats[dataset]["faces"] = faces["stats"]
                flat.update({f"{dataset}.faces.{k}": v for k, v in faces["stats"].items()
                             if isinstance(v, (int, float))})
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
