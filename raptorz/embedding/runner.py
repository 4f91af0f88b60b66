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
options do; since the embeddings store is written in whole units, processes given
disjoint ranges never write the same file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import xarray as xr
import zarr
from distributed import Client, as_completed, default_client, get_worker
from distributed.deploy import Cluster

from raptorz import stores
from raptorz.cluster import (
    GPU_RESOURCE,
    ExitOnClose,
    advertises_gpus,
    connect,
    create_cluster,
    keep_freed_memory,
    pinned_gpu,
    share_cpus,
    worker_device,
    worker_threads,
)
from raptorz.defaults import DEFAULT_ENCODER, RANDOM_WEIGHTS, Precision
from raptorz.embedding.embeddings import (
    KIND,
    check_identity,
    contiguous_runs,
    create_embeddings,
    embeddings_template,
    store_unit,
    stored_projectors,
    token_kinds,
    unit_size,
)
from raptorz.embedding.projection import Projector, load_projector
from raptorz.embedding.settings import PLANE_NAMES, KernelSettings, slice_indices
from raptorz.errors import InputError, RaptorzError

if TYPE_CHECKING:  # torch is imported on the workers only: checks and resumes stay fast
    from raptorz.embedding.encoders import Encoder
    from raptorz.embedding.kernel import BlockEmbedding

