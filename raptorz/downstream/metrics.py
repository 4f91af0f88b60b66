"""Scores of a fitted head on the test split, with bootstrap intervals, a table and plots.

Classification is scored by AUROC (one-vs-rest, macro over classes) and accuracy, as the
Raptor paper reports it; regression by ``pearson_r2`` (the squared Pearson correlation,
as the original tool scores) and ``R2`` (the coefficient of determination). Every
metric is given per target and averaged over targets, each with a percentile bootstrap
95% interval over resamples of the test rows.

``raptorz fit`` (:func:`evaluate`) and ``raptorz score`` (:mod:`~raptorz.downstream.scoring`)
share one definition of each: :func:`squared_pearson`, :func:`bootstrap_indices` and
:func:`bootstrap_interval`, so both give the same numbers for the same predictions.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final, Literal

import numpy as np
from scipy.stats import rankdata

from raptorz.downstream.labels import FittedTask

CLASSIFICATION_METRICS: Final = ("auroc", "accuracy")
REGRESSION_METRICS: Final = ("pearson_r2", "R2")
#: Panels drawn at most per plot; further targets are left out of the figure (not the json).
MAX_PANELS: Final = 16
#: How a bootstrap interval is formed: see :func:`bootstrap_interval`.
Interval = Literal["percentile", "original"]
INTERVALS: Final = ("percentile", "original")
#: The percentiles of the ``percentile`` interval.
PERCENTILES: Final = (2.5, 97.5)
#: The original tool's half-width, in standard deviations of the bootstrap values
#: (``scripts/ucla/score_ukbb20252.py``: ``1.95 * np.std``).
ORIGINAL_HALF_WIDTH: Final = 1.95


def binary_auroc(truth: np.ndarray, score: np.ndarray) -> float:
    """Area under the ROC curve by the rank-sum identity (ties averaged); NaN for one class.

    Equal to :func:`sklearn.metrics.roc_auc_score` on binary ``truth``.
    """
    positive = truth.astype(bool)
    n_pos = int(positive.sum())
    n_neg = len(truth) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(score)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def squared_pearson(truth: np.ndarray, prediction: np.ndarray,
                    indices: np.ndarray | None = None) -> np.ndarray:
    """Squared Pearson correlation ``r^2`` of one target, over all rows or per resample.

    Rows where the truth or the prediction is missing are left out (of each resample).
    ``r^2`` is undefined, and NaN, where either side is constant (among others, a constant
    prediction) or fewer than two rows are seen: Pearson's r divides by both standard
    deviations. A constant prediction is not scored 0: that would be a number the formula
    does not give, and means over targets or resamples skip NaN instead. Float64 throughout.

    Parameters
    ----------
    truth, prediction
        ``(n,)`` values of one target.
    indices
        ``(resamples, m)`` row numbers, one resample per row (:func:`bootstrap_indices`);
        ``None``: all rows once.

    Returns
    -------
    ``(resamples,)`` or, with ``indices`` None, a 0-d array.
    """
    index = np.arange(len(truth))[None] if indices is None else indices
    y, p = np.asarray(truth, np.float64)[index], np.asarray(prediction, np.float64)[index]
    seen = ~(np.isnan(y) | np.isnan(p))
    count = seen.sum(axis=1)
    # Constancy is checked on the values, not on the deviations: the mean of equal values
    # can differ from them by rounding, which would make a tiny, meaningless correlation.
    constant = _constant(y, seen) | _constant(p, seen)
    y, p = np.where(seen, y, 0.0), np.where(seen, p, 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        dy = np.where(seen, y - (y.sum(axis=1) / count)[:, None], 0.0)
        dp = np.where(seen, p - (p.sum(axis=1) / count)[:, None], 0.0)
        r2 = (dy * dp).sum(axis=1) ** 2 / ((dy**2).sum(axis=1) * (dp**2).sum(axis=1))
    r2[constant | (count < 2) | ~np.isfinite(r2)] = np.nan
    return r2 if indices is not None else r2[0]


def _constant(values: np.ndarray, seen: np.ndarray) -> np.ndarray:
    """Per row of ``values``: whether its seen entries are all equal."""
    high = np.where(seen, values, -np.inf).max(axis=1)
    low = np.where(seen, values, np.inf).min(axis=1)
    return high == low


def bootstrap_indices(rows: int, resamples: int, seed: int) -> np.ndarray:
    """``(resamples, rows)`` row numbers, each row one resample of the rows with replacement.

    Drawn at once with ``numpy.random.default_rng(seed).integers``; ``raptorz fit`` and
    ``raptorz score`` both resample this way, so the same seed gives the same resamples.
    """
    return np.random.default_rng(seed).integers(0, rows, (resamples, rows))


def bootstrap_interval(value: float, draws: np.ndarray, kind: Interval = "percentile"
                       ) -> tuple[float, float, float]:
    """A score and its bootstrap interval, from its value on the test split and per resample.

    Parameters
    ----------
    value
        The score on the whole test split.
    draws
        The score on each resample; NaN (undefined there) is left out.
    kind
        ``percentile``: ``value`` with the 2.5 and 97.5 percentiles of ``draws``.
        ``original``: as the original tool reports (``score_ukbb20252.py``): the mean of
        ``draws`` (not ``value``) with the mean -/+ 1.95 standard deviations of ``draws``
        (population standard deviation, ``ddof=0``).

    Returns
    -------
    ``(value, low, high)``; ``low`` and ``high`` are NaN without any defined draw (and so
    is the ``original`` value).
    """
    draws = draws[~np.isnan(draws)]
    if kind == "original":
        if not len(draws):
            return np.nan, np.nan, np.nan
        mean, half = float(np.mean(draws)), ORIGINAL_HALF_WIDTH * float(np.std(draws))
        return mean, mean - half, mean + half
    if not len(draws):
        return value, np.nan, np.nan
    low, high = np.percentile(draws, PERCENTILES)
    return value, float(low), float(high)


def metric_names(task: FittedTask) -> tuple[str, ...]:
    """The metrics reported for ``task``."""
    return REGRESSION_METRICS if task == "regression" else CLASSIFICATION_METRICS


def score(task: FittedTask, truth: np.ndarray, prediction: np.ndarray) -> np.ndarray:
    """Every metric of every target.

    Parameters
    ----------
    task
        What was fitted.
    truth
        ``(n, targets)``: class indices (classification), 0/1 (multilabel) or values;
        NaN where missing (those rows are left out of that target's scores).
    prediction
        Class probabilities ``(n, classes)`` for classification, else ``(n, targets)``
        probabilities (multilabel) or values (regression).

    Returns
    -------
    ``(targets, metrics)`` float64, NaN where a metric is undefined (e.g. one class).
    """
    if task == "classification":
        label = truth[:, 0].astype(np.int64)
        per_class = [binary_auroc(label == c, prediction[:, c])
                     for c in range(prediction.shape[1])]
        auroc = per_class[1] if prediction.shape[1] == 2 else float(np.mean(per_class))
        accuracy = float(np.mean(prediction.argmax(axis=1) == label)) if len(label) else np.nan
        return np.array([[auroc, accuracy]])
    result = np.full((truth.shape[1], 2), np.nan)
    for j in range(truth.shape[1]):
        seen = ~np.isnan(truth[:, j])
        y, p = truth[seen, j], prediction[seen, j]
        if task == "multilabel":
            result[j] = binary_auroc(y, p), np.mean((p >= 0.5) == y.astype(bool))
        elif len(y) > 1 and np.ptp(y) > 0:
            residual = np.sum((y - p) ** 2) / np.sum((y - y.mean()) ** 2)
            result[j] = squared_pearson(y, p), 1 - residual
    return result


def evaluate(task: FittedTask, names: Sequence[str], truth: np.ndarray,
             prediction: np.ndarray, *, resamples: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Scores per target and averaged, each with a bootstrap 95% interval.

    Parameters
    ----------
    task, names, truth, prediction
        As for :func:`score`; ``names`` names the targets.
    resamples
        Bootstrap resamples of the test rows (0: no intervals).
    seed
        Seed of the resampling.

    Returns
    -------
    ``{"targets": {name: {metric: {"value", "low", "high"}}}, "mean": {...},
    "bootstrap": {"resamples", "seed"}}``; intervals are null without resamples.
    """
    metrics = metric_names(task)
    point = score(task, truth, prediction)
    draws = np.full((resamples, *point.shape), np.nan)
    for b, rows in enumerate(bootstrap_indices(len(truth), resamples, seed)):
        draws[b] = score(task, truth[rows], prediction[rows])

    def summary(value: float, samples: np.ndarray) -> dict[str, float | None]:
        value, low, high = bootstrap_interval(value, samples)
        return {"value": _number(value), "low": _number(low), "high": _number(high)}

    with warnings.catch_warnings():  # an all-NaN mean (one class on test) is NaN: expected
        warnings.simplefilter("ignore", RuntimeWarning)
        mean_point = np.nanmean(point, axis=0)
        mean_draws = np.nanmean(draws, axis=1)
    targets = list(names) if task != "classification" else list(names[:1])
    return {
        "targets": {name: {m: summary(point[j, i], draws[:, j, i]) for i, m in enumerate(metrics)}
                    for j, name in enumerate(targets)},
        "mean": {m: summary(mean_point[i], mean_draws[:, i]) for i, m in enumerate(metrics)},
        "bootstrap": {"resamples": resamples, "seed": seed, "interval": "percentile 95%"},
    }


def table(result: dict[str, Any]) -> str:
    """``result`` of :func:`evaluate` as a text table: one row per target, then the mean."""
    rows = {**result["targets"], "mean": result["mean"]}
    metrics = list(result["mean"])
    width = max(len(name) for name in [*rows, "target"])
    lines = [f"{'target':<{width}}  " + "  ".join(f"{m:<24}" for m in metrics)]
    for name, values in rows.items():
        cells = []
        for m in metrics:
            v = values[m]
            interval = (f" [{v['low']:.3f}, {v['high']:.3f}]"
                        if v["low"] is not None and v["high"] is not None else "")
            cells.append(f"{_fmt(v['value'])}{interval}".ljust(24))
        lines.append(f"{name:<{width}}  " + "  ".join(cells))
    return "\n".join(lines)


def plot(task: FittedTask, names: Sequence[str], classes: Sequence[str], truth: np.ndarray,
         prediction: np.ndarray, path: str | Path) -> None:
    """Draw ROC curves (classification, multilabel) or predicted vs true (regression).

    One panel per target, at most :data:`MAX_PANELS`; written as a PNG to ``path``. Drawn
    on a :class:`~matplotlib.figure.Figure` of its own: pyplot and the session's backend
    (e.g. a notebook's inline one) are left alone.
    """
    from matplotlib.figure import Figure
    from sklearn.metrics import roc_curve

    panels = 1 if task == "classification" else min(len(names), MAX_PANELS)
    cols = int(np.ceil(np.sqrt(panels)))
    rows = int(np.ceil(panels / cols))
    figure = Figure(figsize=(4 * cols, 4 * rows))
    axes = figure.subplots(rows, cols, squeeze=False)
    for j, ax in enumerate(axes.flat):
        if j >= panels:
            ax.axis("off")
            continue
        if task == "regression":
            seen = ~np.isnan(truth[:, j])
            ax.scatter(truth[seen, j], prediction[seen, j], s=8, alpha=0.6)
            low, high = np.nanmin(truth[:, j]), np.nanmax(truth[:, j])
            ax.plot([low, high], [low, high], "k--", lw=1)
            ax.set(xlabel="true", ylabel="predicted", title=names[j])
            continue
        curves = ([(f"class {c}", truth[:, 0] == i, prediction[:, i])
                   for i, c in enumerate(classes)] if task == "classification"
                  else [(names[j], truth[:, j] == 1, prediction[:, j])])
        for label, positive, scores in curves:
            seen = ~np.isnan(truth[:, 0 if task == "classification" else j])
            if 0 < positive[seen].sum() < seen.sum():
                fpr, tpr, _ = roc_curve(positive[seen], scores[seen])
                auroc = binary_auroc(positive[seen], scores[seen])
                ax.plot(fpr, tpr, label=f"{label} (AUROC {auroc:.3f})")
        ax.plot([0, 1], [0, 1], "k--", lw=1)
        ax.set(xlabel="false positive rate", ylabel="true positive rate",
               title=names[0] if task == "classification" else names[j])
        if ax.get_legend_handles_labels()[0]:  # none where test has a single class
            ax.legend(loc="lower right", fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def _number(value: Any) -> float | None:
    """A finite float for JSON, or ``None``."""
    return float(value) if value is not None and np.isfinite(value) else None


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"
