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
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Final, get_args

import dask.config
from distributed import Client, LocalCluster, Nanny, Scheduler, SpecCluster
from distributed.deploy import Cluster

from raptorz.defaults import ClusterKind as ClusterKind  # re-exported
from raptorz.errors import InputError, RaptorzError

JOBQUEUE_KINDS: Final = ("slurm", "pbs", "sge", "lsf")

#: The worker resource a GPU task asks for; every GPU worker advertises one.
GPU_RESOURCE: Final = "GPU"


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
    except (subprocess.SubprocessError, OSError):
        return []
    return [line.strip() for line in out.splitlines() if line.strip()]


def create_cluster(
    kind: ClusterKind = "local",
    *,
    workers: int | None = None,
    threads_per_worker: int = 1,
    gpus: Sequence[str] | None = None,
    dashboard_address: str | None = ":8787",
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
        ``local``: worker processes on this machine (CPU). ``cuda``: one worker per GPU,
        each pinned to its device. ``slurm`` / ``pbs`` / ``sge`` / ``lsf``: workers
        started as batch jobs through dask-jobqueue.
    workers
        Local kinds: the number of worker processes (``cuda``: at most one per GPU;
        default one per GPU, or one for ``local``).
    threads_per_worker
        ``local``: Dask threads per worker. raptorz runs one kernel at a time per
        worker, so 1 is right; the kernel's torch threads are set separately.
    gpus
        ``cuda``: the device ids to use (default: :func:`visible_gpus`).
    dashboard_address
        Where the scheduler serves its dashboard (``":0"`` picks a free port).
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
        kind = "cuda" if visible_gpus() else "local"
    if kind == "local":
        return LocalCluster(
            n_workers=workers or 1, threads_per_worker=threads_per_worker, processes=True,
            dashboard_address=dashboard_address, **options,
        )
    if kind == "cuda":
        return _cuda_cluster(gpus, workers, dashboard_address, options)
    if kind in JOBQUEUE_KINDS:
        return _jobqueue_cluster(
            kind, jobs=jobs, config=config, gpus_per_job=gpus_per_job, job_extra=job_extra,
            dashboard_address=dashboard_address,
            options={"queue": queue, "account": account, "walltime": walltime,
                     "cores": cores, "memory": memory, **options},
        )
    raise RaptorzError(f"unknown cluster kind {kind!r}; expected one of {get_args(ClusterKind)}")


def _cuda_cluster(
    gpus: Sequence[str] | None, workers: int | None, dashboard_address: str | None,
    options: dict[str, Any],
) -> Cluster:
    devices = list(gpus) if gpus is not None else visible_gpus()
    if not devices:
        raise RaptorzError("--cluster cuda: no GPU found (CUDA_VISIBLE_DEVICES, nvidia-smi)")
    devices = devices[: workers or len(devices)]
    try:
        from dask_cuda import LocalCUDACluster
    except ImportError:
        # A SpecCluster of Nannies gives each worker its own environment, hence its device.
        spec = {
            f"gpu-{device}": {"cls": Nanny, "options": {
                "nthreads": 1, "env": {"CUDA_VISIBLE_DEVICES": device},
                "resources": {GPU_RESOURCE: 1}, **options,
            }}
            for device in devices
        }
        scheduler = {"cls": Scheduler, "options": {"dashboard_address": dashboard_address}}
        return SpecCluster(workers=spec, scheduler=scheduler, name="raptorz-cuda")
    return LocalCUDACluster(
        CUDA_VISIBLE_DEVICES=devices, threads_per_worker=1,
        resources={GPU_RESOURCE: 1}, dashboard_address=dashboard_address, **options,
    )


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
            f"--cluster {kind} needs dask-jobqueue: pip install 'raptorz[hpc]'") from None
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
    devices = visible_gpus()
    suffix = str(worker.name).rsplit("-", 1)[-1]
    if devices and suffix.isdigit():
        os.environ["CUDA_VISIBLE_DEVICES"] = devices[int(suffix) % len(devices)]
