"""``volumes.zarr``: read, orient, scale and shape volumes into one resumable store.

The store is a Zarr v3 xarray Dataset: ``volume(id, x, y, z)`` in [0, 1] (float16 by
default), chunked along ``id`` only, a few whole volumes per chunk, Blosc-zstd
compressed; per volume ``source``, ``spacing`` (mm), ``original_shape`` (as read, after
reorientation), ``note`` (e.g. a constant volume), ``status`` and ``error``. Each task
converts one whole chunk and writes it through :mod:`raptorz.stores` (data, then
status), so a killed run leaves unfinished volumes pending and a rerun redoes only them,
writing the chunk's other volumes back as they are.

Per volume the store also records its source's identity when converted
(``source_size``, ``source_mtime`` in ns, ``source_sha256`` with ``hash_sources``) and the
``checksum`` of its stored voxels; the store's ``checksum`` attribute is a checksum of
those, so it changes whenever any volume's content does. A rerun
reports sources changed since (and keeps their volumes) unless asked to reconvert them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Final, Literal, get_args

import dask.array as da
import numpy as np
import xarray as xr
from distributed import Client, KilledWorker, as_completed
from distributed.deploy import Cluster
from zarr.codecs import BloscCodec, BloscShuffle

from raptorz import locations, stores
from raptorz.cluster import connect, create_cluster
from raptorz.errors import InputError, RaptorzWarning, SettingsError
from raptorz.ingest._guard import DEFAULT_MAX_VOLUME_BYTES
from raptorz.ingest._shape import Fit, native_shape
from raptorz.ingest.bids import SPLIT_FRACTIONS, BidsQuery, write_bids_labels
from raptorz.ingest.conversion import (
    GONE,
    ChunkResult,
    Dtype,
    Settings,
    convert_chunk,
    item_bytes,
    source_identity,
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
#: The error of a volume left out with ``exclude``.
EXCLUDED: Final = "excluded (exclude=): not converted"
#: The error of a volume whose reading killed its worker process.
KILLED: Final = "worker died while reading it: out of memory?"

@dataclasses.dataclass(frozen=True)
class ConvertSummary:
    """The outcome of :func:`convert`.

    ``converted`` and ``failed`` count this run's volumes; ``skipped`` those already
    done by an earlier run; ``failures`` and ``notes`` map ids to their text.
    """

    store: str | Path
    converted: int
    failed: int
    skipped: int
    failures: dict[str, str]
    notes: dict[str, str]
    labels: str | Path | None

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
            "source_size": ("id", lazy(dtype="int64"), {"units": "bytes"}),
            "source_mtime": ("id", lazy(dtype="int64"),
                             {"long_name": "modification time, ns since the Unix epoch"}),
            "source_sha256": ("id", stores.as_strings([""] * n)),
            "checksum": ("id", lazy(dtype="int64"),
                         {"long_name": "64-bit blake2b of the stored voxels"}),
            "filled_voxels": (VOLUMES.dims["filled_voxels"], lazy(dtype="int64"),
                              {"long_name": "NaN or infinite voxels filled"}),
            **stores.status_variables(n, chunk),
        },
        coords={"id": stores.as_strings(s.id for s in sources),
                "axis": stores.as_strings(VOLUME_AXES)},
        attrs={**stores.provenance(), "convert": settings.record(), "checksum": ""},
    )
    ds.volume.encoding["compressors"] = [BloscCodec(
        cname="zstd", clevel=3, shuffle=BloscShuffle.shuffle)]
    for name in ("source", "note", "source_sha256"):
        ds[name].encoding.update(strings)
    return ds


def _check_rerun(path: str | Path, sources: Sequence[Source], settings: Settings) -> int:
    """Refuse a rerun that differs from the store's run; return the store's chunk size."""
    ds = open_volumes(path)
    before = [str(s) for s in ds.source.values]
    if before != [str(s) for s in sources]:
        raise InputError(path, f"already holds {len(before)} volumes from other sources "
                         f"(this run names {len(sources)}); rerun with the same sources to "
                         "resume, or choose another output")
    recorded, wanted = ds.attrs.get("convert", {}), settings.record()
    changed = [k for k in wanted if _differs(k, recorded.get(k), wanted[k])]
    if changed:
        raise InputError(path, "was converted with other options (" + ", ".join(
            f"{k}: {recorded.get(k)} vs {wanted[k]}" for k in changed) + "); rerun with the "
            "same options to resume, or choose another output")
    return int(ds.volume.encoding["chunks"][0])


def _differs(option: str, recorded: object, wanted: object) -> bool:
    """Whether a store's recorded option differs from this run's; a reader added to the
    per-reader intensity defaults since the store was made changes none of its volumes."""
    if option == "intensity_defaults" and isinstance(recorded, dict) and isinstance(
            wanted, dict):
        return any(wanted.get(kind) != value for kind, value in recorded.items())
    return recorded != wanted


def _to_redo(path: str | Path, sources: Sequence[Source], status: np.ndarray,
             reconvert_changed: bool, hash_sources: bool, read: ReadOptions) -> np.ndarray:
    """Mask of the volumes to convert: those not ok, and, with ``reconvert_changed``, those
    whose source changed since; the others changed (or gone) are reported, and kept."""
    redo = status != stores.OK
    ds = VOLUMES.read(path)
    if "source_size" not in ds:  # an older raptorz recorded no identities
        return redo
    size, mtime = ds.source_size.values, ds.source_mtime.values
    digest = np.asarray(ds.source_sha256.values, dtype=object)
    gone: list[int] = []
    changed: list[int] = []
    for j in map(int, np.flatnonzero(~redo)):
        now = source_identity(sources[j], False, read.storage_options)
        if now == GONE:
            gone.append(j)
        elif now[:2] != (size[j], mtime[j]) and not (
                hash_sources and digest[j] and
                source_identity(sources[j], True, read.storage_options)[2] == digest[j]):
            changed.append(j)
    if gone:
        warnings.warn(f"{_named(sources, gone)}: gone since converted; kept as converted",
                      RaptorzWarning, stacklevel=3)
    if changed and not reconvert_changed:
        warnings.warn(f"{_named(sources, changed)}: changed since converted; kept as "
                      "converted (reconvert_changed=True reconverts them)", RaptorzWarning,
                      stacklevel=3)
    redo[changed] = reconvert_changed
    return redo


def _named(sources: Sequence[Source], positions: Sequence[int]) -> str:
    listed = ", ".join(str(sources[j]) for j in positions[:10])
    return listed + (f" and {len(positions) - 10} more" if len(positions) > 10 else "")


def _excluded(path: str | Path, sources: Sequence[Source], exclude: Sequence[str]) -> np.ndarray:
    """Mask of the volumes ``exclude`` names that are not yet marked excluded."""
    ids = [s.id for s in sources]
    unknown = sorted(set(exclude) - set(ids))
    if unknown:
        raise SettingsError(f"names {len(unknown)} id(s) that are not volumes of this run: "
                            f"{', '.join(unknown[:10])}", option="exclude")
    if not exclude:  # the errors are read only then: a torn chunk's cannot be decoded
        return np.zeros(len(ids), bool)
    ds = VOLUMES.read(path)
    marked = (stores.read_status(path) == stores.FAILED) & (ds.error.values == EXCLUDED)
    return np.isin(ids, list(exclude)) & ~marked


def _one_at_a_time(client: Client, task: tuple, done: Callable[[ChunkResult], None]) -> None:
    """Convert a chunk whose task killed its worker volume by volume; mark the ones that
    kill theirs failed (:data:`KILLED`). Each task writes the whole chunk: one at a time."""
    path, region, sources, settings, redo, refused, hash_sources = task
    killed = {}
    for j in redo:
        future = client.submit(convert_chunk, path, region, sources, settings, (j,), {},
                               hash_sources, pure=False)
        try:
            done(future.result())
        except KilledWorker:
            killed[j] = f"{sources[j]}: {KILLED}"
    if killed or refused:
        done(convert_chunk(path, region, sources, settings, (), {**refused, **killed}))


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
    hash_sources: bool = False,
    reconvert_changed: bool = False,
    exclude: Sequence[str] = (),
    fill_nonfinite: float | Literal["min"] | None = None,
    bids: str | Mapping[str, str] | None = None,
    bids_derivatives: str | None = None,
    split_seed: int = 0,
    split_fractions: Sequence[float] = SPLIT_FRACTIONS,
    storage_options: Mapping[str, Any] | None = None,
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
        Where MedMNIST or BIDS labels go (default: ``output`` with ``.zarr`` replaced by
        ``.labels.csv``).
    series, min_slices
        DICOM folders holding several series: only the series named, else all but
        localizers and series of fewer slices (see
        :func:`raptorz.ingest.sources.resolve_sources`).
    max_volume_bytes
        The largest volume accepted, in bytes of float32 voxels (default 4 GiB), checked
        on every header before anything is allocated; also bounds an npz's arrays.
    hash_sources
        Record each source's sha256 besides its size and modification time; on a rerun a
        source whose size or time changed but whose bytes did not is not reported.
    reconvert_changed
        Reconvert the volumes whose source changed since they were converted; without
        it they are kept as they are, with a :class:`~raptorz.errors.RaptorzWarning`
        naming them.
    exclude
        Volume ids to leave out: marked failed ("excluded"), not read, in a new store or
        one that exists (e.g. a volume that kills its worker: run without it).
    fill_nonfinite
        Fill the NaN and infinite voxels of a volume with this value, or its smallest
        finite one (``"min"``), and record how many in ``filled_voxels(id)``; by default
        such volumes fail.
    bids, bids_derivatives
        Read ``sources``, a BIDS dataset's root, for the images these entities name
        (``{"suffix": "T1w", "ses": "2"}`` or ``"suffix=T1w,ses=2"``; ``suffix`` is
        required), from the pipeline outputs ``derivatives/<bids_derivatives>`` where
        given; ids keep the entities that vary (``sub-01_ses-2``). The labels CSV comes
        from ``participants.tsv``, ``sessions.tsv`` and the sidecars
        (:func:`raptorz.ingest.bids.write_bids_labels`).
    split_seed, split_fractions
        The BIDS labels' split of the subjects into train, validation and test.
    storage_options
        fsspec options for sources given as URLs (``s3://``, ``gs://``, ``https://``), e.g.
        ``{"anon": True}`` for a public bucket; ``output`` may be a URL too, opened with the
        environment's credentials (docs/cloud.md).
    progress
        Called as ``progress(done, total)`` once at the start with ``done=0``, then
        after each chunk with the number of volumes it held; ``total`` is the number
        of volumes this run converts.

    A volume whose reading kills its worker process on a cluster (out of memory) is
    found by converting its chunk's volumes one at a time, and marked failed; the rest
    of the run goes on.

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
    output = locations.location(output)
    read = ReadOptions(member, max_member_bytes, orientation, max_volume_bytes, fill_nonfinite,
                       dict(storage_options) if storage_options else None)
    if bids is None and bids_derivatives is not None:
        raise SettingsError("selects the images of a BIDS dataset: give bids= too",
                            option="bids_derivatives")
    query = None if bids is None else BidsQuery.parse(bids, bids_derivatives, split_seed,
                                                      split_fractions)
    selected = resolve_sources(sources, folder=folder, manifest=manifest, start=start,
                               many=many, series=series, min_slices=min_slices,
                               max_volume_bytes=max_volume_bytes, bids=query,
                               storage_options=read.storage_options)
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
    labels_path = labels_out or locations.sibling(
        output, locations.name(output).removesuffix(".zarr") + ".labels.csv")
    labels = (write_labels(selected, labels_path) if query is None else
              write_bids_labels(sources[0], query, selected, labels_path, read.storage_options))
    redo = _to_redo(output, selected, stores.read_status(output), reconvert_changed,
                    hash_sources, read)
    refused = _excluded(output, selected, exclude)
    redo &= ~refused
    tasks = [(str(output), region, selected[region], settings,
              tuple(int(j) for j in np.flatnonzero(redo[region])),
              {int(j): EXCLUDED for j in np.flatnonzero(refused[region])}, hash_sources)
             for region in stores.chunks_to_do(np.where(redo | refused, stores.PENDING,
                                                        stores.OK), per_chunk)]
    results: list[ChunkResult] = []

    total = int(redo.sum() + refused.sum())

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
                    create_cluster("local", workers=count, gpus=(), dashboard_address=None))
            client = stack.enter_context(connect(cluster))
            futures = {client.submit(convert_chunk, *task, pure=False): task for task in tasks}
            killed = []
            for future in as_completed(futures, loop=client.loop):
                try:
                    done(future.result())
                except KilledWorker:
                    killed.append(futures[future])
            for task in killed:
                _one_at_a_time(client, task, done)
    if results:  # the store's checksum follows its volumes'
        with stores.store_lock(output, "convert"):
            if "checksum" in (ds := VOLUMES.read(output)):
                digest = hashlib.blake2b(ds.checksum.values.tobytes(), digest_size=8)
                stores.update_attrs(output, {"checksum": digest.hexdigest()})
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
