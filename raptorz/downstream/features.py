"""Feature vectors of an embeddings store, read lazily or held in memory.

A volume's feature vector is one variable of ``embeddings.zarr`` with its non-``id``
dimensions flattened row-major (the original tool's order): a projector
``(id, plane, k, token)``, the ``avgpool`` baseline ``(id, dim)`` or the pooled
``tokens`` ``(id, plane, token, dim)``.

The heads only ever ask for the rows of a given set of volumes, in batches of at most
:data:`BATCH` rows. :class:`Features` answers from memory when the features of every
volume used fit the memory budget, and reads each batch from the store otherwise. Both
answers are the same float32 values, so the numbers computed from them, and hence the
fitted heads and their predictions, do not depend on which path was taken.

Every row is read from the store once through the same path, which refuses NaN: a
volume marked ok with no features (a projection cut short) is an error naming the store
and the ids, never a number fed to a head.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Final

import numpy as np
import psutil
import xarray as xr
from dask.utils import format_bytes, parse_bytes

from raptorz.defaults import BATCH
from raptorz.embedding.embeddings import projector_names
from raptorz.errors import InputError, SettingsError

#: Rows read from the store per request while filling the in-memory copy.
LOAD_ROWS: Final = 1024
#: Feature choices other than a projector's name (``voxels``: the raw-voxel baseline's
#: store, :mod:`raptorz.downstream.baselines`).
BASELINES: Final = ("avgpool", "tokens", "voxels")


def feature_choices(ds: xr.Dataset) -> list[str]:
    """The feature variables of an embeddings store: its projectors, then the baselines."""
    projectors = [name for name in projector_names(ds) if name in ds.data_vars]
    return projectors + [name for name in BASELINES if name in ds.data_vars]


def feature_variable(ds: xr.Dataset, store: str | Path, name: str | None) -> xr.DataArray:
    """The variable named ``name`` (default: the store's only projector).

    Raises
    ------
    InputError
        Naming the store and listing the available choices, where ``name`` is not one
        of them or where ``name`` is omitted and the store has not exactly one projector.
    """
    choices = feature_choices(ds)
    projectors = [c for c in choices if c not in BASELINES]
    if name is None:
        if len(projectors) == 1:
            return ds[projectors[0]]
        raise SettingsError(f"{store} holds {len(projectors)} projectors; choose one of: "
                            f"{', '.join(choices) or 'none'}", option="projector")
    if name not in choices:
        raise SettingsError(f"{store} has no projector or feature variable '{name}'; "
                            f"available: {', '.join(choices) or 'none'}", option="projector")
    return ds[name]


def open_variable(ds: xr.Dataset, store: str | Path, name: str | None) -> xr.DataArray:
    """The chosen feature variable (:func:`feature_variable`), opened lazily without dask.

    Batches of rows are then read straight from Zarr: with one volume per chunk, building
    a dask graph for every batch costs about four times the read itself.
    """
    chosen = feature_variable(ds, store, name)
    variable = xr.open_zarr(store, consolidated=False, chunks=None)[chosen.name]
    variable.encoding["source"] = str(store)  # xarray's key for a variable's file
    return variable


def memory_budget(size: str | int | None) -> int:
    """The memory budget in bytes: ``size`` ("4GB", "512MiB", bytes), by default half of
    the memory available now."""
    if size is None:
        return int(psutil.virtual_memory().available // 2)
    try:
        return int(parse_bytes(size))
    except (ValueError, TypeError):
        raise SettingsError(f"cannot read {size!r} as a size (e.g. 512MB, 4GiB)",
                            option="memory_budget") from None


@dataclass(frozen=True)
class Features:
    """The feature rows of a chosen set of volumes ("samples"), numbered 0..n-1.

    Build with :meth:`open`; call with sample numbers to get ``(len(rows), n_features)``
    float32 in the order asked.

    Attributes
    ----------
    variable
        The store variable, lazily opened.
    positions
        The store position of each sample.
    cache
        All samples' features in memory, or ``None`` when streaming from the store.
    """

    variable: xr.DataArray
    positions: np.ndarray
    cache: np.ndarray | None

    @classmethod
    def open(cls, variable: xr.DataArray, positions: np.ndarray, budget: int) -> Features:
        """Hold the samples' features in memory when they fit ``budget`` bytes."""
        variable = variable.transpose("id", ...)
        features = cls(variable, np.asarray(positions, np.int64), None)
        if features.nbytes > budget:
            return features
        cache = np.empty((len(positions), features.n_features), np.float32)
        for start in range(0, len(positions), LOAD_ROWS):
            rows = np.arange(start, min(start + LOAD_ROWS, len(positions)))
            cache[rows] = features(rows)
        return cls(variable, features.positions, cache)

    def _refuse_nan(self, rows: np.ndarray, values: np.ndarray) -> None:
        """Refuse ``values`` (of samples ``rows``) where a row holds NaN: a volume marked
        ok whose features were never written (e.g. a projection cut short).

        Raises
        ------
        InputError
            Naming the store and the volumes' ids.
        """
        holed = np.isnan(values).any(axis=1)
        if holed.any():
            ids = self.variable["id"].values[np.sort(self.positions[rows[holed]])]
            store = self.variable.encoding.get("source", "the embeddings store")
            raise InputError(store, f"'{self.variable.name}' holds NaN for {len(ids)} "
                             f"volume(s) marked ok: {', '.join(map(str, ids[:10]))}; run "
                             "`raptorz embed` (or `raptorz reproject`) on it again to fill them")

    @property
    def n_features(self) -> int:
        """The length of a feature vector."""
        return int(np.prod(self.variable.shape[1:]))

    @property
    def nbytes(self) -> int:
        """The size of all samples' features as float32."""
        return len(self.positions) * self.n_features * 4

    @property
    def streaming(self) -> bool:
        """Whether batches are read from the store (the features exceed the budget)."""
        return self.cache is None

    def describe(self) -> str:
        """One line for the user: which path, and why."""
        where = "streamed from the store" if self.streaming else "held in memory"
        return (f"{len(self.positions)} volumes x {self.n_features} features "
                f"({format_bytes(self.nbytes)}) {where}")

    def __call__(self, rows: np.ndarray) -> np.ndarray:
        if self.cache is not None:
            return self.cache[rows]
        # Read in store order (a zarr chunk is read once), then restore the order asked.
        positions = self.positions[rows]
        order = np.argsort(positions, kind="stable")
        block = self.variable.isel(id=positions[order]).values
        out = np.empty((len(rows), self.n_features), np.float32)
        out[order] = block.reshape(len(rows), -1)
        self._refuse_nan(np.asarray(rows), out)
        return out

    def batches(self, rows: np.ndarray) -> list[np.ndarray]:
        """``rows`` cut into consecutive batches of at most :data:`BATCH`."""
        return [rows[i:i + BATCH] for i in range(0, len(rows), BATCH)]


def statistics(features: Features, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard deviation of each feature over ``rows``, in one streaming pass.

    Batch moments are merged with Chan et al.'s pairwise update in float64, which is
    stable where a plain sum of squares would cancel. Constant features get a standard
    deviation of 1, so that standardizing leaves them at 0; "constant" allows for the
    rounding of float32 features (a spread below 1e-6 of the mean's size).
    """
    count, mean, m2 = 0, np.zeros(features.n_features), np.zeros(features.n_features)
    for batch in features.batches(np.sort(rows)):
        x = features(batch).astype(np.float64)
        n, batch_mean = len(x), x.mean(axis=0)
        batch_m2 = ((x - batch_mean) ** 2).sum(axis=0)
        delta = batch_mean - mean
        total = count + n
        mean = mean + delta * (n / total)
        m2 = m2 + batch_m2 + delta**2 * (count * n / total)
        count = total
    std = np.sqrt(m2 / count)
    std[std <= 1e-6 * np.abs(mean) + np.finfo(np.float32).tiny] = 1.0
    return mean, std
