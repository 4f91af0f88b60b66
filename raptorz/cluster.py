"""Dask clusters for ``raptorz embed``: local CPU, local GPUs, HPC batch systems.

One factory, :func:`create_cluster`, builds every kind; :func:`connect` turns a cluster,
a scheduler address or an existing :class:`~distributed.Client` into a client.

GPU workers are pinned: each worker process sees exactly one device through its own
``CUDA_VISIBLE_DEVICES`` and advertises the resource ``GPU=1``, so that a task submitted
with ``resources={"GPU": 1}`` owns the device while it runs. The client never touches
CUDA (that would initialise a context in the wrong process before the workers start);
devices are discovered from ``CUDA_VISIBLE_DEVICES`` or ``nvidia-smi``.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import subprocess
import sys
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Final, get_args

import dask.config
from distributed import Client, LocalCluster, Nanny, Scheduler, SpecCluster, WorkerPlugin
from distributed.deploy import Cluster
from distributed.system import MEMORY_LIMIT

from raptorz.batch import JOBQUEUE_KINDS, jobqueue_cluster
from raptorz.defaults import GPU_RESOURCE, WORKERS_PER_HOST, ClusterKind
from raptorz.errors import RaptorzError, RaptorzWarning, SettingsError
from raptorz.network import DEFAULT_DASHBOARD, dashboard_options, listen_host
from raptorz.processes import exit_without_teardown, start_worker_server

#: Dask's setting for how a nanny starts its worker process.
_START_METHOD: Final = "distributed.worker.multiprocessing-method"
#: Dask's setting for the environment each nanny gives its worker.
_NANNY_ENVIRON: Final = "distributed.nanny.environ"


def visible_gpus() -> list[str]:
    """The GPUs this machine offers, without initialising CUDA in this process.

    ``CUDA_VISIBLE_DEVICES`` wins where it is set (an empty value or ``-1`` means none);
    otherwise ``nvidia-smi`` lists the devices, by UUID: its indices follow the PCI bus,
    while CUDA's follow its own order (fastest first, unless ``CUDA_DEVICE_ORDER`` says
    otherwise), so a worker pinned to index 1 could get, and record, another GPU than
    nvidia-smi's 1. Without nvidia-smi there are none.
    """
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        devices = [d.strip() for d in listed.split(",") if d.strip()]
        return [] if devices[:1] == ["-1"] else devices
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=uuid", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=30, check=True,
        ).stdout
    except (subprocess.SubprocessError, OSError) as error:
        detail = getattr(error, "stderr", None) or error
        warnings.warn(f"nvidia-smi is installed but failed ({str(detail).strip()}): no GPU "
                      "is used; set CUDA_VISIBLE_DEVICES to use GPUs anyway",
                      RaptorzWarning, stacklevel=2)
        return []
    return [line.strip() for line in out.splitlines() if line.strip()]


def worker_device() -> str:
    """The torch device of this (worker) process: its pinned GPU, else the CPU.

    A worker that advertises the ``GPU`` resource must have been given its devices in
    ``CUDA_VISIBLE_DEVICES`` (by raptorz's local clusters, or by the batch system for a
    job that requested GPUs): it is refused rather than left to guess, since a batch job
    sees every GPU of its node through the driver, those of other jobs included.
    """
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if GPU_RESOURCE in _worker_resources():
        if not listed or listed.strip() == "-1":
            raise RaptorzError(
                "this worker offers a GPU but its job gives it no device list "
                "(CUDA_VISIBLE_DEVICES is unset): request GPUs from the batch system "
                "(e.g. --gpus-per-job 1, which adds --gres=gpu:1 on SLURM) so that it "
                "assigns them; raptorz does not guess which GPU of the node is free")
        return "cuda:0"
    if listed is not None and (not listed.strip() or listed.strip() == "-1"):
        return "cpu"
    import torch

    return "cuda:0" if torch.cuda.is_available() else "cpu"


def pinned_gpu() -> str | None:
    """The GPU (index or UUID, as the driver names it) that ``cuda:0`` is in this process.

    With ``CUDA_VISIBLE_DEVICES=1,0`` (dask-cuda rotates the list for each worker) torch's
    ``cuda:0`` is physical GPU 1. ``None`` where nothing is pinned.
    """
    listed = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")]
    return listed[0] if listed and listed[0] not in ("", "-1") else None


#: glibc ``mallopt`` parameters (malloc.h) and the values :func:`keep_freed_memory` sets.
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD: Final = 32 * 2**20  # glibc's own ceiling for its adaptive threshold
TRIM_THRESHOLD: Final = 128 * 2**20


def keep_freed_memory() -> bool:
    """Let this worker process reuse freed memory instead of mapping it afresh (glibc).

    Dask starts each worker with ``MALLOC_TRIM_THRESHOLD_=65536``. Setting any malloc
    threshold also fixes glibc's mmap threshold at 128 KiB, so every tensor of a batch
    over that size is mapped and unmapped again each batch, which costs a CPU worker many
    page faults and much time per batch (benchmarks/README.md measures it).
    Called once per worker process by the embedding run; returns whether it applied
    (glibc only; elsewhere it does nothing).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and \
        bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))


