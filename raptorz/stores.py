"""The resumable-store mechanics shared by ``volumes.zarr`` and ``embeddings.zarr``.

Both stores are Zarr v3 groups opened as xarray Datasets, chunked along ``id``, with a
per-volume ``status`` (pending / ok / failed) and ``error`` text (their layouts:
:mod:`raptorz.layouts`). A *unit* is the ``id`` extent of one ``status`` chunk: every
variable's file boundaries fall on unit boundaries (a unit is one Zarr chunk of a
variable, or one shard of smaller chunks), so a unit is written whole or not at all.
Both stores are written the same way:

1. :func:`create_store` writes a template (lazy arrays of the final shape, every
   coordinate and attribute) without computing any data, and consolidates its metadata;
2. each task writes the whole units it owns with :func:`write_units`: first the data,
   then the error text, then, last, the status. ``status`` is the commit mark: a task
   killed before it is written leaves its volumes *pending* (or as an earlier run left
   them), so a unit is never counted as done before all of it is on disk;
3. a rerun reads the statuses (:func:`read_status`) and recomputes only what is not ``ok``.

Writes touch whole units only, so several processes may write disjoint units of one
store at once.

Crash safety. Zarr (>= 3.1.3) writes every chunk file of a local store aside and renames
it into place, so a kill leaves a chunk file whole or absent. Other stores and file
systems (and older Zarr) can leave a torn file, so :func:`read_status` also treats a
status chunk it cannot decode as *pending*: its volumes are recomputed and the chunk is
rewritten, and a torn error chunk always belongs to a chunk whose status was not yet
written. Both defences are needed; neither costs anything when nothing was torn. A store
may also be a URL in object storage (:mod:`raptorz.locations`), where each chunk is one
object, which a ``PUT`` replaces whole.

Locks. Steps that change a store's metadata hold its lock (:func:`store_lock`), and a
unit's commit its unit's (:func:`unit_lock`): :mod:`raptorz.locks`.

Consolidated metadata. Every store carries consolidated metadata, so that
``xr.open_zarr(path)`` (and intake, napari, dask) open it fast and without a warning.
Region writes never change metadata, so metadata consolidated when the store is created
stays true while tasks fill it; only the steps that add variables or change attributes
consolidate again (:func:`consolidate`, :func:`update_attrs`). A store without it (from an
older raptorz) still opens, with a one-line hint to run ``raptorz info --repair``.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import platform
import shutil
import uuid
import warnings
from collections.abc import Iterable, Mapping
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Final, Literal

import numpy as np
import xarray as xr
import zarr
from zarr.core.group import GroupMetadata

from raptorz import locations
from raptorz.errors import InputError, RaptorzWarning, SettingsError
from raptorz.locks import LOCK_FILE as LOCK_FILE
from raptorz.locks import LOCK_SECONDS as LOCK_SECONDS
from raptorz.locks import store_lock as store_lock
from raptorz.locks import unit_lock as unit_lock

PENDING: Final = 0
OK: Final = 1
FAILED: Final = 2
STATUS_NAMES: Final = ("pending", "ok", "failed")
#: CF-style attributes that make the integer status self-describing in the store.
STATUS_ATTRS: Final = {"flag_values": [PENDING, OK, FAILED], "flag_meanings": "pending ok failed"}

#: Attribute naming the kind of raptorz store a group is (``volumes`` or ``embeddings``).
KIND_ATTR: Final = "raptorz_store"

STRING_DTYPE: Final = np.dtypes.StringDType()

#: The command that consolidates an older store's metadata (printed in the hint).
REPAIR_COMMAND: Final = "raptorz info --repair"


def as_strings(values: Iterable[str]) -> np.ndarray:
    """Return ``values`` as variable-length strings, which Zarr v3 stores natively."""
    return np.asarray(list(values), dtype=STRING_DTYPE)


def status_variables(n: int, chunk: int) -> dict[str, xr.DataArray]:
    """The ``status`` and ``error`` variables of a fresh store of ``n`` pending volumes."""
    status = xr.DataArray(np.full(n, PENDING, np.int8), dims="id", attrs=STATUS_ATTRS)
    error = xr.DataArray(as_strings([""] * n), dims="id")
    return {"status": status.chunk({"id": chunk}), "error": error.chunk({"id": chunk})}


def provenance() -> dict[str, Any]:
    """Software versions and the current time, for a store's attributes."""
    packages = ("raptorz", "numpy", "torch", "timm", "zarr", "xarray", "dask", "nibabel")
    versions = {}
    for name in packages:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            continue
    versions["python"] = platform.python_version()
    now = datetime.datetime.now(datetime.timezone.utc)
    return {"created": now.isoformat(timespec="seconds"), "versions": versions}


