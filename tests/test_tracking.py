"""The MLflow helper: URI resolution, tags, params/metrics, rank-0-only logging, the store lock
and the experiment kind the MLflow UI reads."""
import multiprocessing
import os
import subprocess
import sys
import traceback
from pathlib import Path

import pytest

from pipeline import tracking

ROOT = Path(__file__).resolve().parents[1]


def test_uri_is_absolute_sqlite_at_repo_root(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    assert tracking.tracking_uri() == f"sqlite:///{tmp_path.resolve()}/mlflow.db"


def test_queued_experiment_copy_maps_back_to_main_repo(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    copy = tmp_path / ".dvc" / "tmp" / "exps" / "tmpab12cd"
    copy.mkdir(parents=True)
    monkeypatch.setenv("DVC_ROOT", str(copy))
    assert tracking.repo_root() == tmp_path.resolve()
    assert tracking.tracking_uri() == f"sqlite:///{tmp_path.resolve()}/mlflow.db"


def test_env_overrides(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert tracking.tracking_uri() == "http://127.0.0.1:5000"


def test_non_zero_rank_logs_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with tracking.start_run("pretrain", {"a": 1}) as t:
        assert not t.active
        t.log_metrics({"loss": 1.0}, step=0)  # no-op, no store touched
    assert not (tmp_path / "mlflow.db").exists()


@pytest.mark.slow
def test_run_records_params_metrics_and_tags(tmp_path, monkeypatch):
    import mlflow
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    monkeypatch.setenv("DVC_STAGE", "finetune_iat@synthetic-1")
    monkeypatch.setenv("DVC_EXP_NAME", "lambda-half")
    with tracking.start_run("finetune", {"finetune": {"epochs": 3}, "lambda": 0.5},
                            run_name="iat/synthetic-1", tags={"fold": 1}) as t:
        assert t.active
        t.log_metrics({"f1@0.5": 61.0}, step=2)
        run_id = mlflow.active_run().info.run_id
    client = mlflow.tracking.MlflowClient(tracking_uri=tracking.tracking_uri())
    run = client.get_run(run_id)
    assert run.data.params == {"finetune.epochs": "3", "lambda": "0.5"}
    assert run.data.metrics == {"f1_0.5": 61.0}
    tags = run.data.tags
    assert tags["dvc.stage"] == "finetune_iat@synthetic-1"
    assert tags["dvc.exp"] == "lambda-half"
    assert tags["fold"] == "1" and tags["pipeline.stage"] == "finetune"
    assert "git.commit" in tags
    assert (tmp_path / "mlflow.db").exists()
    exp = client.get_experiment(run.info.experiment_id)
    assert exp.artifact_location == (tmp_path / "mlartifacts").resolve().as_uri()
    assert exp.tags[tracking.KIND_TAG] == tracking.KIND


@pytest.mark.slow
def test_experiment_made_before_the_kind_tag_gets_it(tmp_path, monkeypatch):
    # a store from an earlier version holds the experiment without the tag: reusing it marks it
    from mlflow.tracking import MlflowClient
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    uri = tracking.tracking_uri()
    client = MlflowClient(tracking_uri=uri)
    old = client.create_experiment(tracking.EXPERIMENT)
    assert tracking.KIND_TAG not in client.get_experiment(old).tags
    assert tracking._ensure_experiment(uri, tmp_path) == old
    assert client.get_experiment(old).tags[tracking.KIND_TAG] == "custom_model_development"


def test_kind_tag_is_the_one_the_mlflow_ui_reads():
    # the UI bundle names the tag and the model-training kind; a rename upstream shows here
    import mlflow
    js = Path(mlflow.__file__).parent / "server" / "js" / "build" / "static" / "js"
    if not js.is_dir():
        pytest.skip("this mlflow build ships no UI bundle")
    bundle = "".join(p.read_text(errors="replace") for p in js.glob("main.*.js"))
    assert f'"{tracking.KIND_TAG}"' in bundle
    assert f'CUSTOM_MODEL_DEVELOPMENT="{tracking.KIND}"' in bundle


_LOCK_PROBE = "import sys; from pipeline import tracking; print(tracking.lock_path(sys.argv[1]))"


def test_lock_name_is_the_same_in_every_process(tmp_path):
    # hash() of a str is salted per process; the lock must not be
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    names = {subprocess.run([sys.executable, "-c", _LOCK_PROBE, uri], check=True, text=True,
                            capture_output=True, cwd=ROOT,
                            env={**os.environ, "PYTHONHASHSEED": str(seed)}).stdout.strip()
             for seed in (1, 2, 3)}
    assert len(names) == 1
    assert Path(names.pop()) == tracking.lock_path(uri)


def test_lock_name_follows_the_resolved_store(tmp_path, monkeypatch):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    monkeypatch.chdir(tmp_path)
    same = {tracking.lock_path(u) for u in (
        f"sqlite:///{tmp_path}/real/mlflow.db", f"sqlite:///{tmp_path}/link/mlflow.db",
        "sqlite:///real/mlflow.db", "sqlite:///real/../real/mlflow.db")}
    assert len(same) == 1
    assert tracking.lock_path(f"sqlite:///{tmp_path}/other.db") not in same


def _race_worker(i: int, roots: list, barrier, results) -> None:
    """One process: for each fresh store, wait for the others, then start a run at once."""
    os.environ.pop("RANK", None)
    import mlflow  # noqa: F401  (imported before the barrier: the race is the store, not imports)
    for k, root in enumerate(roots):
        os.environ["DVC_ROOT"] = root
        # mlflow.set_tracking_uri exports MLFLOW_TRACKING_URI, which would pin the last store
        os.environ.pop("MLFLOW_TRACKING_URI", None)
        try:
            barrier.wait(timeout=120)
            with tracking.start_run("race", run_name=f"w{i}") as t:
                t.log_metrics({"worker": float(i)})
            results.put((k, i, None))
        except BaseException:  # noqa: BLE001 - reported to the parent, which fails the test
            results.put((k, i, traceback.format_exc()))


@pytest.mark.slow
def test_parallel_first_use_of_a_fresh_store(tmp_path, monkeypatch):
    """Several processes open runs on a fresh SQLite store at the same instant, a few times:
    every run succeeds and lands in a fully migrated store."""
    from mlflow.tracking import MlflowClient
    n, trials = 3, 4
    roots = [tmp_path / f"trial{k}" for k in range(trials)]
    for r in roots:
        r.mkdir()
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(n), ctx.Queue()
    procs = []
    for i in range(n):
        # different hash salts per process, whatever this process's environment says
        monkeypatch.setenv("PYTHONHASHSEED", str(i + 1))
        procs.append(ctx.Process(target=_race_worker, args=(i, [str(r) for r in roots],
                                                             barrier, results)))
        procs[-1].start()
    try:
        got = [results.get(timeout=300) for _ in range(n * trials)]
    finally:
        for p in procs:
            p.join(timeout=60)
            if p.is_alive():
                p.kill()
    errors = [f"trial {k}, process {i}:\n{err}" for k, i, err in got if err]
    assert not errors, "\n".join(errors)
    for r in roots:
        client = MlflowClient(tracking_uri=f"sqlite:///{r.resolve()}/mlflow.db")
        exp = client.get_experiment_by_name(tracking.EXPERIMENT)
        runs = client.search_runs([exp.experiment_id])
        assert sorted(run.info.run_name for run in runs) == [f"w{i}" for i in range(n)]
        assert all(run.info.status == "FINISHED" for run in runs)
        assert exp.tags[tracking.KIND_TAG] == tracking.KIND
        assert [e.name for e in client.search_experiments()].count(tracking.EXPERIMENT) == 1
