"""Resuming ``convert`` loses nothing: ok volumes are kept as they are, changed sources are
reported (or reconverted when asked), every content change moves the store's checksum,
a volume that kills its worker fails alone, and ``exclude`` leaves volumes out."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import dask
import nibabel as nib
import numpy as np
import pytest
from distributed import LocalCluster

from raptorz import stores
from raptorz.errors import RaptorzWarning
from raptorz.ingest.volumes import convert
from raptorz.layouts import open_volumes


@pytest.fixture
def pair(volume: Callable[..., np.ndarray],
         write_nifti: Callable[..., Path]) -> Callable[[Path], tuple[Path, Path]]:
    """``pair(folder) -> (good, bad)``: a good NIfTI and a corrupt one, which share one chunk
    when converted."""
    def pair(folder: Path) -> tuple[Path, Path]:
        good = write_nifti(folder / "good.nii.gz", volume((6, 7, 5), seed=1))
        bad = folder / "bad.nii.gz"
        bad.write_bytes(b"not a nifti")
        return good, bad
    return pair


def test_a_resume_keeps_ok_volumes_whose_source_is_gone(
        tmp_path: Path, pair: Callable[[Path], tuple[Path, Path]]) -> None:
    good, bad = pair(tmp_path)
    store = tmp_path / "volumes.zarr"
    first = convert([good, bad], store, chunk=2, workers=1)
    assert (first.converted, first.failed) == (1, 1)
    before = open_volumes(store).volume[0].values
    checksum = open_volumes(store).checksum[0].values
    good.rename(tmp_path / "moved.nii.gz")  # the rerun names it still: only bad is to redo
    with pytest.warns(RaptorzWarning, match=r"good\.nii\.gz.*gone"):
        second = convert([good, bad], store, workers=1)
    assert (second.converted, second.failed, second.skipped) == (0, 1, 1)
    ds = open_volumes(store)
    assert stores.read_status(store).tolist() == [stores.OK, stores.FAILED]
    np.testing.assert_array_equal(ds.volume[0].values, before)
    assert ds.checksum[0].values == checksum


def test_a_changed_source_is_reported_and_kept_or_reconverted_when_asked(
        tmp_path: Path, volume: Callable[..., np.ndarray], write_nifti: Callable[..., Path],
        pair: Callable[[Path], tuple[Path, Path]]) -> None:
    good, bad = pair(tmp_path)
    store = tmp_path / "volumes.zarr"
    convert([good, bad], store, chunk=2, workers=1, hash_sources=True)
    before = open_volumes(store)
    old, checksum = before.volume[0].values, int(before.checksum[0].values)
    store_checksum = before.attrs["checksum"]
    assert before.source_size[0].values == good.stat().st_size
    assert len(str(before.source_sha256[0].values)) == 64
    write_nifti(good, volume((6, 7, 5), seed=2))  # new content at the same path
    with pytest.warns(RaptorzWarning, match=r"good\.nii\.gz.*changed.*reconvert_changed"):
        convert([good, bad], store, workers=1)
    np.testing.assert_array_equal(open_volumes(store).volume[0].values, old)
    assert open_volumes(store).attrs["checksum"] == store_checksum

    # touched, same content: the hash says it is the same
    summary = convert([good, bad], store, workers=1, reconvert_changed=True,
                      hash_sources=True)
    assert summary.converted == 1
    after = open_volumes(store)
    assert not np.array_equal(after.volume[0].values, old)
    assert int(after.checksum[0].values) != checksum
    assert after.attrs["checksum"] != store_checksum
    assert after.source_size[0].values == good.stat().st_size
    os.utime(good)
    convert([good, bad], store, workers=1, hash_sources=True)  # no warning: same bytes


def test_exclude_leaves_volumes_out_of_an_existing_store(
        tmp_path: Path, volume: Callable[..., np.ndarray], write_nifti: Callable[..., Path],
        pair: Callable[[Path], tuple[Path, Path]]) -> None:
    good, bad = pair(tmp_path)
    other = write_nifti(tmp_path / "other.nii.gz", volume((6, 7, 5), seed=3))
    store = tmp_path / "volumes.zarr"
    convert([good, bad, other], store, chunk=3, workers=1)
    summary = convert([good, bad, other], store, workers=1, exclude=["bad"])
    assert summary.failures == {"bad": "excluded (exclude=): not converted"}
    ds = open_volumes(store)
    assert stores.read_status(store).tolist() == [stores.OK, stores.FAILED, stores.OK]
    assert str(ds.error[1].values) == "excluded (exclude=): not converted"


def test_a_volume_that_kills_its_worker_fails_alone(tmp_path: Path,
                                                    volume: Callable[..., np.ndarray],
                                                    write_nifti: Callable[..., Path]) -> None:
    """A sparse 1 GiB NIfTI read by a worker limited to 600 MB: the nanny kills it."""
    good = write_nifti(tmp_path / "good.nii", volume((6, 7, 5), seed=1))
    huge = tmp_path / "huge.nii"
    header = nib.Nifti1Header()
    header.set_data_shape((1024, 1024, 256))
    header.set_data_dtype(np.float32)
    header.set_qform(np.eye(4), code=1)
    header["vox_offset"] = 352
    with open(huge, "wb") as file:
        header.write_to(file)
        file.truncate(352 + 1024 * 1024 * 256 * 4)  # sparse: no disk used
    last = write_nifti(tmp_path / "last.nii", volume((6, 7, 5), seed=2))
    store = tmp_path / "volumes.zarr"
    with dask.config.set({"distributed.scheduler.allowed-failures": 0}), \
            LocalCluster(n_workers=1, threads_per_worker=1, memory_limit="600MB",
                         dashboard_address=None) as cluster:
        summary = convert([good, huge, last], store, shape=(6, 7, 5), chunk=3,
                          cluster=cluster, max_volume_bytes=2**31)
    assert summary.converted == 2
    assert summary.failures == {"huge": f"{huge}: worker died while reading it: "
                                "out of memory?"}
    assert stores.read_status(store).tolist() == [stores.OK, stores.FAILED, stores.OK]
