"""``convert`` into real Zarr stores on disk: layout, values, bad inputs, resume."""

from __future__ import annotations

import gzip
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import xarray as xr
from distributed import LocalCluster
from zarr.codecs import BloscCodec

from raptorz import stores
from raptorz.errors import InputError, RaptorzError, RaptorzWarning, SettingsError
from raptorz.ingest.volumes import convert
from raptorz.layouts import open_volumes

#: float16 keeps 11 significant bits: values in [0, 1] are within 2**-12 of float64.
F16 = 2.0**-11


def _scaled(data: np.ndarray, low: float, high: float) -> np.ndarray:
    return np.clip((np.asarray(data, np.float64) - low) / (high - low), 0, 1)


@pytest.fixture
def niftis(tmp_path: Path, volume: Callable[..., np.ndarray],
           write_nifti: Callable[..., Path]) -> dict[str, np.ndarray]:
    """Five oblique NIfTI volumes of one shape, by id."""
    (tmp_path / "in").mkdir()
    datas = {f"v{i}": volume(seed=i) for i in range(5)}
    for name, data in datas.items():
        write_nifti(tmp_path / "in" / f"{name}.nii.gz", data)
    return datas


def test_store_layout_values_and_provenance(tmp_path: Path, niftis: dict,
                                            oblique_ras_spacing: tuple[float, float, float],
                                            to_ras: Callable[[np.ndarray], np.ndarray]) -> None:
    store = tmp_path / "volumes.zarr"
    calls: list[tuple[int, int]] = []
    summary = convert([tmp_path / "in"], store, intensity="range:0,200", chunk=2, workers=1,
                      progress=lambda done, total: calls.append((done, total)))
    assert (summary.converted, summary.failed, summary.skipped) == (5, 0, 0)
    assert calls == [(0, 5), (2, 5), (2, 5), (1, 5)]
    ds = open_volumes(store)
    assert ds.volume.dims == ("id", "x", "y", "z")
    assert ds.volume.shape == (5, 5, 6, 7) and ds.volume.dtype == np.float16
    assert ds.volume.encoding["chunks"] == (2, 5, 6, 7)
    (codec,) = ds.volume.encoding["compressors"]
    assert isinstance(codec, BloscCodec) and codec.cname.value == "zstd"
    assert list(ds.id.values) == list(niftis)
    for i, data in enumerate(niftis.values()):
        np.testing.assert_allclose(ds.volume[i].values, _scaled(to_ras(data), 0, 200),
                                   atol=F16 / 2)
    np.testing.assert_allclose(ds.spacing.values, [oblique_ras_spacing] * 5)
    np.testing.assert_array_equal(ds.original_shape.values, [[5, 6, 7]] * 5)
    assert ds.source.values[0] == str(tmp_path / "in" / "v0.nii.gz")
    assert set(ds.status.values) == {stores.OK} and set(ds.error.values) == {""}
    recorded = ds.attrs["convert"]
    assert recorded["intensity"] == "range:0,200" and recorded["orientation"] == "ras"
    assert recorded["shape_policy"] == {"shape": [5, 6, 7], "fit": "none"}
    assert ds.attrs["raptorz_store"] == "volumes" and "raptorz" in ds.attrs["versions"]


def test_native_orientation_float32_and_minmax(tmp_path: Path, niftis: dict) -> None:
    store = tmp_path / "native.zarr"
    convert([tmp_path / "in" / "v1.nii.gz"], store, orientation="native", dtype="float32",
            intensity="minmax")
    data = niftis["v1"]
    # float32 arithmetic on values below 2**8: exact to a few ulp
    np.testing.assert_allclose(open_volumes(store).volume[0].values,
                               _scaled(data, data.min(), data.max()), atol=1e-6)


