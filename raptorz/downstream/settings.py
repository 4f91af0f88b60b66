"""How a head is fitted, with no torch: what ``raptorz fit --help`` shows and a saved
model records (:class:`HeadSettings`)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

from raptorz.defaults import PENALTIES, HeadKind
from raptorz.errors import SettingsError

#: What ``device`` may name (checked against the machine, with torch, when a fit starts).
DEVICES: Final = re.compile(r"auto|cpu|cuda(:[0-9]+)?")


@dataclass(frozen=True)
class HeadSettings:
    """How a head is fitted.

    Attributes
    ----------
    head
        ``linear`` (the paper's protocol) or ``mlp`` (the original tool's predictor).
    penalties
        The linear head's grid of inverse penalties ``C``.
    max_iter, tol
        The linear head's L-BFGS iterations per ``C`` and gradient tolerance
        (scikit-learn's defaults).
    layers, hidden, dropout
        The MLP: ``layers`` Linear layers (1 is a linear model), ``hidden`` units.
    depths
        MLP depths to choose among on the validation split (the paper: 1, 2, 3); the
        depth with the lowest validation loss is kept. Empty: ``layers`` alone.
    epochs, patience, lr, weight_decay
        MLP training: at most ``epochs`` passes, stopped after ``patience`` passes
        without a better validation loss; AdamW's learning rate and weight decay.
    seed
        Seeds the MLP's initialisation, shuffling and dropout.
    device
        Where the heads' arithmetic runs: ``auto`` (the GPU where torch sees one, else the
        CPU), ``cpu``, ``cuda`` or ``cuda:N``. The MLP trains and predicts there; the
        linear head's float64 sums use torch there instead of numpy (the same numbers, to
        rounding). A saved model predicts on the CPU.
    """

    head: HeadKind = "linear"
    penalties: tuple[float, ...] = PENALTIES
    max_iter: int = 100
    tol: float = 1e-4
    layers: int = 2
    hidden: int = 256
    dropout: float = 0.0
    epochs: int = 50
    patience: int = 10
    lr: float = 1e-4
    weight_decay: float = 0.01
    seed: int = 0
    depths: tuple[int, ...] = ()
    device: str = "auto"

    def __post_init__(self) -> None:
        # Values from JSON (a saved model) come back as lists: keep the fields hashable.
        object.__setattr__(self, "penalties", tuple(float(c) for c in self.penalties))
        object.__setattr__(self, "depths", tuple(int(d) for d in self.depths))
        problems = [f"{name} must be at least 1, not {getattr(self, name)}"
                    for name in ("max_iter", "layers", "hidden", "epochs", "patience")
                    if getattr(self, name) < 1]
        if self.head not in ("linear", "mlp"):
            problems.append(f"head must be linear or mlp, not {self.head!r}")
        if not self.penalties or min(self.penalties) <= 0:
            problems.append(f"penalties must be positive and at least one, not {self.penalties}")
        if any(d < 1 for d in self.depths):
            problems.append(f"depths must be at least 1, not {self.depths}")
        if not 0 <= self.dropout < 1:
            problems.append(f"dropout must be in [0, 1), not {self.dropout}")
        if self.tol <= 0 or self.lr <= 0 or self.weight_decay < 0:
            problems.append(f"tol and lr must be positive and weight_decay at least 0 "
                            f"(tol {self.tol}, lr {self.lr}, weight_decay {self.weight_decay})")
        if problems:
            raise SettingsError("head settings: " + "; ".join(problems))
        if not isinstance(self.device, str) or not DEVICES.fullmatch(self.device):
            raise SettingsError(f"must be auto, cpu, cuda or cuda:N, not {self.device!r}",
                                option="device")
