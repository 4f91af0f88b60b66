"""``volumes.zarr``: read, orient, scale and shape volumes into one resumable store.

The store is a Zarr v3 xarray Dataset: ``volume(id, x, y, z)`` in [0, 1] (float16 by
default), chunked along ``id`` only, a few whole volumes per chunk, Blosc-zstd
compressed; per volume ``source``, ``spacing`` (mm), ``original_shape`` (as read, after
reorientation), ``note`` (e.g. a constant volume), ``status`` and ``error``. Each task
converts one whole chunk and writes it through :mod:`raptorz.stores` (data, then
status), so a killed run leaves unfinished volumes pending and a rerun redoes only them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Final, get_args

import dask.array as da
import xarray as xr
from distributed import Client, as_completed
from distributed.deploy import Cluster
from zarr.codecs import BloscCodec, BloscShuffle

from raptorz import stores
from raptorz.cluster import connect, create_cluster
from raptorz.errors import InputError, RaptorzWarning, SettingsError
from raptorz.ingest._guard import DEFAULT_MAX_VOLUME_BYTES
from raptorz.ingest._shape import Fit, native_shape
from raptorz.ingest.conversion import (
    ChunkResult,
    Dtype,
    Settings,
    convert_chunk,
    item_bytes,
)
from raptorz.ingest.intensity import Intensity, parse_intensity
from raptorz.ingest.readers import (
    DEFAULT_MEMBER,
    Orientation,
    ReadOptions,
    Source,
)
from raptorz.ingest.sources import DEFAULT_MIN_SLICES, resolve_sources, write_labels
from raptorz.layouts import VOLUME_AXES, VOLUMES, open_volumes

#: Uncompressed bytes aimed at per chunk: a few whole volumes, at least one.
CHUNK_BYTES: Final = 64 * 2**20
#: Fewest voxel bytes to write for which ``workers=None`` starts a local cluster.
CLUSTER_BYTES: Final = 2 * 2**30

@dataclasses.dataclass(frozen=True)
class ConvertSummary:
    """The outcome of :func:`convert`.

    ``converted`` and ``failed`` count this run's volumes; ``skipped`` those already
    done by an earlier run; ``failures`` and ``notes`` map ids to their text.
    """

    store: Path
    converted: int
    failed: int
    skipped: int
    failures: dict[str, str]
    notes: dict[str, str]
    labels: Path | None

    @property
    def ok(self) -> bool:
        return self.failed == 0


def _template(sources: Sequence[Source], settings: Settings, chunk: int) -> xr.Dataset:
    n, shape = len(sources), settings.shape

    def lazy(*tail: int, dtype: str) -> da.Array:
        return da.zeros((n, *tail), chunks=(chunk, *tail), dtype=dtype)

    strings = {"chunks": (chunk,)}
    ds = xr.Dataset(
        {
            "volume": (VOLUMES.dims["volume"], lazy(*shape, dtype=settings.dtype),
                       {"long_name": "intensity scaled to [0, 1]"}),
            "source": ("id", stores.as_strings(map(str, sources))),
            "spacing": (VOLUMES.dims["spacing"], lazy(3, dtype="float64"), {"units": "mm"}),
            "original_shape": (VOLUMES.dims["original_shape"], lazy(3, dtype="int32"),
                               {"long_name": "shape as read, after reorientation"}),
            "note": ("id", stores.as_strings([""] * n)),
            **stores.status_variables(n, chunk),
        },
        coords={"id": stores.as_strings(s.id for s in sources),
                "axis": stores.as_strings(VOLUME_AXES)},
        attrs={**stores.provenance(), "convert": settings.record()},
    )
    ds.volume.encoding["compressors"] = [BloscCodec(
        cname="zstd", clevel=3, shuffle=BloscShuffle.shuffle)]
    ds.source.encoding.update(strings)
    ds.note.encoding.update(strings)
    return ds


def _check_rerun(path: Path, sources: Sequence[Source], settings: Settings) -> int:
    """Refuse a rerun that differs from the store's run; return the store's chunk size."""
    ds = open_volumes(path)
    before = [str(s) for s in ds.source.values]
    if before != [str(s) for s in sources]:
        raise InputError(path, f"already holds {len(before)} volumes from other sources "
                         f"(this run names {len(sources)}); rerun with the same sources to "
                         "resume, or choose another output")
    recorded, wanted = ds.attrs.get("convert", {}), settings.record()
    changed = [k for k in wanted if recorded.get(k) != wanted[k]]
    if changed:
        raise InputError(path, "was converted with other options (" + ", ".join(
            f"{k}: {recorded.get(k)} vs {wanted[k]}" for k in changed) + "); rerun with the "
            "same options to resume, or choose another output")
    return int(ds.volume.encoding["chunks"][0])


def convert(
    sources: Sequence[str | Path] = (),
    output: str | Path = "volumes.zarr",
    *,
    folder: str | Path | None = None,
    manifest: str | Path | None = None,
    start: int = 0,
    many: int | None = None,
    member: str = DEFAULT_MEMBER,
    max_member_bytes: int = 2**31,
    intensity: str | Intensity | None = None,
    orientation: Orientation = "ras",
    shape: tuple[int, int, int] | None = None,
    fit: Fit = "resample",
    dtype: Dtype = "float16",
    chunk: int | None = None,
    workers: int | None = None,
    cluster: Client | Cluster | str | None = None,
    labels_out: str | Path | None = None,
    progress: Callable[[int, int], None] | None = None,
    series: Sequence[str] = (),
    min_slices: int = DEFAULT_MIN_SLICES,
    max_volume_bytes: int = DEFAULT_MAX_VOLUME_BYTES,
) -> ConvertSummary:
    """Convert volumes into the store ``output``, or resume an unfinished conversion.

    Parameters
    ----------
    sources, folder, manifest, start, many
        What to read (see :func:`raptorz.ingest.sources.resolve_sources`).
    member, max_member_bytes
        The NIfTI member of UK Biobank zips, and the cap on its decompressed size.
    intensity
        A preset (``minmax``, ``percentile[:LO,HI]``, ``range:LO,HI``, ``divide:N``,
        ``ct:PRESET``); ``None`` picks per reader: percentile for NIfTI and DICOM,
        ``range:0,1280`` for UK Biobank zips, ``divide:256`` for MedMNIST.
    orientation
        ``ras`` (closest canonical) or ``native`` (array order as stored).
    shape, fit
        A target shape, reached by ``resample`` or ``pad`` (pad / crop); without it
        all volumes must share one shape.
    dtype
        Stored precision of ``volume``.
    chunk
        Volumes per chunk (default: as many as fit in 64 MB, at least one).
    workers
        Processes of the local Dask cluster (default: one per CPU, at most one per
        chunk, where over 2 GiB of voxels are to be written); with 1, with one chunk to
        do, or by default for smaller conversions, the work runs in this process.
    cluster
        Convert on this cluster instead (a :class:`~distributed.Client`, a cluster, or
        a scheduler address such as ``tcp://host:8786``); its workers must see the
        sources and ``output`` at the same paths.
    labels_out
        Where MedMNIST labels go (default: ``output`` with ``.zarr`` replaced by
        ``.labels.csv``).
    series, min_slices
        DICOM folders holding several series: only the series named, else all but
        localizers and series of fewer slices (see
        :func:`raptorz.ingest.sources.resolve_sources`).
    max_volume_bytes
        The largest volume accepted, in bytes of float32 voxels (default 4 GiB), checked
        on every header before anything is allocated; also bounds an npz's arrays.
    progress
        Called as ``progress(done, total)`` once at the start with ``done=0``, then
        after each chunk with the number of volumes it held; ``total`` is the number
        of volumes this run converts.

    Returns
    -------
    ConvertSummary
        Counts, failures (id: error) and notes; constant volumes also raise a
        :class:`~raptorz.errors.RaptorzWarning`.
    """
    for name, value, allowed in (("orientation", orientation, get_args(Orientation)),
                                 ("fit", fit, get_args(Fit)), ("dtype", dtype, get_args(Dtype))):
        if value not in allowed:
            raise SettingsError(f"must be one of {', '.join(allowed)}, not {value!r}",
                                option=name)
    output = Path(output)
    selected = resolve_sources(sources, folder=folder, manifest=manifest, start=start,
                               many=many, series=series, min_slices=min_slices,
                               max_volume_bytes=max_volume_bytes)
    read = ReadOptions(member, max_member_bytes, orientation, max_volume_bytes)
    scaling = parse_intensity(intensity) if isinstance(intensity, str) else intensity
    exists = VOLUMES.exists(output)
    if not exists:
        target = shape or native_shape(selected, read)
        settings = Settings(read, scaling, target, fit if shape else None, dtype)
        per_chunk = chunk or max(1, min(len(selected), CHUNK_BYTES // item_bytes(settings)))
        # False: another process created it first: resume it like any store
        exists = not stores.create_store(output, _template(selected, settings, per_chunk),
                                         VOLUMES.kind)
    if exists:  # resume: the shape policy is the store's unless given again
        policy = open_volumes(output).attrs["convert"]["shape_policy"]
        recorded_fit = None if policy["fit"] == "none" else policy["fit"]
        settings = Settings(read, scaling, shape or tuple(policy["shape"]),
                             fit if shape else recorded_fit, dtype)
        per_chunk = _check_rerun(output, selected, settings)
    labels = write_labels(selected, labels_out or output.with_name(
        output.name.removesuffix(".zarr") + ".labels.csv"))
    status = stores.read_status(output)
    todo = stores.chunks_to_do(status, per_chunk)
    tasks = [(str(output), region, selected[region], settings) for region in todo]
    results: list[ChunkResult] = []

    total = sum(r.stop - r.start for r in todo)

    def done(result: ChunkResult) -> None:
        results.append(result)
        if progress:
            progress(len(result.ids), total)

    if progress:
        progress(0, total)

    # Starting worker processes costs seconds each (imports): by default only worth it
    # for large conversions.
    todo_bytes = total * item_bytes(settings)
    default = (os.cpu_count() or 1) if todo_bytes >= CLUSTER_BYTES else 1
    count = min(workers or default, len(tasks))
    if cluster is None and count <= 1:
        for task in tasks:
            done(convert_chunk(*task))
    elif tasks:
        with contextlib.ExitStack() as stack:
            if cluster is None:
                cluster = stack.enter_context(
                    create_cluster("local", workers=count, dashboard_address=None))
            client = stack.enter_context(connect(cluster))
            futures = [client.submit(convert_chunk, *task, pure=False) for task in tasks]
            for future in as_completed(futures, loop=client.loop):
                done(future.result())
    failures = {i: e for r in results for i, s, e in zip(r.ids, r.status, r.errors,
                                                          strict=True) if s != stores.OK}
    notes = {i: n for r in results for i, n in zip(r.ids, r.notes, strict=True) if n}
    for volume_id, note in notes.items():
        warnings.warn(f"{volume_id}: {note}; converted", RaptorzWarning, stacklevel=2)
    return ConvertSummary(
        store=output, converted=sum(len(r.ids) for r in results) - len(failures),
        failed=len(failures), skipped=len(selected) - sum(len(r.ids) for r in results),
        failures=failures, notes=notes, labels=labels,
    )
