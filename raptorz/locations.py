"""Where stores and sources live: a local path, or a URL of object storage through fsspec.

A *location* is a :class:`~pathlib.Path` on the local (or a shared) file system, or a URL
string such as ``s3://bucket/prefix/volumes.zarr``, ``gs://...`` or ``https://...``:
:func:`location` tells them apart once, so that the rest of raptorz passes a URL on
untouched (``Path`` would turn ``s3://b`` into ``s3:/b``) and keeps its local code as it
was. Zarr and xarray open a URL themselves (Zarr v3's ``FsspecStore``); the helpers here
cover what they do not: whether something is there, a source's identity, listing a
folder of sources, a local copy of a source for the readers, and a lock.

Credentials, endpoint and region come from each library's own environment (s3fs reads
``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL``, ``~/.aws``; gcsfs
reads Google's; fsspec's configuration, e.g. ``FSSPEC_S3='{"anon": true}'``, sets
defaults per protocol). Sources may also be given ``storage_options`` (e.g.
``{"anon": True}`` for a public bucket such as OpenNeuro's).

Locks. A local store's lock is a file lock (:mod:`raptorz.stores`). Object storage has no
file locks: :func:`object_lock` writes a lock object with if-none-match semantics (mode
``"xb"``: S3 and S3-compatible servers refuse a second writer with 412), holding the
holder's host, pid and command, and deletes it when done. A process that dies holding it
leaves the object: another process on the same host sees that the pid is gone and takes
it over; one on another host waits, then names the object to delete.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import re
import socket
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Final, cast

from raptorz.errors import InputError, RaptorzWarning

if TYPE_CHECKING:
    from fsspec import AbstractFileSystem

#: A URL: a scheme of letters, digits, ``+``, ``-`` or ``.``, then ``://``.
_URL: Final = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
#: How often a process waiting for a lock object looks again, in seconds.
_POLL_SECONDS: Final = 0.2
#: The lock objects this process holds, per thread: a step inside another reenters.
_held = threading.local()
#: fsspec's object storage protocols (S3, Google Cloud Storage, Azure).
_STORAGE_PROTOCOLS: Final = ("s3", "s3a", "gs", "gcs", "az", "abfs", "abfss")


def fresh_listings() -> None:
    """Turn off fsspec's cache of listings for object storage, unless configured: several
    processes write one store, and a listing cached by a long-lived worker would hide the
    variable another process just added (each store's metadata is read afresh). Called by
    :mod:`raptorz.layouts` as it is imported, before any store is opened (it imports fsspec,
    which the command line's parser must not)."""
    import fsspec.config

    for protocol in _STORAGE_PROTOCOLS:
        fsspec.config.conf.setdefault(protocol, {}).setdefault("use_listings_cache", False)


def is_url(location: object) -> bool:
    """Whether ``location`` is a URL (``s3://``, ``gs://``, ``https://``...), not a path."""
    return isinstance(location, str) and _URL.match(location) is not None \
        and not location.startswith("file://")


def location(text: str | os.PathLike[str]) -> str | Path:
    """``text`` as a location: a URL stays a string (without a trailing ``/``), anything
    else is a :class:`~pathlib.Path` (``file://`` URLs included)."""
    if is_url(text):
        return str(text).rstrip("/")
    text = os.fspath(text)
    return Path(text.removeprefix("file://"))


def resolved(text: str | os.PathLike[str]) -> str | Path:
    """``text`` as an absolute location: a URL as is, a path resolved (the stores record
    it, and a rerun from elsewhere compares equal)."""
    found = location(text)
    return found if isinstance(found, str) else found.resolve()


def join(base: str | os.PathLike[str], *parts: str) -> str | Path:
    """``base`` with ``parts`` appended (``/`` in a URL, the path's way locally)."""
    found = location(base)
    return "/".join([found, *parts]) if isinstance(found, str) else found.joinpath(*parts)


def name(place: str | os.PathLike[str]) -> str:
    """The last component of a location (``volumes.zarr``)."""
    found = location(place)
    return found.rsplit("/", 1)[-1] if isinstance(found, str) else found.name


def sibling(place: str | os.PathLike[str], other: str) -> str | Path:
    """The location named ``other`` beside ``place`` (a labels CSV beside its store)."""
    found = location(place)
    if isinstance(found, str):
        return f"{found.rsplit('/', 1)[0]}/{other}"
    return found.with_name(other)


def filesystem(url: str, storage_options: Mapping[str, Any] | None = None
               ) -> tuple[AbstractFileSystem, str]:
    """The fsspec file system of ``url`` and the path within it.

    Raises
    ------
    InputError
        Where fsspec has no implementation of the URL's protocol installed (s3fs for
        ``s3://``, gcsfs for ``gs://``), naming what to install.
    """
    from fsspec.core import url_to_fs

    fresh_listings()
    try:
        return url_to_fs(url, **dict(storage_options or {}))
    except ImportError as error:  # fsspec names the missing package in its message
        raise InputError(url, f"cannot be opened: {error} (pip install 'raptorz[cloud]' "
                         "installs s3fs; gcsfs for gs://)") from None
    except ValueError as error:  # an unknown protocol
        raise InputError(url, f"cannot be opened ({error})") from None


def open_file(place: str | os.PathLike[str], mode: str,
              storage_options: Mapping[str, Any] | None = None, **text: Any) -> IO[Any]:
    """``open(place, mode, **text)`` for a path, fsspec's for a URL (``text``: ``newline``,
    ``encoding``)."""
    found = location(place)
    if isinstance(found, Path):
        return open(found, mode, **text)  # noqa: SIM115 (the caller's with closes it)
    fs, path = filesystem(found, storage_options)
    return cast(IO[Any], fs.open(path, mode, **text))


def exists(place: str | os.PathLike[str]) -> bool:
    """Whether anything is at ``place`` (for a URL: an object, or objects below it)."""
    found = location(place)
    if isinstance(found, Path):
        return found.exists()
    fs, path = filesystem(found)
    return bool(fs.exists(path))


def holds_anything(place: str | os.PathLike[str]) -> bool:
    """Whether ``place`` holds something: a file, or a folder or prefix that is not empty."""
    found = location(place)
    if isinstance(found, Path):
        return found.exists() and not (found.is_dir() and not any(found.iterdir()))
    return exists(found)


def identity(url: str, storage_options: Mapping[str, Any] | None = None) -> tuple[int, int]:
    """``(size, modification time in ns)`` of the object at ``url`` (time 0 where the
    storage does not tell it), from its metadata alone.

    Raises
    ------
    OSError
        Where it is not there (``FileNotFoundError``) or cannot be reached.
    """
    fs, path = filesystem(url, storage_options)
    info = fs.info(path)
    try:
        modified = fs.modified(path)
        mtime = int(modified.timestamp() * 1e9)
    except (NotImplementedError, AttributeError, ValueError, TypeError):
        mtime = 0
    return int(info.get("size") or 0), mtime


def listing(url: str, storage_options: Mapping[str, Any] | None = None
            ) -> list[tuple[str, bool]]:
    """The entries directly in the folder (prefix) ``url``, as ``(url, is a folder)``
    sorted by name; one listing request of that prefix only."""
    fs, path = filesystem(url, storage_options)
    protocol = url.split("://", 1)[0]
    entries = fs.ls(path, detail=True)
    return sorted((f"{protocol}://{entry['name'].rstrip('/')}", entry["type"] == "directory")
                  for entry in entries if entry["name"].rstrip("/") != path.rstrip("/"))


def is_folder(url: str, storage_options: Mapping[str, Any] | None = None) -> bool:
    """Whether ``url`` is a folder (a prefix with objects below it), not an object."""
    fs, path = filesystem(url, storage_options)
    return bool(fs.isdir(path))


def matches(pattern: str, storage_options: Mapping[str, Any] | None = None) -> list[str]:
    """The URLs a glob ``pattern`` (``s3://bucket/scans/*.nii.gz``) matches, sorted."""
    fs, path = filesystem(pattern, storage_options)
    protocol = pattern.split("://", 1)[0]
    return sorted(f"{protocol}://{found}" for found in fs.glob(path))


@contextlib.contextmanager
def local_copy(url: str, storage_options: Mapping[str, Any] | None, cap: int,
               companions: tuple[str, ...] = ()) -> Iterator[Path]:
    """A local copy of the object at ``url`` (and of ``companions``, URLs of the files read
    with it: a header's data file) in a temporary folder, kept for the ``with`` block.

    Each object's size is checked against ``cap`` before a byte is fetched: nothing
    larger than a volume raptorz would accept is downloaded.

    Raises
    ------
    InputError
        Where an object is missing, over ``cap``, or cannot be fetched.
    """
    fs, path = filesystem(url, storage_options)
    with tempfile.TemporaryDirectory(prefix="raptorz-source-") as folder, _named_as(url):
        for one, remote in ((url, path), *((c, filesystem(c, storage_options)[1])
                                          for c in companions)):
            try:
                size = int(fs.info(remote).get("size") or 0)
            except FileNotFoundError:
                if one != url:
                    continue  # a companion that is not there: the reader says what lacks
                raise InputError(url, "no such object") from None
            except OSError as error:
                raise InputError(one, f"cannot be reached ({error})") from None
            if size > cap:
                raise InputError(one, f"holds {size} bytes, over the {cap} bytes a volume "
                                 "may take (raise --max-volume-bytes for a genuine giant)")
            try:
                fs.get_file(remote, os.path.join(folder, remote.rsplit("/", 1)[-1]))
            except OSError as error:
                raise InputError(one, f"cannot be fetched ({error})") from None
        yield Path(folder) / path.rsplit("/", 1)[-1]


@contextlib.contextmanager
def mirror(url: str, storage_options: Mapping[str, Any] | None,
           fetch: Callable[[str], bool], cap: int) -> Iterator[Path]:
    """A local stand-in of the folder ``url`` for code that walks a folder (a BIDS
    dataset): its tree from one listing of its prefix, the files whose names ``fetch``
    accepts copied (at once, each checked against ``cap`` bytes first), every other one an
    empty file of its name. Errors raised in the block name ``url``, not the stand-in.

    Raises
    ------
    InputError
        Where ``url`` holds nothing, or a file to copy is over ``cap``.
    """
    fs, path = filesystem(url, storage_options)
    path = path.rstrip("/")
    found = {key: info for key, info in fs.find(path, detail=True).items()
             if not key.endswith("/")}
    if not found:
        raise InputError(url, "holds nothing (no such folder)")
    with tempfile.TemporaryDirectory(prefix="raptorz-mirror-") as folder:
        root = Path(folder) / name(url)
        wanted = {}
        for key, info in found.items():
            local = root / key[len(path):].lstrip("/")
            local.parent.mkdir(parents=True, exist_ok=True)
            local.touch()
            if fetch(local.name):
                if int(info.get("size") or 0) > cap:
                    raise InputError(f"{url}/{local.relative_to(root).as_posix()}",
                                     f"holds {info['size']} bytes, over the {cap} bytes "
                                     "raptorz reads of such a file")
                wanted[key] = local
        for key, data in fs.cat(list(wanted), on_error="raise").items():
            wanted[key].write_bytes(data)
        with _named_as(url, root):
            yield root


@contextlib.contextmanager
def _named_as(url: str, local: Path | None = None) -> Iterator[None]:
    """Errors about a local copy name the object it copies (``local`` standing for
    ``url`` in them), not a temporary file."""
    try:
        yield
    except InputError as error:
        if local is not None:
            raise InputError(error.source.replace(str(local), url),
                             error.problem.replace(str(local), url)) from None
        if error.source == url:
            raise
        raise InputError(url, error.problem) from None


def holder_record(command: str) -> str:
    """What a lock's holder writes for those that wait (JSON): host, pid, command, since."""
    return json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "command": command,
                       "since": datetime.datetime.now().isoformat(timespec="seconds")})


