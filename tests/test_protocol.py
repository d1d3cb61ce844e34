"""The paper's protocol: per-dataset lambda, per-run recipes, extra seeds, and the DVC DAG.

Covers pipeline/recipes.py (what a run resolves to), the params validation of the new keys,
the stage recording the effective values, and dvc.yaml's params lists: changing ``lambda``
(or the per-dataset mapping, or an IAT recipe) must change the params of IAT stages only.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.params import FinetuneParams, Params, ParamsError, build, load_params
from pipeline.recipes import effective_lambda, effective_recipe, recipe_summary, run_seeds

ROOT = Path(__file__).resolve().parents[1]
PAPER = ROOT / "configs" / "paper.yaml"


def params_with(**finetune) -> Params:
    return build(Params, {"download": {"au_datasets": ["synthetic", "bp4d", "disfa"]},
                          "finetune": finetune})


# --------------------------------------------------------------------------- lambda
def test_per_dataset_lambda_overrides_the_top_level_one():
    p = params_with(lambda_per_dataset={"bp4d": 1, "disfa": 0.5})
    assert effective_lambda(p, "bp4d") == 1.0 and isinstance(effective_lambda(p, "bp4d"), float)
    assert effective_lambda(p, "disfa") == 0.5
    assert effective_lambda(p, "synthetic") == p.lambda_ == 2.0  # not listed: top level


def test_paper_profile_runs_each_dataset_at_the_papers_lambda():
    p = load_params(PAPER)
    assert {ds: effective_lambda(p, ds) for ds in ("bp4d", "bp4d_plus", "disfa")} == {
        "bp4d": 2.0, "bp4d_plus": 1.0, "disfa": 0.5}


@pytest.mark.parametrize("mapping, msg", [
    ({"bp4dd": 1.0}, r"finetune\.lambda_per_dataset: unknown dataset 'bp4dd'"),
    ({"bp4d": -1.0}, r"finetune\.lambda_per_dataset\.bp4d: -1\.0 is out of range"),
    ({"bp4d": "high"}, r"finetune\.lambda_per_dataset\.bp4d: expected a number"),
    ({"bp4d": float("nan")}, r"finetune\.lambda_per_dataset\.bp4d: nan is not a finite"),
    ([1.0], r"finetune\.lambda_per_dataset: expected a mapping"),
])
def test_per_dataset_lambda_is_validated(mapping, msg):
    with pytest.raises(ParamsError, match=msg):
        params_with(lambda_per_dataset=mapping)


# --------------------------------------------------------------------------- recipes
def test_recipe_overrides_only_its_dataset_and_variant():
    cfg = build(FinetuneParams, {"epochs": 30, "warmup_epochs": 3, "blr": 5e-4,
                                 "save_backbone_epochs": [0, 1, 19, 20, 25, 30],
                                 "recipes": {"fmae": {"bp4d": {"epochs": 20, "warmup_epochs": 2,
                                                               "blr": 2e-4}},
                                             "iat": {"disfa": {"epochs": 20}}}}, "finetune.")
    bp4d_fmae = effective_recipe(cfg, "bp4d", "fmae")
    assert recipe_summary(bp4d_fmae) == {"epochs": 20, "warmup_epochs": 2, "blr": 2e-4}
    # backbones past the run's last epoch are dropped, the rest kept in order
    assert bp4d_fmae.save_backbone_epochs == [0, 1, 19, 20]
    assert recipe_summary(effective_recipe(cfg, "bp4d", "iat")) == {
        "epochs": 30, "warmup_epochs": 3, "blr": 5e-4}
    disfa_iat = effective_recipe(cfg, "disfa", "iat")  # only epochs set: the rest inherited
    assert recipe_summary(disfa_iat) == {"epochs": 20, "warmup_epochs": 3, "blr": 5e-4}
    # nothing else of the section changes
    same = dataclasses.replace(bp4d_fmae, epochs=30, warmup_epochs=3, blr=5e-4,
                               save_backbone_epochs=cfg.save_backbone_epochs)
    assert same == cfg


def test_paper_profile_has_the_reference_recipes():
    f = load_params(PAPER).finetune
    want = {("bp4d", "fmae"): (20, 2, 2e-4), ("bp4d", "iat"): (30, 3, 5e-4),
            ("bp4d_plus", "fmae"): (20, 2, 5e-4), ("bp4d_plus", "iat"): (30, 3, 5e-4),
            ("disfa", "fmae"): (20, 2, 5e-4), ("disfa", "iat"): (20, 2, 5e-4)}
    for (ds, v), (epochs, warmup, blr) in want.items():
        r = effective_recipe(f, ds, v)
        assert (r.epochs, r.warmup_epochs, r.blr) == (epochs, warmup, blr), (ds, v)
        assert r.save_backbone_epochs[-1] == epochs  # the final backbone is probed
    assert f.unknown_labels == "negative"  # the reference counts BP4D's 9 as absent


@pytest.mark.parametrize("recipes, msg", [
    ({"mae": {}}, r"finetune\.recipes\.mae: unknown variant 'mae'; known: fmae, iat"),
    ({"fmae": {"bp5d": {"epochs": 2}}},
     r"finetune\.recipes\.fmae\.bp5d: unknown dataset 'bp5d'"),
    ({"fmae": {"bp4d": {"lr": 0.1}}},
     r"finetune\.recipes\.fmae\.bp4d\.lr: unknown recipe key; a recipe may set epochs, "
     r"warmup_epochs, blr"),
    ({"iat": {"bp4d": {"epochs": 2.5}}},
     r"finetune\.recipes\.iat\.bp4d\.epochs: expected an integer"),
    ({"iat": {"bp4d": {"blr": 0}}}, r"finetune\.recipes\.iat\.bp4d\.blr: 0\.0 is out of range"),
    ({"iat": {"bp4d": {"epochs": 2}}},  # the section's warmup (3) exceeds the recipe's epochs
     r"finetune\.recipes\.iat\.bp4d: warmup_epochs exceeds epochs \(2\)"),
    ({"iat": {"bp4d": {}}}, r"finetune\.recipes\.iat\.bp4d: expected a mapping of some of"),
    ({"iat": [1]}, r"finetune\.recipes\.iat: expected a mapping of dataset -> recipe"),
])
def test_recipe_validation_names_the_key(recipes, msg):
    with pytest.raises(ParamsError, match=msg):
        params_with(epochs=10, warmup_epochs=3, recipes=recipes)


def test_recipe_errors_come_from_load_params(tmp_path):
    d = yaml.safe_load((ROOT / "params.yaml").read_text())
    d["finetune"]["recipes"]["iat"] = {"synthetic": {"warmup": 1}}
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(d))
    with pytest.raises(ParamsError, match=r"p\.yaml: finetune\.recipes\.iat\.synthetic\.warmup"):
        load_params(tmp_path / "p.yaml")


def test_saved_backbone_epochs_are_checked_against_the_longest_run():
    # a recipe longer than the section lets the list reach its epochs; shorter runs skip them
    p = params_with(epochs=8, warmup_epochs=1, save_backbone_epochs=[0, 8, 12],
                    recipes={"iat": {"bp4d": {"epochs": 12}}})
    assert effective_recipe(p.finetune, "bp4d", "iat").save_backbone_epochs == [0, 8, 12]
    assert effective_recipe(p.finetune, "bp4d", "fmae").save_backbone_epochs == [0, 8]
    with pytest.raises(ParamsError, match=r"save_backbone_epochs: 13 is not an epoch between 0 "
                                          r"and finetune\.epochs \(8\) or the longest "
                                          r"recipe's \(12\)"):
        params_with(epochs=8, warmup_epochs=1, save_backbone_epochs=[13],
                    recipes={"iat": {"bp4d": {"epochs": 12}}})


# --------------------------------------------------------------------------- seeds
def test_seeds_default_to_the_top_level_seed_and_paper_uses_three():
    assert run_seeds(load_params(ROOT / "params.yaml")) == [0]
    assert run_seeds(load_params(PAPER)) == [0, 1, 2]
    assert run_seeds(build(Params, {"seed": 5, "finetune": {"extra_seeds": [7, 6]}})) == [5, 7, 6]


@pytest.mark.parametrize("data, msg", [
    ({"finetune": {"extra_seeds": [1, 1]}}, r"finetune\.extra_seeds lists a value twice"),
    ({"finetune": {"extra_seeds": [-1]}}, r"finetune\.extra_seeds: -1 must be an integer >= 0"),
    ({"finetune": {"extra_seeds": [True]}}, r"finetune\.extra_seeds: True must be an integer"),
    ({"seed": 1, "finetune": {"extra_seeds": [1, 2]}},
     r"finetune\.extra_seeds: 1 is the top-level seed"),
])
def test_seeds_are_validated(data, msg):
    with pytest.raises(ParamsError, match=msg):
        build(Params, data)


# --------------------------------------------------------------------------- the DVC DAG
def _stage_params(workdir: Path, params: dict) -> dict[str, dict]:
    """``{stage: {param key: value}}`` as DVC resolves dvc.yaml's params lists against
    ``params`` (a params.yaml mapping), in a fresh DVC repo holding a copy of dvc.yaml."""
    from dvc.dependency.param import ParamsDependency
    from dvc.repo import Repo

    workdir.mkdir(exist_ok=True)
    shutil.copy(ROOT / "dvc.yaml", workdir / "dvc.yaml")
    (workdir / "params.yaml").write_text(yaml.safe_dump(params))
    if not (workdir / ".dvc").is_dir():
        Repo.init(str(workdir), no_scm=True)
    with Repo(str(workdir)) as repo:
        out = {}
        for stage in repo.index.stages:
            values: dict = {}
            for dep in stage.deps:
                if isinstance(dep, ParamsDependency):
                    values.update(dep.read_params())
            out[stage.name] = values
        return out


def _changed(tmp_path: Path, mutate, before: dict) -> set[str]:
    """Stages whose params values differ from ``before`` (see :func:`_stage_params`) after
    ``mutate`` edits the paper profile; stages only one side has count as changed."""
    after = yaml.safe_load(PAPER.read_text())
    mutate(after)
    b = _stage_params(tmp_path, after)
    return {s for s in before.keys() | b.keys() if before.get(s) != b.get(s)}


def _kind(stage: str) -> str:
    return stage.split("@")[0]


IAT_KINDS = {"finetune_iat", "finetune_iat_seeds", "finetune_sweep_depth", "tables"}


@pytest.mark.slow
def test_changing_lambda_reruns_the_iat_branch_only(tmp_path):
    base = _stage_params(tmp_path / "base", yaml.safe_load(PAPER.read_text()))
    assert sum(_kind(s) == "finetune_fmae_seeds" for s in base) == 20  # 10 runs x seeds 1, 2
    changed = _changed(tmp_path / "l", lambda d: d.update({"lambda": 0.5}), base)
    assert {_kind(s) for s in changed} == IAT_KINDS
    # every IAT run (10 main, 20 extra-seed) is affected, no FMAE one
    assert sum(_kind(s) == "finetune_iat" for s in changed) == 10
    assert sum(_kind(s) == "finetune_iat_seeds" for s in changed) == 20
    per_ds = _changed(tmp_path / "ds", lambda d: d["finetune"]["lambda_per_dataset"].update(
        disfa=0.25), base)
    assert {_kind(s) for s in per_ds} == IAT_KINDS
    recipe = _changed(tmp_path / "r", lambda d: d["finetune"]["recipes"]["iat"]["bp4d"].update(
        blr=1e-4), base)
    assert {_kind(s) for s in recipe} == {"finetune_iat", "finetune_iat_seeds",
                                          "finetune_sweep_lambda", "finetune_sweep_depth",
                                          "tables"}
    fmae = _changed(tmp_path / "f", lambda d: d["finetune"]["recipes"]["fmae"]["bp4d"].update(
        blr=1e-4), base)
    assert {_kind(s) for s in fmae} == {"finetune_fmae", "finetune_fmae_seeds", "tables"}
    # a third seed adds its stages; of the existing ones only tables (which reads all) changes
    seeds = _changed(tmp_path / "s", lambda d: d["finetune"].update(extra_seeds=[1, 2, 3]), base)
    assert {s for s in seeds if s in base} == {"tables"}
    assert {s for s in seeds if s not in base} == {
        f"finetune_{v}_seeds@{r}-3" for v in ("fmae", "iat")
        for r in yaml.safe_load(PAPER.read_text())["finetune"]["runs"]}


# finetune keys each stage kind must NOT depend on (everything else it must)
NOT_A_DEP = {
    "finetune_fmae": {"runs", "id_head_depth", "id_loss", "id_classes", "id_head_init",
                      "sweep_lambdas", "sweep_id_head_depths", "sweep_runs",
                      "lambda_per_dataset", "recipes.iat", "extra_seeds"},
    "finetune_iat": {"runs", "sweep_lambdas", "sweep_id_head_depths", "sweep_runs",
                     "recipes.fmae", "extra_seeds"},
    "finetune_fmae_seeds": {"runs", "id_head_depth", "id_loss", "id_classes", "id_head_init",
                            "sweep_lambdas", "sweep_id_head_depths", "sweep_runs",
                            "lambda_per_dataset", "recipes.iat", "extra_seeds",
                            "save_backbone_epochs"},
    "finetune_iat_seeds": {"runs", "sweep_lambdas", "sweep_id_head_depths", "sweep_runs",
                           "recipes.fmae", "extra_seeds", "save_backbone_epochs"},
    "finetune_sweep_lambda": {"runs", "sweep_lambdas", "sweep_id_head_depths", "sweep_runs",
                              "recipes.fmae", "extra_seeds", "lambda_per_dataset"},
    "finetune_sweep_depth": {"runs", "sweep_lambdas", "sweep_id_head_depths", "sweep_runs",
                             "recipes.fmae", "extra_seeds", "id_head_depth"},
}


def test_every_finetune_key_is_a_dep_of_the_stages_it_affects():
    """A finetune key added to params.py must be listed in dvc.yaml (or above, on purpose),
    or changing it would not re-run the finetune stages."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    keys = [f.name for f in dataclasses.fields(FinetuneParams) if f.name != "recipes"]
    keys += ["recipes.fmae", "recipes.iat"]
    for kind, excluded in NOT_A_DEP.items():
        listed = {str(p) for p in stages[kind]["params"]}
        assert "finetune" not in listed, f"{kind}: list finetune keys one by one"
        deps = {k[len("finetune."):] for k in listed if k.startswith("finetune.")}
        assert deps == set(keys) - excluded, kind
        assert ("lambda" in listed) == ("lambda_per_dataset" in deps), kind
        assert ("lambda" in listed) == (kind in {"finetune_iat", "finetune_iat_seeds",
                                                 "finetune_sweep_depth"}), kind


