"""The process that local workers are forked from, started before Dask is even imported.

Kept apart from :mod:`raptorz.cluster` so that ``raptorz embed`` can start it first thing:
importing Dask to get there cost 0.4 s of the command's start-up, all of it on the path
to the first worker.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.forkserver
import sys
from collections.abc import Sequence

from raptorz.defaults import EMBED_WORKER_IMPORTS


def start_worker_server(imports: Sequence[str] = EMBED_WORKER_IMPORTS) -> bool:
    """Start, in the background, the process that local workers are then forked from.

    The server imports ``imports`` once (by default what an embedding worker needs:
    raptorz's runner with xarray, Zarr and Dask, then torch and timm; about 3.5 s on a
    small CPU), while this process goes on. Local clusters that
    :func:`~raptorz.cluster.create_cluster` starts with ``worker_imports`` fork their
    workers from it, each ready at once: no worker imports torch on its own, and 2
    workers cost the start-up of one. The ``raptorz embed`` command starts it first
    thing, so that the imports overlap its own start and the checks of its inputs.

    The server keeps the environment and working directory of the moment it starts, and
    lives as long as this process, then ends without tearing its imports down
    (:mod:`raptorz._server_exit`): the command line uses it; a long-lived session
    (Jupyter) that changes its environment between runs should keep the default
    (``worker_imports=()``: workers are spawned afresh). Linux only: returns ``False``
    and does nothing elsewhere, where workers are always spawned. Starting it again does
    nothing; the modules of the first call stay.
    """
    if not sys.platform.startswith("linux") or \
            "forkserver" not in multiprocessing.get_all_start_methods():
        return False
    # the server is one per process, whichever context asks: Dask's workers use it too.
    # raptorz._server_exit first, so that the server ends without tearing its imports
    # down; then distributed, as Dask would preload it
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["raptorz._server_exit", "distributed", *imports])
    multiprocessing.forkserver.ensure_running()
    return True
