"""Prediction heads fitted on feature batches: the paper's linear protocol and the original's MLP.

Both heads see the features only through :class:`~raptorz.downstream.features.Features` batches, in
an order fixed by the rows and the seed, so a head fitted on features streamed from the
store is the same head as one fitted on features held in memory.

* ``linear``: L2-penalised logistic regression (classification, multi-label) or ridge
  regression, on features standardized with train statistics, for each penalty ``C`` of
  the paper's grid; the ``C`` with the best validation score is kept per target. The
  objective, ``C * sum(loss) + |W|^2 / 2`` (scikit-learn's ``LogisticRegression``; ridge
  with ``alpha = 1 / C`` on standardized targets), is minimised by L-BFGS whose loss and
  gradient are summed over streamed batches in float64, so it scales to data that do
  not fit in memory.
* ``mlp``: the original tool's MLP, trained with AdamW on minibatches, stopped early on
  the validation loss, keeping the best checkpoint.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from scipy.optimize import minimize
from scipy.special import expit, log_expit, logsumexp, softmax
from torch import nn

from raptorz.downstream.features import Features
from raptorz.downstream.labels import FittedTask
from raptorz.downstream.metrics import score
from raptorz.downstream.settings import HeadSettings

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
        v, c = _fold(self.weight, self.bias, scaling)
        return np.vstack([features(b).astype(np.float64) @ v + c for b in features.batches(rows)]
                         or [np.zeros((0, len(self.bias)))])


@dataclass(frozen=True)
class MLPHead:
    """A fitted MLP (in evaluation mode)."""

    model: nn.Sequential

    def arrays(self) -> dict[str, np.ndarray]:
        """The state dict by name (prefixed ``mlp.``), for saving."""
        return {f"mlp.{k}": v.detach().cpu().numpy() for k, v in self.model.state_dict().items()}

    def raw(self, features: Features, rows: np.ndarray, scaling: Scaling) -> np.ndarray:
        """Raw outputs (logits or standardized values) of ``rows``."""
        mean, std = (torch.as_tensor(a, dtype=torch.float32)
                     for a in (scaling.feature_mean, scaling.feature_std))
        self.model.eval()
        with torch.no_grad():
            out = [self.model((torch.from_numpy(features(b)) - mean) / std).double().numpy()
                   for b in features.batches(rows)]
        return np.vstack(out) if out else np.zeros((0, _outputs(self.model)))


Head = LinearHead | MLPHead


def _outputs(model: nn.Sequential) -> int:
    """The number of outputs of an MLP (its last layer is Linear)."""
    last = model[-1]
    assert isinstance(last, nn.Linear)
    return last.out_features


def build_mlp(n_in: int, n_out: int, layers: int, hidden: int, dropout: float) -> nn.Sequential:
    """The original's MLP: Linear -> BatchNorm -> ReLU -> Dropout, (layers - 2) x
    [Linear -> ReLU -> Dropout], Linear; ``layers=1`` is a single Linear layer."""
    if layers == 1:
        return nn.Sequential(nn.Linear(n_in, n_out))
    blocks: list[nn.Module] = [nn.Linear(n_in, hidden), nn.BatchNorm1d(hidden), nn.ReLU(),
                               nn.Dropout(dropout)]
    for _ in range(layers - 2):
        blocks += [nn.Linear(hidden, hidden), nn.ReLU(), nn.Dropout(dropout)]
    return nn.Sequential(*blocks, nn.Linear(hidden, n_out))


def fit_head(task: FittedTask, truth: np.ndarray, n_classes: int, features: Features,
             train: np.ndarray, val: np.ndarray, scaling: Scaling, settings: HeadSettings,
             log: Log) -> tuple[Head, dict[str, Any]]:
    """Fit the head that ``settings`` names; returns it and a summary of the fit.

    ``truth`` holds every sample's targets (as :class:`~raptorz.downstream.labels.Targets` encodes
    them); ``train`` and ``val`` are sample numbers.
    """
    y = truth.copy()
    if task == "regression":
        y = (y - scaling.target_mean) / scaling.target_std
    if settings.head == "linear":
        return _fit_linear(task, y, truth, n_classes, features, train, val, scaling, settings,
                           log)
    if not settings.depths:
        head, record = _fit_mlp(task, y, n_classes, features, train, val, scaling, settings, log)
        return head, {"depth": settings.layers, **record}
    # The paper's protocol: the depth whose best checkpoint has the lowest validation loss
    # (ties keep the shallower network).
    best: tuple[float, MLPHead, dict[str, Any]] | None = None
    losses: dict[str, float] = {}
    for depth in sorted(set(settings.depths)):
        log(f"mlp depth {depth}:")
        head, record = _fit_mlp(task, y, n_classes, features, train, val, scaling,
                                dataclasses.replace(settings, layers=depth, depths=()), log)
        loss = float(min(record["validation_loss"], default=np.inf))
        losses[str(depth)] = loss
        if best is None or loss < best[0]:
            best = (loss, head, {"depth": depth, **record})
    assert best is not None
    log(f"mlp depth chosen on validation: {best[2]['depth']}")
    return best[1], {**best[2], "depth_validation_loss": losses}


def _fold(weight: np.ndarray, bias: np.ndarray, scaling: Scaling) -> tuple[np.ndarray, np.ndarray]:
    """Fold the standardization into the weights: ``x @ v + c == standardize(x) @ w + b``.

    This spares a standardized copy of every batch on every L-BFGS iteration.
    """
    v = weight / scaling.feature_std[:, None]
    return v, bias - scaling.feature_mean @ v


def _loss(task: FittedTask, z: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
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
    loss = np.where(seen, -log_expit(z) + (1 - y) * z, 0.0)
    return float(np.sum(loss)), np.where(seen, expit(z) - y, 0.0)


def _fit_linear(task: FittedTask, y: np.ndarray, truth: np.ndarray, n_classes: int,
                features: Features, train: np.ndarray, val: np.ndarray, scaling: Scaling,
                settings: HeadSettings, log: Log) -> tuple[LinearHead, dict[str, Any]]:
    n_features, n_out, n = features.n_features, output_size(task, y.shape[1], n_classes), len(train)
    batches = [(b, y[b]) for b in features.batches(train)]

    def objective(theta: np.ndarray, c: float) -> tuple[float, np.ndarray]:
        # scikit-learn's scaling, (loss + |W|^2 / 2C) / n, so that ``tol`` means the same.
        weight, bias = theta[:-n_out].reshape(n_features, n_out), theta[-n_out:]
        v, offset = _fold(weight, bias, scaling)
        total, xt_g, g_sum = 0.0, np.zeros_like(weight), np.zeros(n_out)
        for rows, target in batches:
            x = features(rows).astype(np.float64)
            loss, g = _loss(task, x @ v + offset, target)
            total += loss
            xt_g += x.T @ g
            g_sum += g.sum(axis=0)
        grad_w = (xt_g - scaling.feature_mean[:, None] * g_sum) / scaling.feature_std[:, None]
        value = (total + 0.5 * np.sum(weight**2) / c) / n
        return value, np.concatenate([(grad_w + weight / c).ravel(), g_sum]) / n

    groups = [list(range(n_out))] if task == "classification" else [[j] for j in range(n_out)]
    best: list[tuple[float, float]] = [(-np.inf, -np.inf)] * len(groups)
    weight, bias = np.zeros((n_features, n_out)), np.zeros(n_out)
    penalty, fits = np.zeros(len(groups)), []
    for c in settings.penalties:
        # Each C starts from zero, as scikit-learn does: a warm start would leave the weakly
        # penalised fits near the strongly penalised one whenever the tolerance is loose.
        result = minimize(objective, np.zeros(n_features * n_out + n_out), args=(c,),
                          jac=True, method="L-BFGS-B",
                          options={"maxiter": settings.max_iter, "gtol": settings.tol,
                                   "maxls": 50, "ftol": 64 * np.finfo(float).eps})
        w, b = result.x[:-n_out].reshape(n_features, n_out), result.x[-n_out:]
        head = LinearHead(w, b, np.full(len(groups), c))
        z = head.raw(features, val, scaling)
        criteria = _validation(task, truth[val], y[val], z, scaling, groups)
        fits.append({"C": c, "iterations": int(result.nit), "converged": bool(result.success),
                     "validation": [float(k[0]) for k in criteria]})
        log(f"linear C={c:g}: {result.nit} L-BFGS iterations"
            f"{'' if result.success else ' (not converged: --max-iter)'}, validation "
            f"{'auroc' if task != 'regression' else 'R2'} "
            + ", ".join(f"{k[0]:.3f}" for k in criteria))
        for j, cols in enumerate(groups):
            if criteria[j] > best[j]:  # strictly better: ties keep the stronger penalty
                best[j], penalty[j] = criteria[j], c
                weight[:, cols], bias[cols] = w[:, cols], b[cols]
    return LinearHead(weight, bias, penalty), {"penalty": penalty.tolist(), "path": fits}


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
        return [(float(auroc[0]), -_loss(task, z, y)[0])]
    return [(float(auroc[j]), -_loss(task, z[:, [j]], y[:, [j]])[0]) for j in range(len(groups))]


def _torch_loss(task: FittedTask, z: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed loss over the targets present, and how many there are (for a mean)."""
    if task == "classification":
        return nn.functional.cross_entropy(z, y[:, 0].long(), reduction="sum"), len(y)
    seen = ~torch.isnan(y)
    target = torch.where(seen, y, 0.0)
    if task == "regression":
        loss = (z - target) ** 2
    else:
        loss = nn.functional.binary_cross_entropy_with_logits(z, target, reduction="none")
    return torch.where(seen, loss, 0.0).sum(), int(seen.sum())


