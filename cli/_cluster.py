"""The Dask cluster options ``raptorz embed`` and ``raptorz fit`` share, and the cluster
they ask for (started by the library once it has checked its inputs)."""

from __future__ import annotations

import argparse
import functools
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, cast, get_args

from raptorz.defaults import ClusterKind
from raptorz.errors import RaptorzError

KINDS = get_args(ClusterKind)
#: Kinds that start worker processes on this machine.
LOCAL_KINDS = ("auto", "local", "cuda")


def add_cluster_options(parser: argparse.ArgumentParser, *, default: str,
                        description: str | None = None) -> argparse._ArgumentGroup:
    """Add the ``cluster`` group (``--cluster`` whose absence means ``default``); the
    caller may add its own options to the group it returns."""
    dask = parser.add_argument_group("cluster", description)
    dask.add_argument("--cluster", default=None, metavar="KIND|ADDRESS",
                      help="local | cuda | slurm | pbs | sge | lsf | tcp://HOST:PORT "
                      f"(default {default})")
    dask.add_argument("--workers", type=_at_least_one, help="local/cuda: worker processes")
    dask.add_argument("--dashboard-address", default=":8787", metavar="[HOST]:PORT",
                      help="where the dashboard listens: ':8787' (default) is 127.0.0.1:8787, "
                      "this machine only (':0': any free port); 0.0.0.0:8787 opens it to "
                      "the network (docs/security.md)")
    dask.add_argument("--host", help="local/cuda: where the scheduler and workers listen "
                      "(default 127.0.0.1, this machine only; another host lets whoever "
                      "reaches it run code as you); batch: the scheduler's host")
    dask.add_argument("--jobs", type=int, default=1, help="batch: jobs to start (one worker each)")
    dask.add_argument("--queue", help="batch: queue / partition")
    dask.add_argument("--account", help="batch: account / project to charge")
    dask.add_argument("--walltime", help="batch: job time limit, HH:MM:SS")
    dask.add_argument("--cores", type=int, help="batch: CPU cores per job")
    dask.add_argument("--memory", help="batch: memory per job, e.g. 32GiB")
    dask.add_argument("--job-extra", action="append", default=[], metavar="DIRECTIVE",
                      help="batch: extra job-script directive, repeatable; write "
                      "--job-extra=--exclusive for one that starts with a dash")
    dask.add_argument("--job-prologue", action="append", default=[], metavar="COMMAND",
                      help="batch: shell command run before the worker, e.g. module load")
    dask.add_argument("--job-log-dir", type=Path, help="batch: where job logs go")
    dask.add_argument("--jobqueue-config", type=Path,
                      help="batch: a dask-jobqueue YAML file (flags override it)")
    dask.add_argument("--no-tls", dest="tls", action="store_false",
                      help="batch: no TLS between the jobs and the scheduler (for sites that "
                      "cannot use it; whoever reaches the scheduler can then run code as you)")
    return dask


def cluster_from(args: argparse.Namespace, kind: str, *, gpus_per_job: int = 0,
                 worker_imports: Sequence[str] = ()) -> str | Callable[[], Any]:
    """The scheduler address ``kind`` names, or a function that starts the cluster of
    kind ``kind`` that the options of :func:`add_cluster_options` ask for."""
    if "://" in kind:
        return kind
    if kind not in KINDS:
        raise RaptorzError(f"--cluster {kind!r}: expected one of {', '.join(KINDS)} or an "
                           "address like tcp://HOST:8786")
    options: dict[str, Any] = {"dashboard_address": args.dashboard_address,
                               "workers": args.workers, "host": args.host}
    if kind in LOCAL_KINDS:
        options["worker_imports"] = tuple(worker_imports)
    else:
        options.update(
            jobs=args.jobs, queue=args.queue, account=args.account, walltime=args.walltime,
            cores=args.cores, memory=args.memory, gpus_per_job=gpus_per_job,
            job_extra=args.job_extra, config=args.jobqueue_config, tls=args.tls)
        if args.job_prologue:
            options["job_script_prologue"] = args.job_prologue
        if args.job_log_dir:
            options["log_directory"] = str(args.job_log_dir)
    from raptorz import create_cluster

    return functools.partial(create_cluster, cast(ClusterKind, kind), **options)


def _at_least_one(text: str) -> int:
    """A count of workers: an integer of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, not {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value
