"""The embedding run around the kernel: tasks sized by work, errors, progress, clients.

Real LocalClusters, real stores and the tiny real ViT; a worker's cached encoder is
swapped (through ``client.run``) for one that fails the way a device does.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path

import numpy as np
import pytest
import torch
from distributed import Client, get_task_stream

from raptorz import stores
from raptorz.embedding import runner, worker
from raptorz.embedding.planning import plan_tasks
from raptorz.embedding.projection import create_projector
from raptorz.embedding.runner import embed
from raptorz.embedding.settings import KernelSettings
from raptorz.errors import SettingsError
from raptorz.ingest.volumes import convert
from raptorz.layouts import open_embeddings

SETTINGS = KernelSettings(batch_size=16, subsample=4)
PROJECTOR = create_projector(0, 64, 4, "p4")


def _store(folder: Path, count: int, size: int = 16) -> Path:
    """``count`` random volumes of ``size``^3 in one volumes chunk (the default layout)."""
    images = np.random.default_rng(3).integers(0, 256, (count, size, size, size), np.uint8)
    np.savez(folder / "m.npz", train_images=images, train_labels=np.zeros((count, 1)),
             val_images=images[:0], val_labels=np.zeros((0, 1)), test_images=images[:0],
             test_labels=np.zeros((0, 1)))
    store = folder / "volumes.zarr"
    convert([folder / "m.npz"], store, workers=1)
    return store


@pytest.fixture(scope="module")
def volumes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _store(tmp_path_factory.mktemp("volumes"), 12)


def test_tasks_are_sized_by_slices_and_by_workers() -> None:
    todo = np.ones(100, bool)

    def sizes(*args: int) -> list[int]:
        return [s.stop - s.start for s in plan_tasks(todo, *args)]

    assert sizes(1, 4096, 1) == [1] * 100  # a volume of 4096 slices is a task
    assert sizes(1, 10, 2) == [13] * 7 + [9]  # at least 4 tasks per worker
    assert sizes(10, 10, 2) == [10] * 10  # whole units of the output, never less
    assert sizes(10, 1, 1) == [20] * 5  # 25 volumes a task, rounded down to units
    todo[:] = False
    todo[[5, 6, 42, 99]] = True  # units with nothing to do are left out
    assert [(s.start, s.stop) for s in plan_tasks(todo, 10, 1, 1)] == [(0, 10), (40, 50),
                                                                   (90, 100)]


def test_ranges_must_hold_whole_units() -> None:
    from raptorz.embedding.planning import select_ids

    assert select_ids(250, 100, 100, unit=100).sum() == 100
    assert select_ids(250, 200, 80, unit=100).sum() == 50  # to the end of the store
    with pytest.raises(SettingsError, match="start/many: .*start=0, many=200"):
        select_ids(250, 50, 100, unit=100)
    with pytest.raises(SettingsError, match="start=0, many=99 "):  # the nearer, not 198
        select_ids(1000, 0, 100, unit=99)
    with pytest.raises(SettingsError, match="start=99, many=99 "):
        select_ids(1000, 99, 10, unit=99)


def _mapped_afresh() -> bool:
    """On a worker: is a 16 MiB array a fresh memory mapping (glibc's mmap counter)?"""
    import ctypes

    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
            "uordblks", "fordblks", "keepcost")]

    mallinfo2 = ctypes.CDLL(None).mallinfo2
    mallinfo2.restype = MallInfo2
    before = mallinfo2().hblks
    block = np.ones(2**21)  # 16 MiB, about one ViT-S batch's activation
    mapped = mallinfo2().hblks > before
    del block
    return bool(mapped)


def _glibc() -> bool:
    import ctypes

    return sys.platform.startswith("linux") and hasattr(ctypes.CDLL(None), "mallinfo2")


@pytest.mark.skipif(not _glibc(), reason="glibc's malloc (2.33 or later, for mallinfo2)")
def test_a_worker_reuses_freed_memory_after_its_first_task(
        client: Client, volumes: Path, tmp_path: Path,
        tiny_vit_weights: tuple[str, Path]) -> None:
    """Dask's worker environment makes glibc map every allocation over 128 KiB afresh
    (30% slower batches on CPU); a worker that embedded keeps and reuses its memory.

    First of this module's tests on ``client``: its workers have not embedded yet.
    """
    name, weights = tiny_vit_weights
    assert list(client.run(_mapped_afresh).values()) == [True, True]  # Dask's default
    embed(volumes, tmp_path / "e.zarr", [PROJECTOR], encoder=name, weights=weights,
          settings=SETTINGS, cluster=client, many=1, progress=False)  # one task
    # every worker built the encoder at start-up, the one without a task too
    assert list(client.run(_mapped_afresh).values()) == [False, False]




def test_one_volumes_chunk_keeps_both_workers_busy(client: Client, volumes: Path,
                                                   tmp_path: Path,
                                                   tiny_vit_weights: tuple[str, Path]) -> None:
    assert stores.open_store(volumes, "volumes")["volume"].encoding["chunks"][0] == 12
    name, weights = tiny_vit_weights
    with get_task_stream(client) as stream:
        summary = embed(volumes, tmp_path / "e.zarr", [PROJECTOR], encoder=name,
                        weights=weights, settings=SETTINGS, cluster=client, progress=False)
    assert (summary.ok, summary.batch_size) == (12, 16)
    tasks = [t for t in stream.data if t["key"].startswith("embed-train_")]
    assert len(tasks) == 6  # a few tasks per worker, though the store has one chunk
    assert len({t["worker"] for t in tasks}) == 2
    first, last = tasks[0]["key"].split("-")[1:3]  # the dashboard names the ids
    assert first.startswith("train_") and last.startswith("train_")


