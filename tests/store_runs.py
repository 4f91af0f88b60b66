"""Small real runs of ``convert`` and ``embed`` shared by the store tests.

Embedding runs use a real LocalCluster of threads in the test process (``processes=False``)
so that a test can stop a task at a chosen point of its writes.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from distributed import Client, LocalCluster
from volume_files import write_npz

from raptorz.embedding.projection import create_projector
from raptorz.embedding.runner import EmbedSummary, embed
from raptorz.embedding.settings import KernelSettings
from raptorz.ingest.volumes import convert

SETTINGS = KernelSettings(keep_tokens=True, batch_size=32)
PROJECTORS = [create_projector(0, 64, 4, "p4")]
#: Float32 encoder, float64 pooling; a recomputed volume may be batched differently.
TOLERANCE = {"rtol": 1e-5, "atol": 1e-6}


def volume_sources(folder: Path, count: int, *, bad: bool = False) -> list[Path]:
    """An npz of ``count`` 8^3 volumes, and a corrupt NIfTI after it where ``bad``."""
    folder.mkdir(parents=True, exist_ok=True)
    write_npz(folder / "m.npz", {"train": count}, side=8, seed=count)
    sources = [folder / "m.npz"]
    if bad:
        (folder / "bad.nii.gz").write_bytes(b"not a nifti")
        sources.append(folder / "bad.nii.gz")
    return sources


def converted(folder: Path, count: int, chunk: int) -> Path:
    """A volumes store of ``count`` volumes, ``chunk`` per chunk."""
    store = folder / "volumes.zarr"
    convert(volume_sources(folder / "src", count), store, chunk=chunk, workers=1)
    return store


@contextmanager
def thread_client() -> Iterator[Client]:
    """A one-worker LocalCluster of threads in this process."""
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False,
                      dashboard_address=None) as cluster, Client(cluster) as client:
        yield client


def embed_tiny(volumes: Path, output: Path, client: Client, vit: tuple[str, Path],
               **options: object) -> EmbedSummary:
    """``embed`` with the tiny ViT and :data:`PROJECTORS` on ``client``."""
    options = {"settings": SETTINGS, **options}
    return embed(volumes, output, PROJECTORS, encoder=vit[0], weights=vit[1], cluster=client,
                 torch_threads=1, progress=False, **options)  # type: ignore[arg-type]


def chunk_files(store: Path) -> dict[str, tuple[int, bytes]]:
    """Every chunk file of a store: relative path -> (modification time in ns, bytes)."""
    return {str(p.relative_to(store)): (p.stat().st_mtime_ns, p.read_bytes())
            for p in store.rglob("*") if p.is_file() and "/c/" in f"/{p.relative_to(store)}"}


def changed_chunks(before: dict[str, tuple[int, bytes]], store: Path) -> set[int]:
    """The ``id``-chunk indices of the chunk files written (or removed) since ``before``."""
    after = chunk_files(store)
    changed = {key for key in before.keys() | after.keys() if before.get(key) != after.get(key)}
    return {int(key.split("/c/")[1].split("/")[0]) for key in changed}


def tear(path: Path, how: str) -> None:
    """Leave ``path`` as a kill during a non-atomic write can: half written, or empty."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if how == "truncated" else b"")
    assert path.stat().st_size < len(data) or not data
    os.utime(path)
