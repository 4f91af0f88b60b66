"""What neuroimaging pipelines leave behind: AFNI and PAR/REC files (nibabel's own test
files), and volumes with NaN outside the field of view, filled on request."""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import nibabel.tests as nibabel_tests
import numpy as np
import pytest

from raptorz import stores
from raptorz.cli.main import main
from raptorz.errors import InputError, SettingsError
from raptorz.ingest.readers import ReadOptions, Source, read_volume
from raptorz.ingest.sources import resolve_sources
from raptorz.ingest.volumes import convert
from raptorz.layouts import VOLUMES, open_volumes

DATA = Path(nibabel_tests.__file__).parent / "data"
RAS = ReadOptions()


def _copy(folder: Path, *names: str) -> Path:
    folder.mkdir(exist_ok=True)
    for name in names:
        shutil.copy(DATA / name, folder / name)
    return folder / names[0]


def _canonical(path: Path) -> np.ndarray:
    """What nibabel reads, in RAS order: the reference raptorz must match."""
    image = nib.as_closest_canonical(nib.funcs.squeeze_image(nib.load(path)))
    return image.get_fdata(dtype=np.float32)


def test_afni_header_and_brik_are_one_volume(tmp_path: Path) -> None:
    _copy(tmp_path / "afni", "scaled+tlrc.HEAD", "scaled+tlrc.BRIK", "example4d+orig.HEAD",
          "example4d+orig.BRIK.gz")
    sources = resolve_sources([tmp_path / "afni"])
    assert [(s.id, Path(s.path).name, s.kind) for s in sources] == [
        ("example4d+orig", "example4d+orig.HEAD", "afni"),
        ("scaled+tlrc", "scaled+tlrc.HEAD", "afni")]
    read = read_volume(sources[1], RAS)
    assert read.data.shape == (47, 54, 43)
    np.testing.assert_array_equal(read.data, _canonical(DATA / "scaled+tlrc.HEAD"))
    by_brik = read_volume(Source("s", str(tmp_path / "afni/scaled+tlrc.BRIK"), "afni"), RAS)
    np.testing.assert_array_equal(by_brik.data, read.data)
    with pytest.raises(InputError, match=r"example4d\+orig.HEAD: is a 4D series of 3 frames"):
        read_volume(sources[0], RAS)
    summary = convert([tmp_path / "afni/scaled+tlrc.BRIK"], tmp_path / "a.zarr")
    assert summary.ok and list(open_volumes(tmp_path / "a.zarr").id.values) == ["scaled+tlrc"]


def _first_dynamic(folder: Path) -> Path:
    """nibabel's 4D PAR/REC phantom cut to its first dynamic: a 3D PAR/REC pair."""
    folder.mkdir()
    text = (DATA / "phantom_EPI_asc_CLEAR_2_1.PAR").read_text()
    text = re.sub(r"(Max\. number of dynamics\s*:\s*)3", r"\g<1>1", text)
    lines = [line for line in text.splitlines(keepends=True)
             if not re.match(r"\s+\d+\s+\d+\s+[23]\s", line)]
    (folder / "phantom.PAR").write_text("".join(lines))
    rec = (DATA / "phantom_EPI_asc_CLEAR_2_1.REC").read_bytes()
    (folder / "phantom.REC").write_bytes(rec[: 9 * 64 * 64 * 2])
    return folder / "phantom.PAR"


