"""The paper's linear head, fitted for every penalty of the grid side by side.

L2-penalised logistic regression (classification, multi-label) or ridge regression, on
features standardized with train statistics, for each inverse penalty ``C``; the ``C``
with the best validation score is kept per target. The objective, ``C * sum(loss) +
|W|^2 / 2`` (scikit-learn's ``LogisticRegression``; ridge with ``alpha = 1 / C`` on
standardized targets), is minimised by scipy's L-BFGS-B, each ``C`` starting from zero as
scikit-learn does.

The optimizers of all penalties run side by side, one per thread (:func:`lockstep`):
each asks for the loss and gradient at its point, and one pass over the train rows
(:class:`TrainPasses`) answers every one of them, the features of a group read once
and multiplied by all the models' weights at once. A fit of five penalties reads the
data as often as its longest optimizer evaluates, not five times that. A pass sums, in
float64, one partial result per group of rows (:func:`group_sums`), combined in an order
fixed by the number of groups (:func:`~raptorz.downstream.sums.tree_reduce`): on this
machine (:class:`LocalPasses`) or on Dask workers (:mod:`raptorz.downstream.remote`), the
same numbers. On a GPU (:attr:`~raptorz.downstream.settings.HeadSettings.device`) a group's
sums are computed by torch in float64 (:func:`group_sums_torch`), with numpy on the CPU.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from scipy.optimize import OptimizeResult, minimize
from scipy.special import expit, log_expit, logsumexp, softmax

from raptorz.defaults import BATCH
from raptorz.downstream.features import Features, outputs, statistics
from raptorz.downstream.labels import FittedTask
from raptorz.downstream.metrics import score
from raptorz.downstream.settings import DEVICES, HeadSettings
from raptorz.downstream.sums import add, tree_reduce
from raptorz.errors import SettingsError

Log = Callable[[str], None]


@dataclass(frozen=True)
class Scaling:
    """Train statistics: features are standardized with them, regression targets too."""

    feature_mean: np.ndarray
    feature_std: np.ndarray
    target_mean: np.ndarray
    target_std: np.ndarray

    def arrays(self) -> dict[str, np.ndarray]:
        """The statistics by name, for saving."""
        return {name: getattr(self, name) for name in self.__dataclass_fields__}


def output_size(task: FittedTask, n_targets: int, n_classes: int) -> int:
    """Outputs of the linear head: one logit for two classes, one per class or target else."""
    if task == "classification":
        return 1 if n_classes == 2 else n_classes
    return n_targets


def to_output(task: FittedTask, z: np.ndarray, scaling: Scaling) -> np.ndarray:
    """Raw outputs as class probabilities (classification, multilabel) or original units."""
    if task == "regression":
        return z * scaling.target_std + scaling.target_mean
    if task == "multilabel":
        return expit(z)
    if z.shape[1] == 1:
        return np.hstack([expit(-z), expit(z)])
    return softmax(z, axis=1)


def fold(weight: np.ndarray, bias: np.ndarray, scaling: Scaling) -> tuple[np.ndarray, np.ndarray]:
    """Fold the standardization into the weights: ``x @ v + c == standardize(x) @ w + b``.

    This spares a standardized copy of every batch on every pass.
    """
    v = weight / scaling.feature_std[:, None]
    return v, bias - scaling.feature_mean @ v


@dataclass(frozen=True)
class LinearHead:
    """A fitted linear head: ``z = standardize(x) @ weight + bias``.

    ``penalty`` is the ``C`` kept for each target (one value for a classification target).
    """

    weight: np.ndarray
    bias: np.ndarray
    penalty: np.ndarray

    def arrays(self) -> dict[str, np.ndarray]:
        """The weights by name, for saving."""
        return {"weight": self.weight, "bias": self.bias, "penalty": self.penalty}

    def raw(self, features: Features, rows: np.ndarray, scaling: Scaling) -> np.ndarray:
        """Raw outputs (logits or standardized values) of ``rows``."""
        v, c = fold(self.weight, self.bias, scaling)
        return outputs(features, rows, lambda x: x.astype(np.float64) @ v + c, len(c))


def loss(task: FittedTask, z: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
    """Summed loss of raw outputs ``z`` against ``y`` and its gradient in ``z``.

    Missing targets (NaN) add nothing. Softmax cross-entropy for more than two classes,
    logistic loss per output column otherwise; squared error / 2 for regression.
    """
    if task == "classification" and z.shape[1] > 1:
        label = y[:, 0].astype(np.int64)
        rows = np.arange(len(z))
        gradient = softmax(z, axis=1)
        gradient[rows, label] -= 1
        return float(np.sum(logsumexp(z, axis=1) - z[rows, label])), gradient
    seen = ~np.isnan(y)
    y = np.where(seen, y, 0.0)
    if task == "regression":
        residual = np.where(seen, z - y, 0.0)
        return float(0.5 * np.sum(residual**2)), residual
    value = np.where(seen, -log_expit(z) + (1 - y) * z, 0.0)
    return float(np.sum(value)), np.where(seen, expit(z) - y, 0.0)


def resolve_device(name: str) -> torch.device:
    """The torch device a :class:`~raptorz.downstream.settings.HeadSettings` ``device``
    names on this machine (``auto``: the GPU where torch sees one, else the CPU).

    Raises
    ------
    SettingsError
        Naming the option, where ``name`` is no device or names a GPU this machine lacks.
    """
    if not DEVICES.fullmatch(name):
        raise SettingsError(f"must be auto, cpu, cuda or cuda:N, not {name!r}", option="device")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 or (device.index or 0) >= count:
            raise SettingsError(f"{name} asked for, but torch sees {count} CUDA GPU(s) here",
                                option="device")
    return device


def group_sums(x: np.ndarray, y: np.ndarray, task: FittedTask, v: np.ndarray,
               offset: np.ndarray, n_out: int, device: str = "cpu") -> list[np.ndarray]:
    """One group's share of a pass for models side by side: each model's summed loss,
    ``x.T @ G`` and the column sums of ``G`` (``G`` the gradient in the raw outputs).

    ``v`` and ``offset`` hold the models' folded weights side by side, ``n_out`` columns
    each; ``x`` is float32, computed on in float64 :data:`BATCH` rows at a time, with
    numpy where ``device`` (:func:`resolve_device`) is the CPU, else with torch there
    (:func:`group_sums_torch`).
    """
    if device != "cpu":
        chosen = resolve_device(device)
        if chosen.type != "cpu":
            return group_sums_torch(x, y, task, v, offset, n_out, chosen)
    models = v.shape[1] // n_out
    losses, xt_g, g_sum = np.zeros(models), np.zeros(v.shape), np.zeros(v.shape[1])
    for start in range(0, len(x), BATCH):
        batch = x[start:start + BATCH].astype(np.float64)
        z = batch @ v + offset
        gradient = np.empty_like(z)
        for model in range(models):
            columns = slice(model * n_out, (model + 1) * n_out)
            value, gradient[:, columns] = loss(task, z[:, columns], y[start:start + BATCH])
            losses[model] += value
        xt_g += batch.T @ gradient
        g_sum += gradient.sum(axis=0)
    return [losses, xt_g, g_sum]


def _torch_loss(task: FittedTask, z: torch.Tensor, y: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`loss` in torch: the summed loss (a 0-d tensor) and its gradient in ``z``."""
    if task == "classification" and z.shape[1] > 1:
        label = y[:, 0].long()
        rows = torch.arange(len(z), device=z.device)
        gradient = torch.softmax(z, dim=1)
        gradient[rows, label] -= 1
        return (torch.logsumexp(z, dim=1) - z[rows, label]).sum(), gradient
    seen = ~torch.isnan(y)
    y = torch.where(seen, y, 0.0)
    if task == "regression":
        residual = torch.where(seen, z - y, 0.0)
        return 0.5 * (residual**2).sum(), residual
    value = torch.where(seen, -torch.nn.functional.logsigmoid(z) + (1 - y) * z, 0.0)
    return value.sum(), torch.where(seen, torch.sigmoid(z) - y, 0.0)


