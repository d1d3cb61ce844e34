"""Tables stage: fold means, gains, both protocols, file formats, published rows, report.

Run folders are hand-made in the docs/design.md finetune format (metrics.json, history.csv,
predictions.parquet). The final-epoch F1 in each metrics.json is computed from the fixture's
predictions with scikit-learn, so the stage's cross-check has real numbers to agree with.
"""
import csv
import json
import re
import shutil

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import f1_score

from pipeline.params import Params, build
from pipeline.published import AU_TABLES, BP4D_AUS
from pipeline.report import Table, to_csv, to_latex, to_markdown
from pipeline.tables import PROTO_FINAL, PROTO_PAPER, build_tables
from pipeline.tracking import Tracker

SYN_AUS = [1, 2, 4, 6]
EPOCHS = 3
PAPER_BONUS = {"fmae": 2.0, "iat": 4.5}  # paper-protocol F1 = final F1 + this, per AU


def make_run(d, dataset, fold, variant, aus, seed, lam=2.0, depth=1):
    """A finetune run folder; returns its metrics dict."""
    rng = np.random.default_rng(seed)
    d.mkdir(parents=True)
    n = 50
    pred_rows = []
    for e in range(1, EPOCHS + 1):
        for i in range(n):
            row = {"epoch": e, "key": f"k{i}", "subject": f"S{i % 5}"}
            for a in aus:
                row[f"prob_AU{a}"] = float(rng.random())
                row[f"label_AU{a}"] = int(rng.choice([-1, 0, 1, 1]))
            pred_rows.append(row)
    pred = pd.DataFrame(pred_rows)
    pred.to_parquet(d / "predictions.parquet")
    last = pred[pred["epoch"] == EPOCHS]
    f1 = {}
    for a in aus:
        keep = last[f"label_AU{a}"] >= 0
        f1[f"AU{a}"] = 100 * f1_score(last.loc[keep, f"label_AU{a}"],
                                      last.loc[keep, f"prob_AU{a}"] >= 0.5)
    paper = {k: v + PAPER_BONUS[variant] for k, v in f1.items()}
    metrics = {
        "dataset": dataset, "fold": fold, "variant": variant,
        "lambda": lam if variant == "iat" else 0.0,
        "id_head_depth": depth if variant == "iat" else None, "aus": aus,
        "final": {"f1_mean": float(np.mean(list(f1.values()))), "auc_mean": 70.0, "f1": f1,
                  "auc": {k: 70.0 for k in f1}, "epoch": EPOCHS},
        "paper_protocol": {"f1_mean": float(np.mean(list(paper.values()))), "f1": paper,
                           "threshold": 0.4, "epoch": 2},
        "val_selected": None, "final_id_loss": 2.5 + seed % 3, "convergence_epoch": 2,
        "model_size": "tiny",
    }
    (d / "metrics.json").write_text(json.dumps(metrics))
    pd.DataFrame({"epoch": list(range(1, EPOCHS + 1)), "lr": 1e-4, "au_loss": 0.5,
                  "id_loss": 2.0, "id_acc": 0.3, "f1_mean": [40.0, 45.0, 47.0],
                  "auc_mean": 70.0, "best_threshold": 0.4,
                  "best_threshold_f1_mean": [44.0, 48.0, 49.0]}).to_csv(d / "history.csv",
                                                                        index=False)
    return metrics


def make_params(**finetune) -> Params:
    return build(Params, {"download": {"au_datasets": ["synthetic", "bp4d"]},
                          "finetune": {"runs": ["synthetic-1", "synthetic-2", "bp4d-1",
                                                "bp4d-2"], **finetune}})


def make_finetune(root):
    written = {}
    for v_i, variant in enumerate(("fmae", "iat")):
        for run, aus in (("synthetic-1", SYN_AUS), ("synthetic-2", SYN_AUS),
                         ("bp4d-1", list(BP4D_AUS)), ("bp4d-2", list(BP4D_AUS))):
            ds, fold = run.split("-")
            written[(variant, run)] = make_run(root / variant / run, ds, int(fold), variant,
                                               aus, seed=10 * v_i + int(fold) + len(aus))
    return written


