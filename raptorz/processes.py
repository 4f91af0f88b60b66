"""How raptorz's processes start and end: the worker fork server, and quick exits.

Importing torch (its CUDA build), timm and Dask costs seconds, and so does tearing them
down at exit. Three processes pay neither more than once, and only this module knows how:

The worker fork server (:func:`start_worker_server`)
    ``raptorz embed`` starts, first thing and before Dask is imported, one process that
    imports what a worker needs; local workers are then forked from it, ready at once.
    It lives as long as the command and holds the command's stdout and stderr (its
    workers write to them), so its interpreter's teardown (seconds) kept a
    caller that reads the output to its end waiting (``subprocess.run(capture_output=
    True)``, a pipe to ``tee``, a notebook's ``!raptorz``). It imports this module first,
    and so registers its exit handler before any other: run last, after theirs, it
    skips the teardown.
Workers of a cluster started for one call (:class:`raptorz.cluster.ExitOnClose`)
    A worker that imported torch takes longer to exit than the nanny's 4-second grace,
    so closing such a cluster cost that every time: the worker ends through
    :func:`exit_without_teardown` as soon as it closes.
The console script (:func:`skip_final_collection`)
    The interpreter's last garbage collection walks every object of every library the
    command imported, at the end of each command, for nothing.

Each runs Python's own exit handlers (semaphores, logs) and flushes the standard
streams first: only the native libraries' unloading is skipped.
"""

from __future__ import annotations

import atexit
import gc
import multiprocessing
import multiprocessing.forkserver
import multiprocessing.util
import os
import sys
from collections.abc import Sequence

from raptorz.defaults import EMBED_WORKER_IMPORTS

#: Set in the environment the fork server starts with, so that it alone (not the
#: command that imports this module to start it) ends without its teardown.
_SERVER_MARK = "RAPTORZ_WORKER_SERVER"


def exit_without_teardown(code: int = 0) -> None:
    """End this process now: Python's exit handlers, a flush, then ``os._exit(code)``."""
    atexit._run_exitfuncs()
    _flush_and_exit(code)


def _server_exit() -> None:
    """The fork server's exit handler: registered first, it runs after every handler
    registered later, then runs multiprocessing's own (registered when the server started,
    so it would come last; it releases the server's semaphores) and ends the process."""
    multiprocessing.util._exit_function()  # type: ignore[attr-defined]  # os._exit skips it
    _flush_and_exit(0)


def _flush_and_exit(code: int) -> None:
    for stream in (sys.stdout, sys.stderr):
        if stream is not None:
            stream.flush()
    os._exit(code)  # not the native libraries' unloading, the slow part


def skip_final_collection(code: int) -> int:
    """Return ``code`` after freezing the garbage collector (for the console script)."""
    gc.freeze()  # the objects are left to the process's end, as they are at any exit
    return code


def start_worker_server(imports: Sequence[str] = EMBED_WORKER_IMPORTS) -> bool:
    """Start, in the background, the process that local workers are then forked from.

    The server imports ``imports`` once (by default what an embedding worker needs:
    raptorz's embedding worker with xarray, Zarr and Dask, then torch and timm: seconds),
    while this process goes on. Local clusters that
    :func:`~raptorz.cluster.create_cluster` starts with ``worker_imports`` fork their
    workers from it, each ready at once: no worker imports torch on its own, and 2
    workers cost the start-up of one. The ``raptorz embed`` command starts it first
    thing, so that the imports overlap its own start and the checks of its inputs.

    The server keeps the environment and working directory of the moment it starts, and
    lives as long as this process, then ends without tearing its imports down: the
    command line uses it; a long-lived session (Jupyter) that changes its environment
    between runs should keep the default (``worker_imports=()``: workers are spawned
    afresh). Linux only: returns ``False`` and does nothing elsewhere, where workers are
    always spawned. Starting it again does nothing; the modules of the first call stay.
    """
    if not sys.platform.startswith("linux") or \
            "forkserver" not in multiprocessing.get_all_start_methods():
        return False
    # the server is one per process, whichever context asks: Dask's workers use it too.
    # This module first, so that its exit handler runs last; then distributed, as Dask
    # would preload it.
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__, "distributed", *imports])
    os.environ[_SERVER_MARK] = "1"
    try:
        multiprocessing.forkserver.ensure_running()
    finally:
        del os.environ[_SERVER_MARK]
    return True


if os.environ.pop(_SERVER_MARK, None):  # imported by the fork server, first of all
    atexit.register(_server_exit)
