"""The embedding run: the Raptor kernel mapped over ``volumes.zarr`` on a Dask cluster.

Each task gets a store path and a few volume indices (never arrays, never the model),
loads the encoder once per worker process (:func:`worker_encoder`), reads its volumes
lazily, embeds the ones converted fine, and writes their whole region of
``embeddings.zarr`` itself with :func:`raptorz.stores.write_chunk` (data, then status),
returning only counts. Tasks are idempotent: a task rerun on another worker after a
worker died rewrites the same values.

Resume: a volume is to do while its embedding is pending, or failed while its source is
ok (a kernel failure is retried; a volume that failed conversion is recorded as failed
and left alone). ``start`` / ``many`` select ids exactly as the original's manifest
options do; since the embeddings store holds one volume per chunk, processes given
disjoint ranges never write the same chunk.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr
import zarr
from distributed import Client, as_completed
from distributed.deploy import Cluster

from raptorz import stores
from raptorz.cluster import GPU_RESOURCE, advertises_gpus, connect, create_cluster, visible_gpus
from raptorz.embedding.embeddings import (
    KIND,
    check_identity,
    contiguous_runs,
    create_embeddings,
    embeddings_template,
    k_dim,
    stored_projectors,
    token_kinds,
)
from raptorz.embedding.encoders import (
    DEFAULT_ENCODER,
    RANDOM_WEIGHTS,
    Encoder,
    Precision,
    create_encoder,
)
from raptorz.embedding.kernel import PLANE_NAMES, KernelSettings, embed_block
from raptorz.embedding.projection import Projector, load_projector
from raptorz.errors import InputError, RaptorzError

VOLUMES_KIND = "volumes"


@dataclass(frozen=True)
class EncoderOptions:
    """What builds the encoder on a worker (hashable: the key of the worker's cache)."""

    name: str = DEFAULT_ENCODER
    weights: str | None = None
    precision: Precision | None = None
    img_size: int | None = None


@dataclass(frozen=True)
class ChunkJob:
    """One task: embed volumes ``indices`` (sorted, within one volumes chunk)."""

    volumes: str
    output: str
    indices: tuple[int, ...]
    encoder: EncoderOptions
    settings: KernelSettings
    torch_threads: int | None


@dataclass(frozen=True)
class EmbedSummary:
    """What an embedding run did, over the ids it was asked for.

    Attributes
    ----------
    output
        The embeddings store.
    total, ok, failed
        Volumes in the selected range, and how many of them are embedded / failed now;
        the rest are still pending (a task that kept failing, e.g. ``KilledWorker``).
    computed
        Volumes embedded (or attempted) by this call; 0 when there was nothing to do.
    errors
        Failed volume id -> error, over the range.
    seconds
        Wall time of the call.
    """

    output: Path
    total: int
    ok: int
    failed: int
    computed: int
    errors: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def pending(self) -> int:
        """Volumes of the range neither embedded nor failed: a rerun will retry them."""
        return self.total - self.ok - self.failed

    @property
    def nothing_to_do(self) -> bool:
        """Whether the store was already complete for the range."""
        return self.computed == 0


def embed(
    volumes: str | Path,
    output: str | Path,
    projectors: Sequence[Projector | str | Path],
    *,
    encoder: str = DEFAULT_ENCODER,
    weights: str | Path | None = None,
    settings: KernelSettings | None = None,
    precision: Precision | None = None,
    cluster: Client | Cluster | str | None = None,
    start: int = 0,
    many: int | None = None,
    torch_threads: int | None = None,
    progress: bool = True,
) -> EmbedSummary:
    """Embed the volumes of ``volumes`` into the store ``output`` on a Dask cluster.

    Parameters
    ----------
    volumes
        A ``volumes.zarr`` store (``raptorz convert``).
    output
        The ``embeddings.zarr`` store: created, or resumed where it exists.
    projectors
        :class:`~raptorz.embedding.projection.Projector` objects or ``.npy`` files.
    encoder, weights, precision
        The slice encoder (:func:`~raptorz.embedding.encoders.create_encoder`), built once
        per worker.
    settings
        :class:`~raptorz.embedding.kernel.KernelSettings` (planes, preprocessing, tokens, ...).
    cluster
        A :class:`~distributed.Client`, a cluster, a scheduler address, or ``None`` for
        a cluster started for this call (one worker per GPU, else one CPU worker).
    start, many
        Embed only ids ``start`` to ``start + many`` (the original's job splitting).
    torch_threads
        Torch threads per worker for CPU work (default: every CPU for the default
        cluster, else the worker's own setting, which a Dask nanny sets to 1).
    progress
        Show a progress bar (a widget in Jupyter) and print the dashboard address.

    Returns
    -------
    EmbedSummary
    """
    began = time.perf_counter()
    settings = settings or KernelSettings()
    volumes, output = Path(volumes).resolve(), Path(output).resolve()
    loaded = [p if isinstance(p, Projector) else load_projector(p) for p in projectors]
    source = stores.open_store(volumes, VOLUMES_KIND)
    ids = np.asarray(source["id"].values.tolist(), dtype=str)
    selected = _selection(len(ids), start, many)
    options = EncoderOptions(encoder, _weights_option(weights), precision)
    attrs = _attrs(volumes, source.attrs, settings, projectors=loaded)
    exists = stores.store_kind(output) is not None
    if exists:
        stores.require_kind(output, KIND)
        check_identity(output, ids, attrs, [p.provenance() for p in loaded],
                       keys=("source", "settings"))  # the encoder is not loaded yet
    todo = _todo(volumes, output if exists else None, selected)
    if not todo.any():
        return _summary(output, ids, selected, 0, began)
    if cluster is None and torch_threads is None:
        torch_threads = os.cpu_count()  # the default cluster's one CPU worker gets them all
    with _client(cluster) as client:
        if progress:
            print(f"raptorz embed: dashboard at {client.dashboard_link}", file=sys.stderr)
        resources = {GPU_RESOURCE: 1} if advertises_gpus(client) else None
        info = client.submit(_encoder_provenance, options, resources=resources,
                             pure=False).result()
        if "refused" in info:
            raise RaptorzError(info["refused"])
        template = embeddings_template(
            list(ids), plane_names=[PLANE_NAMES[p] for p in settings.planes], projectors=loaded,
            token_kind=token_kinds(info["num_tokens"], info["num_prefix_tokens"],
                                   tokens=settings.tokens),
            embed_dim=info["embed_dim"], keep_tokens=settings.keep_tokens,
            attrs={**attrs, "encoder": info},
        )
        create_embeddings(output, template)
        todo = _todo(volumes, output, selected)  # another process may have done some
        jobs = [ChunkJob(str(volumes), str(output), tuple(int(i) for i in group), options,
                         settings, torch_threads)
                for group in _groups(np.flatnonzero(todo), _id_chunk(source))]
        _run(client, jobs, resources, total=int(selected.sum()),
             done=int(selected.sum() - todo.sum()), progress=progress)
    return _summary(output, ids, selected, int(todo.sum()), began)


def _weights_option(weights: str | Path | None) -> str | None:
    """``weights`` as workers receive it: an absolute path, ``RANDOM_WEIGHTS`` or ``None``."""
    if weights is None or str(weights) == RANDOM_WEIGHTS:
        return None if weights is None else RANDOM_WEIGHTS
    return str(Path(weights).resolve())


def _selection(n: int, start: int, many: int | None) -> np.ndarray:
    """Boolean mask of the ids ``start`` to ``start + many``."""
    if start < 0 or (many is not None and many < 1):
        raise InputError("--start/--many", f"need start >= 0 and many >= 1, got {start}, {many}")
    if start >= n:
        raise InputError("--start", f"{start} is past the last of the {n} volumes")
    mask = np.zeros(n, bool)
    mask[start: None if many is None else start + many] = True
    return mask


def _todo(volumes: Path, output: Path | None, selected: np.ndarray) -> np.ndarray:
    """Mask of selected volumes to embed: pending, or failed while the source is ok."""
    if output is None:
        return selected.copy()
    mine, theirs = stores.read_status(output), stores.read_status(volumes)
    retry = (mine == stores.FAILED) & (theirs == stores.OK)
    return selected & ((mine == stores.PENDING) | retry)


def _id_chunk(source: xr.Dataset) -> int:
    """Volumes per chunk of the volumes store (a task reads one chunk)."""
    return int(source["volume"].encoding.get("chunks", source["volume"].shape)[0])


def _groups(indices: np.ndarray, chunk: int) -> list[np.ndarray]:
    """``indices`` grouped by the volumes chunk that holds them."""
    if len(indices) == 0:
        return []
    return list(np.split(indices, np.flatnonzero(np.diff(indices // chunk)) + 1))


def _attrs(volumes: Path, source_attrs: dict[str, Any], settings: KernelSettings, *,
           projectors: Sequence[Projector]) -> dict[str, Any]:
    """Provenance attributes of a new embeddings store (the encoder's come from a worker)."""
    return {
        **stores.provenance(),
        "settings": dataclasses.asdict(settings),
        "projectors": {p.name: p.provenance() for p in projectors},
        "source": {"path": str(volumes), "attrs": source_attrs},
    }


@contextlib.contextmanager
def _client(cluster: Client | Cluster | str | None) -> Iterator[Client]:
    """A client for ``cluster``; a default cluster lives only for the call."""
    if cluster is not None:
        with connect(cluster) as client:
            yield client
        return
    with create_cluster("cuda" if visible_gpus() else "local") as made, connect(made) as client:
        yield client


def _run(client: Client, jobs: list[ChunkJob], resources: dict[str, int] | None, *,
         total: int, done: int, progress: bool) -> None:
    """Submit the jobs and follow them; a job that dies leaves its volumes pending."""
    from tqdm.auto import tqdm

    futures = [client.submit(_embed_chunk, job, resources=resources, pure=False,
                             key=f"raptorz-embed-{job.indices[0]}-{os.getpid()}-{time.time_ns()}")
               for job in jobs]
    with tqdm(total=total, initial=done, unit="vol", disable=not progress,
              desc="embed", file=sys.stderr) as bar:
        for future in as_completed(futures):
            if future.status == "error":
                error = future.exception()
                print(f"raptorz embed: a task failed and its volumes stay pending "
                      f"({type(error).__name__}: {error}); rerun to retry", file=sys.stderr)
            else:
                bar.update(future.result())
            future.release()


def _summary(output: Path, ids: np.ndarray, selected: np.ndarray, computed: int,
             began: float) -> EmbedSummary:
    status = stores.read_status(output) if output.exists() else np.zeros(len(ids), np.int8)
    failed = selected & (status == stores.FAILED)
    errors: dict[str, str] = {}
    if failed.any():
        error = zarr.open_array(output / "error", mode="r")
        errors = {str(ids[i]): str(error[int(i)]) for i in np.flatnonzero(failed)}
    return EmbedSummary(output, int(selected.sum()), int((selected & (status == stores.OK)).sum()),
                        int(failed.sum()), computed, errors, time.perf_counter() - began)


# --- On the workers --------------------------------------------------------------------

_ENCODERS: dict[EncoderOptions, Encoder] = {}
_PROJECTORS: dict[tuple[str, str], list[Projector]] = {}
#: One kernel at a time per worker process: it already fills the device or the cores.
_KERNEL_LOCK = threading.Lock()


def worker_encoder(options: EncoderOptions) -> Encoder:
    """The encoder of ``options``, built once per process and kept for later tasks."""
    if options not in _ENCODERS:
        _ENCODERS.clear()  # one model per worker: free the previous one first
        _ENCODERS[options] = create_encoder(options.name, weights=options.weights,
                                            precision=options.precision,
                                            img_size=options.img_size)
    return _ENCODERS[options]


def _encoder_provenance(options: EncoderOptions) -> dict[str, Any]:
    with _KERNEL_LOCK:
        try:
            return worker_encoder(options).provenance()
        except RaptorzError as error:
            # returned, not raised: a raised one is also logged by the worker (printed twice)
            return {"refused": str(error)}


def _worker_projectors(output: str) -> list[Projector]:
    """All projectors of the store (those added later too), read once per process."""
    # chunks=None: plain lazy indexing, no dask graph computed from inside a task
    ds = xr.open_zarr(output, consolidated=False, chunks=None)
    key = (output, str(ds.attrs.get("projectors")))
    if key not in _PROJECTORS:
        _PROJECTORS[key] = stored_projectors(ds)
    return _PROJECTORS[key]


def _embed_chunk(job: ChunkJob) -> int:
    """Embed and write one job's volumes; returns how many it wrote."""
    import torch

    with _KERNEL_LOCK:
        if job.torch_threads:
            torch.set_num_threads(job.torch_threads)
        encoder = worker_encoder(job.encoder)
        projectors = _worker_projectors(job.output)
        indices = np.asarray(job.indices)
        lo, hi = int(indices[0]), int(indices[-1]) + 1
        source = xr.open_zarr(job.volumes, consolidated=False, chunks=None)
        status = np.asarray(source["status"][lo:hi].values)[indices - lo]
        source_error = source["error"][lo:hi].values[indices - lo]
        errors = ["" if s == stores.OK else
                  f"volume not converted ({stores.STATUS_NAMES[s]})" + (f": {e}" if e else "")
                  for s, e in zip(status, source_error, strict=True)]
        good = np.flatnonzero(status == stores.OK)
        results = _embed_volumes(source["volume"], indices[good], encoder, projectors,
                                 job.settings)
        for position, outcome in zip(good, results, strict=True):
            if isinstance(outcome, str):
                errors[position] = outcome
        for run in contiguous_runs(indices):
            _write(job.output, run, indices, results, good, errors, projectors, job.settings)
    return len(indices)


def _embed_volumes(volume: xr.DataArray, indices: np.ndarray, encoder: Encoder,
                   projectors: list[Projector], settings: KernelSettings) -> list[Any]:
    """Per volume: its :class:`BlockEmbedding` row, or the error text."""
    if len(indices) == 0:
        return []
    block = np.asarray(volume[int(indices[0]): int(indices[-1]) + 1].values)
    block = block[indices - indices[0]]
    try:
        embedded = embed_block(block, encoder, projectors, settings)
        return [_row(embedded, i) for i in range(len(indices))]
    except Exception:  # find the culprit: one bad volume must not fail the others
        outcomes: list[Any] = []
        for one in block:
            try:
                outcomes.append(_row(embed_block(one[None], encoder, projectors, settings), 0))
            except Exception as error:
                outcomes.append(f"{type(error).__name__}: {error}")
        return outcomes


def _row(embedded: Any, i: int) -> dict[str, np.ndarray]:
    """Volume ``i`` of a :class:`BlockEmbedding` as store variable -> array."""
    row = {name: value[i] for name, value in embedded.projections.items()}
    if embedded.tokens is not None:
        row["tokens"] = embedded.tokens[i]
    row["avgpool"] = embedded.avgpool[i]
    return row


def _write(output: str, run: slice, indices: np.ndarray, results: list[Any], good: np.ndarray,
           errors: list[str], projectors: list[Projector], settings: KernelSettings) -> None:
    """Write one contiguous run of volumes: NaN rows where a volume failed.

    Any run is made of whole chunks, since the embeddings store has one volume per chunk.
    """
    positions = np.flatnonzero((indices >= run.start) & (indices < run.stop))
    by_position = {int(p): r for p, r in zip(good, results, strict=True) if not isinstance(r, str)}
    rows = [by_position.get(int(p)) for p in positions]
    dims: dict[str, tuple[str, ...]] = {
        p.name: ("id", "plane", k_dim(p.name), "token") for p in projectors}
    dims |= {"tokens": ("id", "plane", "token", "dim"), "avgpool": ("id", "dim")}
    names = [p.name for p in projectors] + (["tokens"] if settings.keep_tokens else []) + \
        ["avgpool"]
    data = {}
    if any(row is not None for row in rows):
        template = next(row for row in rows if row is not None)
        for name in names:
            stacked = np.stack([row[name] if row is not None else
                                np.full_like(template[name], np.nan) for row in rows])
            data[name] = xr.DataArray(stacked, dims=dims[name])
    status = [stores.OK if row is not None else stores.FAILED for row in rows]
    stores.write_chunk(output, data, run, np.asarray(status), [errors[p] for p in positions])

