"""The MLflow helper: URI resolution, tags, params/metrics, rank-0-only logging."""

import pytest

from pipeline import tracking


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