def holder_words(record: str | bytes) -> str:
    """Who holds a lock, in words, from its :func:`holder_record` ("another process" where
    it says nothing readable)."""
    try:
        info = json.loads(record)
        return f"{info['host']} pid {info['pid']} ({info['command']}, since {info['since']})"
    except (ValueError, KeyError, TypeError):
        return "another process"


def _holder_text(fs: AbstractFileSystem, path: str) -> tuple[str, dict[str, Any]]:
    """Who holds the lock object at ``path``, in words and as written."""
    try:
        record = fs.cat_file(path)
        info = json.loads(record)
    except (OSError, ValueError):
        return "another process", {}
    return holder_words(record), info if isinstance(info, dict) else {}


def _dead_here(info: Mapping[str, Any]) -> bool:
    """Whether a holder ran on this host and its process is gone."""
    if info.get("host") != socket.gethostname() or not isinstance(info.get("pid"), int):
        return False
    try:
        os.kill(info["pid"], 0)
    except ProcessLookupError:
        return True
    except OSError:  # alive, another user's
        return False
    return False


@contextlib.contextmanager
def object_lock(url: str, command: str, timeout: float) -> Iterator[None]:
    """Hold the lock object at ``url`` (see the module's notes): create it if none is
    there, else wait for it, up to ``timeout`` seconds. Reentrant in one thread.

    Raises
    ------
    InputError
        Naming the lock object and its holder, where it is still held after ``timeout``.
    """
    held: set[str] = _held.__dict__.setdefault("urls", set())
    if url in held:
        yield
        return
    fs, path = filesystem(url)
    body = holder_record(command)
    deadline, warned = time.monotonic() + timeout, False
    while True:
        try:
            with fs.open(path, "xb") as stream:
                stream.write(body.encode())
            break
        except (ValueError, NotImplementedError):  # this storage cannot create exclusively
            warnings.warn(f"{url}: this storage has no exclusive create, so raptorz cannot "
                          "lock it: run one metadata step (convert, embed's start, "
                          "add_projections, info --repair) on it at a time", RaptorzWarning,
                          stacklevel=4)
            yield
            return
        except FileExistsError:
            holder, info = _holder_text(fs, path)
            if _dead_here(info):  # its holder died: nobody else can free it
                with contextlib.suppress(FileNotFoundError):
                    fs.rm_file(path)
                continue
            if time.monotonic() > deadline:
                raise InputError(url, f"is held by {holder}; still after {timeout:g} s: "
                                 "wait for it to finish, or, if it died on another host, "
                                 "delete this object") from None
            if not warned:
                warnings.warn(f"{url}: waiting (up to {timeout:g} s) for this lock, held by "
                              f"{holder}", RaptorzWarning, stacklevel=4)
                warned = True
            time.sleep(_POLL_SECONDS)
    held.add(url)
    try:
        yield
    finally:
        held.discard(url)
        with contextlib.suppress(FileNotFoundError):
            fs.rm_file(path)
