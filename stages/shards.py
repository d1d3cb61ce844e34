"""Stage shards: downloaded face images -> Face9M-style 224px WebDataset shards + stats.

    python -m stages.shards --params params.yaml --download data/download --out data/shards \
        [--stats data/shards/stats.json]

Reads every source in ``download.sources`` (in sorted name order, each source's items in the
sorted order of ``pipeline.sources.iter_items``), drops images whose aspect ratio exceeds
``shards.max_aspect_ratio`` or whose shorter side is below ``shards.min_side`` (0 = off),
resizes the rest to ``shards.image_size`` (``shards.codec``: libjpeg-turbo via simplejpeg, or
Pillow) and writes
``<out>/face-%06d.tar`` and ``<out>/stats.json`` (docs/design.md, shards contract). The
per-source counts (the Face9M composition table) and the throughput go to MLflow;
``--stats`` writes a copy of ``stats.json`` outside ``<out>`` for ``dvc.yaml``'s ``metrics:``
(DVC refuses a metrics file inside another output folder).

No ``run_info.json`` is written into ``<out>``: the folder is hashed by DVC as a whole, and a
file holding the git commit would change its hash (and re-run pretraining) on every run even
though the shards are byte-identical. The same information is in the MLflow run.
"""
from __future__ import annotations

import argparse
import itertools
import logging
import time
from pathlib import Path


from pipeline.io import atomic_write_json, setup_logging
from pipeline.params import load_params, to_dict
from pipeline.shards import STATS_FILE, build_shards, resolve_codec
from pipeline.tracking import start_run

log = logging.getLogger("stages.shards")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--download", type=Path, default=Path("data/download"),
                    help="the download stage's folder (one subfolder per source)")
    ap.add_argument("--out", type=Path, default=Path("data/shards"))
    ap.add_argument("--stats", type=Path, default=None,
                    help="also write the stats here (the DVC metrics file)")
    ap.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    args = ap.parse_args(argv)
    setup_logging()
    params = load_params(args.params)
    from pipeline import sources  # imported late: it pulls in the download registry

    names = sorted(params.download.sources)
    items = itertools.chain.from_iterable(
        sources.iter_items(name, args.download / name) for name in names)
    # the codec actually used (auto -> turbo or pillow): the shards' bytes depend on it
    logged = {"shards": to_dict(params.shards), "download": {"sources": names},
              "codec_used": resolve_codec(params.shards.codec)}
    with start_run("shards", logged) as tracker:
        t0 = time.perf_counter()
        stats = build_shards(items, sources.read_item, args.out, params.shards,
                             progress=not args.no_progress)
        elapsed = time.perf_counter() - t0
        metrics = {f"{src}.{k}": v for src, st in stats["sources"].items() for k, v in st.items()}
        metrics.update({f"total.{k}": v for k, v in stats["total"].items()})
        metrics["images_per_s"] = stats["total"]["seen"] / max(elapsed, 1e-9)
        metrics["elapsed_s"] = elapsed
        tracker.log_metrics(metrics)
        tracker.log_artifact(args.out / STATS_FILE)
        if args.stats:
            atomic_write_json(args.stats, stats)
        log.info("%d images in %.1f s (%.0f images/s)", stats["total"]["seen"], elapsed,
                 metrics["images_per_s"])


if __name__ == "__main__":
    main()
