"""Imported last by the worker fork server (:func:`raptorz.cluster.start_worker_server`):
when its command ends, the server exits at once.

The server ends when the command that started it does. A normal exit then tears down
everything it imported (torch, timm, Dask: about 1.5 s on 2 cores), and the server holds
the command's stdout and stderr, which its workers write to: a caller that reads the
command's output to its end (``subprocess.run(capture_output=True)``, a pipe to ``tee``,
a notebook's ``!raptorz``) waited for that teardown. The server has nothing to flush or
save, so its last step is ``os._exit``. Workers forked from it end with ``os._exit``
already (multiprocessing's own), so this handler is the server's alone.
"""

from __future__ import annotations

import atexit
import os
import sys


def _exit_now() -> None:
    for stream in (sys.stdout, sys.stderr):
        if stream is not None:
            stream.flush()
    os._exit(0)


atexit.register(_exit_now)  # registered last, so run first: the handlers before it are skipped
