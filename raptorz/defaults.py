"""Default values shared by the library and the command line, with no heavy imports.

The library modules that use these values import them from here (and re-export them
where they were first defined), and so does :mod:`raptorz.cli` to show them in its
help texts, so that ``raptorz --help`` needs neither torch nor Dask, xarray or Zarr
while every default keeps a single source of truth.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Literal

from raptorz.errors import RaptorzError

SourceKind = Literal["nifti", "zip", "npz", "dicom", "nrrd", "metaimage", "mgh", "analyze",
                     "minc"]
HeadKind = Literal["linear", "mlp"]
#: ``auto``: ``cuda`` where GPUs are visible, else ``local``.
ClusterKind = Literal["auto", "local", "cuda", "slurm", "pbs", "sge", "lsf"]

Precision = Literal["fp32", "bf16", "fp16"]

#: What the worker processes of an embedding run import before their first task (the
#: runner, which brings xarray, Zarr and Dask; then torch and timm), where they can be
#: forked from a server that imported them once (:func:`raptorz.cluster.start_worker_server`).
EMBED_WORKER_IMPORTS: Final = ("raptorz.embedding.runner", "raptorz.embedding.encoders",
                               "torch", "timm")
#: The encoder of the Raptor paper.
DEFAULT_ENCODER: Final = "vit_large_patch14_dinov2.lvd142m"
#: ``weights=RANDOM_WEIGHTS``: timm's initial weights drawn with seed 0, for demos and
#: benchmarks where no real weights can be had. The pipeline runs; the embeddings mean
#: nothing. The provenance says so (``weights_source == "random"``).
RANDOM_WEIGHTS: Final = "random"
#: The UK Biobank zip member the original tool reads.
DEFAULT_MEMBER: Final = "T1/T1_brain.nii.gz"
#: The scaling used for each reader where the run chooses none.
DEFAULT_INTENSITY: Final[dict[SourceKind, str]] = {
    "nifti": "percentile:0.5,99.5", "dicom": "percentile:0.5,99.5",
    "zip": "range:0,1280", "npz": "divide:256",
    **dict.fromkeys(("nrrd", "metaimage", "mgh", "analyze", "minc"), "percentile:0.5,99.5"),
}
#: In a DICOM folder of several series, series of fewer slices are skipped (localizers).
DEFAULT_MIN_SLICES: Final = 10
#: Projection width of the Raptor paper.
DEFAULT_K: Final = 100
#: Rows per batch: the unit of every streaming pass and the MLP's minibatch (as the original).
BATCH: Final = 128
#: Inverse L2 penalties tried on the validation split (the Raptor paper's grid).
PENALTIES: Final = (0.01, 0.1, 1.0, 10.0, 100.0)
#: MLP depths the paper chooses among on the validation split.
PAPER_DEPTHS: Final = (1, 2, 3)


class SettingsError(RaptorzError, ValueError):
    """A setting is out of its range (the CLI exits with code 2 on it)."""


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