def store_ids(ds: xr.Dataset) -> np.ndarray:
    """A store's volume ids as a plain ``str`` array (Zarr v3 gives variable-width
    strings, which NumPy does not cast to fixed width)."""
    return np.array(ds["id"].values.tolist(), dtype=str)


def id_range(n: int, start: int = 0, many: int | None = None) -> slice:
    """The ids ``start`` to ``start + many`` of ``n`` (all from ``start`` when ``many`` is
    None): the original tool's way of splitting a job, checked in one place.

    Raises
    ------
    SettingsError
        For ``start < 0``, ``many < 1``, or a ``start`` past the last of the ``n`` ids.
    """
    if start < 0 or (many is not None and many < 1):
        raise SettingsError(f"need start >= 0 and many >= 1, got start={start}, many={many}",
                            option="start/many")
    if start >= n:
        raise SettingsError(f"{start} is past the last of the {n} volumes (start counts "
                            "from 0)", option="start")
    return slice(start, n if many is None else min(n, start + many))


def store_kind(path: str | Path) -> str | None:
    """The kind of raptorz store at ``path``; ``None`` where there is nothing there.

    Raises
    ------
    InputError
        Where ``path`` holds something that is not a raptorz store.
    """
    if not locations.holds_anything(path):
        return None
    try:
        group = zarr.open_group(path, mode="r")
    except Exception as error:  # zarr raises several types for "not a group"
        raise InputError(path, f"exists and is not a Zarr store ({error})") from None
    kind = group.attrs.get(KIND_ATTR)
    if kind is None:
        raise InputError(path, "exists and is a Zarr store that raptorz did not write")
    return str(kind)


def require_kind(path: str | Path, kind: str) -> None:
    """Raise :class:`InputError` unless ``path`` is a raptorz store of ``kind``."""
    found = store_kind(path)
    if found is None:
        raise InputError(path, f"no {kind} store here")
    if found != kind:
        raise InputError(path, f"holds a raptorz {found} store, not {kind}")


def create_store(path: str | Path, template: xr.Dataset, kind: str) -> bool:
    """Write ``template``'s metadata and coordinates to a new store at ``path``.

    Data variables are written lazily (nothing is computed); ``encoding`` on each
    variable is honoured. The store is marked with its ``kind`` and its metadata is
    consolidated (:func:`consolidate`). Creation is safe for processes that start at once:
    each writes its template beside ``path`` and renames it into place (atomic on a POSIX
    file system), a loser discards its copy; in object storage, which renames nothing,
    they take turns by a lock object beside the store (:func:`raptorz.locations.object_lock`).

    Returns
    -------
    bool
        Whether this call created the store; ``False`` where another process just did
        (the caller then checks that store like any existing one).
    """
    template = template.copy()
    template.attrs[KIND_ATTR] = kind
    if locations.is_url(path):
        with locations.object_lock(f"{path}.raptorz-create.lock", "create", LOCK_SECONDS):
            if store_kind(path) is not None:
                return False
            template.to_zarr(path, mode="w-", compute=False, consolidated=False, zarr_format=3)
            consolidate(path)
        return True
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    scratch = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    template.to_zarr(scratch, mode="w-", compute=False, consolidated=False, zarr_format=3)
    consolidate(scratch)
    try:
        if path.exists() and not any(path.iterdir()):
            path.rmdir()  # an empty folder is no store: take its place
        os.rename(scratch, path)
    except OSError:  # another process renamed its template first
        shutil.rmtree(scratch, ignore_errors=True)
        return False
    return True


def open_store(path: str | Path, kind: str) -> xr.Dataset:
    """Open a raptorz store of ``kind`` lazily (safe while other processes write it).

    Reads the consolidated metadata, as ``xr.open_zarr(path)`` does; a store without it
    opens too, with a :class:`~raptorz.errors.RaptorzWarning` naming the command that
    consolidates it.
    """
    require_kind(path, kind)
    return open_dataset(path)


def open_dataset(path: str | Path, *, hint: bool = True) -> xr.Dataset:
    """Open the Zarr group at ``path`` as a lazy Dataset, from consolidated metadata
    where it has some; else warn with the repair command (unless ``hint`` is false)."""
    if has_consolidated_metadata(path):
        return xr.open_zarr(path, consolidated=True)
    if hint:
        warnings.warn(f"{path}: no consolidated metadata (written by an older raptorz), so "
                      f"xarray warns and opens it slowly; run `{REPAIR_COMMAND} {path}`",
                      RaptorzWarning, stacklevel=3)
    return xr.open_zarr(path, consolidated=False)


