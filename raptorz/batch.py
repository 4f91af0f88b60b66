"""Dask clusters of batch jobs (SLURM, PBS, SGE, LSF) through dask-jobqueue.

Each job runs this very Python interpreter: one worker, or one worker per GPU it
requests, each pinned to its device (:func:`dask_setup`). The jobs reach the scheduler
over the network, so by default the scheduler and the workers speak TLS with credentials
made for the cluster (``Security.temporary()``): what a job needs of them is written,
readable by the user only, to a folder the jobs share (dask-jobqueue's
``shared_temp_directory``, by default the working directory). The dashboard stays on
this machine (:mod:`raptorz.network`).
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

import dask.config
from distributed.deploy import Cluster

from raptorz.defaults import GPU_RESOURCE, WORKERS_PER_HOST
from raptorz.errors import InputError, RaptorzError, RaptorzWarning, SettingsError
from raptorz.network import DEFAULT_DASHBOARD, dashboard_options

JOBQUEUE_KINDS: Final = ("slurm", "pbs", "sge", "lsf")

#: Per batch system: the job-script directive that requests ``n`` GPUs. These are the
#: common forms; sites that differ pass their own through ``job_extra``.
GPU_DIRECTIVES: Final = {
    "slurm": "--gres=gpu:{n}",
    "pbs": "-l ngpus={n}",
    "sge": "-l gpu={n}",
    "lsf": '-gpu "num={n}"',
}
#: A job's memory where neither the caller nor the site says: a CPU job's, and a GPU
#: job's per GPU (a worker building a ViT-L peaks at about 3 GB before any CUDA context;
#: its batches and the volumes it reads need room beside it).
CPU_JOB_MEMORY: Final = "4GiB"
GPU_JOB_MEMORY_GIB: Final = 16


def jobqueue_cluster(
    kind: str, *, jobs: int, config: str | Path | None, gpus_per_job: int,
    job_extra: Sequence[str], dashboard_address: str | None, host: str | None, tls: bool,
    options: dict[str, Any],
) -> Cluster:
    """A dask-jobqueue cluster of ``kind`` running ``jobs`` jobs (see
    :func:`raptorz.cluster.create_cluster`, which documents the arguments)."""
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
    site_scheduler = section.pop("scheduler_options", None) or dask.config.get(
        f"jobqueue.{kind}.scheduler-options", default=None) or {}
    kwargs = {**section, **kwargs}
    for key, extra in (("job_extra_directives", directives), ("worker_extra_args", worker_args)):
        if extra:  # added to those of the file, or else of the dask configuration
            configured = section.get(key) or _configured(kind, key, [])
            kwargs[key] = [*configured, *extra]
    # the workers of a job share its CPUs (raptorz.cluster.worker_threads)
    prologue = kwargs.get("job_script_prologue") or _configured(kind, "job_script_prologue", [])
    kwargs["job_script_prologue"] = [
        *prologue, f"export {WORKERS_PER_HOST}={kwargs.get('processes', 1)}"]
    memory = f"{GPU_JOB_MEMORY_GIB * gpus_per_job}GiB" if gpus_per_job > 0 else CPU_JOB_MEMORY
    for key, default in (("python", sys.executable),  # the workers run this environment
                         ("processes", 1),  # one worker per job: one model per job
                         ("cores", 1), ("memory", memory)):
        if _configured(kind, key, None) is None:
            kwargs.setdefault(key, default)
    # raptorz's defaults, then the site's, then the caller's
    chosen = {**({"host": host} if host else {}), **kwargs.pop("scheduler_options", {})}
    if dashboard_address != DEFAULT_DASHBOARD:
        chosen.setdefault("dashboard_address", dashboard_address)
    scheduler = {"dashboard_address": DEFAULT_DASHBOARD, **site_scheduler, **chosen}
    scheduler.update(dashboard_options(scheduler.pop("dashboard_address")))
    kwargs["scheduler_options"] = scheduler
    if tls:
        _secure(kind, kwargs)
    else:
        where = scheduler.get("host") or scheduler.get("interface") or kwargs.get(
            "interface") or _configured(kind, "interface", None) or "every interface"
        warnings.warn(
            f"the {kind} cluster's scheduler listens on {where} without TLS: anyone who "
            "can reach it there can run code as you", RaptorzWarning, stacklevel=3)
    cluster = cls(**kwargs)
    cluster.scale(jobs=jobs)
    _check_submitted(cluster, kind)
    return cluster


def _check_submitted(cluster: Any, kind: str) -> None:
    """Wait until the batch system took the jobs; refuse a cluster whose jobs it refused.

    dask-jobqueue submits in the background and only logs a refusal (no controller, a bad
    ``--gres``), so the run would wait for workers that never come. A job without an id
    was refused: its submission is tried once more here to show the batch system's own
    words.
    """
    cluster.sync(cluster._correct_state)
    refused = [job for job in cluster.workers.values() if getattr(job, "job_id", None) is None]
    if not refused:
        return
    job, detail = refused[0], "it gave no job id"
    try:
        with job.job_file() as script:
            output = cluster.sync(job._submit_job, script)
    except (RuntimeError, OSError) as error:  # the submit command failed, or is missing
        detail = str(error).split("stderr:", 1)[-1].strip() or str(error)
    else:  # taken this time: cancel it, the cluster is refused all the same
        cluster.sync(job._close_job, job._job_id_from_submit_output(output),
                     job.cancel_command)
    for name in [n for n, j in cluster.workers.items() if getattr(j, "job_id", None) is None]:
        cluster._created.discard(cluster.workers.pop(name))  # never started: nothing to close
    cluster.worker_spec.clear()
    cluster.close()
    raise RaptorzError(f"the {kind} batch system refused the job ({job.submit_command}): "
                       f"{detail}")


def _configured(kind: str, key: str, default: Any) -> Any:
    """The site's dask-jobqueue setting ``key`` for ``kind`` (Dask configuration)."""
    return dask.config.get(f"jobqueue.{kind}.{key.replace('_', '-')}", default=default)


def _secure(kind: str, kwargs: dict[str, Any]) -> None:
    """TLS between the scheduler, the jobs' workers and the client, unless the caller
    brought its own ``security``."""
    if "security" in kwargs:
        return
    from distributed.security import Security

    try:
        kwargs["security"] = Security.temporary()
    except ImportError:
        raise SettingsError(
            "TLS between the jobs and the scheduler needs the cryptography package: pip "
            "install 'raptorz[hpc]' (or turn TLS off where the site cannot use it)",
            option="tls") from None
    if _configured(kind, "shared_temp_directory", None) is None:
        # where the jobs read their credentials; said explicitly, else dask-jobqueue warns
        kwargs.setdefault("shared_temp_directory", os.getcwd())


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
