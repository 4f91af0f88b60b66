"""Scores against scikit-learn and SciPy references, bootstrap intervals, table and plots."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import matplotlib
import numpy as np
import pytest
from scipy.stats import pearsonr
from sklearn.metrics import r2_score, roc_auc_score

from raptorz.downstream.metrics import (
    binary_auroc,
    bootstrap_indices,
    evaluate,
    plot,
    score,
    squared_pearson,
    table,
)


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


def test_constant_prediction_has_no_squared_pearson() -> None:
    """r^2 is undefined for a constant prediction: NaN, in ``score`` as per resample."""
    rng = np.random.default_rng(6)
    truth = rng.normal(size=(40, 2))
    # 0.1 is not exact in binary: its mean over rows differs from it by rounding, so a
    # naive Pearson r of this column is a tiny, meaningless number instead of NaN
    prediction = np.column_stack([np.full(40, 0.1), truth[:, 1] + rng.normal(size=40)])
    result = score("regression", truth, prediction)
    assert np.isnan(result[0, 0])
    residual = np.sum((truth[:, 0] - 0.1) ** 2) / np.sum((truth[:, 0] - truth[:, 0].mean()) ** 2)
    assert result[0, 1] == pytest.approx(1 - residual)  # R^2 is defined: below 0 here
    assert result[1, 0] == pytest.approx(pearsonr(truth[:, 1], prediction[:, 1])[0] ** 2)
    indices = bootstrap_indices(40, 25, 0)
    assert np.isnan(squared_pearson(truth[:, 0], prediction[:, 0], indices)).all()
    one_seen = squared_pearson(np.array([1.0, np.nan, 2.0]), np.array([1.0, 2.0, np.nan]))
    assert np.isnan(one_seen)
    reported = evaluate("regression", ["a", "b"], truth, prediction, resamples=25)
    assert reported["targets"]["a"]["pearson_r2"] == {"value": None, "low": None, "high": None}
    assert reported["mean"]["pearson_r2"]["value"] == pytest.approx(result[1, 0])


def test_bootstrap_resamples_are_the_documented_draw() -> None:
    """``evaluate`` scores the rows of ``bootstrap_indices`` (shared with ``raptorz score``)."""
    rng = np.random.default_rng(7)
    truth = rng.normal(size=(30, 1))
    prediction = truth + rng.normal(size=(30, 1))
    indices = bootstrap_indices(30, 50, 4)
    np.testing.assert_array_equal(indices, np.random.default_rng(4).integers(0, 30, (50, 30)))
    draws = squared_pearson(truth[:, 0], prediction[:, 0], indices)
    reported = evaluate("regression", ["y"], truth, prediction, resamples=50, seed=4)
    low, high = np.percentile(draws, [2.5, 97.5])
    assert reported["targets"]["y"]["pearson_r2"]["low"] == pytest.approx(low, abs=1e-12)
    assert reported["targets"]["y"]["pearson_r2"]["high"] == pytest.approx(high, abs=1e-12)


@pytest.fixture
def pdf_backend() -> Iterator[str]:
    """The pdf backend (not Agg) for the test's duration, as a user would have set theirs."""
    before = matplotlib.rcParams["backend"]
    matplotlib.use("pdf")
    yield "pdf"
    matplotlib.use(before)


def test_plots_leave_the_backend_and_pyplot_alone(
        tmp_path: Path, pdf_backend: str,
        synthetic: Callable[..., tuple[np.ndarray, list[str], np.ndarray]],
        write_embeddings: Callable[..., Path], write_labels: Callable[..., Path]) -> None:
    """A library plot draws on its own Figure: no backend switch, no pyplot figure left open."""
    import matplotlib.pyplot as plt

    from raptorz.downstream.pca import embedding_pca

    rng = np.random.default_rng(8)
    truth = rng.normal(size=(30, 2))
    plot("regression", ["x", "y"], (), truth, truth + 0.1, tmp_path / "r.png")
    assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"
    features, ids, split = synthetic(30, (3, 4, 5))
    store = write_embeddings(tmp_path / "e.zarr", features, ids)
    labels = write_labels(tmp_path / "l.csv", ids, split, {"y": features[:, 0, 0, 0]})
    figure = embedding_pca(store, labels)
    assert len(figure.axes) == 2  # the scatter and its colour bar
    assert matplotlib.get_backend() == pdf_backend
    assert plt.get_fignums() == []