def make_probe(root):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    # authors' recipe (test, train) and converged (test, train) accuracy per epoch
    for variant, rec, rec_train, conv in (
            ("fmae", {"0": 30.0, "1": 60.0, "3": 80.0}, {"0": 95.0, "1": 96.0, "3": 99.0},
             {"0": 70.0, "1": 90.0, "3": 96.0}),
            ("iat", {"0": 30.0, "1": 10.0, "3": 20.0}, {"0": 95.0, "1": 40.0, "3": 50.0},
             {"0": 70.0, "1": 60.0, "3": 64.0})):
        (root / variant).mkdir(parents=True)
        for run in ("synthetic-1", "synthetic-2"):
            (root / variant / f"{run}.json").write_text(json.dumps(
                {"epochs": rec, "train_accuracy": rec_train,
                 "converged": {"epochs": conv, "train_accuracy": {e: 100.0 for e in conv}},
                 "underfit": {"recipe": [int(e) for e, a in rec_train.items() if a < 90],
                              "converged": []}, "underfit_below": 90.0,
                 "chance": 20.0, "n_subjects": 5, "n_train": 35, "n_test": 15}))
    fig, ax = plt.subplots(figsize=(2, 2))
    ax.plot([0, 1], [0, 1])
    fig.savefig(root / "identity_vs_epoch.png")
    plt.close(fig)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("tables")
    written = make_finetune(root / "finetune")
    make_probe(root / "probe")
    out = root / "tables"
    metrics = build_tables(root / "finetune", root / "probe", out, make_params(),
                           Tracker(active=False))
    return {"root": root, "out": out, "metrics": metrics, "written": written}


def _expected_mean(written, variant, ds, key):
    runs = [m for (v, r), m in written.items() if v == variant and r.startswith(ds + "-")]
    aus = runs[0]["aus"]
    return np.mean([np.mean([m[key]["f1"][f"AU{a}"] for m in runs]) for a in aus])


def test_fold_means_and_gain(built):
    m, w = built["metrics"], built["written"]
    for ds in ("synthetic", "bp4d"):
        for key in ("final", "paper_protocol"):
            fm, it = (_expected_mean(w, v, ds, key) for v in ("fmae", "iat"))
            # metrics.json keeps 4 decimals
            assert m["f1"][ds]["fmae"][key] == pytest.approx(fm, abs=1e-3)
            assert m["f1"][ds]["iat"][key] == pytest.approx(it, abs=1e-3)
            assert m["f1"][ds]["gain"][key] == pytest.approx(it - fm, abs=1e-3)
        assert m["f1"][ds]["folds"] == 2
    on_disk = json.loads((built["out"] / "metrics.json").read_text())
    assert on_disk["f1"]["synthetic"]["gain"]["paper_protocol"] == pytest.approx(
        m["f1"]["synthetic"]["gain"]["paper_protocol"])
    assert on_disk["probe"]["synthetic"] == {
        "chance": 20.0,
        "fmae": {"recipe": 80.0, "recipe_train": 99.0, "converged": 96.0, "converged_train": 100.0},
        "iat": {"recipe": 20.0, "recipe_train": 50.0, "converged": 64.0, "converged_train": 100.0}}
    probe_md = (built["out"] / "identity_probe.md").read_text()
    # the underfitting recipe probe of FMAE-IAT is flagged, with the adversary's ID loss
    assert "underfits in 2/2 folds" in probe_md
    iat_recipe = next(line for line in probe_md.splitlines()
                      if "FMAE-IAT" in line and "authors' recipe" in line and "ours" in line)
    id_loss = np.mean([m["final_id_loss"] for (v, r), m in built["written"].items()
                       if v == "iat" and r.startswith("synthetic-")])
    assert f"| {id_loss:.3f} |" in iat_recipe  # the adversary's final ID loss, fold mean


