"""Scores against scikit-learn and SciPy references, bootstrap intervals, table and plots."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy.stats import pearsonr
from sklearn.metrics import r2_score, roc_auc_score

from raptorz.downstream.metrics import binary_auroc, evaluate, plot, score, table


def test_auroc_matches_scikit_learn_with_ties() -> None:
    rng = np.random.default_rng(0)
    truth = rng.integers(0, 2, 60)
    prediction = np.round(rng.random(60) + 0.3 * truth, 1)  # rounding makes ties
    assert binary_auroc(truth, prediction) == pytest.approx(roc_auc_score(truth, prediction),
                                                            abs=1e-12)
    assert np.isnan(binary_auroc(np.ones(5), rng.random(5)))


def test_multiclass_is_one_vs_rest_macro() -> None:
    rng = np.random.default_rng(1)
    truth = rng.integers(0, 3, 90)
    proba = rng.dirichlet(np.ones(3), 90) + np.eye(3)[truth] * 0.2
    proba /= proba.sum(axis=1, keepdims=True)
    auroc, accuracy = score("classification", truth[:, None].astype(float), proba)[0]
    assert auroc == pytest.approx(roc_auc_score(truth, proba, multi_class="ovr",
                                                average="macro"), abs=1e-12)
    assert accuracy == pytest.approx(np.mean(proba.argmax(axis=1) == truth))


def test_regression_scores_mask_missing_targets() -> None:
    rng = np.random.default_rng(2)
    truth = rng.normal(size=(50, 2))
    prediction = truth + rng.normal(scale=0.5, size=(50, 2))
    truth[::5, 1] = np.nan
    result = score("regression", truth, prediction)
    seen = ~np.isnan(truth[:, 1])
    assert result[0, 0] == pytest.approx(pearsonr(truth[:, 0], prediction[:, 0])[0] ** 2)
    assert result[1, 0] == pytest.approx(pearsonr(truth[seen, 1], prediction[seen, 1])[0] ** 2)
    assert result[1, 1] == pytest.approx(r2_score(truth[seen, 1], prediction[seen, 1]))


def test_bootstrap_intervals_are_seeded_and_cover_the_point() -> None:
    rng = np.random.default_rng(3)
    truth = rng.integers(0, 2, (80, 2)).astype(float)
    prediction = np.clip(truth * 0.3 + rng.random((80, 2)) * 0.8, 0, 1)
    first = evaluate("multilabel", ["a", "b"], truth, prediction, resamples=200, seed=5)
    assert first == evaluate("multilabel", ["a", "b"], truth, prediction, resamples=200, seed=5)
    assert first != evaluate("multilabel", ["a", "b"], truth, prediction, resamples=200, seed=6)
    for values in (first["targets"]["a"], first["targets"]["b"], first["mean"]):
        for metric in ("auroc", "accuracy"):
            v = values[metric]
            assert v["low"] < v["value"] < v["high"]
    mean = np.mean([first["targets"][t]["auroc"]["value"] for t in "ab"])
    assert first["mean"]["auroc"]["value"] == pytest.approx(mean)
    text = table(first)
    assert text.splitlines()[0].split() == ["target", "auroc", "accuracy"]
    assert [line.split()[0] for line in text.splitlines()[1:]] == ["a", "b", "mean"]


def test_plots_are_pngs(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    truth = rng.normal(size=(30, 3))
    plot("regression", ["x", "y", "z"], (), truth, truth + 0.1, tmp_path / "r.png")
    label = rng.integers(0, 3, (30, 1)).astype(float)
    plot("classification", ["grade"], ("a", "b", "c"), label, rng.dirichlet(np.ones(3), 30),
         tmp_path / "c.png")
    for name in ("r.png", "c.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
