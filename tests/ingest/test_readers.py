"""Readers on real files written by the tests: values, orientation, spacing, refusals."""

from __future__ import annotations

import gzip
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from raptorz.errors import InputError
from raptorz.ingest.readers import ReadOptions, Source, probe_shape, read_volume
from raptorz.ingest.sources import resolve_sources

RAS, NATIVE = ReadOptions(), ReadOptions(orientation="native")


def _nifti(path: Path) -> Source:
    return Source(path.name, str(path), "nifti")


@pytest.mark.parametrize("name", ["v.nii", "v.nii.gz"])
def test_nifti_comes_out_in_ras_order(tmp_path: Path, name: str,
                                      oblique_ras_spacing: tuple[float, float, float],
                                      to_ras: Callable[[np.ndarray], np.ndarray],
                                      volume: Callable[..., np.ndarray],
                                      write_nifti: Callable[..., Path]) -> None:
    data = volume()
    source = _nifti(write_nifti(tmp_path / name, data))
    read = read_volume(source, RAS)
    np.testing.assert_array_equal(read.data, to_ras(data))
    np.testing.assert_allclose(read.spacing, oblique_ras_spacing)
    assert probe_shape(source, RAS) == read.data.shape
    canonical = nib.as_closest_canonical(nib.load(source.path))
    np.testing.assert_array_equal(read.data, canonical.get_fdata())
    native = read_volume(source, NATIVE)
    np.testing.assert_array_equal(native.data, data)
    np.testing.assert_allclose(native.spacing, (2, 3, 1))


def test_nifti_scaling_and_singleton_fourth_axis(tmp_path: Path,
                                                 volume: Callable[..., np.ndarray]) -> None:
    data = volume(dtype="int16")[..., None]
    image = nib.Nifti1Image(data, np.eye(4))
    image.header.set_slope_inter(0.5, 10)
    nib.save(image, tmp_path / "s.nii.gz")
    read = read_volume(_nifti(tmp_path / "s.nii.gz"), RAS)
    np.testing.assert_array_equal(read.data, data[..., 0] * 0.5 + 10)


@pytest.mark.parametrize(("shape", "problem"), [
    ((6, 7, 5, 3), "is a 4D series of 3 frames.*pick one frame"),
    ((6, 7), r"is not a 3D volume \(shape \(6, 7\)\)"),
])
def test_wrong_dimensionality_is_refused(tmp_path: Path, shape: tuple, problem: str,
                                         write_nifti: Callable[..., Path]) -> None:
    path = write_nifti(tmp_path / "bad.nii.gz", np.zeros(shape, np.int16), np.eye(4))
    with pytest.raises(InputError, match=f"bad.nii.gz: {problem}"):
        read_volume(_nifti(path), RAS)


def test_non_finite_voxels_are_refused(tmp_path: Path, volume: Callable[..., np.ndarray],
                                       write_nifti: Callable[..., Path]) -> None:
    data = volume(dtype="float32")
    data[1, 2, 3], data[0, 0, 0] = np.nan, np.inf
    path = write_nifti(tmp_path / "nan.nii.gz", data)
    with pytest.raises(InputError, match="nan.nii.gz: 2 of 210 voxels are NaN or infinite"):
        read_volume(_nifti(path), RAS)


def test_missing_truncated_and_non_volume_files(tmp_path: Path, volume: Callable[..., np.ndarray],
                                                write_nifti: Callable[..., Path]) -> None:
    with pytest.raises(InputError, match="gone.nii.gz: no such file"):
        read_volume(_nifti(tmp_path / "gone.nii.gz"), RAS)
    whole = write_nifti(tmp_path / "whole.nii.gz", volume((20, 20, 20), dtype="float32"))
    cut = tmp_path / "cut.nii.gz"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    with pytest.raises(InputError, match="cut.nii.gz: cannot read the voxels, truncated"):
        read_volume(_nifti(cut), RAS)
    text = tmp_path / "notes.nii.gz"
    text.write_bytes(gzip.compress(b"not a volume at all" * 30))
    with pytest.raises(InputError, match="notes.nii.gz: cannot be read as nifti"):
        read_volume(_nifti(text), RAS)
    other = tmp_path / "report.pdf"
    other.write_bytes(b"%PDF-1.4" * 100)
    with pytest.raises(InputError, match="report.pdf: is not a volume"):
        read_volume(Source("report", str(other), "dicom"), RAS)


def test_ukb_zip_member_is_read_in_memory(tmp_path: Path,
                                          to_ras: Callable[[np.ndarray], np.ndarray],
                                          volume: Callable[..., np.ndarray],
                                          write_ukb_zip: Callable[..., Path]) -> None:
    data = volume(seed=3)
    path = write_ukb_zip(tmp_path / "1000_20252_2_0.zip", data)
    read = read_volume(Source("1000_20252_2_0", str(path), "zip"), RAS)
    np.testing.assert_array_equal(read.data, to_ras(data))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["1000_20252_2_0.zip"]
    other = write_ukb_zip(tmp_path / "o.zip", data, member="T1/T1.nii.gz")
    read = read_volume(Source("o", str(other), "zip"), ReadOptions(member="T1/T1.nii.gz"))
    np.testing.assert_array_equal(read.data, to_ras(data))


