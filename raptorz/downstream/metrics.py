"""Scores of a fitted head on the test split, with bootstrap intervals, a table and plots.

Classification is scored by AUROC (one-vs-rest, macro over classes) and accuracy, as the
Raptor paper reports it; regression by ``pearson_r2`` (the squared Pearson correlation,
as the original tool scores) and ``R2`` (the coefficient of determination). Every
metric is given per target and averaged over targets, each with a percentile bootstrap
95% interval over resamples of the test rows.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

import numpy as np
from scipy.stats import rankdata

from raptorz.downstream.labels import FittedTask

CLASSIFICATION_METRICS: Final = ("auroc", "accuracy")
REGRESSION_METRICS: Final = ("pearson_r2", "R2")
#: Panels drawn at most per plot; further targets are left out of the figure (not the json).
MAX_PANELS: Final = 16


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
            pearson = np.corrcoef(y, p)[0, 1] if np.ptp(p) > 0 else 0.0
            residual = np.sum((y - p) ** 2) / np.sum((y - y.mean()) ** 2)
            result[j] = pearson**2, 1 - residual
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
    rng = np.random.default_rng(seed)
    for b in range(resamples):
        rows = rng.integers(0, len(truth), len(truth))
        draws[b] = score(task, truth[rows], prediction[rows])

    def summary(value: float, samples: np.ndarray) -> dict[str, float | None]:
        samples = samples[~np.isnan(samples)]
        low, high = np.percentile(samples, [2.5, 97.5]) if len(samples) else (None, None)
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

    One panel per target, at most :data:`MAX_PANELS`; written as a PNG to ``path``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_curve

    panels = 1 if task == "classification" else min(len(names), MAX_PANELS)
    cols = int(np.ceil(np.sqrt(panels)))
    rows = int(np.ceil(panels / cols))
    figure, axes = plt.subplots(rows, cols, figsize=(4 * cols, 4 * rows), squeeze=False)
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
    plt.close(figure)


def _number(value: Any) -> float | None:
    """A finite float for JSON, or ``None``."""
    return float(value) if value is not None and np.isfinite(value) else None


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"