def test_every_bad_input_fails_alone(tmp_path: Path, niftis: dict,
                                     to_ras: Callable[[np.ndarray], np.ndarray],
                                     volume: Callable[..., np.ndarray],
                                     write_dicom_series: Callable[..., Path],
                                     write_nifti: Callable[..., Path],
                                     write_ukb_zip: Callable[..., Path],
                                     zip_bomb: Callable[[Path, int], Path]) -> None:
    bad = tmp_path / "in"
    good = volume(seed=9)
    write_ukb_zip(bad / "ukb_ok.zip", good)
    write_ukb_zip(bad / "ukb_nomember.zip", None)
    zip_bomb(bad / "ukb_bomb.zip", 2**21)
    whole = (bad / "v4.nii.gz").read_bytes()
    (bad / "truncated.nii.gz").write_bytes(whole[:-100])  # header intact, voxels cut
    (bad / "text.nii.gz").write_bytes(gzip.compress(b"hello" * 100))
    write_nifti(bad / "flat2d.nii", np.ones((6, 7), np.int16))
    nan = volume(dtype="float32")
    nan[2, 2, 2] = np.nan
    write_nifti(bad / "nan.nii.gz", nan)
    write_nifti(bad / "constant.nii.gz", np.full((6, 7, 5), 42, np.int16))
    mixed = tmp_path / "mixed"
    write_dicom_series(mixed, volume((4, 4, 3)).astype(np.float32), names="a", series="1.2.3")
    write_dicom_series(mixed, volume((4, 4, 3)).astype(np.float32), names="b", series="1.2.3")
    store = tmp_path / "volumes.zarr"
    sources = [bad, mixed, tmp_path / "missing.nii.gz"]
    with pytest.warns(RaptorzWarning, match=r"constant: constant volume \(every voxel is 42"):
        summary = convert(sources, store, max_member_bytes=2**20, chunk=3, workers=1)
    expected = {
        "ukb_nomember": "ukb_nomember.zip: has no member 'T1/T1_brain.nii.gz'",
        "ukb_bomb": "ukb_bomb.zip: member T1/T1_brain.nii.gz would decompress",
        "truncated": "truncated.nii.gz: cannot be read as nifti: corrupt, truncated",
        "text": "text.nii.gz: cannot be read as nifti",
        "flat2d": "flat2d.nii: is not a 3D volume (shape (6, 7))",
        "nan": "nan.nii.gz: 1 of 210 voxels are NaN or infinite",
        "mixed": "mixed: holds two slices at the same position",
        "missing": "missing.nii.gz: no such file or folder",
    }
    assert set(summary.failures) == set(expected)
    for name, message in expected.items():
        assert message in summary.failures[name]
    assert (summary.converted, summary.failed) == (7, 8)
    assert summary.notes == {"constant": "constant volume (every voxel is 42)"}
    ds = open_volumes(store)
    by_id = ds.load()
    assert by_id.note.sel(id="constant").item() == "constant volume (every voxel is 42)"
    np.testing.assert_array_equal(by_id.volume.sel(id="constant").values, 0)
    assert np.isnan(by_id.volume.sel(id="nan").values).all()
    assert expected["nan"] in by_id.error.sel(id="nan").item()
    np.testing.assert_allclose(by_id.volume.sel(id="ukb_ok").values,
                               _scaled(to_ras(good), 0, 1280), atol=F16 / 2)
    data = to_ras(niftis["v3"])
    low, high = np.percentile(data, [0.5, 99.5])
    np.testing.assert_allclose(by_id.volume.sel(id="v3").values, _scaled(data, low, high),
                               atol=F16 / 2 + 1e-6)


def test_mismatched_shapes_need_a_target_shape(tmp_path: Path,
                                               to_ras: Callable[[np.ndarray], np.ndarray],
                                               volume: Callable[..., np.ndarray],
                                               write_nifti: Callable[..., Path]) -> None:
    write_nifti(tmp_path / "a.nii.gz", volume((6, 7, 5)))
    write_nifti(tmp_path / "b.nii.gz", volume((6, 7, 5), seed=1))
    write_nifti(tmp_path / "c.nii.gz", volume((4, 4, 4)))
    with pytest.raises(RaptorzError, match=r"2 shapes \(\(5, 6, 7\): a, b; \(4, 4, 4\): c\).*"
                       "--shape"):
        convert([tmp_path], tmp_path / "s.zarr", workers=1)
    assert not (tmp_path / "s.zarr").exists()
    summary = convert([tmp_path], tmp_path / "pad.zarr", shape=(5, 6, 6), fit="pad",
                      intensity="divide:1000", dtype="float32", workers=1)
    assert summary.ok
    ds = open_volumes(tmp_path / "pad.zarr")
    np.testing.assert_allclose(ds.volume[0, :, :, :].values,
                               to_ras(volume((6, 7, 5)))[:, :, :6] / 1000, rtol=1e-6)
    small = np.zeros((5, 6, 6))
    small[:4, 1:5, 1:5] = to_ras(volume((4, 4, 4))) / 1000
    np.testing.assert_allclose(ds.volume[2].values, small, rtol=1e-6)
    convert([tmp_path], tmp_path / "re.zarr", shape=(8, 8, 8), workers=1)
    spacing = open_volumes(tmp_path / "re.zarr").spacing.values
    np.testing.assert_allclose(spacing[2], np.array([1, 2, 3]) * 4 / 8)