def group_sums_torch(x: np.ndarray, y: np.ndarray, task: FittedTask, v: np.ndarray,
                     offset: np.ndarray, n_out: int, device: torch.device) -> list[np.ndarray]:
    """:func:`group_sums` computed by torch in float64 on ``device`` (the group moved there
    once); the results come back as numpy float64."""
    def put(array: np.ndarray) -> torch.Tensor:
        return torch.tensor(np.asarray(array), device=device)  # a copy: blocks may be read-only

    models = v.shape[1] // n_out
    group, targets = put(x), put(np.asarray(y, np.float64))
    weights, shift = put(v), put(offset)
    losses = torch.zeros(models, dtype=torch.float64, device=device)
    xt_g = torch.zeros(v.shape, dtype=torch.float64, device=device)
    g_sum = torch.zeros(v.shape[1], dtype=torch.float64, device=device)
    for start in range(0, len(x), BATCH):
        batch = group[start:start + BATCH].double()
        z = batch @ weights + shift
        gradient = torch.empty_like(z)
        for model in range(models):
            columns = slice(model * n_out, (model + 1) * n_out)
            value, gradient[:, columns] = _torch_loss(task, z[:, columns],
                                                      targets[start:start + BATCH])
            losses[model] += value
        xt_g += batch.T @ gradient
        g_sum += gradient.sum(dim=0)
    return [t.cpu().numpy() for t in (losses, xt_g, g_sum)]


