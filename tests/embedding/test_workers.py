"""Workers that die or differ, and GPU workers' task slots, on real LocalClusters.

A worker's cached encoder is swapped (through ``client.run``) for one that fails the way a
device does, or that reports another precision; the GPU workers advertise the resource
with ``CUDA_VISIBLE_DEVICES=0`` on this CPU machine and embed on the CPU (``device="cpu"``).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from distributed import Client, get_task_stream

from raptorz.cluster import create_cluster
from raptorz.embedding.projection import create_projector
from raptorz.embedding.runner import embed
from raptorz.embedding.settings import KernelSettings
from raptorz.ingest.volumes import convert

SETTINGS = KernelSettings(batch_size=16, subsample=4)
PROJECTOR = create_projector(0, 64, 4, "p4")


@pytest.fixture(scope="module")
def volumes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12 random volumes of 16^3 in a volumes store."""
    folder = tmp_path_factory.mktemp("volumes")
    images = np.random.default_rng(3).integers(0, 256, (12, 16, 16, 16), np.uint8)
    np.savez(folder / "m.npz", train_images=images, train_labels=np.zeros((12, 1)),
             val_images=images[:0], val_labels=np.zeros((0, 1)), test_images=images[:0],
             test_labels=np.zeros((0, 1)))
    convert([folder / "m.npz"], folder / "volumes.zarr", workers=1)
    return folder / "volumes.zarr"


def _swap(kind: str, dask_worker: object = None) -> int:
    """On a worker: wrap its cached encoders in one that fails or differs like a device."""

    class Swapped:
        def __init__(self, inner: object) -> None:
            self.__dict__.update(inner=inner, sizes=[])

        def __getattr__(self, name: str) -> object:
            return getattr(self.inner, name)

        def encode(self, images: torch.Tensor) -> torch.Tensor:
            self.sizes.append(len(images))
            if kind == "lost":
                raise RuntimeError("CUDA error: an illegal memory access was encountered")
            if kind == "small" and len(images) > 5:
                raise torch.OutOfMemoryError("CUDA out of memory (stand-in)")
            return self.inner.encode(images)  # type: ignore[attr-defined,no-any-return]

        def provenance(self) -> dict[str, object]:
            info = self.inner.provenance()  # type: ignore[attr-defined]
            return {**info, "precision": "fp16"} if kind == "fp16" else info  # a V100

    cache = sys.modules["raptorz.embedding.worker"]._ENCODERS
    for key, encoder in list(cache.items()):
        cache[key] = Swapped(getattr(encoder, "inner", encoder))  # type: ignore[assignment]
    return len(cache)


def _sizes(dask_worker: object = None) -> list[int]:
    cache = sys.modules["raptorz.embedding.worker"]._ENCODERS
    return [size for encoder in cache.values() for size in getattr(encoder, "sizes", [])]


def _restore(dask_worker: object = None) -> None:
    cache = sys.modules["raptorz.embedding.worker"]._ENCODERS
    for key, encoder in list(cache.items()):
        cache[key] = getattr(encoder, "inner", encoder)
    sys.modules["raptorz.embedding.worker"]._BATCH_LIMITS.clear()


@pytest.fixture(scope="module")
def gpu_client() -> Iterator[Client]:
    """Two workers pinned to "GPU 0", each advertising ``GPU=1``, with 2 threads each."""
    with create_cluster("local", workers=2, gpus=["0"], threads_per_worker=2,
                        dashboard_address=":0") as cluster, \
            Client(cluster, set_as_default=False) as client:
        yield client


def _embed(client: Client, volumes: Path, output: Path,
           weights: tuple[str, Path], **options: object) -> object:
    return embed(volumes, output, [PROJECTOR], encoder=weights[0], weights=weights[1],
                 settings=SETTINGS, device="cpu", cluster=client, progress=False,
                 **options)  # type: ignore[arg-type]


def _warm(client: Client, volumes: Path, output: Path, weights: tuple[str, Path]) -> None:
    """Load the encoder on every worker (each builds it at a run's start-up): one volume."""
    _embed(client, volumes, output, weights, many=1)