def _swap_encoder(kind: str, dask_worker: object = None) -> int:
    """On a worker: wrap its cached encoders in one that fails like a device does."""

    class Failing:
        def __init__(self, inner: object) -> None:
            self.inner, self.__dict__["calls"] = inner, 0

        def __getattr__(self, name: str) -> object:
            return getattr(self.inner, name)

        def encode(self, images: torch.Tensor) -> torch.Tensor:
            if len(images) > 5:
                raise torch.OutOfMemoryError("CUDA out of memory (stand-in)")
            return self.inner.encode(images)  # type: ignore[attr-defined]

    cache = sys.modules["raptorz.embedding.worker"]._ENCODERS
    for key, encoder in list(cache.items()):
        cache[key] = Failing(getattr(encoder, "inner", encoder))  # type: ignore[assignment]
    return len(cache)


def _restore_encoder(dask_worker: object = None) -> None:
    cache = sys.modules["raptorz.embedding.worker"]._ENCODERS
    for key, encoder in list(cache.items()):
        cache[key] = getattr(encoder, "inner", encoder)


def test_out_of_memory_halves_the_batch_and_the_run_says_so(
        client: Client, volumes: Path, tmp_path: Path, tiny_vit_weights: tuple[str, Path],
        capsys: pytest.CaptureFixture[str]) -> None:
    name, weights = tiny_vit_weights
    reference = tmp_path / "reference.zarr"
    embed(volumes, reference, [PROJECTOR], encoder=name, weights=weights, settings=SETTINGS,
          cluster=client, progress=False)
    client.run(_swap_encoder, "small")
    try:
        summary = embed(volumes, tmp_path / "e.zarr", [PROJECTOR], encoder=name,
                        weights=weights, settings=SETTINGS, cluster=client, progress=False)
    finally:
        client.run(_restore_encoder)
    assert (summary.ok, summary.batch_size) == (12, 4)
    assert "batches of 4 were used" in capsys.readouterr().err
    np.testing.assert_allclose(open_embeddings(tmp_path / "e.zarr")["p4"].values,
                               open_embeddings(reference)["p4"].values, rtol=1e-5, atol=1e-6)


def test_running_tasks_report_progress_in_volumes(client: Client, volumes: Path,
                                                  tmp_path: Path,
                                                  tiny_vit_weights: tuple[str, Path]) -> None:
    name, weights = tiny_vit_weights
    client.run(setattr, worker, "PROGRESS_SECONDS", 0.0)
    try:
        embed(volumes, tmp_path / "e.zarr", [PROJECTOR], encoder=name, weights=weights,
              settings=KernelSettings(batch_size=4, subsample=4), cluster=client,
              progress=True)
    finally:
        client.run(setattr, worker, "PROGRESS_SECONDS", 1.0)
    topics = {t: e for t, e in client.get_events().items() if t.startswith("raptorz-progress")}
    newest = max(topics.values(), key=lambda events: events[-1][0])  # this run's topic
    reports = [message for _, message in newest]
    assert len(reports) > 12  # more often than tasks finish
    assert sum(r["volumes"] for r in reports) == pytest.approx(12, abs=1e-6)


def test_the_active_client_is_used_and_no_cluster_started(
        volumes: Path, tmp_path: Path, tiny_vit_weights: tuple[str, Path],
        thread_client: Callable[[], AbstractContextManager[Client]],
        monkeypatch: pytest.MonkeyPatch) -> None:
    name, weights = tiny_vit_weights

    def no_cluster(*args: object, **kwargs: object) -> None:
        raise AssertionError("a cluster was started although a client is active")

    monkeypatch.setattr(runner, "create_cluster", no_cluster)
    with thread_client() as active, get_task_stream(active) as stream:  # the default client
        summary = embed(volumes, tmp_path / "e.zarr", [PROJECTOR], encoder=name,
                        weights=weights, settings=SETTINGS, many=3, progress=False)
        assert active.status == "running"  # left open for the notebook
        workers = set(active.scheduler_info()["workers"])
    assert summary.ok == 3
    ran = {t["worker"] for t in stream.data if t["key"].startswith("embed-")}
    assert ran and ran <= workers


def test_inputs_are_checked_before_any_cluster_starts(
        volumes: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    from distributed.deploy.spec import SpecCluster

    from raptorz.cli.main import main

    def no_cluster(*args: object, **kwargs: object) -> None:
        raise AssertionError("a cluster was started before the inputs were checked")

    monkeypatch.setattr(SpecCluster, "__init__", no_cluster)  # LocalCluster and jobqueue's
    np.save(tmp_path / "p.npy", PROJECTOR.matrix)
    for args, problem in (
        ([str(tmp_path / "missing.zarr"), "--projector", str(tmp_path / "p.npy")], "missing"),
        ([str(volumes), "--projector", str(tmp_path / "nope.npy")], "nope.npy"),
        ([str(volumes), "--projector", str(tmp_path / "p.npy"), "--start", "99"], "past"),
    ):
        try:  # in process: the command's exit code and stderr, as the console script's
            code = main(["embed", *args, "-o", str(tmp_path / "e.zarr"), "--cluster", "local"])
        except SystemExit as exit_:
            code = exit_.code
        err = capsys.readouterr().err
        assert code == 2 and problem in err, err
        assert "dashboard" not in err.lower(), err  # no cluster was started
