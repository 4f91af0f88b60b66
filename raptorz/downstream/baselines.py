"""The raw-voxel baseline: each volume downsampled to a small grid, then PCA fitted on train.

:func:`voxel_baseline` reads ``volumes.zarr`` in batches (never whole), block-averages
each volume to ``grid^3`` voxels, fits a PCA on the labels' train split and writes the
components of every volume as the ``voxels(id, component)`` variable of a small store laid
out as ``embeddings.zarr``. ``raptorz fit STORE --projector voxels`` then fits the same
heads as on Raptor embeddings and ``raptorz score`` scores them on the same resamples.
The ``avgpool`` baseline needs nothing new: it is a variable of every embeddings store.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import dask.array as da
import numpy as np
import torch
import xarray as xr

from raptorz import stores
from raptorz.downstream.labels import read_labels, store_index
from raptorz.errors import InputError, SettingsError
from raptorz.layouts import EMBEDDINGS, VOLUMES

#: The variable the baseline writes (a feature choice of ``raptorz fit``).
VOXELS: Final = "voxels"
#: Volumes read from ``volumes.zarr`` at a time.
READ_BATCH: Final = 16


@dataclass(frozen=True)
class VoxelSettings:
    """The raw-voxel baseline's size.

    Attributes
    ----------
    grid
        Each volume is block-averaged to ``grid^3`` voxels.
    components
        PCA components kept (at most the number of train volumes).
    """

    grid: int = 16
    components: int = 64

    def __post_init__(self) -> None:
        if self.grid < 1 or self.components < 1:
            raise SettingsError(f"grid and components must be at least 1, not {self.grid} "
                                f"and {self.components}")


def downsample(volumes: np.ndarray, grid: int) -> np.ndarray:
    """``(B, x, y, z)`` volumes as ``(B, grid^3)`` float64 block means (adaptive pooling)."""
    tensor = torch.as_tensor(np.asarray(volumes, np.float64))[:, None]
    pooled = torch.nn.functional.adaptive_avg_pool3d(tensor, grid)
    return pooled.reshape(len(volumes), -1).numpy()


def pca(train: np.ndarray, components: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean, ``(components, d)`` principal axes and explained variance ratios of ``train``.

    Each axis's sign is fixed (largest loading positive) so the result is deterministic.
    """
    mean = train.mean(axis=0)
    _, singular, axes = np.linalg.svd(train - mean, full_matrices=False)
    axes = axes[:components]
    axes *= np.sign(axes[np.arange(len(axes)), np.abs(axes).argmax(axis=1)])[:, None]
    variance = singular**2
    return mean, axes, variance[:components] / max(variance.sum(), np.finfo(float).tiny)


def voxel_baseline(volumes: str | Path, labels: str | Path, output: str | Path,
                   settings: VoxelSettings | None = None, *,
                   log: Callable[[str], None] = lambda message: None) -> Path:
    """Write the raw-voxel baseline store (see the module) for every ok volume.

    Parameters
    ----------
    volumes
        ``volumes.zarr`` (``raptorz convert``).
    labels
        The labels CSV: the PCA is fitted on the volumes of its train split.
    output
        The store to write (refused where something is already there).

    Raises
    ------
    InputError
        Where ``output`` exists, or no labelled train volume is in the volumes store.
    """
    settings = settings or VoxelSettings()
    output = Path(output)
    if stores.store_kind(output) is not None:
        raise InputError(output, "already exists; write the baseline to a new store")
    ds = VOLUMES.open(volumes)
    ids = stores.store_ids(ds)
    status = stores.read_status(volumes)
    ok = np.flatnonzero(status == stores.OK)
    small = np.zeros((len(ids), settings.grid**3))
    for start in range(0, len(ok), READ_BATCH):
        rows = ok[start:start + READ_BATCH]
        small[rows] = downsample(ds["volume"].isel(id=rows).values, settings.grid)
    read = read_labels(labels)
    found = store_index(read.ids[read.split == "train"].astype(str), ids)
    train = found[(found >= 0)]
    train = train[status[train] == stores.OK]
    if not len(train):
        raise InputError(labels, f"no train volume of these labels is ok in {volumes}")
    n_components = min(settings.components, len(train))
    mean, axes, explained = pca(small[train], n_components)
    log(f"voxels: {len(ok)} volumes at {settings.grid}^3, PCA on {len(train)} train volumes, "
        f"{n_components} components explain {explained.sum():.1%} of the variance")
    features = ((small - mean) @ axes.T).astype(np.float32)
    features[status != stores.OK] = 0
    _write(output, ids, features, status, {
        "baseline": {"kind": "raw voxels", "volumes": str(volumes), "labels": str(labels),
                     "grid": settings.grid, "components": n_components,
                     "explained_variance": explained.tolist()},
        "projectors": {}})
    return output


def _write(path: Path, ids: np.ndarray, features: np.ndarray, status: np.ndarray,
           attrs: dict[str, object]) -> None:
    """One chunk of all volumes: the features are small (``components`` per volume)."""
    n = len(ids)
    lazy = da.zeros(features.shape, chunks=(max(n, 1), features.shape[1]), dtype=np.float32)
    template = xr.Dataset({VOXELS: (("id", "component"), lazy),
                           **stores.status_variables(n, max(n, 1))},
                          coords={"id": stores.as_strings(ids.tolist())},
                          attrs=stores.json_attr(attrs))
    stores.create_store(path, template, EMBEDDINGS.kind)
    errors = ["" if s == stores.OK else "not ok in the volumes store" for s in status]
    written = np.where(status == stores.OK, stores.OK, stores.FAILED).astype(np.int8)
    stores.write_units(path, {VOXELS: xr.DataArray(features, dims=("id", "component"))},
                       slice(0, n), written, errors)