def test_zip_without_member_or_over_the_cap(tmp_path: Path, write_ukb_zip: Callable[..., Path],
                                            zip_bomb: Callable[[Path, int], Path]) -> None:
    empty = write_ukb_zip(tmp_path / "empty.zip", None)
    with pytest.raises(InputError, match="empty.zip: has no member 'T1/T1_brain.nii.gz'"):
        read_volume(Source("empty", str(empty), "zip"), RAS)
    bomb = zip_bomb(tmp_path / "bomb.zip", 2**21)
    with pytest.raises(InputError, match=r"bomb.zip: member .* would decompress to \d+ bytes"):
        read_volume(Source("bomb", str(bomb), "zip"), ReadOptions(max_member_bytes=2**20))


def test_npz_volumes_and_labels(tmp_path: Path, write_npz: Callable[..., dict]) -> None:
    arrays = write_npz(tmp_path / "m.npz", {"train": 3, "val": 1, "test": 2})
    sources = resolve_sources([tmp_path / "m.npz"])
    assert [s.id for s in sources] == ["train_0", "train_1", "train_2", "val_0", "test_0",
                                       "test_1"]
    read = read_volume(sources[4], RAS)
    np.testing.assert_array_equal(read.data, arrays["test_images"][0])
    assert read.spacing == (1.0, 1.0, 1.0)


def test_npz_with_objects_or_without_images_fails(tmp_path: Path) -> None:
    np.savez(tmp_path / "obj.npz", train_images=np.array([{"a": 1}], dtype=object))
    np.savez(tmp_path / "plain.npz", x=np.zeros(3))
    for name in ("obj", "plain"):
        (source,) = resolve_sources([tmp_path / f"{name}.npz"])
        with pytest.raises(InputError, match=f"{name}.npz: is not a MedMNIST-style npz"):
            read_volume(source, RAS)


def test_dicom_series_sorted_by_position_and_rescaled(
        tmp_path: Path, volume: Callable[..., np.ndarray],
        write_dicom_series: Callable[..., Path]) -> None:
    data = volume((5, 4, 6), seed=1).astype(np.float32) * 2 - 100
    folder = write_dicom_series(tmp_path / "series", data)
    (source,) = resolve_sources([folder])
    assert source.kind == "dicom" and source.id == "series"
    native = read_volume(source, NATIVE)
    np.testing.assert_array_equal(native.data, data)
    np.testing.assert_allclose(native.spacing, (0.8, 0.5, 2.5))
    # LPS axial slices: RAS flips the first two axes
    np.testing.assert_array_equal(read_volume(source, RAS).data, data[::-1, ::-1, :])


def test_dicom_folder_mixing_series_is_refused(tmp_path: Path, volume: Callable[..., np.ndarray],
                                               write_dicom_series: Callable[..., Path]) -> None:
    data = volume((4, 4, 3)).astype(np.float32)
    write_dicom_series(tmp_path / "mixed", data, names="a")
    write_dicom_series(tmp_path / "mixed", data, names="b")
    with pytest.raises(InputError, match="mixed: mixes 2 DICOM series.*one volume per series"):
        read_volume(Source("mixed", str(tmp_path / "mixed"), "dicom"), RAS)
    with pytest.raises(InputError, match="mixed: holds no DICOM series 9.9.9"):
        read_volume(Source("mixed", str(tmp_path / "mixed"), "dicom", entry="9.9.9"), RAS)


def test_multiframe_dicom_with_functional_groups(tmp_path: Path, volume: Callable[..., np.ndarray],
                                                 write_multiframe: Callable[..., Path]) -> None:
    data = volume((5, 4, 6), seed=2).astype(np.float32) * 0.5 + 3
    (source,) = resolve_sources([write_multiframe(tmp_path / "mf.dcm", data)])
    assert (source.id, source.kind) == ("mf", "dicom")
    native = read_volume(source, NATIVE)
    # frames are stacked along the normal, row x column = patient right (LPS -x): the
    # frame at the largest x (most left) comes first
    np.testing.assert_array_equal(native.data, data[:, :, ::-1])
    np.testing.assert_allclose(native.spacing, (0.9, 0.7, 1.5))
    # axis 0 runs posterior, axis 1 inferior, axis 2 right: RAS is (2, 0 flipped, 1 flipped)
    np.testing.assert_array_equal(read_volume(source, RAS).data,
                                  np.transpose(data, (2, 0, 1))[::-1, ::-1, ::-1])


@pytest.mark.requires_data
def test_real_multiframe_and_mprage_dicom(shared_data: Path) -> None:
    frames = read_volume(Source("e", str(shared_data / "small/pydicom_data_emri_small.dcm"),
                                "dicom"), NATIVE)
    assert frames.data.shape == (64, 64, 10)
    import pydicom

    stored = pydicom.dcmread(shared_data / "small/pydicom_data_emri_small.dcm").pixel_array
    np.testing.assert_array_equal(frames.data, np.transpose(stored, (2, 1, 0)))
    mprage = read_volume(Source("t", str(shared_data / "dicom/trio_mprage"), "dicom"), RAS)
    assert mprage.data.shape == (176, 256, 256)  # sagittal slices: RAS puts them first
    np.testing.assert_allclose(mprage.spacing, (1, 1, 1), atol=1e-3)
    assert mprage.data.min() == 0 and mprage.data.max() == 1579
