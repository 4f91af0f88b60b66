"""``raptorz convert`` and ``raptorz info`` as users run them, SIGKILL and resume included."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import dask.array as da
import numpy as np
import pytest
import xarray as xr

from raptorz import stores
from raptorz.cli.main import main
from raptorz.ingest.volumes import convert
from raptorz.layouts import open_volumes

COMMAND = [sys.executable, "-m", "raptorz.cli.main"]


@pytest.fixture
def tiny_niftis(volume: Callable[..., np.ndarray],
                write_nifti: Callable[..., Path]) -> Callable[[Path, int], Path]:
    """``tiny_niftis(folder, n) -> folder``: ``n`` random 8^3 NIfTIs in a new ``folder``."""
    def tiny_niftis(folder: Path, n: int) -> Path:
        folder.mkdir()
        for i in range(n):
            write_nifti(folder / f"s{i:03d}.nii.gz", volume((8, 8, 8), seed=i))
        return folder
    return tiny_niftis


def test_convert_reports_failures_and_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                 tiny_niftis: Callable[[Path, int], Path]) -> None:
    folder = tiny_niftis(tmp_path / "in", 3)
    store = tmp_path / "v.zarr"
    args = ["convert", str(folder), str(tmp_path / "absent.nii.gz"), "-o", str(store),
            "--intensity", "ct:brain", "--workers", "1", "--dtype", "float32"]
    assert main(args) == 1
    out, err = capsys.readouterr()
    assert "3 converted, 1 failed, 0 already done" in out
    assert "failed: " in err and "absent.nii.gz: no such file or folder" in err
    assert main(["info", str(store)]) == 0
    out = capsys.readouterr().out
    assert "raptorz volumes store" in out and "4 (0 pending, 3 ok, 1 failed)" in out
    assert "volume(id=4, x=8, y=8, z=8) float32 chunks=(4, 8, 8, 8)" in out
    assert '"intensity": "ct:brain"' in out and "absent: " in out
    (tmp_path / "absent.nii.gz").write_bytes((folder / "s000.nii.gz").read_bytes())
    assert main(args) == 0
    assert "1 converted, 0 failed, 3 already done" in capsys.readouterr().out


def test_refusals_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                         volume: Callable[..., np.ndarray], write_nifti: Callable[..., Path],
                         tiny_niftis: Callable[[Path, int], Path]) -> None:
    folder = tiny_niftis(tmp_path / "in", 2)
    write_nifti(folder / "sub.nii", volume((8, 8, 8)))
    (folder / "sub").mkdir()
    write_nifti(folder / "sub" / "sub.nii.gz", volume((8, 8, 8)))
    store = str(tmp_path / "v.zarr")
    assert main(["convert", str(folder), str(folder / "sub"), "-o", store]) == 2
    assert "duplicate volume ids" in capsys.readouterr().err
    assert main(["convert", "-o", store]) == 2
    assert "give at least one SOURCE" in capsys.readouterr().err
    assert main(["convert", str(folder), "-o", store, "--intensity", "ct:heart"]) == 2
    assert main(["info", str(tmp_path / "nothing.zarr")]) == 2
    assert "nothing.zarr: no raptorz store here" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["convert", str(folder), "-o", store, "--shape", "1,2"])


def test_info_understands_an_embeddings_store(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "embeddings.zarr"
    projected = xr.DataArray(da.zeros((3, 3, 4, 5), chunks=(2, 3, 4, 5), dtype="f4"),
                             dims=("id", "plane", "k", "token"))
    ids = stores.as_strings(["a", "b", "c"])
    template = xr.Dataset({"proj": projected, **stores.status_variables(3, 2)},
                          coords={"id": ids}, attrs={"encoder": "tiny-vit"})
    stores.create_store(path, template, "embeddings")
    stores.write_units(path, {}, slice(0, 2), np.array([1, 2]), ["", "b: out of memory"])
    assert main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    assert "raptorz embeddings store" in out and "3 (1 pending, 1 ok, 1 failed)" in out
    assert "proj(id=3, plane=3, k=4, token=5) float32" in out
    assert '"encoder": "tiny-vit"' in out and "b: b: out of memory" in out


def test_npz_labels_out(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                        write_npz: Callable[..., dict]) -> None:
    write_npz(tmp_path / "m.npz", {"train": 2, "val": 1, "test": 1})
    labels = tmp_path / "labels" / "y.csv"
    labels.parent.mkdir()
    assert main(["convert", str(tmp_path / "m.npz"), "-o", str(tmp_path / "m.zarr"),
                 "--labels-out", str(labels)]) == 0
    assert f"labels: {labels}" in capsys.readouterr().out
    assert len(labels.read_text().splitlines()) == 5


def _ok_count(store: Path) -> int:
    """Volumes marked ok so far in a store another process is writing."""
    try:
        return int(np.sum(stores.read_status(store) == stores.OK))
    except Exception:  # not created yet, or a file caught half-written: not ok yet
        return 0


@pytest.mark.slow
def test_sigkill_then_resume_equals_an_uninterrupted_run(
        tmp_path: Path, tiny_niftis: Callable[[Path, int], Path]) -> None:
    folder = tiny_niftis(tmp_path / "in", 60)
    killed, clean = tmp_path / "killed.zarr", tmp_path / "clean.zarr"
    options = ["--workers", "1", "--chunk", "1"]
    process = subprocess.Popen([*COMMAND, "convert", str(folder), "-o", str(killed),
                                *options], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        # kill once some, but not all, volumes are done
        while process.poll() is None:
            if _ok_count(killed) >= 5:
                process.send_signal(signal.SIGKILL)
                break
            time.sleep(0.02)
        assert process.wait() == -signal.SIGKILL, process.stderr.read() if process.stderr else ""
    finally:
        process.kill()
    counts = stores.status_counts(stores.read_status(killed))
    assert counts["ok"] >= 5 and counts["pending"] > 0
    resumed = subprocess.run([*COMMAND, "convert", str(folder), "-o", str(killed), *options],
                             capture_output=True, text=True, check=False)
    assert resumed.returncode == 0, resumed.stderr
    assert f"{counts['ok']} already done" in resumed.stdout
    convert([folder], clean, workers=1, chunk=1)
    xr.testing.assert_identical(open_volumes(killed).drop_attrs(),
                                open_volumes(clean).drop_attrs())


def test_two_processes_converting_into_one_new_store(
        tmp_path: Path, tiny_niftis: Callable[[Path, int], Path]) -> None:
    folder = tiny_niftis(tmp_path / "in", 6)
    store = tmp_path / "v.zarr"
    args = [*COMMAND, "convert", str(folder), "-o", str(store), "--chunk", "1"]
    runs = [subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for _ in range(2)]
    for run in runs:
        _, err = run.communicate(timeout=300)
        assert run.returncode == 0, err
    assert _ok_count(store) == 6
    alone = tmp_path / "alone.zarr"
    convert([str(folder)], alone, chunk=1)
    np.testing.assert_array_equal(open_volumes(store).volume.values,
                                  open_volumes(alone).volume.values)
