"""The layouts of raptorz's three stores: their kind, variables and dimensions, and how to
open them. One home for each, so that the stage that writes a store and the stages that
read it cannot drift apart.

``volumes.zarr`` (written by :mod:`raptorz.ingest`, read by :mod:`raptorz.embedding` and
the raw-voxel baseline):

``volume(id, x, y, z)``
    Intensities in [0, 1] (float16 by default), a few whole volumes per chunk.
``source(id)``, ``note(id)``
    The file each volume was read from; a note (e.g. a constant volume) or "".
``spacing(id, axis)``, ``original_shape(id, axis)``
    Voxel spacing in mm, and the shape as read (after reorientation).
``source_size(id)``, ``source_mtime(id)``, ``source_sha256(id)``, ``checksum(id)``
    The source's identity when converted (size, modification time in ns, sha256 or ""),
    and a 64-bit checksum of the stored voxels: the embeddings made from it record it.
``filled_voxels(id)``
    How many NaN or infinite voxels were filled (``fill_nonfinite``); 0 for the others.

``embeddings.zarr`` (written by :mod:`raptorz.embedding`, read by :mod:`raptorz.downstream`):

``<projector>(id, plane, k_<projector>, token)``, ``matrix_<projector>(dim, k_<projector>)``
    One projection variable and its matrix per projector (see :func:`k_dim`).
``tokens(id, plane, token, dim)``
    The pooled, unprojected tokens (only with ``keep_tokens``).
``avgpool(id, dim)``
    The tokens' mean over slices, tokens and planes (the original's baseline).
``source_checksum(id)``
    The ``checksum`` of the volume each embedding was made from: one that differs from
    the volumes store's now is stale.
``mask_checksum(id)``
    In a region embeddings store, the ``checksum`` of the mask each embedding was made
    from: one that differs from the masks store's now is stale too.

``masks.zarr`` (written by :mod:`raptorz.ingest.masks`, read by the region embedding):

``mask(id, x, y, z)``
    Integer labels (0: background) on the grid of the same id's volume in
    ``volumes.zarr``; its attribute ``labels`` maps each region name to its value.
``source(id)``
    The mask file (or folder of binary masks) each was read from.
``source_size(id)``, ``source_mtime(id)``, ``checksum(id)``
    The mask source's identity when converted (total size, latest modification time in
    ns) and a 64-bit checksum of the stored labels: the region embeddings record it.

A region embeddings store (``raptorz embed --masks``) gives the projections, ``tokens``
and ``avgpool`` a ``roi`` dimension after ``id`` (:func:`projection_dims`), with
``region_status(id, roi)``: ok, absent (the volume's mask lacks the region) or failed.

All have ``status(id)`` and ``error(id)`` (:mod:`raptorz.stores`). :meth:`StoreLayout.open`
is how people and the client read a store (lazily, Dask-backed, from the consolidated
metadata); :meth:`StoreLayout.read` is how a task on a worker reads it (plain lazy
indexing with no Dask graph; an embeddings store's metadata read afresh, so that variables
another process just added are seen). A task that writes a store opens it once with
:class:`raptorz.stores.OpenStore`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import numpy as np
import xarray as xr

from raptorz import locations, stores

#: The array axes of ``volume`` after ``id``.
VOLUME_AXES: Final = ("x", "y", "z")

locations.fresh_listings()  # before any store in object storage is opened


@dataclass(frozen=True)
class StoreLayout:
    """One kind of raptorz store: its ``kind`` attribute and its fixed variables' dims.

    Attributes
    ----------
    kind
        The value of the store's :data:`raptorz.stores.KIND_ATTR` attribute.
    dims
        Variable name -> dimensions, for the variables every store of the kind may hold
        (an embeddings store also holds one variable per projector).
    grows
        Whether a step adds variables to a store of this kind once it is made (an
        embeddings store's ``raptorz reproject``).
    """

    kind: str
    dims: Mapping[str, tuple[str, ...]]
    grows: bool = False

    def require(self, path: str | Path) -> None:
        """Refuse ``path`` unless it holds a store of this kind (naming what it holds)."""
        stores.require_kind(path, self.kind)

    def exists(self, path: str | Path) -> bool:
        """Whether ``path`` holds a store of this kind; ``False`` where it holds nothing.

        Raises
        ------
        InputError
            Where ``path`` holds something else (another kind, or not a raptorz store).
        """
        found = stores.store_kind(path)
        if found is not None and found != self.kind:
            self.require(path)
        return found is not None

    def open(self, path: str | Path) -> xr.Dataset:
        """Open the store lazily (Dask arrays), safe while other processes write it."""
        return stores.open_store(path, self.kind)

    def read(self, path: str | Path) -> xr.Dataset:
        """The store for a task on a worker: lazy indexing without Dask.

        A store of a kind that does not grow is read from its consolidated metadata
        where it has some (region writes change no metadata): one request in object
        storage, not a listing and every array's metadata. One that grows is read afresh,
        so that the variables another process just added are seen.
        """
        if not self.grows:
            with contextlib.suppress(ValueError):  # zarr's error where there is none
                return xr.open_zarr(path, consolidated=True, chunks=None, zarr_format=3)
        return xr.open_zarr(path, consolidated=False, chunks=None)


VOLUMES: Final = StoreLayout("volumes", {
    "volume": ("id", *VOLUME_AXES),
    "source": ("id",),
    "spacing": ("id", "axis"),
    "original_shape": ("id", "axis"),
    "note": ("id",),
    "source_size": ("id",),
    "source_mtime": ("id",),
    "source_sha256": ("id",),
    "checksum": ("id",),
    "filled_voxels": ("id",),
    "status": ("id",),
    "error": ("id",),
})

EMBEDDINGS: Final = StoreLayout("embeddings", {
    "tokens": ("id", "plane", "token", "dim"),
    "avgpool": ("id", "dim"),
    "source_checksum": ("id",),
    "status": ("id",),
    "error": ("id",),
}, grows=True)


MASKS: Final = StoreLayout("masks", {
    "mask": ("id", *VOLUME_AXES),
    "source": ("id",),
    "source_size": ("id",),
    "source_mtime": ("id",),
    "checksum": ("id",),
    "status": ("id",),
    "error": ("id",),
})

#: The region dimension of a region embeddings store, after ``id``.
ROI: Final = "roi"
#: ``region_status`` of a region the volume's mask does not hold (beside the stores'
#: pending / ok / failed).
REGION_ABSENT: Final = 3
REGION_STATUS_NAMES: Final = ("pending", "ok", "failed", "absent")
REGION_STATUS_ATTRS: Final = {"flag_values": [0, 1, 2, REGION_ABSENT],
                              "flag_meanings": " ".join(REGION_STATUS_NAMES)}


def k_dim(projector: str) -> str:
    """The name of projector ``projector``'s ``k`` dimension: projectors may differ in K."""
    return f"k_{projector}"


def with_roi(dims: tuple[str, ...], regions: bool = True) -> tuple[str, ...]:
    """``dims`` (``id`` first) as in a region embeddings store where ``regions``: ``roi``
    after ``id``."""
    return (dims[0], *((ROI,) if regions else ()), *dims[1:])


def projection_dims(projector: str, regions: bool = False) -> tuple[str, ...]:
    """The dimensions of projector ``projector``'s variable in an embeddings store (with
    ``regions``, in a region embeddings store: ``roi`` after ``id``)."""
    return with_roi(("id", "plane", k_dim(projector), "token"), regions)


def open_volumes(path: str | Path) -> xr.Dataset:
    """Open a ``volumes.zarr`` lazily (safe while a conversion is writing it)."""
    return VOLUMES.open(path)


def open_masks(path: str | Path) -> xr.Dataset:
    """Open a ``masks.zarr`` lazily (``raptorz masks``)."""
    return MASKS.open(path)


def open_embeddings(path: str | Path) -> xr.Dataset:
    """Open an ``embeddings.zarr`` lazily (safe while a run is still writing it).

    Examples
    --------
    >>> ds = open_embeddings("embeddings.zarr")  # doctest: +SKIP
    >>> ds[list(ds.attrs["projectors"])[0]].sel(plane="A")  # doctest: +SKIP
    """
    return EMBEDDINGS.open(path)


def stale_volumes(path: str | Path, volumes: str | Path) -> np.ndarray:
    """Mask of the volumes embedded ok in the embeddings store ``path`` whose volume in
    ``volumes`` was converted again since (its ``checksum`` differs); none where either
    store predates checksums."""
    mine, theirs = stores.OpenStore(path, "r"), stores.OpenStore(volumes, "r")
    if "source_checksum" not in mine or "checksum" not in theirs:
        return np.zeros(mine.array("status").shape[0], bool)
    ok = stores.read_status(path) == stores.OK
    return ok & (np.asarray(mine.array("source_checksum")[...]) !=
                 np.asarray(theirs.array("checksum")[...]))


def stale_masks(path: str | Path, masks: str | Path | None = None) -> np.ndarray:
    """Mask of the volumes embedded ok in the region embeddings store ``path`` whose mask
    in ``masks`` (by default the masks store ``path`` records) was converted again since
    (its ``checksum`` differs); none for a store without regions, where either store
    predates mask checksums, or where the masks store is gone."""
    mine = stores.OpenStore(path, "r")
    n = mine.array("status").shape[0]
    if masks is None:  # the store's regions attribute names it
        masks = (mine.attrs.get("regions") or {}).get("masks")
    if "mask_checksum" not in mine or not masks or stores.store_kind(masks) != MASKS.kind:
        return np.zeros(n, bool)
    theirs = MASKS.read(masks)
    if "checksum" not in theirs or theirs.sizes["id"] != n:
        return np.zeros(n, bool)
    ok = stores.read_status(path) == stores.OK
    return ok & (np.asarray(mine.array("mask_checksum")[...]) != theirs["checksum"].values)
