"""`raptorz reproject` while `raptorz embed` runs, and a resume healing a projection left NaN.

The race: a task loads the store's projectors when it starts and writes its units when it
is done; a reproject that adds a projector in between used to fill the new projection for
the volumes ok at that moment only, and the task then marked its volumes ok with NaN in it.
The first test stops a real task (on a real 2-process LocalCluster) at its read of a
volume: the volume's chunk file is a named pipe that the test writes only after the
reproject is over. The second holds a unit's lock so that a reproject stops there while a
task commits another unit. The last damages a store as older versions did, for a resume
to heal.
"""

from __future__ import annotations

import errno
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import xarray as xr
from distributed import Client

from raptorz import stores
from raptorz.embedding.embeddings import add_projections, stored_projectors
from raptorz.embedding.projection import create_projector, project
from raptorz.embedding.runner import EmbedSummary
from raptorz.layouts import EMBEDDINGS, open_embeddings

#: How long the test waits for the task to open the volume it is stopped at.
OPEN_SECONDS = 120.0


def _pipe_in_place_of(chunk: Path) -> bytes:
    """Replace the file ``chunk`` by a named pipe; its bytes, for the pipe's writer."""
    data = chunk.read_bytes()
    chunk.unlink()
    os.mkfifo(chunk)
    return data


def _open_writer(pipe: Path, worker: threading.Thread) -> int:
    """Open ``pipe`` for writing once a reader has it open (the task reading its volume)."""
    deadline = time.monotonic() + OPEN_SECONDS
    while time.monotonic() < deadline and worker.is_alive():
        try:
            fd = os.open(pipe, os.O_WRONLY | os.O_NONBLOCK)
            os.set_blocking(fd, True)  # the volume's bytes may not fit the pipe at once
            return fd
        except OSError as error:
            if error.errno != errno.ENXIO:  # ENXIO: nobody reads the pipe yet
                raise
        time.sleep(0.05)
    raise AssertionError(f"no task opened {pipe} within {OPEN_SECONDS:g} s")


def _expected(output: Path, name: str) -> tuple[np.ndarray, np.ndarray]:
    """The projection ``name`` as stored, and as projected from the stored tokens."""
    ds = open_embeddings(output)
    matrix = next(p.matrix for p in stored_projectors(ds) if p.name == name)
    return ds[name].values, project(ds["tokens"].values, matrix)


def test_reproject_during_embed_leaves_no_nan(
        tmp_path: Path, client: Client, converted: Callable[[Path, int, int], Path],
        embed_tiny: Callable[..., EmbedSummary], tiny_vit_weights: tuple[str, Path]) -> None:
    volumes = converted(tmp_path, 4, 1)
    output = tmp_path / "embeddings.zarr"
    embed_tiny(volumes, output, client, tiny_vit_weights, many=3)  # one unit a volume
    pipe = volumes / "volume" / "c" / "3" / "0" / "0" / "0"
    data = _pipe_in_place_of(pipe)
    resumed: list[EmbedSummary] = []
    run = threading.Thread(target=lambda: resumed.append(
        embed_tiny(volumes, output, client, tiny_vit_weights)))
    run.start()
    try:
        fd = _open_writer(pipe, run)  # the task has loaded the projectors and reads volume 3
        try:
            new = create_projector(5, 64, 3, "q3")
            assert add_projections(output, [new]) == ["q3"]
            os.write(fd, data)
        finally:
            os.close(fd)
    finally:
        run.join(OPEN_SECONDS)
    assert not run.is_alive() and resumed[0].computed == 1
    assert (stores.read_status(output) == stores.OK).all()
    stored, expected = _expected(output, "q3")
    assert not np.isnan(stored).any()  # volume 3 was NaN in q3 before the fix
    np.testing.assert_allclose(stored, expected, rtol=1e-6, atol=1e-6)


def test_task_fills_a_projection_still_being_added(
        tmp_path: Path, client: Client, converted: Callable[[Path, int, int], Path],
        embed_tiny: Callable[..., EmbedSummary], tiny_vit_weights: tuple[str, Path]) -> None:
    """A task that commits while the reproject fills other units (its projector not yet
    listed) fills the new projection of its own units: the reproject passed them before."""
    volumes = converted(tmp_path, 4, 1)
    output = tmp_path / "embeddings.zarr"
    embed_tiny(volumes, output, client, tiny_vit_weights, many=2)
    added: list[list[str]] = []
    reproject = threading.Thread(target=lambda: added.append(
        add_projections(output, [create_projector(5, 64, 3, "q3")], block=1)))
    with stores.unit_lock(output, slice(3, 4)):  # the reproject stops at the last unit
        reproject.start()
        deadline = time.monotonic() + OPEN_SECONDS
        while "q3" not in (ds := EMBEDDINGS.read(output)) or np.isnan(ds["q3"][1]).all():
            assert time.monotonic() < deadline, "the reproject did not fill unit 1"
            time.sleep(0.05)
        assert embed_tiny(volumes, output, client, tiny_vit_weights, start=2,
                          many=1).computed == 1
        assert "q3" not in open_embeddings(output).attrs["projectors"]  # still being added
    reproject.join(OPEN_SECONDS)
    assert added == [["q3"]]
    stored, expected = _expected(output, "q3")
    np.testing.assert_allclose(stored[:3], expected[:3], rtol=1e-6, atol=1e-6)
    assert np.isnan(stored[3]).all()  # pending


def test_resume_fills_a_projection_left_nan(
        tmp_path: Path, client: Client, converted: Callable[[Path, int, int], Path],
        embed_tiny: Callable[..., EmbedSummary], tiny_vit_weights: tuple[str, Path]) -> None:
    volumes = converted(tmp_path, 4, 1)
    output = tmp_path / "embeddings.zarr"
    embed_tiny(volumes, output, client, tiny_vit_weights)
    add_projections(output, [create_projector(5, 64, 3, "q3")])
    # what an older raptorz left: volumes 1 and 3 ok, their q3 never written
    projection = open_embeddings(output)["q3"]
    holes = xr.DataArray(np.full((1, *projection.shape[1:]), np.nan, np.float32),
                         dims=projection.dims)
    for index in (1, 3):
        stores.write_region(output, {"q3": holes}, slice(index, index + 1))
    assert np.isnan(_expected(output, "q3")[0][[1, 3]]).all()

    first = embed_tiny(volumes, output, client, tiny_vit_weights, start=0, many=2)
    assert first.nothing_to_do
    stored, expected = _expected(output, "q3")
    np.testing.assert_allclose(stored[:2], expected[:2], rtol=1e-6, atol=1e-6)
    assert np.isnan(stored[3]).all()  # outside the range: another job's to heal

    assert embed_tiny(volumes, output, client, tiny_vit_weights).nothing_to_do
    stored, expected = _expected(output, "q3")
    np.testing.assert_allclose(stored, expected, rtol=1e-6, atol=1e-6)
    assert (stores.read_status(output) == stores.OK).all()