def test_rerun_converts_only_what_failed(tmp_path: Path, niftis: dict) -> None:
    store = tmp_path / "volumes.zarr"
    moved = tmp_path / "v2.nii.gz"
    (tmp_path / "in" / "v2.nii.gz").rename(moved)
    sources = [tmp_path / "in" / f"v{i}.nii.gz" for i in range(5)]
    first = convert(sources, store, intensity="minmax", chunk=2, workers=1)
    assert (first.converted, first.failed) == (4, 1)
    before = open_volumes(store).volume.values
    moved.rename(tmp_path / "in" / "v2.nii.gz")
    second = convert(sources, store, intensity="minmax", workers=1)
    assert (second.converted, second.failed, second.skipped) == (1, 0, 4)  # v2 alone
    after = open_volumes(store)
    assert set(after.status.values) == {stores.OK}
    np.testing.assert_array_equal(after.volume.values[[0, 1, 3, 4]], before[[0, 1, 3, 4]])
    third = convert(sources, store, intensity="minmax", workers=1)
    assert (third.converted, third.skipped) == (0, 5)
    with pytest.raises(InputError, match="already holds 5 volumes from other sources"):
        convert(sources[:4], store, intensity="minmax", workers=1)
    with pytest.raises(InputError, match="other options .*intensity: minmax vs range:0,1"):
        convert(sources, store, intensity="range:0,1", workers=1)


def test_unknown_modes_are_refused(tmp_path: Path, niftis: dict) -> None:
    with pytest.raises(SettingsError, match="orientation: must be one of ras, native"):
        convert([tmp_path / "in"], tmp_path / "s.zarr", orientation="lps")  # type: ignore[arg-type]
    with pytest.raises(SettingsError, match="dtype: must be one of"):
        convert([tmp_path / "in"], tmp_path / "s.zarr", dtype="int8")  # type: ignore[arg-type]


def test_other_stores_are_never_overwritten(tmp_path: Path, niftis: dict) -> None:
    embeddings = tmp_path / "embeddings.zarr"
    ids = stores.as_strings(["a", "b"])
    template = xr.Dataset(stores.status_variables(2, 2), coords={"id": ids})
    stores.create_store(embeddings, template, "embeddings")
    with pytest.raises(InputError, match="embeddings.zarr: holds a raptorz embeddings store"):
        convert([tmp_path / "in"], embeddings, workers=1)
    assert stores.store_kind(embeddings) == "embeddings"
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("keep me")
    with pytest.raises(InputError, match="notes: exists and is not a Zarr store"):
        convert([tmp_path / "in"], tmp_path / "notes", workers=1)
    assert (tmp_path / "notes" / "a.txt").read_text() == "keep me"


def test_npz_default_scaling_and_labels(tmp_path: Path, write_npz: Callable[..., dict]) -> None:
    arrays = write_npz(tmp_path / "m.npz", {"train": 3, "val": 2, "test": 2})
    summary = convert([tmp_path / "m.npz"], tmp_path / "m.zarr", start=2, many=3, workers=1)
    assert summary.labels == tmp_path / "m.labels.csv"
    assert summary.labels.read_text().splitlines()[0] == "id,split,label"
    ds = open_volumes(tmp_path / "m.zarr")
    assert list(ds.id.values) == ["train_2", "val_0", "val_1"]
    np.testing.assert_allclose(ds.volume[1].values, arrays["val_images"][0] / 256,
                               atol=F16 / 2)
    # a file rewritten in place is read afresh, not from this process's cache
    arrays = write_npz(tmp_path / "m.npz", {"train": 3, "val": 2, "test": 2}, seed=1)
    convert([tmp_path / "m.npz"], tmp_path / "again.zarr", start=2, many=3, workers=1)
    np.testing.assert_allclose(open_volumes(tmp_path / "again.zarr").volume[1].values,
                               arrays["val_images"][0] / 256, atol=F16 / 2)