def test_a_gpu_worker_reads_and_writes_one_task_while_it_encodes_another(
        gpu_client: Client, volumes: Path, tmp_path: Path,
        tiny_vit_weights: tuple[str, Path]) -> None:
    with get_task_stream(client=gpu_client) as stream:
        summary = _embed(gpu_client, volumes, tmp_path / "e.zarr", tiny_vit_weights)
    assert summary.ok == 12  # type: ignore[attr-defined]
    spans: dict[str, list[tuple[float, float]]] = {}
    for record in stream.data:
        if record["key"].startswith("embed-") and "load-encoder" not in record["key"]:
            compute = [s for s in record["startstops"] if s["action"] == "compute"]
            spans.setdefault(record["worker"], []).extend(
                (s["start"], s["stop"]) for s in compute)
    overlapping = [worker for worker, runs in spans.items() for a in runs for b in runs
                   if a < b and b[0] < a[1]]
    assert overlapping, spans  # two tasks of one worker in flight at once


def test_a_batch_size_learned_from_out_of_memory_is_kept_for_later_blocks(
        gpu_client: Client, volumes: Path, tmp_path: Path,
        tiny_vit_weights: tuple[str, Path]) -> None:
    """16 -> 8 -> 4 once per worker, not once per block (each task has its blocks)."""
    _warm(gpu_client, volumes, tmp_path / "warm.zarr", tiny_vit_weights)  # encoders loaded
    gpu_client.run(_swap, "small")
    try:
        summary = _embed(gpu_client, volumes, tmp_path / "e.zarr", tiny_vit_weights)
        sizes = gpu_client.run(_sizes)
    finally:
        gpu_client.run(_restore)
    assert (summary.ok, summary.batch_size) == (12, 4)  # type: ignore[attr-defined]
    for worker, tried in sizes.items():
        too_large = [size for size in tried if size > 5]
        assert too_large in ([], [16, 8]), (worker, tried)


def test_a_worker_whose_encoder_differs_is_retired_at_start_up(
        gpu_client: Client, volumes: Path, tmp_path: Path, tiny_vit_weights: tuple[str, Path],
        capsys: pytest.CaptureFixture[str]) -> None:
    """Last in this module: it retires one of the module's two workers."""
    _warm(gpu_client, volumes, tmp_path / "warm.zarr", tiny_vit_weights)
    second = sorted(gpu_client.scheduler_info(n_workers=-1)["workers"])[-1]
    gpu_client.run(_swap, "fp16", workers=[second])
    summary = _embed(gpu_client, volumes, tmp_path / "e.zarr", tiny_vit_weights)
    assert summary.ok == 12  # type: ignore[attr-defined]
    err = capsys.readouterr().err
    assert f"worker {second} differs" in err and "precision 'fp16'" in err
    assert list(gpu_client.scheduler_info(n_workers=-1)["workers"]) != [second]


def test_a_worker_whose_device_fails_retires_and_its_tasks_move(
        volumes: Path, tmp_path: Path, tiny_vit_weights: tuple[str, Path],
        capsys: pytest.CaptureFixture[str]) -> None:
    """One lost device: its worker retires and the other does every task; once the last
    worker's device fails too, the run stops with the rest pending instead of waiting."""
    with create_cluster("local", workers=2, threads_per_worker=2, dashboard_address=":0") \
            as cluster, Client(cluster, set_as_default=False) as client:
        _warm(client, volumes, tmp_path / "warm.zarr", tiny_vit_weights)
        first, second = sorted(client.scheduler_info(n_workers=-1)["workers"])
        client.run(_swap, "lost", workers=[first])
        summary = _embed(client, volumes, tmp_path / "e.zarr", tiny_vit_weights)
        assert (summary.ok, summary.failed) == (12, 0)  # type: ignore[attr-defined]
        err = capsys.readouterr().err
        assert f"worker {first} retired: its device failed" in err
        assert "illegal memory access" in err
        assert list(client.scheduler_info(n_workers=-1)["workers"]) == [second]
        client.run(_swap, "lost")
        last = _embed(client, volumes, tmp_path / "last.zarr", tiny_vit_weights)
        assert (last.ok, last.pending) == (0, 12)  # type: ignore[attr-defined]
        assert "every worker retired; 12 volumes stay pending" in capsys.readouterr().err
