"""AU metrics against scikit-learn, the global threshold search and epoch selection."""
from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import f1_score, roc_auc_score

from pipeline import metrics as M


def _data(n: int = 300, a: int = 4, seed: int = 0):
    rng = np.random.default_rng(seed)
    labels = (rng.random((n, a)) < 0.3).astype(np.int64)
    # Informative but noisy scores, rounded so that ties occur.
    probs = np.clip(0.35 * labels + rng.random((n, a)) * 0.65, 0, 1).round(2)
    labels[rng.random((n, a)) < 0.2] = -1  # 20 % not coded
    return probs, labels


def _sk_f1(probs, labels, t):
    out = []
    for j in range(labels.shape[1]):
        k = labels[:, j] >= 0
        out.append(f1_score(labels[k, j], (probs[k, j] >= t).astype(int), zero_division=0))
    return np.array(out)


@pytest.mark.parametrize("t", [0.2, 0.5, 0.73])
def test_f1_matches_sklearn_with_unknown_masked(t):
    probs, labels = _data()
    np.testing.assert_allclose(M.f1_per_au(probs, labels, t), _sk_f1(probs, labels, t))


def test_f1_hand_made_case():
    probs = np.array([[0.9, 0.1], [0.6, 0.8], [0.2, 0.4], [0.7, 0.3]])
    labels = np.array([[1, 0], [0, -1], [1, 0], [-1, 0]])
    # AU a: known rows 0,1,2 -> preds 1,1,0 vs labels 1,0,1: tp1 fp1 fn1 -> F1 0.5.
    # AU b: known rows 0,2,3, all negative and predicted negative -> 0 (sklearn default).
    np.testing.assert_allclose(M.f1_per_au(probs, labels), [0.5, 0.0])
    # The unknown row 1 of AU b would be a false positive if it were counted.
    assert M.f1_per_au(probs, np.where(labels < 0, 0, labels))[1] == 0.0
    # An AU with no known label at all is NaN and left out of the mean.
    f1 = M.f1_per_au(probs, np.array([[1, -1], [0, -1], [1, -1], [-1, -1]]))
    assert f1[0] == 0.5 and math.isnan(f1[1])
    assert M.nanmean(f1) == 0.5


def test_auc_matches_sklearn_with_ties_and_masks():
    probs, labels = _data(seed=1)
    got = M.auc_per_au(probs, labels)
    for j in range(labels.shape[1]):
        k = labels[:, j] >= 0
        assert got[j] == pytest.approx(roc_auc_score(labels[k, j], probs[k, j]), abs=1e-12)


def test_auc_single_class_is_nan_and_excluded():
    probs, labels = _data(seed=2)
    labels[:, 1] = np.where(labels[:, 1] >= 0, 0, -1)  # AU 2: only negatives known
    auc = M.auc_per_au(probs, labels)
    assert math.isnan(auc[1]) and np.isfinite(auc[[0, 2, 3]]).all()
    rep = M.au_report(probs, labels, [1, 2, 4, 6])
    assert rep["auc"]["AU2"] is None
    assert rep["auc_mean"] == pytest.approx(np.mean(auc[[0, 2, 3]]), abs=1e-6)
    assert rep["f1_mean"] == pytest.approx(100 * np.mean(_sk_f1(probs, labels, 0.5)), abs=1e-3)


def test_best_global_threshold_is_the_grid_maximum():
    probs, labels = _data(seed=3)
    grid = np.round(np.arange(1, 100) / 100, 2)
    sk = np.array([_sk_f1(probs, labels, t).mean() for t in grid])
    t, f = M.best_global_threshold(probs, labels)
    assert f == pytest.approx(sk.max())
    assert sk[np.flatnonzero(np.isclose(grid, t))[0]] == pytest.approx(sk.max())
    # Scores squeezed below 0.5: the best threshold moves down and beats 0.5.
    t2, f2 = M.best_global_threshold(probs * 0.4, labels)
    assert t2 < 0.4 and f2 > M.nanmean(M.f1_per_au(probs * 0.4, labels, 0.5))


def _rep(f1_mean, thr=0.5):
    return {"f1_mean": f1_mean, "auc_mean": 0.5, "f1": {"AU1": f1_mean}, "auc": {"AU1": 0.5},
            "threshold": thr}


def test_epoch_summaries():
    epochs = [
        {"epoch": 1, "test": _rep(40.0), "test_best": _rep(45.0, 0.3), "val": _rep(30.0)},
        {"epoch": 2, "test": _rep(55.0), "test_best": _rep(58.0, 0.4), "val": _rep(50.0)},
        {"epoch": 3, "test": _rep(50.0), "test_best": _rep(60.0, 0.2), "val": _rep(45.0)},
    ]
    assert M.final_summary(epochs) == {"f1_mean": 50.0, "auc_mean": 0.5, "f1": {"AU1": 50.0},
                                       "auc": {"AU1": 0.5}, "epoch": 3}
    pp = M.paper_protocol_summary(epochs)
    assert (pp["epoch"], pp["threshold"], pp["f1_mean"]) == (3, 0.2, 60.0)
    vs = M.val_selected_summary(epochs)
    assert (vs["epoch"], vs["f1_mean"], vs["val_f1_mean"]) == (2, 55.0, 50.0)
    assert M.convergence_epoch(epochs) == 2
    assert M.val_selected_summary([{**e, "val": None} for e in epochs]) is None


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="must both be"):
        M.f1_per_au(np.zeros((3, 2)), np.zeros((3, 3)))
