"""The one MLflow helper every stage uses.

- Tracking URI: ``MLFLOW_TRACKING_URI`` if set, else SQLite at the repository root as an
  absolute path (``sqlite:////abs/repo/mlflow.db``). Queued DVC experiments run in temp copies
  under ``<repo>/.dvc/tmp/exps/``; those map back to the main repository so their runs are not
  lost when the copy is deleted.
- The store and the experiment are created once under a file lock named from a digest of the
  resolved URI (parallel first use of a fresh SQLite store races otherwise), with an explicit
  artifact location and the ``mlflow.experimentKind`` tag that makes the MLflow 3 UI open it
  as a model-training experiment (its runs page), not on the GenAI overview.
- Runs carry params, metrics, and tags for the DVC stage, the DVC experiment and the git commit.
- Under DDP only rank 0 logs: other ranks get a tracker whose methods do nothing.
"""
from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from pipeline.io import git_commit
from pipeline.params import flatten

log = logging.getLogger(__name__)

EXPERIMENT = "fmae-iat"
# The MLflow 3 UI opens an experiment on its GenAI overview (traces, token usage) unless this
# tag marks it as model training; the value is the UI's ExperimentKind.CUSTOM_MODEL_DEVELOPMENT.
KIND_TAG, KIND = "mlflow.experimentKind", "custom_model_development"
_EXPS_MARK = os.sep + os.path.join(".dvc", "tmp", "exps") + os.sep


def repo_root(start: str | Path | None = None) -> Path:
    """The main repository root, also from inside a queued DVC experiment's temp copy."""
    root = Path(os.environ.get("DVC_ROOT") or start or Path.cwd()).resolve()
    s = str(root) + os.sep
    if _EXPS_MARK in s:
        root = Path(s.split(_EXPS_MARK)[0])
    return root


def tracking_uri(root: str | Path | None = None) -> str:
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return f"sqlite:///{repo_root(root) / 'mlflow.db'}"


def is_rank0() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


class Tracker:
    """Thin wrapper over an active MLflow run (rank 0) or a no-op (other ranks)."""

    def __init__(self, active: bool):
        self.active = active
        if active:
            import mlflow
            self._mlflow = mlflow

    def log_params(self, params: dict) -> None:
        if self.active:
            flat = {k: str(v)[:6000] for k, v in flatten(params).items()}
            items = list(flat.items())
            for i in range(0, len(items), 100):  # MLflow caps a batch at 100 params
                self._mlflow.log_params(dict(items[i:i + 100]))

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if self.active:
            clean = {_metric_key(k): float(v) for k, v in metrics.items() if v is not None}
            self._mlflow.log_metrics(clean, step=step)

    def set_tags(self, tags: dict[str, Any]) -> None:
        if self.active:
            self._mlflow.set_tags({k: str(v) for k, v in tags.items()})

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if self.active:
            self._mlflow.log_artifact(str(path), artifact_path=artifact_path)

    def log_figure(self, fig, name: str) -> None:
        """Log a matplotlib figure as a PNG artifact named ``name``."""
        if self.active:
            self._mlflow.log_figure(fig, name)

    def log_text(self, text: str, name: str) -> None:
        if self.active:
            self._mlflow.log_text(text, name)


def _metric_key(k: str) -> str:
    # MLflow allows alphanumerics, _ - . / and space; F1 keys like "f1@0.5" need mapping.
    return "".join(c if (c.isalnum() or c in "_-./ ") else "_" for c in k)


def _resolved_uri(uri: str) -> str:
    """``uri`` with a SQLite file path made absolute and free of symlinks, so that every
    spelling of the same store (relative, via a symlink) names the same lock."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and len(uri) > len(prefix):
        path, sep, query = uri[len(prefix):].partition("?")
        return f"{prefix}{Path(path).resolve()}{sep}{query}"
    return uri


def lock_path(uri: str) -> Path:
    """The lock file that serialises store creation and experiment setup for ``uri``.

    Named from a SHA-256 digest of the resolved URI: the built-in ``hash()`` of a str is salted
    per process (PYTHONHASHSEED), which would give every process a lock of its own.
    """
    digest = hashlib.sha256(_resolved_uri(uri).encode()).hexdigest()[:24]
    return Path(tempfile.gettempdir()) / f"fmae-iat-mlflow-{digest}.lock"


@contextmanager
def _store_lock(uri: str) -> Iterator[None]:
    with open(lock_path(uri), "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _ensure_experiment(uri: str, root: Path) -> str:
    """Create (or migrate) the store and the experiment under the store lock; return its id.

    MLflow builds a store once per process and URI (and caches it): the first client call
    below creates the SQLite tables or upgrades their schema, so it must run under the lock.
    """
    import mlflow
    from mlflow.tracking import MlflowClient
    mlflow.set_tracking_uri(uri)
    with _store_lock(uri):
        client = MlflowClient(tracking_uri=uri)
        exp = client.get_experiment_by_name(EXPERIMENT)  # builds / migrates the store
        if exp is None:
            art = (root / "mlartifacts").resolve()
            art.mkdir(parents=True, exist_ok=True)
            return client.create_experiment(EXPERIMENT, artifact_location=art.as_uri(),
                                             tags={KIND_TAG: KIND})
        if KIND_TAG not in exp.tags:  # made before the tag was set: mark it once
            client.set_experiment_tag(exp.experiment_id, KIND_TAG, KIND)
        return exp.experiment_id


@contextmanager
def start_run(stage: str, params: dict | None = None, run_name: str | None = None,
              tags: dict | None = None) -> Iterator[Tracker]:
    """Open an MLflow run for ``stage`` (rank 0 only) and yield a :class:`Tracker`.

    ``params`` is a nested dict (flattened to dotted keys); ``tags`` are added to the standard
    ones: ``dvc.stage``, ``dvc.exp``, ``dvc.baseline``, ``git.commit``, ``pipeline.stage``.
    """
    if not is_rank0():
        yield Tracker(active=False)
        return
    import mlflow
    root = repo_root()
    uri = tracking_uri(root)
    exp_id = _ensure_experiment(uri, root)
    std_tags = {
        "pipeline.stage": stage,
        "dvc.stage": os.environ.get("DVC_STAGE", stage),
        "dvc.exp": os.environ.get("DVC_EXP_NAME", "workspace"),
        "dvc.baseline": os.environ.get("DVC_EXP_BASELINE_REV", ""),
        "git.commit": git_commit(root),
    }
    std_tags.update(tags or {})
    with mlflow.start_run(experiment_id=exp_id, run_name=run_name or stage, tags={
            k: str(v) for k, v in std_tags.items()}):
        tracker = Tracker(active=True)
        if params:
            tracker.log_params(params)
        log.info("MLflow run in %s (experiment %s)", uri, EXPERIMENT)
        yield tracker