@pytest.mark.slow
def test_clusters_match_in_process(tmp_path: Path, niftis: dict) -> None:
    inline = convert([tmp_path / "in"], tmp_path / "a.zarr", chunk=1, workers=1)
    parallel = convert([tmp_path / "in"], tmp_path / "b.zarr", chunk=1, workers=2)
    with LocalCluster(n_workers=1, threads_per_worker=1, dashboard_address=None) as cluster:
        given = convert([tmp_path / "in"], tmp_path / "c.zarr", chunk=2,
                        cluster=cluster.scheduler_address)
    assert inline.converted == parallel.converted == given.converted == 5
    expected = open_volumes(tmp_path / "a.zarr").drop_attrs()
    xr.testing.assert_identical(open_volumes(tmp_path / "b.zarr").drop_attrs(), expected)
    np.testing.assert_array_equal(open_volumes(tmp_path / "c.zarr").volume, expected.volume)


def _reference(path: Path, low: float, high: float) -> np.ndarray:
    """A NIfTI read independently (nibabel, float64) and scaled to [0, 1]."""
    return _scaled(nib.as_closest_canonical(nib.load(path)).get_fdata(), low, high)


@pytest.mark.requires_data
def test_real_niftis(tmp_path: Path, shared_data: Path) -> None:
    ct = shared_data / "ct/ct_head.nii.gz"
    convert([ct], tmp_path / "ct.zarr", intensity="ct:brain", workers=1)
    ds = open_volumes(tmp_path / "ct.zarr")
    np.testing.assert_allclose(ds.volume[0].values, _reference(ct, 0, 80), atol=F16 / 2)
    np.testing.assert_allclose(ds.spacing[0].values, (0.957, 0.957, 1.5), atol=1e-3)
    mni = shared_data / "brain_1mm/mni152_t1_brain_1mm.nii.gz"
    convert([mni], tmp_path / "mni.zarr", intensity="range:0,1280", workers=1)
    ds = open_volumes(tmp_path / "mni.zarr")
    assert ds.volume.shape == (1, 182, 218, 182)
    np.testing.assert_allclose(ds.volume[0].values, _reference(mni, 0, 1280), atol=F16 / 2)
    ixi = sorted((shared_data / "ixi/t1").glob("*.nii.gz"))[:3]
    summary = convert(ixi, tmp_path / "ixi.zarr", workers=1)
    assert summary.converted == 3
    ds = open_volumes(tmp_path / "ixi.zarr")
    assert ds.volume.shape[1:] == (90, 120, 120)
    data = nib.as_closest_canonical(nib.load(ixi[1])).get_fdata()
    np.testing.assert_allclose(ds.volume[1].values,
                               _scaled(data, *np.percentile(data, [0.5, 99.5])), atol=F16)


@pytest.mark.requires_data
def test_real_dicom_and_medmnist(tmp_path: Path, shared_data: Path) -> None:
    summary = convert([shared_data / "dicom/trio_mprage",
                       shared_data / "small/pydicom_data_emri_small.dcm"],
                      tmp_path / "dcm.zarr", shape=(64, 64, 64), workers=1)
    assert summary.converted == 2
    ds = open_volumes(tmp_path / "dcm.zarr")
    np.testing.assert_array_equal(ds.original_shape.values, [[176, 256, 256], [64, 64, 10]])
    np.testing.assert_allclose(ds.spacing[0].values, (2.75, 4, 4), atol=1e-3)
    npz = shared_data / "medmnist/adrenalmnist3d.npz"
    summary = convert([npz], tmp_path / "adrenal.zarr", workers=1)
    assert summary.converted == 1584
    ds = open_volumes(tmp_path / "adrenal.zarr")
    with np.load(npz) as arrays:
        np.testing.assert_array_equal(ds.volume[-1].values, arrays["test_images"][-1] / 256)
    labels = summary.labels.read_text().splitlines() if summary.labels else []
    assert len(labels) == 1585 and labels[-1].startswith("test_297,test,")
    npz64 = shared_data / "medmnist/adrenalmnist3d_64.npz"
    convert([npz64], tmp_path / "a64.zarr", start=1188, many=10, workers=1)
    ds = open_volumes(tmp_path / "a64.zarr")
    with np.load(npz64) as arrays:
        np.testing.assert_array_equal(ds.volume.values, arrays["val_images"][:10] / 256)