def _fit_mlp(task: FittedTask, y: np.ndarray, n_classes: int, features: Features,
             train: np.ndarray, val: np.ndarray, scaling: Scaling, settings: HeadSettings,
             log: Log) -> tuple[MLPHead, dict[str, Any]]:
    n_out = n_classes if task == "classification" else y.shape[1]
    targets = torch.as_tensor(y, dtype=torch.float32)
    mean, std = (torch.as_tensor(a, dtype=torch.float32)
                 for a in (scaling.feature_mean, scaling.feature_std))
    rng = np.random.default_rng(settings.seed)
    # A private torch RNG state: the seed fixes initialisation and dropout without
    # touching the caller's global generator.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        model = build_mlp(features.n_features, n_out, settings.layers, settings.hidden,
                          settings.dropout)
        optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr,
                                      weight_decay=settings.weight_decay)
        best_loss, best_epoch, history = np.inf, 0, []
        best_state = copy.deepcopy(model.state_dict())
        for epoch in range(settings.epochs):
            model.train()
            order = rng.permutation(train)
            for rows in features.batches(order):
                if len(rows) < 2 and settings.layers > 1:
                    continue  # BatchNorm cannot train on a single row
                x = (torch.from_numpy(features(rows)) - mean) / std
                loss, count = _torch_loss(task, model(x), targets[rows])
                optimizer.zero_grad()
                (loss / max(count, 1)).backward()
                optimizer.step()
            val_loss = _mean_loss(task, MLPHead(model), features, val, scaling, targets)
            history.append(val_loss)
            log(f"mlp epoch {epoch + 1}: validation loss {val_loss:.4f}")
            if val_loss < best_loss:
                best_loss, best_epoch = val_loss, epoch + 1
                best_state = copy.deepcopy(model.state_dict())
            elif epoch + 1 - best_epoch >= settings.patience:
                break
        model.load_state_dict(best_state)
    model.eval()
    return MLPHead(model), {"best_epoch": best_epoch, "epochs_run": len(history),
                            "validation_loss": history}


def _mean_loss(task: FittedTask, head: MLPHead, features: Features, rows: np.ndarray,
               scaling: Scaling, targets: torch.Tensor) -> float:
    """The head's mean loss over ``rows`` (missing targets left out)."""
    z = torch.as_tensor(head.raw(features, rows, scaling), dtype=torch.float32)
    loss, count = _torch_loss(task, z, targets[rows])
    return float(loss) / max(count, 1)
