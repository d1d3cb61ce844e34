"""Finetune run folders read back for the tables (docs/design.md finetune contract).

A run folder holds ``metrics.json`` (required) and ``history.csv``; the main stages' runs live
in ``data/finetune/<variant>/<dataset>-<fold>/`` (top-level seed), their repeats with
``finetune.extra_seeds`` in ``data/finetune/seed<k>/<variant>/<dataset>-<fold>/``, the ablation
sweeps in ``data/finetune/sweep_lambda/<run>/lambda<L>/`` and ``sweep_depth/<run>/depth<D>/``.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from pipeline.io import read_json
from pipeline.params import Params, ParamsError, parse_run
from pipeline.recipes import run_seeds

log = logging.getLogger(__name__)

VARIANTS = ("fmae", "iat")
# sweep kind -> (folder under data/finetune, run sub-folder pattern, metrics.json key it sets)
SWEEPS = {"lambda": ("sweep_lambda", re.compile(r"^lambda(?P<v>[0-9.eE+-]+)$"), "lambda"),
          "depth": ("sweep_depth", re.compile(r"^depth(?P<v>\d+)$"), "id_head_depth")}


@dataclass
class RunResult:
    """One finetune run's outputs (docs/design.md finetune contract)."""
    run: str
    dataset: str
    fold: int
    variant: str
    path: Path
    metrics: dict
    history: pd.DataFrame | None
    sweep: str | None = None  # "lambda" / "depth" for ablation runs
    seed: int | None = None   # the finetune seed (metrics.json "seed", else the folder's)

    @property
    def aus(self) -> list[int]:
        return [au_number(a) for a in self.metrics.get("aus", [])]

    @property
    def lam(self) -> float:
        v = self.metrics.get("lambda")
        return 0.0 if self.variant == "fmae" or v is None else float(v)

    @property
    def depth(self) -> int | None:
        v = self.metrics.get("id_head_depth")
        return None if v is None else int(v)


def au_number(a) -> int:
    """1, "1", "AU1" and "AU01" -> 1."""
    m = re.fullmatch(r"(?:AU)?0*(\d+)", str(a).strip(), flags=re.IGNORECASE)
    if not m:
        raise ValueError(f"{a!r} is not an AU name like 'AU12'")
    return int(m[1])


def load_run(run_dir: str | Path, variant: str, run: str) -> RunResult:
    """Read ``metrics.json`` (required) and ``history.csv`` (optional) of one run."""
    run_dir = Path(run_dir)
    ds, fold = parse_run(run)
    metrics = read_json(run_dir / "metrics.json")
    for key in ("final", "paper_protocol"):
        if not isinstance(metrics.get(key), dict) or "f1_mean" not in metrics[key]:
            raise ValueError(f"{run_dir / 'metrics.json'}: '{key}' with 'f1_mean' missing; the "
                             "file does not follow the finetune contract (docs/design.md); "
                             "re-run the finetune stage")
    hist_path = run_dir / "history.csv"
    history = pd.read_csv(hist_path) if hist_path.is_file() else None
    if history is None:
        log.warning("%s: missing; Figure 5 leaves this run out", hist_path)
    return RunResult(run, ds, fold, variant, run_dir, metrics, history)


def seed_run_dir(finetune_dir: Path, variant: str, run: str, seed: int,
                 main_seed: int) -> Path:
    """Folder of ``run`` trained with ``seed``: the main stages' for the top-level seed,
    else ``seed<k>/<variant>/<run>`` (the finetune_<variant>_seeds stages)."""
    if seed == main_seed:
        return finetune_dir / variant / run
    return finetune_dir / f"seed{seed}" / variant / run


def load_seed_runs(finetune_dir: Path, params: Params) -> dict[str, dict[str, list[RunResult]]]:
    """Every finetune run, once per seed: ``{variant: {run: [RunResult per seed]}}``, the
    top-level seed first. A missing folder fails naming the stage that writes it."""
    out: dict[str, dict[str, list[RunResult]]] = {v: {} for v in VARIANTS}
    for v in VARIANTS:
        for run in params.finetune.runs:
            for seed in run_seeds(params):
                run_dir = seed_run_dir(finetune_dir, v, run, seed, params.seed)
                if not run_dir.is_dir():
                    stage = f"finetune_{v}" + ("" if seed == params.seed else "_seeds")
                    raise FileNotFoundError(
                        f"{run_dir}: finetune run missing (finetune.runs lists {run!r}, seeds "
                        f"{run_seeds(params)}); run `dvc repro {stage}`")
                r = load_run(run_dir, v, run)
                r.seed = int(r.metrics.get("seed", seed))
                out[v].setdefault(run, []).append(r)
    return out


def load_sweeps(finetune_dir: Path) -> list[RunResult]:
    """Every finished ablation run: ``sweep_lambda/<run>/lambda<L>/`` and
    ``sweep_depth/<run>/depth<D>/`` folders that hold a ``metrics.json``."""
    out = []
    for kind, (folder, pattern, key) in SWEEPS.items():
        root = finetune_dir / folder
        if not root.is_dir():
            continue
        for run_dir in sorted(p for p in root.iterdir() if p.is_dir()):
            try:
                parse_run(run_dir.name)
            except ParamsError:
                log.warning("%s: not a <dataset>-<fold> folder; ignored", run_dir)
                continue
            for cfg_dir in sorted(p for p in run_dir.iterdir() if p.is_dir()):
                m = pattern.match(cfg_dir.name)
                if not m or not (cfg_dir / "metrics.json").is_file():
                    log.warning("%s: not a finished %s sweep run; ignored", cfg_dir, kind)
                    continue
                r = load_run(cfg_dir, "iat", run_dir.name)
                r.sweep = kind
                # metrics.json is authoritative; the folder name is the fallback.
                r.metrics.setdefault(key, float(m["v"]) if kind == "lambda" else int(m["v"]))
                out.append(r)
    return out
