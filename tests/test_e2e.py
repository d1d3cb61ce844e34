"""The whole DAG, end to end, at a scale smaller than the built-in default.

Copies the tracked repository into a temp dir, shrinks params.yaml, runs `dvc repro`, checks
the report and metrics, then checks that a second `dvc repro` does nothing and that changing
`lambda` invalidates only the IAT branch (and what depends on it).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _run(cmd: list[str], cwd: Path, env: dict) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=1500)
    if proc.returncode:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n"
                             f"{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    return proc.stdout + proc.stderr


def _tiny_params(src: Path) -> dict:
    p = yaml.safe_load(src.read_text())
    p["download"]["synthetic"].update(subjects=6, tasks=2, frames_per_task=8, frame_size=64,
                                      pool_images=40, pool_broken=7)
    p["shards"].update(samples_per_shard=16, workers=1)
    p["au_shards"].update(image_size=32, synthetic_parts=2, workers=1)
    p["pretrain"].update(image_size=32, patch_size=8, decoder_dim=32, decoder_depth=1,
                         decoder_heads=2, epochs=1, warmup_epochs=0, batch_size=8,
                         num_workers=0, log_every=1)
    p["finetune"].update(runs=["synthetic-1", "synthetic-2"], image_size=32, epochs=1,
                         warmup_epochs=0, batch_size=8, num_workers=0,
                         save_backbone_epochs=[0, 1])
    p["probe"].update(frames_per_subject=6, epochs=5, tsne_subjects=4)
    p["download"]["synthetic_fer"].update(subjects=4, test_subjects=1, frames_per_expression=2,
                                          frame_size=32)
    p["fer_shards"].update(image_size=32)
    p["finetune_fer"].update(image_size=32)
    p["finetune_fer"]["synthetic"].update(epochs=1, warmup_epochs=0, batch_size=8)
    return p


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> tuple[Path, dict]:
    work = tmp_path_factory.mktemp("e2e") / "repo"
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split()
    for f in files:
        if f.startswith(("data/",)) or not (ROOT / f).is_file():
            continue
        dst = work / f
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, dst)
    (work / "params.yaml").write_text(yaml.safe_dump(_tiny_params(ROOT / "params.yaml"),
                                                     sort_keys=False))
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{work / 'mlflow.db'}"
    env.pop("DVC_ROOT", None)
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"],
                ["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "e2e"]):
        _run(cmd, work, env)
    _run([str(Path(sys.executable).parent / "dvc"), "repro"], work, env)
    return work, env


def test_repro_builds_report_and_metrics(repo):
    work, _ = repo
    report = (work / "data" / "tables" / "report.html").read_text()
    assert "data:image/png;base64," in report
    assert "Table 4: facial expression recognition" in report
    stats = json.loads((work / "data" / "shards" / "stats.json").read_text())
    synth = stats["sources"]["synthetic"]
    assert synth["seen"] == 40 + 7 and synth["failed"] >= 1 and synth["dropped_aspect"] >= 1
    for variant in ("fmae", "iat"):
        for run in ("synthetic-1", "synthetic-2"):
            m = json.loads((work / "data" / "finetune" / variant / run / "metrics.json").read_text())
            assert 0.0 <= m["final"]["f1_mean"] <= 100.0
    headline = json.loads((work / "data" / "tables" / "metrics.json").read_text())
    assert headline  # tables wrote headline metrics
    fer = json.loads((work / "data" / "finetune_fer" / "synthetic" / "metrics.json").read_text())
    assert headline["fer"]["synthetic"]["top1"] == fer["final"]["top1"]
    assert (work / "data" / "probe" / "identity_vs_epoch.png").stat().st_size > 0
    assert (work / "data" / "shards" / "face").is_dir()
    assert (work / "data" / "download" / "synthetic" / "contact_sheet.png").is_file()


def test_second_repro_does_nothing(repo):
    work, env = repo
    out = _run([str(Path(sys.executable).parent / "dvc"), "status", "--json"], work, env)
    assert json.loads(out.strip().splitlines()[-1] or "{}") == {}


def test_lambda_experiment_reruns_only_the_iat_branch(repo):
    work, env = repo
    dvc = str(Path(sys.executable).parent / "dvc")
    out = _run([dvc, "exp", "run", "-S", "lambda=0.5", "-n", "lam-half"], work, env)
    for stage in ("download", "shards", "au_shards", "pretrain", "finetune_fmae@synthetic-1",
                  "finetune_fmae@synthetic-2"):
        assert f"Stage '{stage}' didn't change, skipping" in out, stage
    for stage in ("finetune_iat@synthetic-1", "finetune_iat@synthetic-2", "probe", "tables"):
        assert f"Running stage '{stage}'" in out, stage
    iat = json.loads((work / "data" / "finetune" / "iat" / "synthetic-1" / "metrics.json")
                     .read_text())
    assert iat["lambda"] == 0.5
    # the experiment's metrics are readable by `dvc exp show` (cached metrics, not '!')
    shown = json.loads(_run([dvc, "exp", "show", "--json"], work, env).strip().splitlines()[-1])
    exps = [e for rev in shown for e in (rev.get("experiments") or [])]
    named = [r for e in exps for r in e.get("revs", []) if r.get("name") == "lam-half"]
    assert named, shown
    data = named[0]["data"]
    assert data["params"]["params.yaml"]["data"]["lambda"] == 0.5
    tables = data["metrics"]["data/tables/metrics.json"]["data"]
    assert tables["f1"]["synthetic"]["iat"]["final"] >= 0.0
