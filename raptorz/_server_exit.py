"""Imported first by the worker fork server (:func:`raptorz.start_worker_server`): when
its command ends, the server runs its exit handlers, then ends without tearing down
what it imported.

The server ends when the command that started it does. Its interpreter's teardown of
torch, timm and Dask then took about 1.5 s on 2 cores, and the server holds the command's
stdout and stderr, which its workers write to: a caller that reads the command's output
to its end (``subprocess.run(capture_output=True)``, a pipe to ``tee``, a notebook's
``!raptorz``) waited for it. Registered before the preloaded modules, this handler runs
after theirs; then multiprocessing's own (registered when the server started: it
releases the server's semaphores), a flush, and ``os._exit``. Workers forked from the
server end with ``os._exit`` already (multiprocessing's own), so this is the server's
alone.
"""

from __future__ import annotations

import atexit
import multiprocessing.util
import os
import sys


def _exit_now() -> None:
    multiprocessing.util._exit_function()  # type: ignore[attr-defined]  # os._exit skips it
    for stream in (sys.stdout, sys.stderr):
        if stream is not None:
            stream.flush()
    os._exit(0)


atexit.register(_exit_now)  # first registered, last run: every later module's handler runs
