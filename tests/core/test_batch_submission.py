"""A batch system that refuses the job is an error at once, in its own words, not a wait."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("dask_jobqueue")

from raptorz.cluster import create_cluster  # noqa: E402
from raptorz.errors import RaptorzError  # noqa: E402

REFUSAL = "sbatch: error: Batch job submission failed: Invalid generic resource (gres) " \
    "specification"


@pytest.fixture
def refusing_sbatch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A real ``sbatch`` on PATH that refuses every job as SLURM does (exit 1)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    sbatch = bin_dir / "sbatch"
    sbatch.write_text(f"#!/bin/sh\necho '{REFUSAL}' >&2\nexit 1\n")
    sbatch.chmod(sbatch.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.chdir(tmp_path)  # the jobs' TLS credentials are written here
    return sbatch


def test_a_refused_job_is_an_error_with_the_batch_systems_message(
        refusing_sbatch: Path) -> None:
    with pytest.raises(RaptorzError, match="slurm batch system refused the job .*Invalid "
                                           r"generic resource \(gres\)"):
        create_cluster("slurm", jobs=1, gpus_per_job=1, dashboard_address=None)


def test_the_command_exits_2_when_the_job_is_refused(refusing_sbatch: Path,
                                                     tmp_path: Path) -> None:
    from raptorz.embedding.projection import create_projector, save_projector

    volumes = tmp_path / "v.npz"
    import numpy as np

    images = np.random.default_rng(0).integers(0, 255, (2, 8, 8, 8), np.uint8)
    np.savez(volumes, train_images=images, train_labels=np.zeros((2, 1)),
             val_images=images[:0], val_labels=np.zeros((0, 1)), test_images=images[:0],
             test_labels=np.zeros((0, 1)))
    save_projector(create_projector(0, 64, 4), tmp_path / "p.npy")
    console = Path(sys.executable).with_name("raptorz")
    assert subprocess.run([str(console), "convert", str(volumes), "-o", str(tmp_path / "v.zarr")],
                          capture_output=True, timeout=300).returncode == 0
    result = subprocess.run(
        [str(console), "embed", str(tmp_path / "v.zarr"), "-o", str(tmp_path / "e.zarr"),
         "--projector", str(tmp_path / "p.npy"), "--cluster", "slurm", "--jobs", "1"],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr
    assert REFUSAL in result.stderr
