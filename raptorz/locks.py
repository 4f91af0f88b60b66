"""The locks of a raptorz store: one for the steps that change its metadata, one per unit
for a unit's commit (:mod:`raptorz.stores` re-exports them).

Steps that change a store's metadata (attributes, variables) read it and write it
back, so two at once would lose one's change: each holds the store's lock
(:func:`store_lock`), a file lock whose holder (host, pid, command) is written beside it
for the one that waits. Data writes take no lock, so that processes writing disjoint
units (``raptorz embed --start/--many`` jobs) run at once; only a unit's commit holds that
unit's own lock for a moment (:func:`unit_lock`), against a step filling a new variable.

In object storage, which has no file locks, each is a lock object instead
(:func:`raptorz.locations.object_lock`).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Final

import zarr
from filelock import FileLock, Timeout

from raptorz import locations
from raptorz.errors import InputError, RaptorzWarning

#: The store's lock file, inside its ``status`` array: Zarr lists (and warns at foreign
#: files in) a group's folder, never an array's.
LOCK_FILE: Final = "status/.raptorz.lock"
#: How long a metadata step waits for another one's lock before it gives up.
LOCK_SECONDS: Final = 600.0


def _holder(path: Path) -> str:
    """Who holds the lock at ``path``, as its holder wrote it ("another process" if unsaid)."""
    with contextlib.suppress(OSError):
        return locations.holder_words(path.with_name(path.name + ".holder").read_text())
    return "another process"


@contextlib.contextmanager
def store_lock(path: str | Path, command: str, *,
               timeout: float = LOCK_SECONDS) -> Iterator[None]:
    """Hold the lock of the store at ``path`` for a step that changes its metadata.

    Reentrant in one thread; excludes other threads and processes (on any host sharing
    the file system). The holder's host, pid and ``command`` are written beside the lock;
    one that has to wait is told who holds it with a :class:`~raptorz.errors.RaptorzWarning`.
    A process that dies releases its lock. In object storage, a lock object
    (:func:`raptorz.locations.object_lock`).

    Raises
    ------
    InputError
        Naming the store and the holder, where the lock is not free within ``timeout`` s.
    """
    if locations.is_url(path):  # no file locks in object storage
        with locations.object_lock(f"{path}/{LOCK_FILE}", command, timeout):
            yield
        return
    file = Path(path) / LOCK_FILE
    lock = FileLock(file, is_singleton=True)
    holder = file.with_name(file.name + ".holder")
    if lock.is_locked:  # this thread holds it already: one step inside another
        with lock:
            yield
        return
    try:
        lock.acquire(timeout=0)
    except Timeout:
        warnings.warn(f"{path}: waiting (up to {timeout:g} s) for its lock, held by "
                      f"{_holder(file)}", RaptorzWarning, stacklevel=3)
        try:
            lock.acquire(timeout=timeout)
        except Timeout:
            raise InputError(path, f"is locked by {_holder(file)}; still held after "
                             f"{timeout:g} s: wait for it to finish, or stop it") from None
    try:
        holder.write_text(locations.holder_record(command))
        yield
    finally:
        holder.unlink(missing_ok=True)
        lock.release()


@contextlib.contextmanager
def unit_lock(path: str | Path, region: slice, *,
              timeout: float = LOCK_SECONDS) -> Iterator[None]:
    """Hold the locks of the units of ``region`` (a file lock per unit, taken in order).

    For brief steps that must not interleave in a unit: a task's commit (it looks for new
    variables) and a new variable's fill (:func:`raptorz.embedding.embeddings.add_projections`
    reads the status). Other units' writers never wait; reentrant; released by a death.

    Raises
    ------
    InputError
        Naming the store and the unit, where a unit's lock is not free within ``timeout``.
    """
    unit = zarr.open_array(locations.join(path, "status"), mode="r", zarr_format=3).chunks[0]
    folder = locations.join(path, "status", ".raptorz-units")  # beside LOCK_FILE, by first id
    if isinstance(folder, Path):
        folder.mkdir(exist_ok=True)
    with contextlib.ExitStack() as held:
        for start in range(region.start // unit * unit, region.stop, unit):
            if isinstance(folder, str):  # object storage: a lock object per unit
                held.enter_context(locations.object_lock(f"{folder}/{start}.lock", "commit",
                                                         timeout))
                continue
            lock = FileLock(folder / f"{start}.lock", is_singleton=True)
            try:  # in order: two holders of several units never wait on each other
                held.enter_context(lock.acquire(timeout=timeout))
            except Timeout:
                raise InputError(path, f"the unit of id {start} is still locked after "
                                 f"{timeout:g} s (a stuck writer?): stop it, rerun") from None
        yield