VOLUMES_KIND = "volumes"
#: Slices a task aims at: enough to fill a few batches, few enough that the tail of a run
#: is short and progress moves. Fewer where that leaves under TASKS_PER_WORKER per worker.
TASK_SLICES = 4096
TASKS_PER_WORKER = 4
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
    topic: str | None = None  # where the task reports its progress

    @property
    def key(self) -> str:
        """Progress events and results of this task carry its first volume."""
        return str(self.start)


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
    batch_size
        The smallest batch the encoder ran in this call (less than the settings' or the
        device's default where a batch ran out of device memory and was halved); ``None``
        when nothing ran.
    startup
        Of ``seconds``, the time before the first task was submitted: checks, cluster
        start, the encoder's first load on a worker, the store's creation.
    """

    output: Path
    total: int
    ok: int
    failed: int
    computed: int
    errors: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    batch_size: int | None = None
    startup: float = 0.0

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
    device: str | None = None,
    cluster: Client | Cluster | str | Callable[[], Cluster] | None = None,
    start: int = 0,
    many: int | None = None,
    torch_threads: int | None = None,
    progress: bool = True,
) -> EmbedSummary:
    """Embed the volumes of ``volumes`` into the store ``output`` on a Dask cluster.

    Everything that can be checked without the encoder (the stores, the projectors, the
    range, a resumed store's settings) is checked before any cluster is started, and a
    store that is already complete starts none.

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
        per worker, on every connected worker at once before the first task.
    settings
        :class:`~raptorz.embedding.kernel.KernelSettings` (planes, preprocessing, tokens, ...).
    device
        The torch device of every worker (``"cpu"``, ``"cuda:1"``); by default each
        worker uses the GPU it is pinned to, else the CPU. For single-worker runs.
    cluster
        A :class:`~distributed.Client`, a cluster, a scheduler address, a function that
        starts a cluster (called only when there is work; the cluster is closed after
        the call), or ``None``: the active client if there is one (Dask's convention),
        else a cluster started for this call (one worker per GPU, else one CPU worker).
    start, many
        Embed only ids ``start`` to ``start + many`` (the original's job splitting).
    torch_threads
        Torch threads per worker. By default each worker takes its share of the CPUs it
        may run on (:func:`raptorz.cluster.worker_threads`).
    progress
        Show a progress bar in volumes (a widget in Jupyter) and the dashboard address.

    Returns
    -------
    EmbedSummary
    """
    began = time.perf_counter()
    settings = settings or KernelSettings()
    volumes, output = Path(volumes).resolve(), Path(output).resolve()
    loaded = [p if isinstance(p, Projector) else load_projector(p) for p in projectors]
    source = stores.open_store(volumes, VOLUMES_KIND)
    ids = stores.store_ids(source)
    exists = stores.store_kind(output) is not None
    unit = store_unit(output) if exists and stores.store_kind(output) == KIND else \
        unit_size(len(ids))
    selected = _selection(len(ids), start, many, unit)
    options = EncoderOptions(encoder, _weights_option(weights), precision, device=device)
    attrs = _attrs(volumes, source.attrs, settings, projectors=loaded)
    if exists:
        stores.require_kind(output, KIND)
        check_identity(output, ids, attrs, [p.provenance() for p in loaded],
                       keys=("source", "settings"))  # the encoder is not loaded yet
    todo = _todo(volumes, output if exists else None, selected)
    if not todo.any():
        return _summary(output, ids, selected, 0, began)
    with _client(cluster) as client:
        if progress:
            print(f"raptorz embed: dashboard at {client.dashboard_link}", file=sys.stderr)
        if torch_threads is None:
            share_cpus(client)
        resources = {GPU_RESOURCE: 1} if advertises_gpus(client) else None
        info = _load_encoders(client, options, resources)
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
        topic = f"raptorz-progress-{uuid.uuid4().hex}"
        tasks = [EmbedTask(str(volumes), str(output), span.start, span.stop,
                           tuple(int(i) for i in np.flatnonzero(todo[span]) + span.start),
                           options, settings, torch_threads, topic)
                 for span in _tasks(todo, store_unit(output),
                                    _slices_per_volume(source, settings),
                                    _expected_workers(client))]
        startup = time.perf_counter() - began
        used, halved = _run(client, tasks, resources, ids, total=int(selected.sum()),
                            done=int(selected.sum() - todo.sum()), progress=progress)
    if halved:
        print(f"raptorz embed: a batch ran out of device memory; batches of {used} were used",
              file=sys.stderr)
    return _summary(output, ids, selected, int(todo.sum()), began, batch_size=used,
                    startup=startup)


def _weights_option(weights: str | Path | None) -> str | None:
    """``weights`` as workers receive it: an absolute path, ``RANDOM_WEIGHTS`` or ``None``."""
    if weights is None or str(weights) == RANDOM_WEIGHTS:
        return None if weights is None else RANDOM_WEIGHTS
    return str(Path(weights).resolve())


def _selection(n: int, start: int, many: int | None, unit: int = 1) -> np.ndarray:
    """Boolean mask of the ids ``start`` to ``start + many``, whole units of the output.

    Separate processes may write disjoint ranges of one store at once, so a range must
    start and end on unit boundaries (or at the last volume): never two writers in a unit.
    """
    stop = stores.id_range(n, start, many).stop  # the range checks convert makes too
    if start % unit or (stop % unit and stop != n):
        low, high = start // unit * unit, min(n, -(-stop // unit) * unit)
        raise InputError("--start/--many", f"the output is written in units of {unit} "
                         f"volumes and a range must hold whole units: use --start {low} "
                         f"--many {high - low} (or another multiple of {unit})")
    mask = np.zeros(n, bool)
    mask[start:stop] = True
    return mask


def _todo(volumes: Path, output: Path | None, selected: np.ndarray) -> np.ndarray:
    """Mask of selected volumes to embed: pending, or failed while the source is ok."""
    if output is None:
        return selected.copy()
    mine, theirs = stores.read_status(output), stores.read_status(volumes)
    retry = (mine == stores.FAILED) & (theirs == stores.OK)
    return selected & ((mine == stores.PENDING) | retry)


def _slices_per_volume(source: xr.Dataset, settings: KernelSettings) -> int:
    """Slices the kernel encodes per volume of the store (every volume has one shape)."""
    shape = source["volume"].shape[1:]
    return sum(len(slice_indices(shape[axis], settings.subsample)) for axis in settings.planes)


def _load_encoders(client: Client, options: EncoderOptions,
                   resources: dict[str, int] | None) -> dict[str, Any]:
    """Build the encoder on every connected worker at once; the first one's provenance.

    All during start-up, so that no worker spends the run importing torch and reading
    weights while the others encode, and a worker that cannot load it refuses before any
    task. A worker that joins later builds it on its first task.
    """
    tag = uuid.uuid4().hex[:8]
    workers: list[str | None] = [*client.scheduler_info(n_workers=-1)["workers"]] or [None]
    infos = client.gather([
        client.submit(_encoder_provenance, options, resources=resources, pure=False,
                      workers=worker, allow_other_workers=True,  # a worker may leave
                      key=f"embed-load-encoder-{tag}-{n}")
        for n, worker in enumerate(workers)])
    return next((info for info in infos if "refused" in info), infos[0])


def _expected_workers(client: Client) -> int:
    """Workers the run can count on: those connected, or those a cluster will start."""
    connected = len(client.scheduler_info(n_workers=-1)["workers"])
    planned = len(getattr(client.cluster, "worker_spec", None) or {})
    return max(connected, planned, 1)


def _tasks(todo: np.ndarray, unit: int, slices_per_volume: int, workers: int) -> list[slice]:
    """The output's units holding a volume to do, as tasks of about :data:`TASK_SLICES`.

    Smaller where that would leave fewer than :data:`TASKS_PER_WORKER` tasks a worker,
    so that every worker stays busy until the tail of the run; at least one unit, and a
    task only joins neighbouring units.
    """
    n = len(todo)
    units = [slice(s, min(s + unit, n)) for s in range(0, n, unit)]
    wanted = [u for u in units if todo[u].any()]
    volumes = int(todo.sum())
    by_work = max(1, TASK_SLICES // max(1, slices_per_volume))
    by_workers = max(1, -(-volumes // (TASKS_PER_WORKER * workers)))
    size = max(1, min(by_work, by_workers) // unit)  # units per task
    tasks: list[slice] = []
    for u in wanted:
        last = tasks[-1] if tasks else None
        if last is not None and last.stop == u.start and (last.stop - last.start) < size * unit:
            tasks[-1] = slice(last.start, u.stop)
        else:
            tasks.append(u)
    return tasks


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
def _client(cluster: Client | Cluster | str | Callable[[], Cluster] | None) -> Iterator[Client]:
    """A client for ``cluster``; a cluster started here lives only for the call."""
    if cluster is None:
        try:
            cluster = default_client()  # the active client, as dask's compute() uses
        except ValueError:
            cluster = functools.partial(create_cluster, "auto")
    if callable(cluster) and not isinstance(cluster, (Client, Cluster)):
        with cluster() as made, connect(made) as client:
            client.register_plugin(ExitOnClose())  # this call's cluster closes at once
            yield client
        return
    with connect(cluster) as client:
        yield client


class _Progress:
    """A progress bar in volumes, moved by finished tasks and by running tasks' reports."""

    def __init__(self, total: int, done: int, enabled: bool) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, initial=done, unit="vol", disable=not enabled,
                        desc="embed", file=sys.stderr)
        self.done = float(done)
        self.running: dict[str, float] = {}
        self.lock = threading.Lock()

    def report(self, event: tuple[float, dict[str, Any]]) -> None:
        """A running task's report (from the client's event loop)."""
        _, message = event
        with self.lock:
            if message["task"] in self.running:
                self.running[message["task"]] += message["volumes"]
                self._show()

    def start(self, tasks: Sequence[EmbedTask]) -> None:
        self.running = {task.key: 0.0 for task in tasks}

    def finish(self, task: EmbedTask, volumes: int) -> None:
        with self.lock:
            self.running.pop(task.key, None)
            self.done += volumes
            self._show()

    def _show(self) -> None:
        self.bar.n = round(self.done + sum(self.running.values()), 1)
        self.bar.refresh()

    def close(self) -> None:
        self.bar.close()


def _run(client: Client, tasks: list[EmbedTask], resources: dict[str, int] | None,
         ids: np.ndarray, *, total: int, done: int,
         progress: bool) -> tuple[int | None, bool]:
    """Submit the tasks and follow them: the smallest batch size a task used, and whether
    a task ran out of device memory and halved its batches.

    A task that fails is retried by Dask on another worker; one that keeps failing
    leaves its volumes pending and its error is printed (a rerun retries them).
    """
    bar = _Progress(total, done, progress)
    bar.start(tasks)
    if progress and tasks:
        client.subscribe_topic(tasks[0].topic, bar.report)
    run = uuid.uuid4().hex[:8]
    futures = {client.submit(_embed_task, task, resources=resources, pure=False, retries=2,
                             key=f"embed-{ids[task.start]}-{ids[task.stop - 1]}-{run}"):
               task for task in tasks}
    used: list[int] = []
    halved = False
    try:
        for future in as_completed(futures, loop=client.loop):
            task = futures[future]
            if future.status == "error":
                error = future.exception()
                print(f"raptorz embed: a task failed and its {len(task.indices)} volumes stay "
                      f"pending ({type(error).__name__}: {error}); rerun to retry",
                      file=sys.stderr)
            else:
                result = future.result()
                used.append(result["batch_size"])
                halved |= result["halved"]
            bar.finish(task, len(task.indices))
            future.release()
    finally:
        if progress and tasks:
            client.unsubscribe_topic(tasks[0].topic)
        bar.close()
    return (min(used) if used else None), halved


def _summary(output: Path, ids: np.ndarray, selected: np.ndarray, computed: int,
             began: float, batch_size: int | None = None, startup: float = 0.0) -> EmbedSummary:
    status = stores.read_status(output) if output.exists() else np.zeros(len(ids), np.int8)
    failed = selected & (status == stores.FAILED)
    errors: dict[str, str] = {}
    if failed.any():
        error = zarr.open_array(output / "error", mode="r")
        errors = {str(ids[i]): str(error[int(i)]) for i in np.flatnonzero(failed)}
    return EmbedSummary(output, int(selected.sum()), int((selected & (status == stores.OK)).sum()),
                        int(failed.sum()), computed, errors, time.perf_counter() - began,
                        batch_size, startup)


# --- On the workers --------------------------------------------------------------------

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
        keep_freed_memory()  # before the first batch: Dask's malloc settings cost 30%
        _ENCODERS.clear()  # one model per worker: free the previous one first
        _ENCODERS[options] = create_encoder(options.name, weights=options.weights,
                                            precision=options.precision,
                                            img_size=options.img_size,
                                            device=options.device or worker_device())
    return _ENCODERS[options]


def _encoder_provenance(options: EncoderOptions) -> dict[str, Any]:
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
    # chunks=None: plain lazy indexing, no dask graph computed from inside a task
    ds = xr.open_zarr(output, consolidated=False, chunks=None)
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

    source = xr.open_zarr(volumes, consolidated=False, chunks=None)
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


def _embed_task(task: EmbedTask) -> dict[str, int | bool]:
    """Embed one task's volumes and write its units once; returns counts and batch size.

    The volumes are read and embedded in blocks of about :data:`TASK_SLICES` slices, the
    next block read by a helper thread while the current one is encoded. Only errors
    caused by a volume mark it failed (:func:`volume_problem`); any other error (out of
    device memory at batch size 1, a lost device, a bug) fails the task, which Dask
    retries on another worker, with the original error in the worker's log.
    """
    import torch

    from raptorz.embedding.kernel import embed_block

    indices = np.asarray(task.indices, dtype=np.int64)
    with _KERNEL_LOCK:
        encoder = worker_encoder(task.encoder)
    pooled = len(task.settings.planes) * encoder.num_tokens * encoder.embed_dim * 8
    per_block = max(1, min(TASK_SLICES // max(1, _slices_per_task_volume(task)),
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


def _slices_per_task_volume(task: EmbedTask) -> int:
    source = zarr.open_array(Path(task.volumes) / "volume", mode="r")
    return sum(len(slice_indices(source.shape[1 + axis], task.settings.subsample))
               for axis in task.settings.planes)


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
    existing = xr.open_zarr(task.output, consolidated=False, chunks=None)
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
    stores.write_chunk(task.output, data, region, status, [str(e) for e in errors])


def _variable(embedded: BlockEmbedding, name: str) -> np.ndarray:
    """One store variable of a :class:`BlockEmbedding`, all its volumes."""
    if name == "avgpool":
        return embedded.avgpool
    if name == "tokens":
        assert embedded.tokens is not None
        return embedded.tokens
    return embedded.projections[name]
