"""Feature vectors of an embeddings store, read lazily or held in memory.

A volume's feature vector is one variable of ``embeddings.zarr`` with its non-``id``
dimensions flattened row-major (the original tool's order): a projector
``(id, plane, k, token)``, the ``avgpool`` baseline ``(id, dim)`` or the pooled
``tokens`` ``(id, plane, token, dim)``.

The heads ask for the rows of a set of volumes in *groups* (:meth:`Features.groups`): the
rows that lie in one unit of the store (its file of about 100 volumes), in store order,
at most :data:`BLOCK_BYTES` of them. A pass (:meth:`Features.blocks`) reads each group's
unit once, whole, several at a time in threads (Zarr's decompression releases the GIL),
ahead of the group being used. :class:`Features` answers from memory when the features of
every volume used fit the memory budget, from an optional uncompressed local copy (a
memory-mapped file filled by the first pass) and from the store otherwise. All three
answer the same float32 values in the same groups, so the numbers computed from them,
and hence the fitted heads and their predictions, do not depend on the path taken.

Every row is read from the store through the same path, which refuses NaN: a volume
marked ok with no features (a projection cut short) is an error naming the store and the
ids, never a number fed to a head.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import numpy as np
import psutil
import xarray as xr
from dask.utils import format_bytes, parse_bytes

from raptorz.defaults import BATCH
from raptorz.downstream.sums import merge_moments, moments, standard, tree_reduce
from raptorz.embedding.embeddings import projector_names
from raptorz.errors import InputError, SettingsError
from raptorz.stores import FAILED, OK

#: Rows of a group where the variable is not a store's (an array in memory: no units).
LOAD_ROWS: Final = 1024
#: Most bytes of one group: a unit of large rows (the pooled ``tokens``) is read in parts.
BLOCK_BYTES: Final = 64 * 2**20
#: Groups read at once, in threads, ahead of the one in use...
READERS: Final = max(2, min(8, os.cpu_count() or 1))
#: ...at most this many bytes of them, so that reading adds little to a fit's memory.
READ_AHEAD_BYTES: Final = 32 * 2**20
#: Feature choices other than a projector's name (``voxels``: the raw-voxel baseline's
#: store, :mod:`raptorz.downstream.baselines`).
BASELINES: Final = ("avgpool", "tokens", "voxels")

def feature_choices(ds: xr.Dataset) -> list[str]:
    """The feature variables of an embeddings store: its projectors, then the baselines."""
    projectors = [name for name in projector_names(ds) if name in ds.data_vars]
    return projectors + [name for name in BASELINES if name in ds.data_vars]


#: Between a feature and the regions it is restricted to, in a feature name of a region
#: store (docs/regions.md): ``p4@liver`` or ``@liver,spleen`` (the only projector's).
REGION_SEPARATOR: Final = "@"


def feature_variable(ds: xr.Dataset, store: str | Path, name: str | None) -> xr.DataArray:
    """The variable named ``name``; in a region store, of the regions the name ends with
    (``p4@liver,spleen``: their features concatenated in that order).

    Raises
    ------
    SettingsError
        Where the store has regions and ``name`` names none, or no such regions.
    """
    base, _, regions = (name or "").partition(REGION_SEPARATOR)
    variable = _feature_variable(ds, store, base or None)
    if "roi" not in variable.dims:
        if regions:
            raise SettingsError(f"{store} holds no region embeddings", option="region")
        return variable
    held = [str(r) for r in ds["roi"].values.tolist()]
    asked = [r.strip() for r in regions.split(",") if r.strip()]
    unknown = [r for r in asked if r not in held]
    if unknown or not asked:
        raise SettingsError(f"{store} holds region embeddings: choose among "
                            f"{', '.join(held)} (no {', '.join(unknown) or 'region asked'})",
                            option="region")
    return variable.sel(roi=asked)


def feature_status(ds: xr.Dataset, name: str | None, status: np.ndarray) -> np.ndarray:
    """``status`` with the volumes failed where a region ``name`` asks for is not ok there
    (absent from the volume's mask): they are left out like volumes that failed."""
    if "region_status" not in ds:
        return status
    regions = feature_variable(ds, "", name)["roi"].values
    ok = (ds["region_status"].sel(roi=regions).values == OK).all(axis=1)
    return np.where(ok, status, np.int8(FAILED))


def _feature_variable(ds: xr.Dataset, store: str | Path, name: str | None) -> xr.DataArray:
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

    Groups of rows are then read straight from Zarr: with small chunks, building a dask
    graph for every read costs more than the read itself.
    """
    chosen = feature_variable(ds, store, name)
    variable = xr.open_zarr(store, consolidated=False, chunks=None)[chosen.name]
    if "roi" in chosen.dims:  # named with its regions: a model fitted on it keeps them
        regions = [str(r) for r in chosen["roi"].values.tolist()]
        variable = variable.sel(roi=regions).rename(
            f"{chosen.name}{REGION_SEPARATOR}{','.join(regions)}")
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


@dataclass
class Reads:
    """What the features' readers did, for the fit's record.

    Attributes
    ----------
    passes
        Passes over a set of rows (:meth:`Features.blocks`, and passes on the workers).
    bytes
        Float32 features delivered by those passes.
    """

    passes: int = 0
    bytes: int = 0


class LocalCopy:
    """An uncompressed copy of the samples' features in a memory-mapped file under a folder,
    filled group by group as they are first read from the store.

    The file is unlinked as soon as it is made: it takes disk space while the fit runs
    and none after, even where the process is killed.
    """

    def __init__(self, folder: str | Path, shape: tuple[int, int]) -> None:
        folder = Path(folder)
        need = shape[0] * shape[1] * 4
        try:
            folder.mkdir(parents=True, exist_ok=True)
            free = shutil.disk_usage(folder).free
            # open for the copy's lifetime: closing it frees the (already unlinked) file
            self.file = tempfile.TemporaryFile(dir=folder, prefix="raptorz-features-")  # noqa: SIM115
        except OSError as error:
            raise SettingsError(f"cannot write a feature cache under {folder}: {error}",
                                option="cache") from None
        if need > free:
            self.file.close()
            raise SettingsError(f"{folder} has {format_bytes(free)} free; the feature "
                                f"cache needs {format_bytes(need)}", option="cache")
        self.array = np.memmap(self.file, np.float32, "w+", shape=shape)
        self.filled = np.zeros(shape[0], bool)


@dataclass(frozen=True)
class Features:
    """The feature rows of a chosen set of volumes ("samples"), numbered 0..n-1.

    Build with :meth:`open`; call with sample numbers to get ``(len(rows), n_features)``
    float32 in the order asked, or make one pass over rows group by group with
    :meth:`blocks`.

    Attributes
    ----------
    variable
        The store variable, lazily opened.
    positions
        The store position of each sample.
    cache
        All samples' features in memory, or ``None`` when streaming from the store.
    local
        The uncompressed local copy streamed passes read after the first, if asked for.
    reads
        What was read so far.
    """

    variable: xr.DataArray
    positions: np.ndarray
    cache: np.ndarray | None
    local: LocalCopy | None = None
    reads: Reads = field(default_factory=Reads)

    @classmethod
    def open(cls, variable: xr.DataArray, positions: np.ndarray, budget: int,
             cache: str | Path | None = None) -> Features:
        """Hold the samples' features in memory when they fit ``budget`` bytes; otherwise
        stream them, through a local copy under the folder ``cache`` where one is given."""
        variable = variable.transpose("id", ...)
        features = cls(variable, np.asarray(positions, np.int64), None)
        if features.nbytes > budget:
            if cache is None or not features.nbytes:
                return features
            local = LocalCopy(cache, (len(features.positions), features.n_features))
            return dataclasses.replace(features, local=local)
        held = np.empty((len(features.positions), features.n_features), np.float32)
        for rows, block in features.blocks(np.arange(len(features.positions))):
            held[rows] = block
        return dataclasses.replace(features, cache=held)

    def refuse_nan(self, rows: np.ndarray, holed: np.ndarray) -> None:
        """Refuse samples ``rows[holed]``: volumes marked ok whose features hold NaN (never
        written, e.g. a projection cut short).

        Raises
        ------
        InputError
            Naming the store and the volumes' ids.
        """
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

    @property
    def unit(self) -> int:
        """Volumes per file of the store (a shard, or a chunk); :data:`LOAD_ROWS` for an
        array in memory."""
        shape = self.variable.encoding.get("shards") or self.variable.encoding.get("chunks")
        return int(shape[0]) if shape else LOAD_ROWS

    @property
    def span(self) -> int:
        """Rows of the store a group spans at most: a unit, or :data:`BLOCK_BYTES` of it."""
        return max(1, min(self.unit, BLOCK_BYTES // max(1, 4 * self.n_features)))

    def describe(self) -> str:
        """One line for the user: which path, and why."""
        where = ("held in memory" if not self.streaming else "streamed from the store"
                 + (" through a local uncompressed copy" if self.local else ""))
        return (f"{len(self.positions)} volumes x {self.n_features} features "
                f"({format_bytes(self.nbytes)}) {where}")

    def groups(self, rows: np.ndarray) -> list[np.ndarray]:
        """``rows`` (sample numbers) as they are read: grouped by unit of the store, in
        store order, each group spanning at most :data:`BLOCK_BYTES` of the store."""
        return [np.asarray(rows, np.int64)[part] for part in self._parts(rows)]

    def _parts(self, rows: np.ndarray) -> list[np.ndarray]:
        """:meth:`groups` as indices into ``rows``."""
        order = np.argsort(self.positions[np.asarray(rows, np.int64)], kind="stable")
        positions = self.positions[np.asarray(rows, np.int64)[order]]
        key = (positions // self.unit) * self.unit + (positions % self.unit) // self.span
        return np.split(order, np.flatnonzero(np.diff(key)) + 1) if len(order) else []

    def blocks(self, rows: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """One pass over ``rows``: ``(sample numbers, float32 features)`` group by group
        (:meth:`groups`)."""
        self.reads.passes += 1
        groups = self.groups(rows)
        for group, block in zip(groups, self._read(groups), strict=True):
            self.reads.bytes += block.nbytes
            yield group, block

    def __call__(self, rows: np.ndarray) -> np.ndarray:
        rows = np.asarray(rows, np.int64)
        self.reads.bytes += len(rows) * self.n_features * 4
        if self.cache is not None:
            return self.cache[rows]
        out = np.empty((len(rows), self.n_features), np.float32)
        parts = self._parts(rows)
        for part, block in zip(parts, self._read([rows[p] for p in parts]), strict=True):
            out[part] = block
        return out

    def batches(self, rows: np.ndarray) -> list[np.ndarray]:
        """``rows`` cut into consecutive batches of at most :data:`BATCH`."""
        return [rows[i:i + BATCH] for i in range(0, len(rows), BATCH)]

    def _read(self, groups: list[np.ndarray]) -> Iterator[np.ndarray]:
        """The features of each group in turn, read up to :data:`READERS` groups (and
        :data:`READ_AHEAD_BYTES`) ahead."""
        if self.cache is not None:
            yield from (self.cache[group] for group in groups)
            return
        depth = max(1, min(READERS, READ_AHEAD_BYTES // max(1, 4 * self.n_features * self.span)))
        with ThreadPoolExecutor(depth, thread_name_prefix="raptorz-read") as pool:
            ahead: deque[Future[np.ndarray]] = deque()
            todo = iter(groups)
            for group in todo:
                ahead.append(pool.submit(self._fetch, group))
                if len(ahead) >= depth:
                    break
            while ahead:
                block = ahead.popleft().result()
                following = next(todo, None)
                if following is not None:
                    ahead.append(pool.submit(self._fetch, following))
                yield block

    def _fetch(self, group: np.ndarray) -> np.ndarray:
        """One group's features: from the local copy once it holds them, else the store."""
        if self.local is not None and self.local.filled[group].all():
            return np.asarray(self.local.array[group])
        block = read_span(self.variable, self.positions[group])
        self.refuse_nan(group, np.isnan(block).any(axis=1))
        if self.local is not None:
            self.local.array[group] = block
            self.local.filled[group] = True
        return block


def read_span(variable: xr.DataArray, positions: np.ndarray) -> np.ndarray:
    """The float32 feature rows at the sorted store ``positions``, in one read of the
    span they cover (a group: within one unit)."""
    start, stop = int(positions[0]), int(positions[-1]) + 1
    block = np.asarray(variable.isel(id=slice(start, stop)).values, np.float32)
    block = block.reshape(stop - start, -1)
    return block if stop - start == len(positions) else block[positions - start]


def statistics(features: Features, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard deviation of each feature over ``rows``, in one pass."""
    merged = tree_reduce((moments(block) for _, block in features.blocks(rows)), merge_moments)
    return standard(merged, features.n_features)



def outputs(features: Features, rows: np.ndarray, function: Callable[[np.ndarray], np.ndarray],
            width: int) -> np.ndarray:
    """``function`` of the features of ``rows``, :data:`BATCH` rows at a time, in one pass;
    ``(len(rows), width)`` float64 in the order of ``rows``."""
    rows = np.asarray(rows, np.int64)
    out = np.zeros((len(rows), width))
    sorter = np.argsort(rows, kind="stable")
    for group, block in features.blocks(rows):
        where = sorter[np.searchsorted(rows, group, sorter=sorter)]
        for start in range(0, len(group), BATCH):
            out[where[start:start + BATCH]] = function(block[start:start + BATCH])
    return out