def has_consolidated_metadata(path: str | Path) -> bool:
    """Whether the group at ``path`` carries consolidated metadata (true or stale)."""
    group = zarr.open_group(path, mode="r", zarr_format=3)
    return group.metadata.consolidated_metadata is not None


def consolidated_metadata_true(path: str | Path) -> bool:
    """Whether the consolidated metadata at ``path`` is there and equals every array's own.

    Reads each array's ``zarr.json``: for ``raptorz info`` and tests, not for hot paths.
    """
    consolidated = zarr.open_group(path, mode="r", zarr_format=3).metadata.consolidated_metadata
    if consolidated is None:
        return False
    recorded = {name: meta.to_dict() for name, meta in consolidated.metadata.items()}
    actual = {name: array.metadata.to_dict()
              for name, array in zarr.open_group(path, mode="r", zarr_format=3,
                                               use_consolidated=False).members()}
    return recorded == actual


def consolidate(path: str | Path) -> None:
    """Write the consolidated metadata of the group at ``path`` (after any metadata change;
    safe while tasks write data: region writes change no metadata)."""
    with warnings.catch_warnings():
        # Zarr notes that consolidated metadata is not (yet) in the v3 specification;
        # xarray, zarr-python and the tools built on them read it, which is the point.
        warnings.filterwarnings("ignore", message="Consolidated metadata is currently not",
                                category=UserWarning)
        zarr.consolidate_metadata(str(path), zarr_format=3)


def update_attrs(path: str | Path, attrs: Mapping[str, Any]) -> None:
    """Set attributes of the group at ``path`` and keep its consolidated metadata true,
    under the store's lock (:func:`store_lock`)."""
    with store_lock(path, "update_attrs"):
        group = zarr.open_group(path, mode="r+", zarr_format=3, use_consolidated=False)
        group.attrs.update(json_attr(dict(attrs)))
        consolidate(path)


def read_status(path: str | Path, region: slice = slice(None)) -> np.ndarray:
    """The status codes of the store at ``path`` (``region`` of its ids), read afresh.

    A chunk that cannot be decoded (a file torn by a kill on a file system without
    atomic renames) reads as *pending*, with a :class:`~raptorz.errors.RaptorzWarning`:
    its volumes are then recomputed and the chunk rewritten.

    Raises
    ------
    InputError
        Where a chunk cannot be read at all (an I/O error, no permission): its volumes'
        state is unknown, so nothing may be redone or rewritten on a guess.
    """
    array = zarr.open_array(locations.join(path, "status"), mode="r", zarr_format=3)
    try:
        return np.asarray(array[region])
    except OSError as error:
        raise _unreadable(path, error) from None
    except Exception:  # the codec's error for a torn file: RuntimeError, ValueError...
        status = np.full(array.shape, PENDING, np.int8)
        torn = []
        for chunk in chunk_slices(array.shape[0], array.chunks[0]):
            try:
                status[chunk] = array[chunk]
            except OSError as error:
                raise _unreadable(path, error) from None
            except Exception:
                torn.append(chunk)
        warnings.warn(f"{path}: {len(torn)} status chunk(s) unreadable (a write cut short), "
                      f"ids {', '.join(f'{r.start}-{r.stop - 1}' for r in torn[:5])}: "
                      "counted as pending, so they are recomputed", RaptorzWarning,
                      stacklevel=2)
        return status[region]


def _unreadable(path: str | Path, error: OSError) -> InputError:
    return InputError(path, f"its status cannot be read ({error.strerror or error}"
                      f"{': ' + str(error.filename) if error.filename else ''}); check the "
                      "file system and permissions, then rerun")


def chunk_slices(n: int, chunk: int) -> list[slice]:
    """The id-slices of the chunks of an ``n``-volume store chunked by ``chunk``."""
    return [slice(start, min(start + chunk, n)) for start in range(0, n, chunk)]


def chunks_to_do(status: np.ndarray, chunk: int, within: slice | None = None) -> list[slice]:
    """The chunks holding a volume that is not ``ok``, optionally only those in ``within``.

    Where ``within`` does not start or end on a chunk boundary, the chunks it cuts are
    included whole: a task always writes whole chunks.
    """
    slices = chunk_slices(len(status), chunk)
    if within is not None:
        start, stop, _ = within.indices(len(status))
        slices = [s for s in slices if s.start < stop and s.stop > start]
    return [s for s in slices if np.any(status[s] != OK)]