def test_parrec_read_with_the_same_checks(tmp_path: Path) -> None:
    par = _first_dynamic(tmp_path / "pr")
    sources = resolve_sources([tmp_path / "pr"])
    assert [(s.id, Path(s.path).name, s.kind) for s in sources] == [
        ("phantom", "phantom.PAR", "parrec")]
    read = read_volume(sources[0], RAS)
    four_d = nib.load(DATA / "phantom_EPI_asc_CLEAR_2_1.PAR")
    first = nib.as_closest_canonical(four_d.slicer[..., 0]).get_fdata(dtype=np.float32)
    assert read.data.shape == (64, 64, 9)
    np.testing.assert_allclose(read.data, first, rtol=1e-6)
    np.testing.assert_allclose(read.spacing, nib.affines.voxel_sizes(
        nib.as_closest_canonical(nib.load(par)).affine))
    whole = _copy(tmp_path / "four", "phantom_EPI_asc_CLEAR_2_1.PAR",
                  "phantom_EPI_asc_CLEAR_2_1.REC")
    with pytest.raises(InputError, match="_1.PAR: is a 4D series of 3 frames"):
        read_volume(Source("p", str(whole), "parrec"), RAS)
    (tmp_path / "pr/phantom.REC").write_bytes((tmp_path / "pr/phantom.REC").read_bytes()[:999])
    with pytest.raises(InputError, match="phantom.PAR: the header describes 73728 bytes of "
                       "voxels but the file holds 999"):
        read_volume(sources[0], RAS)
    broken = _copy(tmp_path / "bad", "phantom_truncated.PAR", "phantom_truncated.REC")
    with pytest.raises(InputError, match="cannot be read as parrec: corrupt, truncated"):
        read_volume(Source("t", str(broken), "parrec"), RAS)


def test_a_store_made_before_new_readers_resumes(tmp_path: Path,
                                                 volume: Callable[..., np.ndarray],
                                                 write_nifti: Callable[..., Path]) -> None:
    path = write_nifti(tmp_path / "a.nii.gz", volume())
    store = tmp_path / "v.zarr"
    convert([path], store, exclude=["a"])
    recorded = open_volumes(store).attrs["convert"]
    older = {k: v for k, v in recorded["intensity_defaults"].items()
             if k not in ("afni", "parrec")}
    stores.update_attrs(store, {"convert": {**recorded, "intensity_defaults": older}})
    assert convert([path], store).converted == 1


@pytest.fixture
def resampled(tmp_path: Path) -> Path:
    """nibabel's resampled_anat_moved.nii: 153 of its 1071 voxels are NaN."""
    return _copy(tmp_path, "resampled_anat_moved.nii")


def test_non_finite_voxels_fail_unless_filled(tmp_path: Path, resampled: Path) -> None:
    finite = _canonical(resampled)
    nan = np.isnan(finite)
    assert nan.sum() == 153
    with pytest.raises(InputError, match="153 of 1071 voxels are NaN or infinite; raptorz "
                       "refuses such volumes .fix or mask them first, or fill them: "
                       "--fill-nonfinite"):
        read_volume(Source("r", str(resampled), "nifti"), RAS)
    for fill, value in ((0.0, 0.0), ("min", float(np.nanmin(finite)))):
        read = read_volume(Source("r", str(resampled), "nifti"), ReadOptions(
            fill_nonfinite=fill))
        assert read.filled == 153
        np.testing.assert_array_equal(read.data[nan], value)
        np.testing.assert_array_equal(read.data[~nan], finite[~nan])
    with pytest.raises(SettingsError, match="fill_nonfinite: expected a number or 'min'"):
        convert([resampled], tmp_path / "x.zarr", fill_nonfinite="max")


def test_filled_voxels_are_recorded_per_volume(tmp_path: Path, resampled: Path,
                                               volume: Callable[..., np.ndarray],
                                               write_nifti: Callable[..., Path],
                                               capsys: pytest.CaptureFixture[str]) -> None:
    clean = write_nifti(tmp_path / "clean.nii", volume((17, 21, 3), dtype="float32"),
                        np.eye(4))
    store = tmp_path / "v.zarr"
    assert main(["convert", str(resampled), str(clean), "-o", str(store)]) == 1
    assert "153 of 1071 voxels are NaN" in capsys.readouterr().err
    shutil.rmtree(store)
    assert main(["convert", str(resampled), str(clean), "-o", str(store),
                 "--fill-nonfinite", "min"]) == 0
    ds = open_volumes(store)
    assert ds.filled_voxels.dims == VOLUMES.dims["filled_voxels"]
    assert dict(zip(ds.id.values, ds.filled_voxels.values.tolist(), strict=True)) == {
        "resampled_anat_moved": 153, "clean": 0}
    assert ds.attrs["convert"]["reader"]["fill_nonfinite"] == "min"
    with pytest.raises(InputError, match="other options .reader"):
        convert([resampled, clean], store, fill_nonfinite=0)
