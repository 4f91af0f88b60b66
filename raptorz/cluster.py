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

from raptorz.defaults import ClusterKind
from raptorz.errors import InputError, RaptorzError, RaptorzWarning, SettingsError
from raptorz.processes import exit_without_teardown, start_worker_server

JOBQUEUE_KINDS: Final = ("slurm", "pbs", "sge", "lsf")

#: The worker resource a GPU task asks for; every GPU worker advertises one.
GPU_RESOURCE: Final = "GPU"
#: The environment variable that tells a worker how many workers share its host's CPUs.
WORKERS_PER_HOST: Final = "RAPTORZ_WORKERS_PER_HOST"
#: Dask's setting for how a nanny starts its worker process.
_START_METHOD: Final = "distributed.worker.multiprocessing-method"


def visible_gpus() -> list[str]:
    """The GPUs this machine offers, without initialising CUDA in this process.

    ``CUDA_VISIBLE_DEVICES`` wins where it is set (an empty value or ``-1`` means none);
    otherwise ``nvidia-smi`` lists the devices; without it there are none.
    """
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        devices = [d.strip() for d in listed.split(",") if d.strip()]
        return [] if devices[:1] == ["-1"] else devices
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"],
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
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else \
        (os.cpu_count() or 1)
    return max(1, cpus // max(1, int(os.environ.get(WORKERS_PER_HOST, "1"))))


def share_cpus(client: Client) -> None:
    """Give each connected worker its share of its host's CPUs (see :func:`worker_threads`)."""
    workers = client.scheduler_info(n_workers=-1)["workers"].values()
    per_host: dict[str, int] = {}
    for worker in workers:
        per_host[worker["host"]] = per_host.get(worker["host"], 0) + 1
    client.run(_take_share, per_host)


def _take_share(per_host: dict[str, int], dask_worker: Any = None) -> None:
    host = str(dask_worker.address).split("://")[-1].rsplit(":", 1)[0] if dask_worker else ""
    os.environ[WORKERS_PER_HOST] = str(per_host.get(host, 1))
    _THREADS.clear()
    _THREADS.append(worker_threads())


def _worker_resources() -> dict[str, float]:
    """The resources this process's Dask worker advertises (none outside a worker)."""
    try:
        from distributed import get_worker

        return dict(get_worker().state.total_resources)
    except ValueError:
        return {}


@contextlib.contextmanager
def _starting_workers(imports: Sequence[str]) -> Iterator[None]:
    """Start local workers forked from :func:`start_worker_server` where it can run."""
    if imports and start_worker_server(imports):
        with dask.config.set({_START_METHOD: "forkserver"}):
            yield
    else:
        yield


def create_cluster(
    kind: ClusterKind = "local",
    *,
    workers: int | None = None,
    threads_per_worker: int = 2,
    gpus: Sequence[str] | None = None,
    dashboard_address: str | None = ":8787",
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
        started as batch jobs through dask-jobqueue.
    workers
        Local kinds: the number of worker processes (``cuda``: at most one per GPU;
        default one per GPU, or one for ``local``).
    threads_per_worker
        Local kinds: Dask threads per worker. A worker encodes one task at a time; its
        second thread reads and writes the next and the previous task meanwhile. The
        kernel's torch threads are set separately (:func:`worker_threads`).
    gpus
        ``cuda`` and ``local``: the device ids to use (default: :func:`visible_gpus`).
    dashboard_address
        Where the scheduler serves its dashboard (``":0"`` picks a free port).
    worker_imports
        Local kinds: modules every worker has imported before it starts, by forking it
        from :func:`start_worker_server` (Linux; ``raptorz embed`` passes
        :data:`~raptorz.defaults.EMBED_WORKER_IMPORTS`). Default: none; workers are
        spawned and import what their tasks need.
    jobs, queue, account, walltime, cores, memory
        Batch kinds: how many jobs to start (one worker each) and what each requests.
    gpus_per_job
        Batch kinds: GPUs each job requests. The job script gets the batch system's GPU
        directive; each job runs one worker process per GPU, each pinned to its own
        device (:func:`dask_setup`) and advertising ``GPU=1``.
    job_extra
        Batch kinds: extra directives for the job script (``"--constraint=a100"``).
    config
        Batch kinds: a dask-jobqueue YAML configuration file (``jobqueue: slurm: ...``);
        the other arguments override its values.
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
    if kind == "auto":
        kind = "cuda" if (gpus if gpus is not None else visible_gpus()) else "local"
    if kind == "local":
        devices = list(gpus) if gpus is not None else visible_gpus()
        with _starting_workers(worker_imports):
            if devices:  # never every worker on cuda:0: each pinned to a GPU in turn
                count = workers or 1
                return _pinned_cluster([devices[i % len(devices)] for i in range(count)],
                                       threads_per_worker, dashboard_address, options)
            return LocalCluster(
                n_workers=workers or 1, threads_per_worker=threads_per_worker,
                processes=True, dashboard_address=dashboard_address,
                env={WORKERS_PER_HOST: str(workers or 1)}, **options,
            )
    if kind == "cuda":
        with _starting_workers(worker_imports):
            return _cuda_cluster(gpus, workers, threads_per_worker, dashboard_address,
                                 options)
    if kind in JOBQUEUE_KINDS:
        return _jobqueue_cluster(
            kind, jobs=jobs, config=config, gpus_per_job=gpus_per_job, job_extra=job_extra,
            dashboard_address=dashboard_address,
            options={"queue": queue, "account": account, "walltime": walltime,
                     "cores": cores, "memory": memory, **options},
        )
    raise RaptorzError(f"unknown cluster kind {kind!r}; expected one of {get_args(ClusterKind)}")


def _cuda_cluster(
    gpus: Sequence[str] | None, workers: int | None, threads: int,
    dashboard_address: str | None, options: dict[str, Any],
) -> Cluster:
    devices = list(gpus) if gpus is not None else visible_gpus()
    if not devices:
        raise SettingsError("'cuda': no GPU found (CUDA_VISIBLE_DEVICES, nvidia-smi)",
                            option="cluster")
    devices = devices[: workers or len(devices)]
    try:
        from dask_cuda import LocalCUDACluster
    except ImportError:
        return _pinned_cluster(devices, threads, dashboard_address, options)
    return LocalCUDACluster(
        CUDA_VISIBLE_DEVICES=devices, threads_per_worker=threads,
        resources={GPU_RESOURCE: 1}, dashboard_address=dashboard_address,
        env={WORKERS_PER_HOST: str(len(devices))}, **options,
    )


def _pinned_cluster(devices: Sequence[str], threads: int, dashboard_address: str | None,
                    options: dict[str, Any]) -> Cluster:
    """One worker process per entry of ``devices``, pinned to it, advertising ``GPU=1``.

    A SpecCluster of Nannies gives each worker its own environment, hence its device.
    """
    spec = {
        f"gpu-{device}-{i}": {"cls": Nanny, "options": {
            "nthreads": threads, "resources": {GPU_RESOURCE: 1},
            "env": {"CUDA_VISIBLE_DEVICES": device, WORKERS_PER_HOST: str(len(devices))},
            **options,
        }}
        for i, device in enumerate(devices)
    }
    scheduler = {"cls": Scheduler, "options": {"dashboard_address": dashboard_address}}
    return SpecCluster(workers=spec, scheduler=scheduler, name="raptorz-gpus")


#: Per batch system: the job-script directive that requests ``n`` GPUs. These are the
#: common forms; sites that differ pass their own through ``job_extra``.
GPU_DIRECTIVES: Final = {
    "slurm": "--gres=gpu:{n}",
    "pbs": "-l ngpus={n}",
    "sge": "-l gpu={n}",
    "lsf": '-gpu "num={n}"',
}


def _jobqueue_cluster(
    kind: str, *, jobs: int, config: str | Path | None, gpus_per_job: int,
    job_extra: Sequence[str], dashboard_address: str | None, options: dict[str, Any],
) -> Cluster:
    try:
        import dask_jobqueue
    except ImportError:
        raise RaptorzError(
            f"a {kind} cluster needs dask-jobqueue: pip install 'raptorz[hpc]'") from None
    cls = {"slurm": dask_jobqueue.SLURMCluster, "pbs": dask_jobqueue.PBSCluster,
           "sge": dask_jobqueue.SGECluster, "lsf": dask_jobqueue.LSFCluster}[kind]
    kwargs = {key: value for key, value in options.items() if value is not None}
    if kind in ("sge", "lsf") and "account" in kwargs:  # these call it "project"
        kwargs["project"] = kwargs.pop("account")
    directives = list(job_extra)
    worker_args: list[str] = []
    if gpus_per_job > 0:
        directives.insert(0, GPU_DIRECTIVES[kind].format(n=gpus_per_job))
        worker_args = ["--resources", f"{GPU_RESOURCE}=1"]
        if gpus_per_job > 1:
            # one worker process per GPU of the job, each pinned by :func:`dask_setup`
            kwargs["processes"] = gpus_per_job
            worker_args += ["--preload", __name__]
    # the file's values become arguments: dask-jobqueue also reads its configuration
    # when it starts jobs later, after any temporary configuration would be gone
    section = _read_jobqueue_config(config, kind) if config is not None else {}
    kwargs = {**section, **kwargs}
    for key, extra in (("job_extra_directives", directives), ("worker_extra_args", worker_args)):
        if extra:  # added to those of the file, or else of the dask configuration
            configured = section.get(key) or dask.config.get(
                f"jobqueue.{kind}.{key.replace('_', '-')}", default=[])
            kwargs[key] = [*configured, *extra]
    # the workers of a job share its CPUs (:func:`worker_threads`)
    prologue = kwargs.get("job_script_prologue") or dask.config.get(
        f"jobqueue.{kind}.job-script-prologue", default=None) or []
    kwargs["job_script_prologue"] = [
        *prologue, f"export {WORKERS_PER_HOST}={kwargs.get('processes', 1)}"]
    for key, default in (("python", sys.executable),  # the workers run this environment
                         ("processes", 1),  # one worker per job: one model per job
                         ("cores", 1), ("memory", "4GiB")):
        if dask.config.get(f"jobqueue.{kind}.{key}", default=None) is None:
            kwargs.setdefault(key, default)
    kwargs.setdefault("scheduler_options", {"dashboard_address": dashboard_address})
    cluster = cls(**kwargs)
    cluster.scale(jobs=jobs)
    return cluster


def _read_jobqueue_config(path: str | Path, kind: str) -> dict[str, Any]:
    """The ``jobqueue: <kind>:`` section of a YAML file, as cluster arguments."""
    import yaml

    try:
        loaded = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as error:
        raise InputError(path, f"cannot read the dask-jobqueue configuration ({error})") from None
    if not isinstance(loaded, dict) or not isinstance(loaded.get("jobqueue"), dict):
        raise InputError(path, "is not a dask-jobqueue configuration (no 'jobqueue:' section)")
    section = loaded["jobqueue"].get(kind)
    if not isinstance(section, dict):
        raise InputError(path, f"has no 'jobqueue: {kind}:' section")
    return {key.replace("-", "_"): value for key, value in section.items() if value is not None}


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


def dask_setup(worker: Any) -> None:
    """Dask preload hook: pin one worker of a multi-GPU batch job to one of its GPUs.

    ``dask worker --nworkers N --name J`` names its workers ``J-0`` ... ``J-(N-1)``; the
    worker with suffix ``i`` keeps the ``i``-th device the batch system gave the job.
    It runs in the worker process before any task, hence before CUDA is initialised.
    """
    listed = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    devices = [d.strip() for d in listed.split(",") if d.strip() not in ("", "-1")]
    suffix = str(worker.name).rsplit("-", 1)[-1]
    if not devices:
        # the batch system gave no device list: pinning by nvidia-smi's list of the whole
        # node could take another job's GPU; worker_device() refuses the first task
        return
    if suffix.isdigit():
        os.environ["CUDA_VISIBLE_DEVICES"] = devices[int(suffix) % len(devices)]
