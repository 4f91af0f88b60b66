"""An embedding task's writes on a worker: its whole units of ``embeddings.zarr``, data
first, then (under the units' lock) status, through the output store opened once for the
task (:class:`raptorz.stores.OpenStore`).

A task reads the store's metadata once when it starts (one request in object storage),
and once more under the units' lock as it commits, to find the projections a reproject
under way has added since: not a listing and every array's metadata per read or write.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import xarray as xr

from raptorz import stores
from raptorz.embedding.embeddings import MATRIX_PREFIX
from raptorz.embedding.projection import Projector, project_ok

if TYPE_CHECKING:
    from raptorz.embedding.kernel import BlockEmbedding
    from raptorz.embedding.regions import RegionEmbedding
    from raptorz.embedding.worker import EmbedTask, _Read


def store_projectors(store: stores.OpenStore, names: Sequence[str] | None = None
                     ) -> list[Projector]:
    """The projectors ``names`` of an opened embeddings store (by default those its
    attributes list), their matrices read from it."""
    info = store.attrs.get("projectors", {})
    return [Projector(name, np.asarray(store.array(MATRIX_PREFIX + name)[...]),
                      info.get(name, {}).get("seed"))
            for name in (list(info) if names is None else names)]


def write_task(task: EmbedTask, output: stores.OpenStore,
               results: list[tuple[_Read, BlockEmbedding | RegionEmbedding | None]],
               projectors: list[Projector]) -> None:
    """Write the task's whole units in one region write, data first, then status (under
    the units' lock, with any projection a reproject added since the task began).

    Volumes it embedded get their rows; those that failed get NaN rows and their error;
    the others of its units (already done) are written back as they are.
    """
    region = slice(task.start, task.stop)
    names = [p.name for p in projectors] + \
        (["tokens"] if task.settings.keep_tokens else []) + ["avgpool"] + \
        (["region_status"] if task.regions is not None else [])
    size = task.stop - task.start
    status, errors = np.full(size, stores.PENDING, np.int8), np.full(size, "", dtype=object)
    kept = np.setdiff1d(np.arange(task.start, task.stop), task.indices) - task.start
    if len(kept):  # only then is anything of the units read back (it may be torn else)
        status[kept] = np.asarray(output.array("status")[region])[kept]
        errors[kept] = np.asarray(output.array("error")[region], dtype=object)[kept]
    data = {}
    for name in names:
        array = output.array(name)
        values = np.full((size, *array.shape[1:]),  # region_status: pending (0)
                         np.nan if array.dtype.kind == "f" else 0, array.dtype)
        if len(kept):
            values[kept] = array.oindex[kept + task.start]
        for read, embedded in results:
            if embedded is not None:
                values[read.usable - task.start] = _variable(embedded, name)
            if name == "region_status":  # every region of a failed volume failed
                values[np.asarray(list(read.errors), np.int64) - task.start] = stores.FAILED
        data[name] = xr.DataArray(values, dims=output.dims(name))
    for name in ("source_checksum", "mask_checksum"):  # older stores lack them
        if name not in output:
            continue
        checksum = np.zeros(size, np.int64)
        if len(kept):
            checksum[kept] = output.array(name).oindex[kept + task.start]
        for read, _ in results:
            found = read.checksums if name == "source_checksum" else read.mask_checksums
            if found is not None:
                checksum[read.usable - task.start] = found
        data[name] = xr.DataArray(checksum, dims="id")
    for read, _ in results:
        status[read.usable - task.start] = stores.OK
        for index, problem in read.errors.items():
            status[index - task.start], errors[index - task.start] = stores.FAILED, problem
        errors[read.usable - task.start] = ""
    stores.write_region(output, data, region)
    # a reproject under way adds its variables (and consolidates), then fills each unit
    # under the unit's lock: committing under it, a task either precedes that fill or
    # sees the variables (in the metadata read now) and fills them
    with stores.unit_lock(task.output, region):
        now = stores.OpenStore(task.output)
        present = now.names()
        matrices = [m[len(MATRIX_PREFIX):] for m in present if m.startswith(MATRIX_PREFIX)]
        added = [name for name in matrices  # both of its variables exist
                 if name not in names and name in present]
        late = {name: xr.DataArray(value, dims=now.dims(name)) for name, value in project_ok(
            data["tokens"].values, status == stores.OK, store_projectors(now, added)).items()
        } if added else {}
        stores.write_units(now, late, region, status, [str(e) for e in errors])


def _variable(embedded: BlockEmbedding | RegionEmbedding, name: str) -> np.ndarray:
    """One store variable of a :class:`~raptorz.embedding.kernel.BlockEmbedding` (or of a
    :class:`~raptorz.embedding.regions.RegionEmbedding`: ``region_status`` too)."""
    if name in ("avgpool", "tokens", "region_status"):
        value = getattr(embedded, name)
        assert value is not None
        return np.asarray(value)
    return embedded.projections[name]
