"""Options are checked by the library (the Python API refuses what the CLI refuses), once,
with one error type; the CLI only parses and maps the error to exit code 2."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from raptorz.cli.main import EXIT_REFUSED, main
from raptorz.demo import run_demo
from raptorz.embedding.projection import create_projector, make_projector
from raptorz.embedding.settings import KernelSettings
from raptorz.errors import InputError, SettingsError
from raptorz.ingest.sources import resolve_sources
from raptorz.ingest.volumes import convert


@pytest.mark.parametrize(("seed", "dim", "k", "problem"), [
    (0, 0, 5, "dim=0, k=5: dim and k must be at least 1"),
    (0, 8, 0, "dim=8, k=0: dim and k must be at least 1"),
    (0, -2, -1, "dim and k must be at least 1"),
    (-1, 8, 5, r"seed=-1: the seed must be in \[0, 2\*\*32\)"),
    (2**32, 8, 5, "the seed must be in"),
])
def test_projector_sizes_are_refused_by_the_library(seed: int, dim: int, k: int,
                                                    problem: str) -> None:
    with pytest.raises(InputError, match=problem):
        make_projector(seed, dim, k)
    with pytest.raises(InputError, match=problem):
        create_projector(seed, dim, k)


def test_cli_projector_reports_the_library_error(tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["projector", "--dim", "0", "-o", str(tmp_path / "p.npy")]) == EXIT_REFUSED
    assert "raptorz projector: error: projector seed=0, dim=0, k=100: dim and k must be" in \
        capsys.readouterr().err


@pytest.fixture
def three_volumes(tmp_path: Path, volume: Callable[..., np.ndarray],
                  write_nifti: Callable[..., Path]) -> list[Path]:
    return [write_nifti(tmp_path / f"{name}.nii.gz", volume((6, 6, 6), seed=i))
            for i, name in enumerate("abc")]


@pytest.mark.parametrize(("start", "many", "option", "problem"), [
    (-1, None, "start/many", "need start >= 0 and many >= 1, got start=-1, many=None"),
    (0, 0, "start/many", "need start >= 0 and many >= 1, got start=0, many=0"),
    (3, 1, "start", "3 is past the last of the 3 volumes"),
])
def test_start_and_many_are_refused_once_with_one_error_type(
        three_volumes: list[Path], tmp_path: Path, start: int, many: int | None, option: str,
        problem: str, capsys: pytest.CaptureFixture[str]) -> None:
    """The library names its keywords, the command line its flags."""
    with pytest.raises(SettingsError, match=re.escape(f"{option}: {problem}")):
        resolve_sources(three_volumes, start=start, many=many)
    store = tmp_path / "volumes.zarr"
    with pytest.raises(SettingsError, match=re.escape(f"{option}: {problem}")):
        convert(three_volumes, store, start=start, many=many)
    assert not store.exists()
    argv = ["convert", *map(str, three_volumes), "-o", str(store), "--start", str(start)]
    assert main(argv + ([] if many is None else ["--many", str(many)])) == EXIT_REFUSED
    flags = "/".join(f"--{name}" for name in option.split("/"))
    assert f"raptorz convert: error: {flags}: {problem}" in capsys.readouterr().err


def test_start_and_many_past_the_end_keep_the_volumes_there(three_volumes: list[Path]) -> None:
    assert [s.id for s in resolve_sources(three_volumes, start=1, many=5)] == ["b", "c"]


def test_kernel_settings_are_refused_by_the_library_and_named_as_flags(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SettingsError, match="planes: must be distinct axes"):
        KernelSettings(planes=(0, 0))
    with pytest.raises(SettingsError, match="batch_size: must be at least 1, not 0"):
        KernelSettings(batch_size=0)
    argv = ["embed", str(tmp_path / "v.zarr"), "-o", str(tmp_path / "e.zarr"), "--projector",
            str(tmp_path / "p.npy"), "--batch-size", "0"]
    assert main(argv) == EXIT_REFUSED
    assert "raptorz embed: error: --batch-size: must be at least 1, not 0" in \
        capsys.readouterr().err


def test_demo_labels_without_data_is_refused_with_exit_2(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    workdir = tmp_path / "demo"
    labels = tmp_path / "labels.csv"
    with pytest.raises(InputError, match="labels.csv: labels need data"):
        run_demo(workdir, labels=labels)
    assert main(["demo", "--workdir", str(workdir), "--labels", str(labels)]) == EXIT_REFUSED
    assert f"raptorz demo: error: {labels}: labels need data (--data)" in \
        capsys.readouterr().err
    assert not workdir.exists()  # refused before anything was made