# --------------------------------------------------------------------------- a tiny run
@pytest.fixture
def tiny(monkeypatch, tmp_path):
    spec = importlib.util.spec_from_file_location("_ft_fixtures", ROOT / "tests" /
                                                  "test_finetune.py")
    fx = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fx)
    from pipeline.models import vit
    monkeypatch.setitem(vit.VIT_SIZES, "tiny", fx.TINY)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.chdir(tmp_path)
    au_root = tmp_path / "au_shards"
    fx.make_au_shards(au_root)
    return au_root, fx.make_checkpoint(tmp_path / "ckpt.pt")


@pytest.mark.slow
def test_stage_runs_with_the_effective_lambda_recipe_and_seed(tiny, tmp_path):
    au_root, ckpt = tiny
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({
        "lambda": 2.0, "model_size": "tiny", "pretrain": {"image_size": 32, "patch_size": 8},
        "finetune": {"image_size": 32, "epochs": 1, "warmup_epochs": 0, "batch_size": 8,
                     "save_backbone_epochs": [0, 1, 2], "num_workers": 0,
                     "lambda_per_dataset": {"synthetic": 0.25},
                     "recipes": {"fmae": {}, "iat": {"synthetic": {"epochs": 2, "blr": 1e-3}}},
                     "extra_seeds": [3]}}))
    from stages import finetune as stage
    runs = {}
    for variant, extra in (("iat", ["--seed", "3", "--no-backbones"]), ("fmae", [])):
        out = tmp_path / variant
        assert stage.main(["--params", str(params), "--run", "synthetic-1", "--variant", variant,
                           "--au-shards", str(au_root), "--pretrained", str(ckpt),
                           "--out", str(out)] + extra) == 0
        runs[variant] = (out, json.loads((out / "metrics.json").read_text()))
    out, m = runs["iat"]
    assert (m["lambda"], m["seed"], m["recipe"]) == (
        0.25, 3, {"epochs": 2, "warmup_epochs": 0, "blr": 1e-3})
    assert m["unknown_labels"] == "mask" and m["final"]["epoch"] == 2
    assert not (out / "backbones").exists()  # extra-seed repeats save none
    info = json.loads((out / "run_info.json").read_text())
    assert info["params"]["finetune"]["epochs"] == 2 and info["params"]["seed"] == 3
    out, m = runs["fmae"]
    assert (m["lambda"], m["seed"], m["recipe"]["epochs"], m["recipe"]["blr"]) == (
        0.0, 0, 1, 5e-3)
    assert sorted(p.name for p in (out / "backbones").iterdir()) == [
        "epoch_000.pt", "epoch_001.pt"]  # epoch 2 is past this run's end
    import mlflow
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    df = mlflow.search_runs(experiment_names=["fmae-iat"])
    iat = df[df["tags.variant"] == "iat"].iloc[0]
    assert iat["tags.mlflow.runName"] == "iat/synthetic-1/seed=3"
    assert (float(iat["params.lambda"]), int(iat["params.seed"]),
            int(iat["params.finetune.epochs"]), float(iat["params.finetune.blr"])) == (
        0.25, 3, 2, 1e-3)