def write_units(
    path: str | Path | OpenStore,
    data: Mapping[str, xr.DataArray],
    region: slice,
    status: np.ndarray,
    errors: Iterable[str],
) -> None:
    """Write whole units of the store: their data, then their error text, last their status.

    The status is the units' commit mark, written alone after everything else: a task
    stopped at any point before it leaves the units to be recomputed by a rerun.

    Parameters
    ----------
    path
        The store (or the store opened once: :class:`OpenStore`).
    data
        The units' data variables, each with ``id`` as its first dimension; variables
        may be omitted (they keep their fill value), e.g. for units that failed whole.
    region
        The ``id`` slice of one or more whole, neighbouring units of the store.
    status, errors
        Per volume of the region: the status code and the error text ("" when ok).
    """
    store = path if isinstance(path, OpenStore) else OpenStore(path)
    if data:
        write_region(store, data, region)
    write_region(store, {"error": xr.DataArray(as_strings(errors), dims="id")}, region)
    write_region(store, {"status": xr.DataArray(np.asarray(status, np.int8), dims="id")},
                 region)


def write_region(path: str | Path | OpenStore, data: Mapping[str, xr.DataArray],
                 region: slice) -> None:
    """Write ``data`` into the existing variables of the store at ``region`` of ``id``,
    each write whole before the next (the variables' dimensions are checked).

    Changes no metadata, so the consolidated metadata stays true.
    """
    store = path if isinstance(path, OpenStore) else OpenStore(path)
    for name, variable in data.items():
        array = store.array(name)
        rows = len(range(*region.indices(array.shape[0])))
        if (variable.dims, variable.shape) != (store.dims(name), (rows, *array.shape[1:])):
            raise ValueError(f"{store.path}: {name}[{region.start}:{region.stop}] is "
                             f"{store.dims(name)} {(rows, *array.shape[1:])}, not "
                             f"{variable.dims} {variable.shape}")
        if {"scale_factor", "add_offset"} & set(array.attrs) or variable.dtype.kind in "mM":
            xr.Dataset({name: variable}).to_zarr(store.path, region={"id": region},
                                                 consolidated=False)  # CF-encoded
        else:
            array[region] = np.asarray(variable.values)


class OpenStore:
    """A store opened once for a task's reads and writes: its group's metadata is read
    once (one request in object storage), and its arrays' from its consolidated metadata
    (none: region writes change no array's metadata, and ``raptorz reproject``, which adds
    arrays, consolidates before it fills or lists them); an array that lacks (an older
    store's) is opened from its own. Open again to see what was added since. Reads and
    writes go to Zarr directly: the variables carry no CF encoding but a NaN fill value.
    """

    def __init__(self, path: str | Path, mode: Literal["r", "r+"] = "r+") -> None:
        self.path, self.mode = path, mode
        self.group = zarr.open_group(path, mode=mode, zarr_format=3)
        self._arrays: dict[str, zarr.Array] = {}

    @property
    def attrs(self) -> dict[str, Any]:
        """The group's attributes, as read when it was opened."""
        return dict(self.group.attrs)

    def names(self) -> list[str]:
        """The store's arrays (one listing where it has no consolidated metadata)."""
        consolidated = self.group.metadata.consolidated_metadata
        return list(self.group.array_keys()) if consolidated is None else [
            name for name, meta in consolidated.metadata.items()
            if not isinstance(meta, GroupMetadata)]

    def __contains__(self, name: str) -> bool:
        """Whether the store has the array ``name``: from the consolidated metadata where
        it has some (true of every array made with the store), else from the array's own."""
        if self.group.metadata.consolidated_metadata is not None:
            return name in self.names()
        with contextlib.suppress(KeyError):
            return self.array(name) is not None
        return False

    def array(self, name: str) -> zarr.Array:
        """The array ``name``, opened once (``KeyError`` where there is none)."""
        if not name or "/" in name or "\\" in name or name in (".", ".."):
            raise KeyError(name)  # an array of this store, never a path out of it
        if name not in self._arrays:
            try:
                found = self.group[name]
            except KeyError:  # or consolidated before it was added (by an older raptorz)
                try:
                    found = zarr.open_array(locations.join(self.path, name), mode=self.mode,
                                            zarr_format=3)
                except FileNotFoundError:
                    raise KeyError(name) from None
            if not isinstance(found, zarr.Array):
                raise KeyError(name)
            self._arrays[name] = found
        return self._arrays[name]

    def dims(self, name: str) -> tuple[str, ...]:
        """The dimensions of the array ``name``."""
        return tuple(str(d) for d in getattr(self.array(name).metadata, "dimension_names",
                                             None) or ())


def status_counts(status: np.ndarray) -> dict[str, int]:
    """How many volumes are pending, ok and failed."""
    return {name: int(np.sum(status == code)) for code, name in enumerate(STATUS_NAMES)}


def json_attr(value: Any) -> Any:
    """``value`` made JSON-safe for a Zarr attribute (tuples to lists, paths to str)."""
    return json.loads(json.dumps(value, default=str))