def test_both_protocols_labelled_and_published_only_for_real_datasets(built):
    out = built["out"]
    syn = (out / "table1_synthetic.md").read_text()
    bp4d = (out / "table1_bp4d.md").read_text()
    for text in (syn, bp4d):
        assert PROTO_FINAL in text and PROTO_PAPER in text
    assert not [r for r in _md_rows(syn) if "published" in " ".join(r)]
    assert len([r for r in _md_rows(bp4d) if r[1] == "published (paper protocol)"]) == 4
    pub_fmae = next(r for r in AU_TABLES["bp4d"]["rows"] if r.method == "FMAE-IAT")
    line = next(l for l in bp4d.splitlines() if l.startswith("| FMAE-IAT (published)"))
    assert f"| {pub_fmae.avg:.1f} |" in line and f"| {pub_fmae.f1[1]:.1f} |" in line
    # Published rows sit beside ours in the same columns (AU1..AU24, Avg.).
    header = bp4d.splitlines()[2]
    assert header.count("| AU") == len(BP4D_AUS)


def _md_rows(text):
    rows = [l for l in text.splitlines() if l.startswith("|")]
    return [[c.strip() for c in re.split(r"(?<!\\)\|", r)[1:-1]] for r in rows[2:]]


def test_markdown_csv_and_latex_agree(built):
    out = built["out"]
    for name in ("table1_synthetic", "table1_bp4d", "ablation_lambda", "identity_probe"):
        md = _md_rows((out / f"{name}.md").read_text())
        with open(out / f"{name}.csv", newline="") as f:
            rows = list(csv.reader(f))[1:]
        tex = (out / f"{name}.tex").read_text()
        assert len(md) == len(rows) > 0
        for m_row, c_row in zip(md, rows):
            assert len(m_row) == len(c_row)
            for m_cell, c_cell in zip(m_row, c_row):
                if c_cell == "":
                    assert m_cell == "–"
                    continue
                try:
                    assert float(m_cell) == pytest.approx(float(c_cell), abs=0.051)
                    assert m_cell in tex
                except ValueError:
                    assert m_cell == c_cell
    # The overall mean in the synthetic table equals the headline metric, in all formats.
    fm = built["metrics"]["f1"]["synthetic"]["fmae"]["final"]
    md_text = (out / "table1_synthetic.md").read_text()
    assert f"{fm:.1f}" in md_text and f"{fm:.1f}" in (out / "table1_synthetic.tex").read_text()


def test_report_is_self_contained(built):
    html = (built["out"] / "report.html").read_text()
    assert '<img alt="' in html and 'src="data:image/png;base64,' in html
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", html)
    assert "<link" not in html and "<script" not in html
    # Our figures and the probe's figure are all inline.
    assert html.count("data:image/png;base64,") >= 4  # figure5 x2, figure2, probe
    assert "Identity accuracy vs AU-training epoch" in html
    for name in ("figure2_model_size.png", "figure5_f1_synthetic.png", "figure5_f1_bp4d.png"):
        assert (built["out"] / name).read_bytes()[:4] == b"\x89PNG"
    assert "agrees with predictions.parquet" in html


def test_ablations_say_not_run_without_sweeps(built):
    out = built["out"]
    lam = (out / "ablation_lambda.md").read_text()
    depth = (out / "ablation_id_head_depth.md").read_text()
    assert "not run; set finetune.sweep_lambdas" in lam
    assert "not run; set finetune.sweep_id_head_depths" in depth
    assert "published (Table 5)" in lam and "published (Table 7)" in depth
    assert "not run; set finetune.sweep_lambdas" in (out / "report.html").read_text()


