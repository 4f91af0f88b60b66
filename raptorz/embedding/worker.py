"""The embedding run's side on the Dask workers: one encoder per process, tasks that read,
embed and write their own units of ``embeddings.zarr``.

Everything here runs in worker processes; the client (:mod:`raptorz.embedding.runner`)
only builds :class:`EmbedTask` objects and submits :func:`embed_task` and
:func:`encoder_provenance`. So this module imports torch (and the kernel, which imports
it) inside the functions that run on workers, never at import: the client imports it to
name those functions and must stay free of torch.

A task gets a store path and a few volume indices (never arrays, never the model), loads
the encoder once per worker process (:func:`worker_encoder`), reads its volumes, embeds
the ones converted fine, and writes its whole units of the output itself with
:func:`raptorz.stores.write_units` (data, then status), returning only counts. Tasks are
idempotent: a task rerun on another worker after a worker died rewrites the same values.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import xarray as xr
from distributed import get_worker

from raptorz import stores
from raptorz.cluster import keep_freed_memory, pinned_gpu, worker_device, worker_threads
from raptorz.defaults import DEFAULT_ENCODER, Precision
from raptorz.embedding.embeddings import contiguous_runs, stored_projectors
from raptorz.embedding.projection import Projector
from raptorz.embedding.settings import KernelSettings
from raptorz.errors import RaptorzError
from raptorz.layouts import EMBEDDINGS, VOLUMES

if TYPE_CHECKING:  # torch is imported on the workers only
    from raptorz.embedding.encoders import Encoder
    from raptorz.embedding.kernel import BlockEmbedding

#: Slices a task aims at (the client sizes tasks by it), and a task's block of volumes
#: read at once: enough to fill a few batches, few enough that a run's tail is short.
TASK_SLICES = 4096
#: Most bytes of float64 pooled sums a kernel call holds (DINOv2-L, 3 planes: 81 volumes).
BLOCK_BYTES = 512 * 2**20
#: How often, at most, a task reports its progress to the client.
PROGRESS_SECONDS = 1.0


@dataclass(frozen=True)
class EncoderOptions:
    """What builds the encoder on a worker (hashable: the key of the worker's cache)."""

    name: str = DEFAULT_ENCODER
    weights: str | None = None
    precision: Precision | None = None
    img_size: int | None = None
    device: str | None = None


@dataclass(frozen=True)
class EmbedTask:
    """One task: the whole units ``start:stop`` of the output, of which it embeds the
    volumes ``indices`` (sorted) and keeps the others as they are; sized by slices."""

    volumes: str
    output: str
    start: int
    stop: int
    indices: tuple[int, ...]
    encoder: EncoderOptions
    settings: KernelSettings
    torch_threads: int | None
    slices_per_volume: int  # every volume of a store has one shape
    topic: str | None = None  # where the task reports its progress

    @property
    def key(self) -> str:
        """Progress events and results of this task carry its first volume."""
        return str(self.start)


_ENCODERS: dict[EncoderOptions, Encoder] = {}
_PROJECTORS: dict[tuple[str, str], list[Projector]] = {}
#: One kernel at a time per worker process: it already fills the device or the cores.
#: Only device work holds it: a task reads its volumes and writes its results outside it,
#: so that a worker's second thread reads the next task while this one encodes.
_KERNEL_LOCK = threading.Lock()


def worker_encoder(options: EncoderOptions) -> Encoder:
    """The encoder of ``options``, built once per process and kept for later tasks."""
    from raptorz.embedding.encoders import create_encoder

    if options not in _ENCODERS:
        keep_freed_memory()  # before the first batch: see raptorz.cluster
        _ENCODERS.clear()  # one model per worker: free the previous one first
        _ENCODERS[options] = create_encoder(options.name, weights=options.weights,
                                            precision=options.precision,
                                            img_size=options.img_size,
                                            device=options.device or worker_device())
    return _ENCODERS[options]


def encoder_provenance(options: EncoderOptions) -> dict[str, Any]:
    """Build the worker's encoder; its provenance, or ``{"refused": why}``."""
    with _KERNEL_LOCK:
        try:
            info = worker_encoder(options).provenance()
        except RaptorzError as error:
            # returned, not raised: a raised one is also logged by the worker (printed twice)
            return {"refused": str(error)}
    gpu = pinned_gpu()
    if gpu is not None and info["device"].startswith("cuda"):
        info["device"] += f" (GPU {gpu})"  # the physical device, whatever the worker's index
    return info


def _worker_projectors(output: str) -> list[Projector]:
    """All projectors of the store (those added later too), read once per process."""
    ds = EMBEDDINGS.read(output)
    key = (output, str(ds.attrs.get("projectors")))
    if key not in _PROJECTORS:
        _PROJECTORS[key] = stored_projectors(ds)
    return _PROJECTORS[key]


@dataclass
class _Read:
    """Some of a task's volumes as read: the usable ones' voxels, and an error per volume."""

    block: np.ndarray  # (usable volumes, X, Y, Z)
    usable: np.ndarray  # their ids' indices
    errors: dict[int, str]  # index -> why it failed (not converted, or unusable)


def _read(volumes: str, indices: np.ndarray) -> _Read:
    """Read volumes ``indices`` (sorted); one that failed conversion or is unusable gets
    an error instead."""
    from raptorz.embedding.kernel import volume_problem

    source = VOLUMES.read(volumes)
    lo, hi = int(indices[0]), int(indices[-1]) + 1
    status = np.asarray(source["status"][lo:hi].values)[indices - lo]
    source_error = source["error"][lo:hi].values[indices - lo]
    errors = {int(i): f"volume not converted ({stores.STATUS_NAMES[s]})" + (f": {e}" if e else "")
              for i, s, e in zip(indices, status, source_error, strict=True) if s != stores.OK}
    good = indices[status == stores.OK]
    parts = [np.asarray(source["volume"][run].values) for run in contiguous_runs(good)]
    block = np.concatenate(parts) if parts else np.empty((0, *source["volume"].shape[1:]))
    keep = np.ones(len(good), bool)
    for n, (index, volume) in enumerate(zip(good, block, strict=True)):
        problem = volume_problem(volume)  # an error this volume causes, before the device
        if problem:
            errors[int(index)], keep[n] = problem, False
    return _Read(block[keep], good[keep], errors)


def embed_task(task: EmbedTask) -> dict[str, int | bool]:
    """Embed one task's volumes and write its units once; returns counts and batch size.

    The volumes are read and embedded in blocks of about :data:`TASK_SLICES` slices, the
    next block read by a helper thread while the current one is encoded. Only errors
    caused by a volume mark it failed (:func:`~raptorz.embedding.kernel.volume_problem`);
    any other error (out of device memory at batch size 1, a lost device, a bug) fails
    the task, which Dask retries on another worker, with the original error in the
    worker's log.
    """
    import torch

    from raptorz.embedding.kernel import embed_block

    indices = np.asarray(task.indices, dtype=np.int64)
    with _KERNEL_LOCK:
        encoder = worker_encoder(task.encoder)
    pooled = len(task.settings.planes) * encoder.num_tokens * encoder.embed_dim * 8
    per_block = max(1, min(TASK_SLICES // max(1, task.slices_per_volume),
                           BLOCK_BYTES // pooled))
    blocks = [indices[i:i + per_block] for i in range(0, len(indices), per_block)]
    report = _reporter(task)
    asked = batch_size = task.settings.batch_for(encoder.device.type)
    results: list[tuple[_Read, BlockEmbedding | None]] = []
    with ThreadPoolExecutor(1, thread_name_prefix="raptorz-read") as reader:
        ahead = reader.submit(_read, task.volumes, blocks[0]) if blocks else None
        for n in range(len(blocks)):
            assert ahead is not None
            read = ahead.result()
            if n + 1 < len(blocks):
                ahead = reader.submit(_read, task.volumes, blocks[n + 1])
            embedded = None
            with _KERNEL_LOCK:
                torch.set_num_threads(task.torch_threads or worker_threads())
                encoder = worker_encoder(task.encoder)
                projectors = _worker_projectors(task.output)
                if len(read.block):
                    embedded = embed_block(read.block, encoder, projectors, task.settings,
                                           progress=report)
                    batch_size = min(batch_size, embedded.batch_size)
            results.append((read, embedded))
    _write(task, results, _worker_projectors(task.output))
    return {"volumes": len(indices), "batch_size": batch_size, "halved": batch_size < asked}


def _reporter(task: EmbedTask) -> Callable[[float], None] | None:
    """A progress callback sending a task's progress to the client every second or so."""
    topic = task.topic
    if topic is None:
        return None
    worker = get_worker()
    pending = [0.0, time.monotonic()]

    def report(volumes: float) -> None:
        pending[0] += volumes
        if time.monotonic() - pending[1] >= PROGRESS_SECONDS:
            worker.log_event(topic, {"task": task.key, "volumes": pending[0]})
            pending[:] = [0.0, time.monotonic()]

    return report


def _write(task: EmbedTask, results: list[tuple[_Read, BlockEmbedding | None]],
           projectors: list[Projector]) -> None:
    """Write the task's whole units in one region write, data first, then status.

    Volumes it embedded get their rows; those that failed get NaN rows and their error;
    the others of its units (already done) are written back as they are.
    """
    region = slice(task.start, task.stop)
    names = [p.name for p in projectors] + \
        (["tokens"] if task.settings.keep_tokens else []) + ["avgpool"]
    existing = EMBEDDINGS.read(task.output)
    size = task.stop - task.start
    status, errors = np.full(size, stores.PENDING, np.int8), np.full(size, "", dtype=object)
    kept = np.setdiff1d(np.arange(task.start, task.stop), task.indices) - task.start
    if len(kept):  # only then is anything of the units read back (it may be torn else)
        status[kept] = np.asarray(existing["status"][region].values)[kept]
        errors[kept] = np.asarray(existing["error"][region].values, dtype=object)[kept]
    data = {}
    for name in names:
        variable = existing[name]
        values = np.full((size, *variable.shape[1:]), np.nan, np.float32)
        if len(kept):
            values[kept] = variable[kept + task.start].values
        for read, embedded in results:
            if embedded is not None:
                values[read.usable - task.start] = _variable(embedded, name)
        data[name] = xr.DataArray(values, dims=variable.dims)
    for read, _ in results:
        status[read.usable - task.start] = stores.OK
        for index, problem in read.errors.items():
            status[index - task.start], errors[index - task.start] = stores.FAILED, problem
        errors[read.usable - task.start] = ""
    stores.write_units(task.output, data, region, status, [str(e) for e in errors])


def _variable(embedded: BlockEmbedding, name: str) -> np.ndarray:
    """One store variable of a :class:`~raptorz.embedding.kernel.BlockEmbedding`."""
    if name == "avgpool":
        return embedded.avgpool
    if name == "tokens":
        assert embedded.tokens is not None
        return embedded.tokens
    return embedded.projections[name]
