"""A run stopped at the worst moments loses nothing finished and redoes exactly the rest.

The stores' rule is "data, then error text, then status" (:func:`raptorz.stores.write_units`).
These tests stop runs between a chunk's data and its status (a real SIGKILL of a converting
process; a task that dies mid-write in an embedding run) and leave status and error chunk
files torn, as a kill during a non-atomic write can; a rerun must then recompute exactly
the chunks not marked done and leave every finished chunk file as it was.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import xarray as xr

from raptorz import stores
from raptorz.errors import RaptorzWarning
from raptorz.ingest.volumes import convert
from raptorz.layouts import open_embeddings, open_volumes

#: Converts argv[1] into argv[2] (2 volumes per chunk) and SIGKILLs itself right after the
#: data and error text of the chunk starting at argv[3] are written, before its status.
KILLED_CONVERT = """
import os, signal, sys
from raptorz import stores
from raptorz.ingest.volumes import convert
write_region = stores.write_region
def killed_before_status(path, data, region):
    if "status" in data and region.start == int(sys.argv[3]):
        os.kill(os.getpid(), signal.SIGKILL)
    write_region(path, data, region)
stores.write_region = killed_before_status
convert([sys.argv[1]], sys.argv[2], chunk=2, workers=1)
"""


@pytest.fixture
def written_regions(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """The (start, stop) of every chunk written from now on (spied on the real writer)."""
    regions: list[tuple[int, int]] = []
    write_chunk = stores.write_units

    def spy(path: str, data: dict, region: slice, *args: object) -> None:
        regions.append((region.start, region.stop))
        write_chunk(path, data, region, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(stores, "write_units", spy)
    return regions


def _reference_volumes(tmp_path: Path, sources: list[Path]) -> np.ndarray:
    store = tmp_path / "reference.zarr"
    convert(sources, store, chunk=2, workers=1)
    return np.asarray(open_volumes(store)["volume"].values)


def test_convert_killed_between_data_and_status(
        tmp_path: Path, written_regions: list[tuple[int, int]],
        changed_chunks: Callable[[dict[str, tuple[int, bytes]], Path], set[int]],
        chunk_files: Callable[[Path], dict[str, tuple[int, bytes]]],
        volume_sources: Callable[..., list[Path]]) -> None:
    sources = volume_sources(tmp_path / "src", 6)
    store = tmp_path / "volumes.zarr"
    killed = subprocess.run([sys.executable, "-c", KILLED_CONVERT, str(sources[0]), str(store),
                             "2"], capture_output=True, text=True, timeout=300, check=False)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    np.testing.assert_array_equal(stores.read_status(store), [1, 1, 0, 0, 0, 0])
    assert (store / "volume" / "c" / "1" / "0" / "0" / "0").is_file()  # its data is there
    before = chunk_files(store)
    summary = convert(sources, store, chunk=2, workers=1)
    assert written_regions == [(2, 4), (4, 6)]  # the killed chunk and the one never started
    assert (summary.converted, summary.skipped, summary.failed) == (4, 2, 0)
    assert changed_chunks(before, store) == {1, 2}  # the finished chunk 0: untouched
    np.testing.assert_array_equal(stores.read_status(store), [stores.OK] * 6)
    np.testing.assert_array_equal(open_volumes(store)["volume"].values,
                                  _reference_volumes(tmp_path, sources))


def test_convert_rerun_after_torn_status_and_error_files(
        tmp_path: Path, written_regions: list[tuple[int, int]],
        changed_chunks: Callable[[dict[str, tuple[int, bytes]], Path], set[int]],
        chunk_files: Callable[[Path], dict[str, tuple[int, bytes]]],
        tear: Callable[[Path, str], None], volume_sources: Callable[..., list[Path]]) -> None:
    sources = volume_sources(tmp_path / "src", 6, bad=True)  # ids 0-5, then one bad file
    store = tmp_path / "volumes.zarr"
    first = convert(sources, store, chunk=2, workers=1)
    assert (first.converted, first.failed) == (6, 1)
    tear(store / "status" / "c" / "1", "truncated")  # killed while writing chunk 1's status
    tear(store / "status" / "c" / "2", "empty")
    # killed while writing chunk 3's error text: its status was never written
    (store / "status" / "c" / "3").unlink()
    tear(store / "error" / "c" / "3", "truncated")
    before = chunk_files(store)
    written_regions.clear()
    with pytest.warns(RaptorzWarning, match=r"2 status chunk\(s\) unreadable.*ids 2-3, 4-5"):
        again = convert(sources, store, chunk=2, workers=1)
    assert written_regions == [(2, 4), (4, 6), (6, 7)]
    assert (again.converted, again.failed, again.skipped) == (4, 1, 2)
    assert changed_chunks(before, store) == {1, 2, 3}
    np.testing.assert_array_equal(stores.read_status(store), [stores.OK] * 6 + [stores.FAILED])
    ds = open_volumes(store)
    assert list(ds.error.values[:6]) == [""] * 6 and "bad.nii.gz" in ds.error.values[6]
    np.testing.assert_array_equal(ds["volume"].values[:6],
                                  _reference_volumes(tmp_path, sources[:1]))


@pytest.mark.slow
def test_embed_task_stopped_between_data_and_status(
        tmp_path: Path, tiny_vit_weights: tuple[str, Path], monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str],
        changed_chunks: Callable[[dict[str, tuple[int, bytes]], Path], set[int]],
        chunk_files: Callable[[Path], dict[str, tuple[int, bytes]]],
        converted: Callable[[Path, int, int], Path], embed_tiny: Callable[..., Any],
        thread_client: Callable[[], Any], run_tolerance: dict[str, float]) -> None:
    volumes = converted(tmp_path, 5, chunk=1)  # one task per volume
    output = tmp_path / "embeddings.zarr"
    write_region = stores.write_region

    def dies_before_status(path: str, data: dict, region: slice) -> None:
        if "status" in data and region.start == 2:
            raise MemoryError("the worker died here")
        write_region(path, data, region)

    with thread_client() as client:
        monkeypatch.setattr(stores, "write_region", dies_before_status)
        # the task of volumes 2 and 3 (tasks are sized by work: 2 volumes here) dies
        # after writing their data and error text
        stopped = embed_tiny(volumes, output, client, tiny_vit_weights)
        monkeypatch.undo()
        assert "a task failed and its 2 volumes stay pending" in capsys.readouterr().err
        assert (stopped.ok, stopped.pending) == (3, 2)
        half = open_embeddings(output).load()
        before = chunk_files(output)
        regions: list[int] = []
        write_chunk = stores.write_units
        monkeypatch.setattr(stores, "write_units", lambda path, data, region, *rest: (
            regions.append(region.start), write_chunk(path, data, region, *rest)))
        again = embed_tiny(volumes, output, client, tiny_vit_weights)
        monkeypatch.undo()
        full = embed_tiny(volumes, tmp_path / "reference.zarr", client, tiny_vit_weights)
    assert (again.computed, again.ok, full.ok) == (2, 5, 5)
    assert regions == [2, 3]
    # volume 2's data was on disk before its status; finished volumes' files are untouched
    assert not half.avgpool[2].isnull().any()
    assert changed_chunks(before, output) == {2, 3}
    _assert_same_embeddings(output, tmp_path / "reference.zarr", run_tolerance)


@pytest.mark.slow
def test_embed_rerun_after_torn_status_and_error_files(
        tmp_path: Path, tiny_vit_weights: tuple[str, Path],
        changed_chunks: Callable[[dict[str, tuple[int, bytes]], Path], set[int]],
        chunk_files: Callable[[Path], dict[str, tuple[int, bytes]]],
        converted: Callable[[Path, int, int], Path], embed_tiny: Callable[..., Any],
        run_tolerance: dict[str, float], tear: Callable[[Path, str], None],
        thread_client: Callable[[], Any]) -> None:
    volumes = converted(tmp_path, 5, chunk=1)
    output = tmp_path / "embeddings.zarr"
    with thread_client() as client:
        assert embed_tiny(volumes, output, client, tiny_vit_weights).ok == 5
        reference = open_embeddings(output).load()
        tear(output / "status" / "c" / "1", "truncated")
        tear(output / "status" / "c" / "3", "empty")
        (output / "status" / "c" / "4").unlink()  # killed while writing volume 4's error
        (output / "error" / "c").mkdir(exist_ok=True)  # no error text so far: no chunk
        (output / "error" / "c" / "4").write_bytes(b"\x28\xb5\x2f")  # a torn zstd frame
        before = chunk_files(output)
        with pytest.warns(RaptorzWarning, match=r"2 status chunk\(s\) unreadable.*ids 1-1, 3-3"):
            again = embed_tiny(volumes, output, client, tiny_vit_weights)
    assert (again.computed, again.ok) == (3, 5)
    assert changed_chunks(before, output) == {1, 3, 4}
    ds = open_embeddings(output)
    assert list(ds.error.values) == [""] * 5
    for name in ("p4", "tokens", "avgpool"):
        np.testing.assert_allclose(ds[name].values, reference[name].values, **run_tolerance)


def _assert_same_embeddings(path: Path, reference: Path, tolerance: dict[str, float]) -> None:
    ours, theirs = open_embeddings(path), open_embeddings(reference)
    np.testing.assert_array_equal(stores.read_status(path), stores.read_status(reference))
    for name in ("p4", "tokens", "avgpool"):
        np.testing.assert_allclose(ours[name].values, theirs[name].values, **tolerance)
    xr.testing.assert_identical(ours.error, theirs.error)
