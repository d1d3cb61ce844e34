"""Stage download: obtain, place-check and verify every face source the params name.

    python -m stages.download --params params.yaml --out data/download

Runs :func:`pipeline.sources.prepare_sources` for each name in ``download.sources`` and
``download.au_datasets`` (a name in both runs once), each into ``<out>/<name>/`` with a
``manifest.json`` (docs/design.md, download contract). ``synthetic`` is generated; CelebA is
fetched (interrupted downloads resume from their ``.part`` file) unless its images are placed
already, in which case nothing is downloaded; LAION-Face runs img2dataset on URL lists you
place; the others, ``folder`` (your own photos, see the "Your own photos" section of
``pipeline/sources.py``) and the licensed AU datasets are verified where you placed them.
The expression datasets of ``download.fer_datasets`` follow (pipeline/fer_data.py):
``synthetic`` is generated into ``<out>/synthetic_fer/``, RAF-DB and AffectNet are verified
in ``<out>/rafdb/`` and ``<out>/affectnet/``. Counts per source go to MLflow. Exits with status 2, after printing exactly what to place
where, when a source needs a manual step; the sources that are ready stay ready.

No ``run_info.json`` is written into ``<out>``: DVC hashes the folder as the shards stage's
input, and a file holding the git commit would re-run everything downstream on every run.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path


from pipeline.fer_data import prepare_fer_sources
from pipeline.io import setup_logging
from pipeline.params import load_params, to_dict
from pipeline.sources import prepare_sources
from pipeline.tracking import start_run

log = logging.getLogger("stages.download")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--out", type=Path, default=Path("data/download"),
                    help="one subfolder per source is prepared here")
    args = ap.parse_args(argv)
    setup_logging()
    params = load_params(args.params)
    dl = params.download
    names = list(dict.fromkeys([*dl.sources, *dl.au_datasets]))

    with start_run("download", {"download": to_dict(dl)}) as tracker:
        summary = prepare_sources(names, args.out, retries=dl.retries, timeout=dl.timeout_s,
                                  synthetic_cfg=dl.synthetic)
        # expression datasets (Table 4): synthetic_fer/ generated, rafdb/ affectnet/ verified
        fer = prepare_fer_sources(dl.fer_datasets, args.out, dl.synthetic_fer)
        summary["sources"].update(fer["sources"])
        summary["pending"].update(fer["pending"])
        names += [f"fer_{n}" for n in dl.fer_datasets]
        metrics = {f"{name}.{k}": v for name, m in summary["sources"].items()
                   for k, v in m["counts"].items()}
        metrics["sources_ready"] = len(summary["sources"])
        metrics["sources_pending"] = len(summary["pending"])
        tracker.log_metrics(metrics)
        tracker.set_tags({"download.pending": ",".join(summary["pending"]) or "none"})

    if summary["pending"]:
        log.error("%d of %d source(s) need a manual step (ready: %s):\n\n%s",
                  len(summary["pending"]), len(names), ", ".join(summary["sources"]) or "none",
                  "\n\n".join(summary["pending"].values()))
        return 2
    log.info("all %d source(s) ready in %s", len(names), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