class TrainPasses(Protocol):
    """Passes over the train rows: their statistics, the sums of :func:`group_sums`, and
    the rows of an MLP epoch's windows."""

    def statistics(self) -> tuple[np.ndarray, np.ndarray]:
        """Mean and standard deviation of each feature over the train rows."""

    def sums(self, task: FittedTask, y: np.ndarray, v: np.ndarray, offset: np.ndarray,
             n_out: int) -> list[np.ndarray]:
        """:func:`group_sums` over every train row (``y``: every sample's targets)."""

    def window(self, rows: np.ndarray) -> np.ndarray | None:
        """The float32 features of the train rows ``rows`` in that order, got at once (an
        MLP epoch's window, :func:`~raptorz.downstream.heads.epoch_windows`); ``None``
        where the features are in this process's memory, sliced batch by batch."""


@dataclass(frozen=True)
class LocalPasses:
    """Passes on this machine, over features in memory, in a local copy or in the store;
    :func:`group_sums` on ``device`` (a name :func:`resolve_device` reads)."""

    features: Features
    rows: np.ndarray
    device: str = "cpu"

    def window(self, rows: np.ndarray) -> np.ndarray | None:
        return self.features(rows) if self.features.streaming else None

    def statistics(self) -> tuple[np.ndarray, np.ndarray]:
        return statistics(self.features, self.rows)

    def sums(self, task: FittedTask, y: np.ndarray, v: np.ndarray, offset: np.ndarray,
             n_out: int) -> list[np.ndarray]:
        parts = (group_sums(block, y[group], task, v, offset, n_out, self.device)
                 for group, block in self.features.blocks(self.rows))
        total = tree_reduce(parts, add)
        width = v.shape[1]
        return total or [np.zeros(width // n_out), np.zeros(v.shape), np.zeros(width)]


class _Stop(Exception):
    """Ends an optimizer's thread after a pass failed."""


def lockstep(starts: list[np.ndarray],
             evaluate: Callable[[dict[int, np.ndarray]], dict[int, tuple[float, np.ndarray]]],
             options: dict[str, Any]) -> tuple[list[OptimizeResult], int]:
    """Minimise several objectives with L-BFGS-B at once, one call of ``evaluate`` per round.

    Each optimizer runs in a thread of its own and blocks at every evaluation; once every
    optimizer still running is waiting, ``evaluate`` gets all their points (by index) and
    answers all of them. The rounds, and hence the results, do not depend on the threads'
    timing. Returns the results and the number of rounds.

    Raises
    ------
    Exception
        Whatever ``evaluate`` or an optimizer raised, once every thread has ended.
    """
    requests: queue.Queue[tuple[int, np.ndarray | None]] = queue.Queue()
    replies: list[queue.Queue[tuple[float, np.ndarray] | None]] = [
        queue.Queue() for _ in starts]
    results: list[OptimizeResult | None] = [None] * len(starts)
    errors: list[BaseException] = []

    def optimize(index: int) -> None:
        def objective(theta: np.ndarray) -> tuple[float, np.ndarray]:
            requests.put((index, theta.copy()))
            answer = replies[index].get()
            if answer is None:
                raise _Stop
            return answer

        try:
            results[index] = minimize(objective, starts[index], jac=True, method="L-BFGS-B",
                                      options=options)
        except _Stop:
            pass
        except BaseException as error:  # handed to the caller's thread
            errors.append(error)
        finally:
            requests.put((index, None))

    threads = [threading.Thread(target=optimize, args=(i,), daemon=True,
                                name=f"raptorz-lbfgs-{i}") for i in range(len(starts))]
    for thread in threads:
        thread.start()
    running, rounds = len(starts), 0
    while running:
        asked: dict[int, np.ndarray] = {}
        for _ in range(running):  # each running optimizer asks once, or ends
            index, theta = requests.get()
            if theta is None:
                running -= 1
            else:
                asked[index] = theta
        if not asked:
            continue
        rounds += 1
        try:
            answers = evaluate(asked)
        except BaseException as error:
            errors.insert(0, error)
            answers = {}
        for index in asked:
            replies[index].put(answers.get(index))
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return [r for r in results if r is not None], rounds  # every one, without errors


def fit_linear(task: FittedTask, y: np.ndarray, truth: np.ndarray, n_classes: int,
               features: Features, train: np.ndarray, val: np.ndarray, scaling: Scaling,
               settings: HeadSettings, log: Log, passes: TrainPasses | None = None
               ) -> tuple[LinearHead, dict[str, Any]]:
    """Fit the linear head for every penalty side by side; keep the best ``C`` per target.

    ``y`` holds every sample's (standardized) targets, ``truth`` the original ones;
    ``passes`` reads the ``train`` rows (default: :class:`LocalPasses`), ``features`` the
    ``val`` rows.
    """
    n_features, n_out = features.n_features, output_size(task, y.shape[1], n_classes)
    penalties, n = settings.penalties, len(train)
    passes = passes or LocalPasses(features, train, str(resolve_device(settings.device)))

    def evaluate(asked: dict[int, np.ndarray]) -> dict[int, tuple[float, np.ndarray]]:
        # scikit-learn's scaling, (loss + |W|^2 / 2C) / n, so that ``tol`` means the same.
        order = sorted(asked)
        weights = [asked[i][:-n_out].reshape(n_features, n_out) for i in order]
        v, offset = fold(np.hstack(weights), np.concatenate([asked[i][-n_out:] for i in order]),
                         scaling)
        losses, xt_g, g_sum = passes.sums(task, y, v, offset, n_out)
        grad_w = (xt_g - scaling.feature_mean[:, None] * g_sum) / scaling.feature_std[:, None]
        answers = {}
        for model, (i, weight) in enumerate(zip(order, weights, strict=True)):
            columns, c = slice(model * n_out, (model + 1) * n_out), penalties[i]
            value = (losses[model] + 0.5 * np.sum(weight**2) / c) / n
            answers[i] = value, np.concatenate([(grad_w[:, columns] + weight / c).ravel(),
                                                g_sum[columns]]) / n
        return answers

    results, rounds = lockstep(
        [np.zeros(n_features * n_out + n_out) for _ in penalties], evaluate,
        {"maxiter": settings.max_iter, "gtol": settings.tol, "maxls": 50,
         "ftol": 64 * np.finfo(float).eps})
    fitted = [LinearHead(r.x[:-n_out].reshape(n_features, n_out), r.x[-n_out:],
                         np.full(1, c)) for r, c in zip(results, penalties, strict=True)]
    # One pass over val for every penalty's model.
    side_by_side = LinearHead(np.hstack([h.weight for h in fitted]),
                              np.concatenate([h.bias for h in fitted]), np.zeros(0))
    z_all = side_by_side.raw(features, val, scaling)
    groups = [list(range(n_out))] if task == "classification" else [[j] for j in range(n_out)]
    best: list[tuple[float, float]] = [(-np.inf, -np.inf)] * len(groups)
    weight, bias = np.zeros((n_features, n_out)), np.zeros(n_out)
    penalty, path = np.zeros(len(groups)), []
    for model, (result, head, c) in enumerate(zip(results, fitted, penalties, strict=True)):
        z = z_all[:, model * n_out:(model + 1) * n_out]
        criteria = _validation(task, truth[val], y[val], z, scaling, groups)
        path.append({"C": c, "iterations": int(result.nit), "evaluations": int(result.nfev),
                     "converged": bool(result.success),
                     "validation": [float(k[0]) for k in criteria]})
        log(f"linear C={c:g}: {result.nit} L-BFGS iterations"
            f"{'' if result.success else ' (not converged: --max-iter)'}, validation "
            f"{'auroc' if task != 'regression' else 'R2'} "
            + ", ".join(f"{k[0]:.3f}" for k in criteria))
        for j, cols in enumerate(groups):
            if criteria[j] > best[j]:  # strictly better: ties keep the stronger penalty
                best[j], penalty[j] = criteria[j], c
                weight[:, cols], bias[cols] = head.weight[:, cols], head.bias[cols]
    log(f"linear: {len(penalties)} penalties side by side in {rounds} passes over train")
    unconverged = sorted({float(c) for c in penalty} & {float(c) for c, r in
                                                        zip(penalties, results, strict=True)
                                                        if not r.success})
    log(f"linear: chosen C={', '.join(f'{c:g}' for c in penalty)} (best validation "
        f"{'auroc' if task != 'regression' else 'R2'}, then loss)"
        + (f"; C={', '.join(f'{c:g}' for c in unconverged)} did not converge: raise --max-iter"
           if unconverged else ""))
    return LinearHead(weight, bias, penalty), {"penalty": penalty.tolist(), "path": path,
                                               "rounds": rounds}


def _validation(task: FittedTask, truth: np.ndarray, y: np.ndarray, z: np.ndarray,
                scaling: Scaling, groups: list[list[int]]) -> list[tuple[float, float]]:
    """Per target: (validation score, -validation loss), compared in that order.

    The score is the AUROC for classification (NaN, e.g. with one class on val, counts
    as worst) and R^2 for regression.
    """
    if task == "regression":
        r2 = score(task, truth, to_output(task, z, scaling))[:, 1]
        return [(float(np.nan_to_num(r, nan=-np.inf)), 0.0) for r in r2]
    auroc = np.nan_to_num(score(task, truth, to_output(task, z, scaling))[:, 0], nan=-np.inf)
    if task == "classification":  # one target, all outputs
        return [(float(auroc[0]), -loss(task, z, y)[0])]
    return [(float(auroc[j]), -loss(task, z[:, [j]], y[:, [j]])[0]) for j in range(len(groups))]
