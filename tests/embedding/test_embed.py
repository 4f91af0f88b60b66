"""The distributed embedding run, on real LocalClusters, real stores and a tiny real ViT.

Every result is compared with the in-process kernel (:func:`raptorz.embedding.kernel.embed_block`)
on the same volumes: rtol 1e-5 / atol 1e-6 (float32 encoder, float64 pooling; the run
and the reference differ only in how slices are batched).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import dask.array as da
import numpy as np
import pytest
import xarray as xr
from distributed import Client, get_task_stream

from raptorz import stores
from raptorz.cli.main import main
from raptorz.embedding.encoders import Encoder
from raptorz.embedding.kernel import embed_block
from raptorz.embedding.projection import create_projector
from raptorz.embedding.runner import embed
from raptorz.embedding.settings import KernelSettings
from raptorz.errors import InputError, SettingsError
from raptorz.ingest.volumes import convert
from raptorz.layouts import open_embeddings, open_volumes

SETTINGS = KernelSettings(keep_tokens=True, batch_size=32)
PROJECTORS = [create_projector(0, 64, 5, "p5"), create_projector(1, 64, 3, "p3")]
TOLERANCE = {"rtol": 1e-5, "atol": 1e-6}


def _npz(path: Path, count: int, seed: int) -> Path:
    """A MedMNIST-style npz of ``count`` random 16^3 uint8 volumes."""
    images = np.random.default_rng(seed).integers(0, 256, (count, 16, 16, 16), dtype=np.uint8)
    half = count // 2
    np.savez(path, train_images=images[:half], train_labels=np.zeros((half, 1), np.uint8),
             val_images=images[half:], val_labels=np.zeros((count - half, 1), np.uint8),
             test_images=images[:0], test_labels=np.zeros((0, 1), np.uint8))
    return path


def _converted(factory: pytest.TempPathFactory, count: int, seed: int, chunk: int) -> Path:
    """A volumes store of ``count`` volumes converted by the real ``convert``."""
    folder = factory.mktemp("volumes")
    store = folder / "volumes.zarr"
    convert([_npz(folder / "m.npz", count, seed)], store, chunk=chunk, workers=1)
    return store


@pytest.fixture(scope="module")
def volumes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """6 volumes, 2 per chunk."""
    return _converted(tmp_path_factory, 6, seed=0, chunk=2)


@pytest.fixture(scope="module")
def many_volumes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """10 volumes, 1 per chunk: enough tasks to interrupt a run in the middle."""
    return _converted(tmp_path_factory, 10, seed=1, chunk=1)


def _reference(store: Path, encoder: Encoder) -> dict[str, np.ndarray]:
    """The in-process kernel on every volume of ``store``."""
    block = open_volumes(store)["volume"].values
    result = embed_block(block, encoder, PROJECTORS, SETTINGS)
    return {**result.projections, "tokens": result.tokens, "avgpool": result.avgpool}


def _assert_matches(output: Path, reference: dict[str, np.ndarray],
                    rows: list[int] | None = None) -> None:
    ds = open_embeddings(output)
    rows = list(range(ds.sizes["id"])) if rows is None else rows
    for name, values in reference.items():
        np.testing.assert_allclose(ds[name].values[rows], values[rows], **TOLERANCE,
                                   err_msg=name)


def _encoders_loaded() -> list[int]:
    """On a worker: the ids of the encoders its process holds (one model per process)."""
    return [id(encoder) for encoder in sys.modules["raptorz.embedding.worker"]._ENCODERS.values()]


def _precisions_loaded() -> list[str]:
    """On a worker: the precision of each encoder its process holds."""
    return [options.precision for options in sys.modules["raptorz.embedding.worker"]._ENCODERS]


def _cli(*args: str | Path) -> list[str]:
    return [sys.executable, "-m", "raptorz.cli.main", "embed", *map(str, args)]


def _main(capsys: pytest.CaptureFixture[str], *args: str | Path) -> tuple[int, str, str]:
    """``raptorz embed ARGS`` in this process (no interpreter to start, no torch to import):
    the exit code, stdout and stderr."""
    capsys.readouterr()
    code = main(["embed", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


def _status_files(output: Path) -> dict[str, int]:
    """The status chunk files of ``output``: path -> modification time (ns). Listing them
    costs next to nothing, unlike opening the store: a poll that waits for a commit reads
    the status only when they change, and leaves the CPUs to the run it watches."""
    found = {}
    for folder, _, names in os.walk(output / "status"):
        for name in names:
            with contextlib.suppress(FileNotFoundError):
                found[os.path.join(folder, name)] = os.stat(os.path.join(folder, name)).st_mtime_ns
    return found


def _wait_for_a_commit(output: Path, running: Callable[[], bool]) -> bool:
    """Poll (20 ms) until a volume of ``output`` is OK (True) or ``running()`` turns False."""
    seen: dict[str, int] = {}
    while running():
        files = _status_files(output)
        if files and files != seen:
            seen = files
            if (stores.read_status(output) == stores.OK).any():
                return True
        time.sleep(0.02)
    return False


def _projector_files(folder: Path) -> list[str]:
    out = []
    for projector in PROJECTORS:
        np.save(folder / f"{projector.name}.npy", projector.matrix)
        out += ["--projector", str(folder / f"{projector.name}.npy")]
    return out


@pytest.mark.slow
def test_two_workers_equal_in_process_kernel(client: Client, volumes: Path, tmp_path: Path,
                                             tiny_vit_weights: tuple[str, Path],
                                             encoder: Encoder) -> None:
    output = tmp_path / "embeddings.zarr"
    name, weights = tiny_vit_weights
    summary = embed(volumes, output, PROJECTORS, encoder=name, weights=weights,
                    settings=SETTINGS, cluster=client, torch_threads=1, progress=False)
    assert (summary.total, summary.ok, summary.failed, summary.computed) == (6, 6, 0, 6)
    _assert_matches(output, _reference(volumes, encoder))
    ds = open_embeddings(output)
    assert list(ds["id"].values) == list(open_volumes(volumes)["id"].values)
    assert ds.attrs["encoder"]["weights_checksum"] == encoder.checksum
    assert ds.attrs["projectors"]["p5"]["checksum"] == PROJECTORS[0].checksum
    assert ds.attrs["source"]["attrs"] == open_volumes(volumes).attrs
    assert ds.attrs["settings"]["keep_tokens"] is True
    # a finished run does nothing, without even starting a cluster (cluster=None)
    again = embed(volumes, output, PROJECTORS, encoder=name, weights=weights,
                  settings=SETTINGS, progress=False)
    assert again.nothing_to_do and again.ok == 6


def test_every_worker_loads_the_encoder_before_the_run(
        client: Client, volumes: Path, tmp_path: Path,
        tiny_vit_weights: tuple[str, Path]) -> None:
    """Each worker builds the model during start-up, all at once, before any task runs.

    No worker spends the run importing torch and reading weights while the others encode.
    One chunk is enough (bf16 is emulated, slowly, on most CPUs): the worker that gets no
    task loads the encoder all the same.
    """
    name, weights = tiny_vit_weights
    with get_task_stream(client) as stream:
        summary = embed(volumes, tmp_path / "embeddings.zarr", PROJECTORS[:1], encoder=name,
                        weights=weights, precision="bf16", cluster=client, torch_threads=1,
                        start=0, many=2, progress=False)
    assert summary.computed == 2
    loads = [t for t in stream.data if t["key"].startswith("embed-load-encoder-")]
    tasks = [t for t in stream.data if not t["key"].startswith("embed-load-encoder-")]
    assert {t["worker"] for t in loads} == set(client.scheduler_info()["workers"])
    first_task = min(s["start"] for t in tasks for s in t["startstops"])
    assert max(s["stop"] for t in loads for s in t["startstops"]) <= first_task
    assert list(client.run(_precisions_loaded).values()) == [["bf16"], ["bf16"]]


def test_other_settings_are_refused(client: Client, volumes: Path, tmp_path: Path,
                                    tiny_vit_weights: tuple[str, Path],
                                    write_tiny_vit: Callable[..., Path]) -> None:
    output = tmp_path / "embeddings.zarr"
    name, weights = tiny_vit_weights
    embed(volumes, output, PROJECTORS[:1], encoder=name, weights=weights, settings=SETTINGS,
          cluster=client, start=0, many=1, progress=False)
    with pytest.raises(InputError, match="settings: store"):
        embed(volumes, output, PROJECTORS[:1], encoder=name, weights=weights,
              settings=KernelSettings(planes=(0, 1), keep_tokens=True), cluster=client)
    with pytest.raises(InputError, match="no projector 'p3'"):
        embed(volumes, output, PROJECTORS, encoder=name, weights=weights, settings=SETTINGS,
              cluster=client)
    with pytest.raises(SettingsError, match="start: .* is past the last"):
        embed(volumes, output, PROJECTORS[:1], encoder=name, weights=weights,
              settings=SETTINGS, cluster=client, start=6)
    other = tmp_path / "other.zarr"  # another tiny ViT: another weights checksum
    embed(volumes, other, PROJECTORS[:1], encoder=name, weights=weights, settings=SETTINGS,
          cluster=client, start=0, many=1, progress=False)
    with pytest.raises(InputError, match="encoder: store"):
        embed(volumes, other, PROJECTORS[:1], encoder=name,
              weights=write_tiny_vit(tmp_path / "other.safetensors", seed=1),
              settings=SETTINGS, cluster=client, progress=False)


def test_cli_refuses_an_unknown_cluster(volumes: Path, tmp_path: Path) -> None:
    np.save(tmp_path / "p5.npy", PROJECTORS[0].matrix)
    code = main(["embed", str(volumes), "-o", str(tmp_path / "e.zarr"), "--projector",
                 str(tmp_path / "p5.npy"), "--cluster", "kubernetes"])
    assert code == 2 and not (tmp_path / "e.zarr").exists()


def _volumes_with_failures(path: Path) -> np.ndarray:
    """A volumes store: volume 1 holds NaN (the kernel refuses it), 2 failed to convert."""
    block = np.random.default_rng(3).random((4, 16, 16, 16)).astype(np.float32)
    block[1, 0, 0, 0] = np.nan
    template = xr.Dataset(
        {"volume": (("id", "x", "y", "z"), da.zeros(block.shape, chunks=(2, 16, 16, 16),
                                                     dtype=np.float32)),
         **stores.status_variables(4, 2)},
        coords={"id": stores.as_strings(["a", "b", "c", "d"])}, attrs={"convert": {"x": 1}})
    stores.create_store(path, template, "volumes")
    for chunk, status, errors in ((slice(0, 2), [1, 1], ["", ""]),
                                  (slice(2, 4), [2, 1], ["unreadable header", ""])):
        data = {"volume": xr.DataArray(block[chunk], dims=("id", "x", "y", "z"))}
        stores.write_units(path, data, chunk, np.array(status), errors)
    return block


def test_failed_volumes_are_recorded(client: Client, tmp_path: Path,
                                     tiny_vit_weights: tuple[str, Path], encoder: Encoder,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    store, output = tmp_path / "volumes.zarr", tmp_path / "embeddings.zarr"
    block = _volumes_with_failures(store)
    name, weights = tiny_vit_weights
    summary = embed(store, output, PROJECTORS, encoder=name, weights=weights,
                    settings=SETTINGS, cluster=client, progress=False)
    assert (summary.ok, summary.failed) == (2, 2)
    assert "NaN" in summary.errors["b"]
    assert summary.errors["c"] == "volume not converted (failed): unreadable header"
    status = stores.read_status(output)
    assert status.tolist() == [stores.OK, stores.FAILED, stores.FAILED, stores.OK]
    result = embed_block(block[[0, 3]], encoder, PROJECTORS, SETTINGS)
    ds = open_embeddings(output)
    np.testing.assert_allclose(ds["p5"].values[[0, 3]], result.projections["p5"], **TOLERANCE)
    assert np.isnan(ds["p5"].values[1]).all()
    # a rerun retries the kernel failure, not the volume that failed to convert; the
    # command line lists the failures and exits with 1
    np.save(tmp_path / "p5.npy", PROJECTORS[0].matrix)
    np.save(tmp_path / "p3.npy", PROJECTORS[1].matrix)
    loaded = client.run(_encoders_loaded)
    assert all(len(ids) <= 1 for ids in loaded.values()) and any(loaded.values())
    code, out, err = _main(
        capsys, store, "-o", output, "--encoder", name, "--weights", weights, "--keep-tokens",
        "--batch-size", "32", "--projector", tmp_path / "p5.npy", "--projector",
        tmp_path / "p3.npy", "--cluster", client.scheduler.address)
    assert code == 1, err
    assert "2 embedded, 2 failed, of 4 (1 this run" in out
    assert "failed: c: volume not converted (failed): unreadable header" in err
    assert client.run(_encoders_loaded) == loaded  # the same models: loaded once per worker
    code, _, err = _main(
        capsys, store, "-o", output, "--encoder", name, "--weights", weights, "--planes", "A,C",
        "--projector", tmp_path / "p5.npy", "--cluster", client.scheduler.address)
    assert code == 2 and "other settings" in err


@pytest.mark.slow
def test_worker_killed_mid_run(client: Client, many_volumes: Path, tmp_path: Path,
                               tiny_vit_weights: tuple[str, Path], encoder: Encoder) -> None:
    output = tmp_path / "embeddings.zarr"
    name, weights = tiny_vit_weights
    pids = list(client.run(os.getpid).values())
    killed: list[int] = []

    def kill_one_worker_once_a_volume_is_done() -> None:
        if _wait_for_a_commit(output, lambda: not killed):
            os.kill(pids[0], signal.SIGKILL)
            killed.append(int((stores.read_status(output) == stores.OK).sum()))

    killer = threading.Thread(target=kill_one_worker_once_a_volume_is_done, daemon=True)
    killer.start()
    summary = embed(many_volumes, output, PROJECTORS, encoder=name, weights=weights,
                    settings=SETTINGS, cluster=client, torch_threads=1, progress=False)
    killer.join(60)
    assert killed, "the worker was not killed"
    assert (summary.ok, summary.failed) == (10, 0)
    _assert_matches(output, _reference(many_volumes, encoder))
    client.wait_for_workers(2)  # the nanny restarted the killed worker


@pytest.mark.slow
def test_two_processes_split_one_output(client: Client, many_volumes: Path, tmp_path: Path,
                                        tiny_vit_weights: tuple[str, Path], encoder: Encoder,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    """Two `raptorz embed` processes start at once on disjoint --start/--many ranges."""
    output = tmp_path / "embeddings.zarr"
    name, weights = tiny_vit_weights
    common = ["-o", output, "--encoder", name, "--weights", weights, "--keep-tokens",
              "--batch-size", "32", *_projector_files(tmp_path),
              "--cluster", client.scheduler.address]
    runs = [subprocess.Popen(_cli(many_volumes, *common, "--start", start, "--many", many),
                             stderr=subprocess.PIPE, text=True)
            for start, many in (("0", "4"), ("4", "6"))]
    for run in runs:
        _, err = run.communicate(timeout=600)
        assert run.returncode == 0, err
    assert (stores.read_status(output) == stores.OK).all()
    _assert_matches(output, _reference(many_volumes, encoder))
    code, out, _ = _main(capsys, many_volumes, *common)
    assert code == 0 and "nothing to do" in out


@pytest.mark.slow
def test_sigkill_cli_then_rerun(client: Client, many_volumes: Path, tmp_path: Path,
                                tiny_vit_weights: tuple[str, Path],
                                capsys: pytest.CaptureFixture[str]) -> None:
    output = tmp_path / "embeddings.zarr"
    name, weights = tiny_vit_weights
    args = [many_volumes, "-o", output, "--encoder", name, "--weights", weights,
            "--keep-tokens", "--batch-size", "32", *_projector_files(tmp_path),
            "--threads", "1"]
    run = subprocess.Popen(_cli(*args, "--cluster", "local", "--workers", "1",
                                "--dashboard-address", ":0"),
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if _wait_for_a_commit(output, lambda: run.poll() is None):
        run.send_signal(signal.SIGKILL)
    run.wait(600)
    assert run.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    interrupted = stores.read_status(output)
    assert (interrupted != stores.FAILED).all()
    # the same command resumes it: here, on the module's cluster (its workers hold the
    # encoder already) and in this process (no second interpreter importing torch)
    code, out, err = _main(capsys, *args, "--cluster", client.scheduler.address)
    assert code == 0, err
    assert "10 embedded, 0 failed" in out
    uninterrupted = tmp_path / "uninterrupted.zarr"
    embed(many_volumes, uninterrupted, PROJECTORS, encoder=name, weights=weights,
          settings=SETTINGS, cluster=client, torch_threads=1, progress=False)
    a, b = open_embeddings(output), open_embeddings(uninterrupted)
    for variable in ("p5", "p3", "tokens", "avgpool"):
        np.testing.assert_allclose(a[variable].values, b[variable].values, **TOLERANCE)
    for variable in ("status", "error"):
        assert a[variable].values.tolist() == b[variable].values.tolist()
