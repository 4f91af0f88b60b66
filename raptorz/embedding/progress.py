"""The embedding run's progress display: a bar in volumes on the client.

Kept apart from the run (:mod:`raptorz.embedding.runner`), which only feeds it: finished
tasks move it by their volumes, and running tasks' reports (events a worker logs every
second or so, see :mod:`raptorz.embedding.worker`) move it in between.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterable
from typing import Any


class ProgressBar:
    """A progress bar in volumes (a widget in Jupyter), over tasks known by their keys.

    Parameters
    ----------
    total, done
        Volumes of the run, and how many of them were done before it started.
    enabled
        Whether anything is shown.
    """

    def __init__(self, total: int, done: int, enabled: bool) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, initial=done, unit="vol", disable=not enabled,
                        desc="embed", file=sys.stderr)
        self.done = float(done)
        self.running: dict[str, float] = {}
        self.lock = threading.Lock()

    def start(self, keys: Iterable[str]) -> None:
        """The tasks whose reports count from now on."""
        self.running = dict.fromkeys(keys, 0.0)

    def report(self, event: tuple[float, dict[str, Any]]) -> None:
        """A running task's report (from the client's event loop)."""
        _, message = event
        with self.lock:
            if message["task"] in self.running:
                self.running[message["task"]] += message["volumes"]
                self._show()

    def finish(self, key: str, volumes: int) -> None:
        """Task ``key`` ended (done or failed) with ``volumes`` volumes."""
        with self.lock:
            self.running.pop(key, None)
            self.done += volumes
            self._show()

    def _show(self) -> None:
        self.bar.n = round(self.done + sum(self.running.values()), 1)
        self.bar.refresh()

    def close(self) -> None:
        self.bar.close()