def test_ablations_from_sweep_runs_and_mismatch_check(tmp_path):
    ft = tmp_path / "finetune"
    written = make_finetune(ft)
    s05 = make_run(ft / "sweep_lambda" / "synthetic-1" / "lambda0.5", "synthetic", 1, "iat",
                   SYN_AUS, seed=40, lam=0.5)
    s3 = make_run(ft / "sweep_depth" / "synthetic-1" / "depth3", "synthetic", 1, "iat", SYN_AUS,
                  seed=41, lam=2.0, depth=3)
    # A stale folder for a value no longer in params is ignored.
    make_run(ft / "sweep_lambda" / "synthetic-1" / "lambda9.0", "synthetic", 1, "iat", SYN_AUS,
             seed=42, lam=9.0)
    # Tamper with one run's reported F1: the cross-check must notice.
    p = ft / "iat" / "synthetic-2" / "metrics.json"
    m = json.loads(p.read_text())
    m["final"]["f1"]["AU2"] += 7.0
    p.write_text(json.dumps(m))
    params = make_params(sweep_lambdas=[0.5], sweep_id_head_depths=[3],
                         sweep_runs=["synthetic-1"])
    out = tmp_path / "tables"
    build_tables(ft, tmp_path / "no_probe", out, params, Tracker(active=False))

    with open(out / "ablation_lambda.csv", newline="") as f:
        lam_rows = [r for r in csv.DictReader(f) if r["Source"].startswith("ours")]
    assert [float(r["λ"]) for r in lam_rows] == [0.0, 0.5, 2.0]  # main FMAE, sweep, main IAT
    base = written[("fmae", "synthetic-1")]["paper_protocol"]["f1_mean"]
    r05 = next(r for r in lam_rows if float(r["λ"]) == 0.5)
    assert float(r05["Δ vs λ=0 (paper)"]) == pytest.approx(
        s05["paper_protocol"]["f1_mean"] - base, abs=1e-3)
    with open(out / "ablation_id_head_depth.csv", newline="") as f:
        d_rows = [r for r in csv.DictReader(f) if r["Source"].startswith("ours")]
    assert [int(r["ID head depth"]) for r in d_rows] == [1, 3]
    assert float(d_rows[1]["Final ID loss"]) == pytest.approx(s3["final_id_loss"])
    assert "9" not in {r["λ"] for r in lam_rows}

    html = (out / "report.html").read_text()
    assert "synthetic-2" in html and "disagrees" in html and "AU2" in html
    assert "not run (no probe results" in (out / "identity_probe.md").read_text()


def test_table_writers_escape_and_reject_ragged_rows():
    t = Table("t", "A | B & C_1", ["Method", "x"], [["a|b", 1.25], ["c_d & e", None]], digits=1)
    md = to_markdown(t)
    assert "a\\|b" in md and "| – |" in md
    assert r"c\_d \& e" in to_latex(t) and r"A | B \& C\_1" in to_latex(t)
    assert to_csv(t).splitlines()[1:] == ['a|b,1.25', 'c_d & e,']
    with pytest.raises(ValueError, match="3 cells for 2 columns"):
        t.add(["x", 1, 2])


