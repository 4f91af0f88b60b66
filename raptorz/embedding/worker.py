"""The embedding run's side on the Dask workers: one encoder per process, tasks that read,
embed and write their own units of ``embeddings.zarr``.

Everything here runs in worker processes; the client (:mod:`raptorz.embedding.runner`)
only builds :class:`EmbedTask` objects and submits :func:`embed_task` and
:func:`encoder_provenance`. So this module imports torch (and the kernel, which imports
it) inside the functions that run on workers, never at import: the client imports it to
name those functions and must stay free of torch.

A task gets a store path and a few volume indices (never arrays, never the model), loads
the encoder once per worker process (:func:`worker_encoder`), reads its volumes, embeds
the ones converted fine, and writes its whole units of the output itself
(:func:`raptorz.embedding.commit.write_task`: data, then status), returning only counts;
it reads the output's metadata once (:class:`raptorz.stores.OpenStore`). Tasks are
idempotent: a task rerun on another worker after a worker died rewrites the same values.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NoReturn

import numpy as np
from distributed import Reschedule, get_worker

from raptorz import stores
from raptorz.cluster import keep_freed_memory, pinned_gpu, worker_device, worker_threads
from raptorz.defaults import DEFAULT_ENCODER, Precision
from raptorz.embedding.commit import store_projectors, write_task
from raptorz.embedding.embeddings import contiguous_runs
from raptorz.embedding.projection import Projector
from raptorz.embedding.settings import KernelSettings, RegionRequest
from raptorz.errors import RaptorzError
from raptorz.layouts import VOLUMES

if TYPE_CHECKING:  # torch is imported on the workers only
    from raptorz.embedding.blocks import BlockPlan
    from raptorz.embedding.encoders import Encoder
    from raptorz.embedding.kernel import BlockEmbedding, Pooled
    from raptorz.embedding.region_worker import RegionBlock
    from raptorz.embedding.regions import RegionEmbedding

#: Slices a task aims at (the client sizes tasks by it), and a task's block of volumes
#: read at once: enough to fill a few batches, few enough that a run's tail is short.
TASK_SLICES = 4096
#: Most bytes of float64 pooled sums a kernel call holds (DINOv2-L, 3 planes: 81 volumes).
BLOCK_BYTES = 512 * 2**20
#: How often, at most, a task reports its progress to the client.
PROGRESS_SECONDS = 1.0
#: The event topic where a worker says that it retired (read by the run on the client).
RETIRED_TOPIC = "raptorz-retired"
#: What every worker of a run must share with the store's encoder: a worker that differs
#: (another GPU kind without bf16, other weights) would write other embeddings.
WORKER_IDENTITY = ("weights_checksum", "precision", "device_kind", "tf32")


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
    regions: RegionRequest | None = None  # embed per region of a masks store

    @property
    def key(self) -> str:
        """Progress events and results of this task carry its first volume."""
        return str(self.start)


_ENCODERS: dict[EncoderOptions, Encoder] = {}
#: The largest batch known to fit this worker's device (halved after out-of-memory
#: errors), kept for the encoder's later blocks and tasks.
_BATCH_LIMITS: dict[EncoderOptions, int] = {}
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
        _BATCH_LIMITS.clear()
        _ENCODERS[options] = create_encoder(options.name, weights=options.weights,
                                            precision=options.precision,
                                            img_size=options.img_size,
                                            device=options.device or worker_device())
    encoder = _ENCODERS[options]
    _exact_fp32(encoder)
    return encoder


def _exact_fp32(encoder: Encoder) -> None:
    """On CUDA at fp32, no TF32: torch would run convolutions (the patch embedding) with
    10-bit mantissas otherwise, and "fp32" would not be what ran (docs/kernel.md)."""
    import torch

    if encoder.device.type == "cuda" and encoder.precision == "fp32":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False


def encoder_provenance(options: EncoderOptions) -> dict[str, Any]:
    """Build the worker's encoder; its provenance, or ``{"refused": why}``.

    ``worker`` names the worker (for the run's messages); ``device_kind`` is the
    device's kind without its index (every worker of a run may use another ``cuda:N``).
    """
    with _KERNEL_LOCK:
        try:
            info = worker_encoder(options).provenance()
        except RaptorzError as error:
            # returned, not raised: a raised one is also logged by the worker (printed twice)
            return {"refused": str(error), "worker": _worker_name()}
    gpu = pinned_gpu()
    if gpu is not None and info["device"].startswith("cuda"):
        info["device"] += f" (GPU {gpu})"  # the physical device, whatever the worker's index
    return {**info, "device_kind": info["device"].split(":")[0].split(" ")[0],
            "worker": _worker_name()}


def provenance_difference(mine: dict[str, Any], reference: dict[str, Any]) -> str:
    """How a worker's encoder provenance differs from ``reference``'s; empty if it does not.

    Only :data:`WORKER_IDENTITY` counts: another device index or weights path is fine.
    """
    kind = {**mine, "device_kind": str(mine.get("device", "")).split(":")[0].split(" ")[0]}
    theirs = {**reference,
              "device_kind": str(reference.get("device", "")).split(":")[0].split(" ")[0]}
    return ", ".join(f"{key} {kind.get(key)!r} where the store has {theirs.get(key)!r}"
                     for key in WORKER_IDENTITY if kind.get(key) != theirs.get(key))


def _worker_name() -> str:
    try:
        return str(get_worker().address)
    except ValueError:
        return "this process"


def retire(problem: str, run: str | None) -> NoReturn:
    """Close this worker for good and hand its task back to the scheduler.

    For a worker that must take no more tasks (its device failed, or its encoder differs
    from the run's): the close is scheduled first, so that the scheduler knows it is
    closing when :class:`distributed.Reschedule` sends the task elsewhere. The run
    learns of it through :data:`RETIRED_TOPIC`.
    """
    worker = get_worker()
    worker.log_event(RETIRED_TOPIC, {"worker": worker.address, "problem": problem,
                                     "run": run})
    worker.loop.add_callback(worker.close, nanny=True, executor_wait=False,
                             reason=f"raptorz: {problem}")
    raise Reschedule()


def _worker_projectors(output: stores.OpenStore) -> list[Projector]:
    """All projectors of the store (those added later too), read once per process."""
    key = (str(output.path), str(output.attrs.get("projectors")))
    if key not in _PROJECTORS:
        _PROJECTORS[key] = store_projectors(output)
    return _PROJECTORS[key]


@dataclass
class _Read:
    """Some of a task's volumes as read: the usable ones' voxels, and an error per volume."""

    block: np.ndarray  # (usable volumes, X, Y, Z)
    usable: np.ndarray  # their ids' indices
    errors: dict[int, str]  # index -> why it failed (not converted, or unusable)
    checksums: np.ndarray  # the usable volumes' checksums, read before their voxels
    mask_checksums: np.ndarray | None = None  # their masks' (region_worker.read_masks)


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
    # before the voxels: a volume converted again meanwhile then shows as stale
    checksums = (np.asarray(source["checksum"][lo:hi].values)[good - lo]
                   if "checksum" in source else np.zeros(len(good), np.int64))
    parts = [np.asarray(source["volume"][run].values) for run in contiguous_runs(good)]
    block = np.concatenate(parts) if parts else np.empty((0, *source["volume"].shape[1:]))
    keep = np.ones(len(good), bool)
    for n, (index, volume) in enumerate(zip(good, block, strict=True)):
        problem = volume_problem(volume)  # an error this volume causes, before the device
        if problem:
            errors[int(index)], keep[n] = problem, False
    return _Read(block[keep], good[keep], errors, checksums[keep])


def embed_task(task: EmbedTask) -> dict[str, int | bool]:
    """Embed one task's volumes and write its units once; returns counts and batch size.

    The volumes are read, checked and planned (:func:`~raptorz.embedding.kernel.prepare_block`)
    in blocks of about :data:`TASK_SLICES` slices by a helper thread while the current
    block is on the device; only the device's share holds the kernel lock, and the
    projections are made after it. Only errors caused by a volume mark it failed
    (:func:`~raptorz.embedding.kernel.volume_problem`, tokens that overflowed); out of
    device memory at batch size 1 or a bug fails the task, which Dask retries on another
    worker. A worker whose device fails, or whose encoder differs from the store's,
    retires (:func:`retire`) and the task moves to another worker.
    """
    import torch

    from raptorz.embedding.kernel import default_batch_size, pool_block
    from raptorz.embedding.region_worker import embed_crops_block

    indices = np.asarray(task.indices, dtype=np.int64)
    with _KERNEL_LOCK:
        encoder = worker_encoder(task.encoder)
    output = stores.OpenStore(task.output)  # its metadata read once for the whole task
    _check_provenance(task, encoder, output)
    pooled = len(task.settings.planes) * encoder.num_tokens * encoder.embed_dim * 8
    if task.regions is not None and task.regions.settings.mode == "onepass":
        pooled *= 1 + len(task.regions.values)  # each region's sums besides the block's
    per_block = max(1, min(TASK_SLICES // max(1, task.slices_per_volume),
                           BLOCK_BYTES // pooled))
    blocks = [indices[i:i + per_block] for i in range(0, len(indices), per_block)]
    report = _reporter(task)
    asked = batch_size = default_batch_size(task.settings, encoder)
    projectors = _worker_projectors(output)
    results: list[tuple[_Read, BlockEmbedding | RegionEmbedding | None]] = []
    with ThreadPoolExecutor(1, thread_name_prefix="raptorz-read") as reader:
        ahead = reader.submit(_read_and_plan, task, blocks[0], encoder) if blocks else None
        for n in range(len(blocks)):
            assert ahead is not None
            read, plan, regions = ahead.result()
            if n + 1 < len(blocks):
                ahead = reader.submit(_read_and_plan, task, blocks[n + 1], encoder)
            embedded: BlockEmbedding | RegionEmbedding | None = None
            if regions is not None and plan is None and len(read.usable):
                with _KERNEL_LOCK:  # crop mode: each region's box on its own
                    torch.set_num_threads(task.torch_threads or worker_threads())
                    embedded = embed_crops_block(task.regions, read.block, regions,
                                                 worker_encoder(task.encoder), projectors,
                                                 task.settings)
            if plan is not None:
                try:
                    with _KERNEL_LOCK:
                        torch.set_num_threads(task.torch_threads or worker_threads())
                        encoder = worker_encoder(task.encoder)
                        block = pool_block(plan, encoder, progress=report,
                                           limit=_BATCH_LIMITS.get(task.encoder),
                                           sink=regions.pooling if regions else None)
                        _BATCH_LIMITS[task.encoder] = block.batch_size
                except RuntimeError as error:
                    if device_failed(error):
                        retire(f"its device failed ({type(error).__name__}: {error})",
                               task.topic)
                    raise
                batch_size = min(batch_size, block.batch_size)
                embedded = _finish(read, block, encoder, projectors, task.settings, regions)
            results.append((read, embedded))
    write_task(task, output, results, projectors)
    return {"volumes": len(indices), "batch_size": batch_size, "halved": batch_size < asked}


def device_failed(error: BaseException) -> bool:
    """Whether ``error`` is the device's own failure (not out of memory): a CUDA context
    that saw one is lost for good, so every later task of the process would fail."""
    import torch

    if isinstance(error, torch.OutOfMemoryError):
        return False
    return isinstance(error, torch.AcceleratorError) or str(error).startswith("CUDA error")


def _check_provenance(task: EmbedTask, encoder: Encoder, output: stores.OpenStore) -> None:
    """Retire this worker where its encoder differs from the one the store records."""
    stored = output.attrs.get("encoder") or {}
    difference = provenance_difference(encoder.provenance(), stored)
    if difference:
        retire(f"its encoder differs from the store's: {difference}", task.topic)


def _read_and_plan(task: EmbedTask, indices: np.ndarray, encoder: Encoder,
                   ) -> tuple[_Read, BlockPlan | None, RegionBlock | None]:
    """The reader thread's share of a block: read and check the volumes (and masks), plan
    the batches (and the regions' weights; none in crop mode)."""
    from raptorz.embedding.kernel import default_batch_size, prepare_block
    from raptorz.embedding.region_worker import plan_regions, read_masks

    read = _read(task.volumes, indices)
    masks = spacing = None
    if task.regions is not None:  # a volume whose mask is not ok fails
        masks, spacing = read_masks(task.regions, task.volumes, read)
    if not len(read.block):
        return read, None, None
    plan = None
    if task.regions is None or task.regions.settings.mode == "onepass":
        plan = prepare_block(read.block, encoder, task.settings,
                             _BATCH_LIMITS.get(task.encoder) or
                             default_batch_size(task.settings, encoder))
        read.block = read.block[:0]  # the plan holds the voxels now
    if task.regions is None or masks is None or spacing is None:
        return read, plan, None
    return read, plan, plan_regions(task.regions, plan, masks, spacing, encoder)


def _finish(read: _Read, block: Pooled, encoder: Encoder, projectors: list[Projector],
            settings: KernelSettings, regions: RegionBlock | None = None,
            ) -> BlockEmbedding | RegionEmbedding | None:
    """Projections of a pooled block (of its regions, where asked); its volumes whose
    tokens were not finite fail."""
    from raptorz.embedding.kernel import finish_block, nonfinite_problem
    from raptorz.embedding.region_worker import finish_onepass

    if regions is not None and (~block.nonfinite).any():
        embedded = finish_onepass(regions, ~block.nonfinite, block.slices, encoder,
                                  projectors, settings)
    if block.nonfinite.any():
        problem = nonfinite_problem(encoder)
        read.errors.update({int(i): problem for i in read.usable[block.nonfinite]})
        read.usable = read.usable[~block.nonfinite]
        block = block.select(~block.nonfinite)
    if not len(read.usable):
        return None
    if regions is not None:
        return embedded
    return finish_block(block, encoder, projectors, settings)


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
