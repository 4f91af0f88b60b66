"""Prediction heads fitted on feature batches: the paper's linear protocol and the original's MLP.

Both heads see the features only through :class:`~raptorz.downstream.features.Features`, in
an order fixed by the rows and the seed, so a head fitted on features streamed from the
store is the same head as one fitted on features held in memory.

* ``linear``: :mod:`raptorz.downstream.linear`, every penalty of the grid fitted side by
  side, one pass over the data serving all of them.
* ``mlp``: the original tool's MLP, trained with AdamW on minibatches, stopped early on
  the validation loss, keeping the best checkpoint. An epoch reads the train rows once:
  the store's groups in a seeded order, their rows shuffled together in windows of at
  most :data:`SHUFFLE_BYTES` (all the train rows at once where they fit one). A window
  comes from memory, from the store, or with ``--cluster`` from the blocks the Dask
  workers hold (:meth:`~raptorz.downstream.remote.ClusterPasses.window`); the
  mini-batches run here, in order.

Both compute on :attr:`HeadSettings.device <raptorz.downstream.settings.HeadSettings.device>`
(:func:`~raptorz.downstream.linear.resolve_device`); the fit's record names it.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import torch
from torch import nn

from raptorz.downstream.features import Features, outputs
from raptorz.downstream.labels import FittedTask
from raptorz.downstream.linear import (
    LinearHead,
    LocalPasses,
    Scaling,
    TrainPasses,
    fit_linear,
    resolve_device,
)
from raptorz.downstream.settings import HeadSettings

Log = Callable[[str], None]
#: Most bytes of train features shuffled together in an MLP epoch (one window).
SHUFFLE_BYTES: Final = 256 * 2**20


@dataclass(frozen=True)
class MLPHead:
    """A fitted MLP (in evaluation mode)."""

    model: nn.Sequential

    def arrays(self) -> dict[str, np.ndarray]:
        """The state dict by name (prefixed ``mlp.``), for saving."""
        return {f"mlp.{k}": v.detach().cpu().numpy() for k, v in self.model.state_dict().items()}

    def raw(self, features: Features, rows: np.ndarray, scaling: Scaling) -> np.ndarray:
        """Raw outputs (logits or standardized values) of ``rows``, computed on the device
        the model lies on."""
        device = next(iter(self.model.parameters())).device
        mean, std = (torch.as_tensor(a, dtype=torch.float32, device=device)
                     for a in (scaling.feature_mean, scaling.feature_std))
        self.model.eval()

        def forward(x: np.ndarray) -> np.ndarray:
            with torch.no_grad():
                z = self.model((torch.from_numpy(x).to(device) - mean) / std)
                return z.double().cpu().numpy()

        return outputs(features, rows, forward, _outputs(self.model))


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
             log: Log, passes: TrainPasses | None = None) -> tuple[Head, dict[str, Any]]:
    """Fit the head that ``settings`` names; returns it and a summary of the fit.

    ``truth`` holds every sample's targets (as :class:`~raptorz.downstream.labels.Targets` encodes
    them); ``train`` and ``val`` are sample numbers. The passes over the train rows go
    through ``passes`` where given (on Dask workers: :mod:`.remote`). The record names the
    device the head computed on.
    """
    device = resolve_device(settings.device)
    head, record = _fit(task, truth, n_classes, features, train, val, scaling, settings, log,
                        passes or LocalPasses(features, train, str(device)), device)
    return head, {**record, "device": str(device)}


def _fit(task: FittedTask, truth: np.ndarray, n_classes: int, features: Features,
         train: np.ndarray, val: np.ndarray, scaling: Scaling, settings: HeadSettings,
         log: Log, passes: TrainPasses, device: torch.device) -> tuple[Head, dict[str, Any]]:
    y = truth.copy()
    if task == "regression":
        y = (y - scaling.target_mean) / scaling.target_std
    if settings.head == "linear":
        return fit_linear(task, y, truth, n_classes, features, train, val, scaling, settings,
                          log, passes)
    if not settings.depths:
        head, record = _fit_mlp(task, y, n_classes, features, train, val, scaling, settings,
                                log, passes, device)
        return head, {"depth": settings.layers, **record}
    # The paper's protocol: the depth whose best checkpoint has the lowest validation loss
    # (ties keep the shallower network).
    best: tuple[float, MLPHead, dict[str, Any]] | None = None
    losses: dict[str, float] = {}
    for depth in sorted(set(settings.depths)):
        log(f"mlp depth {depth}:")
        head, record = _fit_mlp(task, y, n_classes, features, train, val, scaling,
                                dataclasses.replace(settings, layers=depth, depths=()), log,
                                passes, device)
        loss = float(min(record["validation_loss"], default=np.inf))
        losses[str(depth)] = loss
        if best is None or loss < best[0]:
            best = (loss, head, {"depth": depth, **record})
    assert best is not None
    log(f"mlp depth chosen on validation: {best[2]['depth']}")
    return best[1], {**best[2], "depth_validation_loss": losses}


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


def epoch_windows(features: Features, train: np.ndarray,
                  rng: np.random.Generator) -> list[np.ndarray]:
    """An MLP epoch's order of the train rows, in windows each read whole from the store.

    Where the train rows' features fit :data:`SHUFFLE_BYTES`, one window: all of them
    shuffled. Otherwise the store's groups of train rows (:meth:`Features.groups`) in a
    shuffled order, gathered into windows of at least that size, each shuffled within.
    The order depends on the rows, the store's units and ``rng`` only: the same whether
    the features are held in memory or streamed.
    """
    window = max(1, SHUFFLE_BYTES // max(1, 4 * features.n_features))
    if len(train) <= window:
        return [rng.permutation(train)]
    groups = features.groups(train)
    windows, current = [], []
    for index in rng.permutation(len(groups)):
        current.append(groups[index])
        if sum(map(len, current)) >= window:
            windows.append(rng.permutation(np.concatenate(current)))
            current = []
    if current:
        windows.append(rng.permutation(np.concatenate(current)))
    return windows


def _fit_mlp(task: FittedTask, y: np.ndarray, n_classes: int, features: Features,
             train: np.ndarray, val: np.ndarray, scaling: Scaling, settings: HeadSettings,
             log: Log, passes: TrainPasses, device: torch.device
             ) -> tuple[MLPHead, dict[str, Any]]:
    """Train the MLP on ``device``: each epoch's windows of train rows from ``passes``
    (or sliced from memory), their mini-batches in order."""
    n_out = n_classes if task == "classification" else y.shape[1]
    targets = torch.as_tensor(y, dtype=torch.float32)
    mean, std = (torch.as_tensor(a, dtype=torch.float32, device=device)
                 for a in (scaling.feature_mean, scaling.feature_std))
    rng = np.random.default_rng(settings.seed)
    gpus = [device.index if device.index is not None else torch.cuda.current_device()
            ] if device.type == "cuda" else []
    # A private torch RNG state: the seed fixes initialisation and dropout without
    # touching the caller's global generator.
    with torch.random.fork_rng(devices=gpus):
        torch.manual_seed(settings.seed)
        # Built on the CPU, then moved: the same initial weights on every device.
        model = build_mlp(features.n_features, n_out, settings.layers, settings.hidden,
                          settings.dropout).to(device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr,
                                      weight_decay=settings.weight_decay)
        best_loss, best_epoch, history = np.inf, 0, []
        best_state = copy.deepcopy(model.state_dict())
        for epoch in range(settings.epochs):
            model.train()
            features.reads.passes += 1
            for window in epoch_windows(features, train, rng):
                # A streamed window is got once, whole (from the store, or the workers'
                # blocks); one in memory is sliced per batch.
                held = passes.window(window)
                for batch in features.batches(np.arange(len(window))):
                    if len(batch) < 2 and settings.layers > 1:
                        continue  # BatchNorm cannot train on a single row
                    x = held[batch] if held is not None else features(window[batch])
                    inputs = (torch.from_numpy(x).to(device) - mean) / std
                    loss, count = _torch_loss(task, model(inputs),
                                              targets[window[batch]].to(device))
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