def test_seeds_give_mean_and_std_over_seeds_and_notes(tmp_path):
    """Runs repeated with finetune.extra_seeds: Avg. is the mean over seeds of the fold
    means, Std (seeds) their sample std; recipes and BP4D label handling are noted."""
    root = tmp_path / "finetune"
    written = {}
    for seed, folder in ((0, root), (1, root / "seed1"), (2, root / "seed2")):
        for v_i, variant in enumerate(("fmae", "iat")):
            for run in ("bp4d-1", "bp4d-2"):
                d = folder / variant / run
                m = make_run(d, "bp4d", int(run[-1]), variant, list(BP4D_AUS),
                             seed=100 * seed + 10 * v_i + int(run[-1]))
                m.update(seed=seed, unknown_labels="negative",
                         recipe={"epochs": 20 if variant == "fmae" else 30,
                                 "warmup_epochs": 2 if variant == "fmae" else 3,
                                 "blr": 2e-4 if variant == "fmae" else 5e-4})
                (d / "metrics.json").write_text(json.dumps(m))
                written[(seed, variant, run)] = m
    params = build(Params, {"download": {"au_datasets": ["bp4d"]},
                            "finetune": {"runs": ["bp4d-1", "bp4d-2"], "extra_seeds": [1, 2],
                                         "unknown_labels": "negative"}})
    out = tmp_path / "tables"
    metrics = build_tables(root, tmp_path / "no_probe", out, params, Tracker(active=False))
    for variant in ("fmae", "iat"):
        for key in ("final", "paper_protocol"):
            per_seed = [np.mean([written[(s, variant, r)][key]["f1_mean"]
                                 for r in ("bp4d-1", "bp4d-2")]) for s in (0, 1, 2)]
            got = metrics["f1"]["bp4d"][variant]
            assert got[key] == pytest.approx(np.mean(per_seed), abs=1e-3)
            assert got[f"{key}_std"] == pytest.approx(np.std(per_seed, ddof=1), abs=1e-3)
    assert metrics["f1"]["bp4d"]["seeds"] == 3 and metrics["f1"]["bp4d"]["folds"] == 2
    md = (out / "table1_bp4d.md").read_text()
    row = next(r for r in _md_rows(md) if r[0] == "FMAE (ours)" and r[1] == PROTO_FINAL)
    assert row[-4:] == [f"{metrics['f1']['bp4d']['fmae']['final']:.1f}",
                        f"{metrics['f1']['bp4d']['fmae']['final_std']:.1f}", "2", "3"]
    assert "Seeds 0, 1, 2" in md
    assert "FMAE recipe: 20 epochs (2 warmup), blr 0.0002" in md
    assert "FMAE-IAT recipe: 30 epochs (3 warmup), blr 0.0005" in md
    assert "counted as absent (finetune.unknown_labels: negative" in md
    summary = _md_rows((out / "summary.md").read_text())
    assert summary[0][3] == f"{metrics['f1']['bp4d']['fmae']['final_std']:.1f}"
    # a missing seed run names the stage that writes it
    shutil.rmtree(root / "seed2" / "iat" / "bp4d-1")
    with pytest.raises(FileNotFoundError, match=r"seed2/iat/bp4d-1.*dvc repro "
                                                r"finetune_iat_seeds"):
        build_tables(root, tmp_path / "no_probe", tmp_path / "t2", params, Tracker(active=False))


def test_single_seed_shows_no_std(built):
    md = (built["out"] / "table1_bp4d.md").read_text()
    row = next(r for r in _md_rows(md) if r[0] == "FMAE (ours)" and r[1] == PROTO_FINAL)
    assert row[-3:] == ["–", "2", "1"]  # Std (seeds), Folds, Seeds
    assert not re.search(r"Seeds \d", md) and "_std" not in json.dumps(built["metrics"])
    # runs without "unknown_labels" in metrics.json: the params' handling is noted
    assert "Not-coded AU labels (BP4D's 9): masked out of loss and metrics" in md


def test_protocol_notes_name_head_inits_that_are_not_the_references():
    from pathlib import Path

    from pipeline.runs import RunResult
    from pipeline.tables import protocol_notes

    def run(variant, **m):
        return RunResult(run="synthetic-1", dataset="synthetic", fold=1, variant=variant,
                         path=Path("."), metrics=m, history=None)

    reference = protocol_notes("synthetic", [run("fmae", au_head_init="default")],
                               [run("iat", au_head_init="default", id_head_init="default")])
    assert not any("head" in n for n in reference)
    cpu = protocol_notes("synthetic", [run("fmae", au_head_init="prior")],
                         [run("iat", au_head_init="prior", id_head_init="prior")])
    assert any("AU head" in n and "au_head_init: prior" in n for n in cpu)
    assert any(n.startswith("ID head init: prior (finetune.id_head_init") for n in cpu)
    # runs written before the key existed say nothing about it
    assert not any("head" in n for n in protocol_notes("synthetic", [run("fmae")], []))