#: Torch threads this worker process was given by :func:`share_cpus` (empty: not yet).
_THREADS: list[int] = []


def worker_threads() -> int:
    """Torch threads for this worker: its share of the CPUs it may run on.

    The CPUs of this process (its affinity: a batch job's allocation) divided among the
    workers of its host, as counted by :func:`share_cpus`, or as the cluster recorded in
    ``RAPTORZ_WORKERS_PER_HOST`` when it started the worker.
    """
    if _THREADS:
        return _THREADS[-1]
    return max(1, _cpus() // max(1, int(os.environ.get(WORKERS_PER_HOST, "1"))))


def _cpus() -> int:
    """The CPUs this process may run on (its affinity: a batch job's allocation)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else \
        (os.cpu_count() or 1)


def share_cpus(client: Client) -> None:
    """Give each connected worker its share of its host's CPUs (see :func:`worker_threads`)."""
    workers = client.scheduler_info(n_workers=-1)["workers"].values()
    per_host: dict[str, int] = {}
    for worker in workers:
        per_host[worker["host"]] = per_host.get(worker["host"], 0) + 1
    client.run(_take_share, per_host)


def _take_share(per_host: dict[str, int], dask_worker: Any = None) -> None:
    # kept in this module, not in os.environ: an in-process worker (a threads cluster)
    # shares its environment with the client, whose later clusters would inherit it
    host = str(dask_worker.address).split("://")[-1].rsplit(":", 1)[0] if dask_worker else ""
    _THREADS.clear()
    _THREADS.append(max(1, _cpus() // max(1, per_host.get(host, 1))))


def _worker_resources() -> dict[str, float]:
    """The resources this process's Dask worker advertises (none outside a worker)."""
    try:
        from distributed import get_worker

        return dict(get_worker().state.total_resources)
    except ValueError:
        return {}


@contextlib.contextmanager
def _starting_workers(imports: Sequence[str], workers: int) -> Iterator[None]:
    """Start ``workers`` local workers, told how many they are (:func:`worker_threads`),
    forked from :func:`start_worker_server` where it can run.

    The count goes through Dask's ``distributed.nanny.environ``, read by each nanny as it
    is made: dask-cuda replaces the ``env`` of its workers' specs with its own. A nanny
    prefers this process's environment to that setting, so a count this process
    inherited (a batch job's) is replaced while the workers start.
    """
    environ = {**dask.config.get(_NANNY_ENVIRON, default={}), WORKERS_PER_HOST: str(workers)}
    settings: dict[str, Any] = {_NANNY_ENVIRON: environ}
    if imports and start_worker_server(imports):
        settings[_START_METHOD] = "forkserver"
    inherited = os.environ.get(WORKERS_PER_HOST)
    with dask.config.set(settings):
        if inherited is not None:
            os.environ[WORKERS_PER_HOST] = str(workers)
        try:
            yield
        finally:
            if inherited is not None:
                os.environ[WORKERS_PER_HOST] = inherited


def create_cluster(
    kind: ClusterKind = "local",
    *,
    workers: int | None = None,
    threads_per_worker: int = 2,
    gpus: Sequence[str] | None = None,
    host: str | None = None,
    dashboard_address: str | None = DEFAULT_DASHBOARD,
    worker_imports: Sequence[str] = (),
    jobs: int = 1,
    queue: str | None = None,
    account: str | None = None,
    walltime: str | None = None,
    cores: int | None = None,
    memory: str | None = None,
    gpus_per_job: int = 0,
    job_extra: Sequence[str] = (),
    config: str | Path | None = None,
    tls: bool = True,
    **options: Any,
) -> Cluster:
    """Start a Dask cluster of ``kind`` for embedding.

    Parameters
    ----------
    kind
        ``auto``: ``cuda`` where :func:`visible_gpus` finds GPUs, else ``local``.
        ``local``: worker processes on this machine, each pinned to one of the visible
        GPUs in turn where there are any, else on the CPU. ``cuda``: one worker per GPU,
        each pinned to its device. ``slurm`` / ``pbs`` / ``sge`` / ``lsf``: workers
        started as batch jobs through dask-jobqueue (:mod:`raptorz.batch`).
    workers
        Local kinds: the number of worker processes (``cuda``: at most one per GPU;
        default one per GPU, or one for ``local``).
    threads_per_worker
        Local kinds: Dask threads per worker. A worker encodes one task at a time; its
        second thread reads and writes the next and the previous task meanwhile. The
        kernel's torch threads are set separately (:func:`worker_threads`).
    gpus
        ``cuda`` and ``local``: the device ids to use (default: :func:`visible_gpus`).
    host
        Local kinds: where the scheduler, the nannies and the workers listen (default
        ``127.0.0.1``: this machine only; any other host is warned about, since whoever
        reaches them can run code as you). Batch kinds: the scheduler's host (default:
        the site's ``interface`` or ``scheduler-options``, else every interface).
    dashboard_address
        Where the scheduler serves its dashboard: ``":PORT"`` is ``127.0.0.1:PORT``
        (``":0"`` picks a free port), ``"HOST:PORT"`` listens on ``HOST`` (warned about
        unless loopback), ``None`` serves none.
    worker_imports
        Local kinds: modules every worker has imported before it starts, by forking it
        from :func:`start_worker_server` (Linux; ``raptorz embed`` passes
        :data:`~raptorz.defaults.EMBED_WORKER_IMPORTS`). Default: none; workers are
        spawned and import what their tasks need.
    jobs, queue, account, walltime, cores, memory
        Batch kinds: how many jobs to start (one worker each) and what each requests
        (``memory`` default: 16 GiB per GPU of a GPU job, else 4 GiB).
    gpus_per_job
        Batch kinds: GPUs each job requests. The job script gets the batch system's GPU
        directive; each job runs one worker process per GPU, each pinned to its own
        device (:func:`raptorz.batch.dask_setup`) and advertising ``GPU=1``.
    job_extra
        Batch kinds: extra directives for the job script (``"--constraint=a100"``).
    config
        Batch kinds: a dask-jobqueue YAML configuration file (``jobqueue: slurm: ...``);
        the other arguments override its values, and its ``scheduler-options`` (or the
        Dask configuration's) override raptorz's defaults.
    tls
        Batch kinds: encrypt and authenticate every connection with credentials made
        for this cluster (default); ``False``, for sites that cannot, is warned about.
    **options
        Passed on to the cluster class (e.g. ``job_script_prologue``, ``local_directory``).

    Raises
    ------
    RaptorzError
        For an unknown kind, a ``cuda`` cluster without GPUs, or a batch kind without
        dask-jobqueue installed.

    Examples
    --------
    >>> cluster = create_cluster("slurm", jobs=4, queue="gpu", walltime="04:00:00",
    ...                          cores=8, memory="64GiB", gpus_per_job=1)  # doctest: +SKIP
    """
    if kind in JOBQUEUE_KINDS:
        return jobqueue_cluster(
            kind, jobs=jobs, config=config, gpus_per_job=gpus_per_job, job_extra=job_extra,
            dashboard_address=dashboard_address, host=host, tls=tls,
            options={"queue": queue, "account": account, "walltime": walltime,
                     "cores": cores, "memory": memory, **options},
        )
    if kind not in ("auto", "local", "cuda"):
        raise RaptorzError(
            f"unknown cluster kind {kind!r}; expected one of {get_args(ClusterKind)}")
    devices = list(gpus) if gpus is not None else visible_gpus()
    if kind == "cuda" and not devices:
        raise SettingsError("'cuda': no GPU found (CUDA_VISIBLE_DEVICES, nvidia-smi)",
                            option="cluster")
    listen = {"host": listen_host(host), **dashboard_options(dashboard_address)}
    if devices and kind != "local":  # cuda, or auto where GPUs are visible
        devices = devices[: workers or len(devices)]
        with _starting_workers(worker_imports, len(devices)):
            return _cuda_cluster(devices, threads_per_worker, listen, options)
    if devices:  # local on a GPU machine: never every worker on cuda:0, each on a GPU in turn
        devices = [devices[i % len(devices)] for i in range(workers or 1)]
    with _starting_workers(worker_imports, len(devices) or workers or 1):
        if devices:
            return _pinned_cluster(devices, threads_per_worker, listen, options)
        return LocalCluster(
            n_workers=workers or 1, threads_per_worker=threads_per_worker, processes=True,
            host=listen.pop("host"), dashboard_address=None, scheduler_kwargs=listen,
            **options)


def _cuda_cluster(devices: list[str], threads: int, listen: dict[str, Any],
                  options: dict[str, Any]) -> Cluster:
    try:
        from dask_cuda import LocalCUDACluster
    except ImportError:
        return _pinned_cluster(devices, threads, listen, options)
    host = listen.pop("host")
    return LocalCUDACluster(  # RAM / workers each, as it gives by default
        CUDA_VISIBLE_DEVICES=devices, threads_per_worker=threads, host=host,
        resources={GPU_RESOURCE: 1}, dashboard_address=None, scheduler_kwargs=listen,
        **options,
    )


def _pinned_cluster(devices: Sequence[str], threads: int, listen: dict[str, Any],
                    options: dict[str, Any]) -> Cluster:
    """One worker process per entry of ``devices``, pinned to it, advertising ``GPU=1``.

    A SpecCluster of Nannies gives each worker its own environment, hence its device,
    and, as LocalCluster does, its share of the machine's memory.
    """
    spec = {
        f"gpu-{i}": {"cls": Nanny, "options": {
            "nthreads": threads, "resources": {GPU_RESOURCE: 1}, "host": listen["host"],
            "memory_limit": MEMORY_LIMIT // len(devices),
            "env": {"CUDA_VISIBLE_DEVICES": device}, **options,
        }}
        for i, device in enumerate(devices)
    }
    scheduler = {"cls": Scheduler, "options": listen}
    return SpecCluster(workers=spec, scheduler=scheduler, name="raptorz-gpus")


@contextlib.contextmanager
def connect(target: Client | Cluster | str) -> Iterator[Client]:
    """A client for ``target``: an existing client, a cluster, or a scheduler address.

    An existing client is yielded as is and left open; a client made here is closed on
    exit (the cluster itself is left to its owner).
    """
    if isinstance(target, Client):
        yield target
        return
    with Client(target) as client:
        yield client


class ExitOnClose(WorkerPlugin):
    """Ends a worker process as soon as it closes (:mod:`raptorz.processes` says why).

    Registered only on clusters started for one call, after every task has written its
    results.
    """

    name = "raptorz-exit-on-close"

    def teardown(self, worker: Any) -> None:
        exit_without_teardown()


def advertises_gpus(client: Client) -> bool:
    """Whether the connected workers offer the ``GPU`` resource (waits for one worker)."""
    client.wait_for_workers(1)
    workers = client.scheduler_info(n_workers=-1)["workers"].values()
    return any(GPU_RESOURCE in worker.get("resources", {}) for worker in workers)

