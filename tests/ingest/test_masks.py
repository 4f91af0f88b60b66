"""``raptorz masks``: label maps on the volumes' grids (issue #25)."""

from __future__ import annotations

import json
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from raptorz.errors import InputError, RaptorzWarning, SettingsError
from raptorz.ingest.conversion import volume_checksum
from raptorz.ingest.masks import build_masks, read_label_table
from raptorz.ingest.volumes import convert
from raptorz.layouts import MASKS, VOLUMES
from raptorz.stores import OK, read_status


def labels_of(shape: tuple[int, int, int]) -> np.ndarray:
    """Labels 0, 3 and 7 in blocks: asymmetric, so a wrong flip or transpose shows."""
    labels = np.zeros(shape, np.int16)
    labels[1:4, 2:5, 1:3] = 3
    labels[4:, :2, 3:] = 7
    return labels


def test_multilabel_maps_follow_their_volumes_orientation_and_padding(
        tmp_path: Path, write_nifti: Callable[..., Path],
        to_ras: Callable[[np.ndarray], np.ndarray]) -> None:
    """Each voxel's intensity is its label (times 10): after conversion with the oblique
    affine and padding, the stored mask must be the stored volume's intensities."""
    labels = labels_of((6, 7, 5))
    write_nifti(tmp_path / "a.nii.gz", labels * 10)
    (tmp_path / "masks").mkdir()
    write_nifti(tmp_path / "masks" / "a.nii.gz", labels)
    volumes = tmp_path / "v.zarr"
    convert([tmp_path / "a.nii.gz"], volumes, shape=(8, 8, 8), fit="pad",
            intensity="range:0,70", dtype="float32")
    summary = build_masks(tmp_path / "masks", volumes, tmp_path / "m.zarr")
    assert (summary.converted, summary.failed) == (1, 0)
    assert summary.labels == {"3": 3, "7": 7}
    mask = MASKS.open(tmp_path / "m.zarr")["mask"].values[0]
    volume = VOLUMES.open(volumes)["volume"].values[0]
    assert mask.dtype == np.uint16
    np.testing.assert_array_equal(mask, np.round(volume * 7))
    padded = np.zeros((8, 8, 8), np.int16)
    padded[1:6, 1:7, 0:7] = to_ras(labels)  # RAS shape (5, 6, 7), centred in 8^3
    np.testing.assert_array_equal(mask, padded)


def test_resampled_volumes_get_nearest_neighbour_masks(
        tmp_path: Path, write_nifti: Callable[..., Path],
        to_ras: Callable[[np.ndarray], np.ndarray]) -> None:
    labels = labels_of((6, 7, 5))
    write_nifti(tmp_path / "a.nii.gz", labels.astype(np.float32) + 1)
    (tmp_path / "masks").mkdir()
    write_nifti(tmp_path / "masks" / "a.nii.gz", labels)
    volumes = tmp_path / "v.zarr"
    convert([tmp_path / "a.nii.gz"], volumes, shape=(10, 12, 14))  # RAS (5, 6, 7) doubled
    build_masks(tmp_path / "masks", volumes, tmp_path / "m.zarr")
    mask = MASKS.open(tmp_path / "m.zarr")["mask"].values[0]
    expected = to_ras(labels).repeat(2, 0).repeat(2, 1).repeat(2, 2)
    np.testing.assert_array_equal(mask, expected)  # no label is interpolated into another


def test_a_mask_off_its_volumes_grid_fails_saying_how(
        tmp_path: Path, write_nifti: Callable[..., Path]) -> None:
    labels = labels_of((6, 7, 5))
    write_nifti(tmp_path / "a.nii.gz", labels * 1.0)
    write_nifti(tmp_path / "b.nii.gz", labels * 1.0)
    write_nifti(tmp_path / "c.nii.gz", labels * 1.0)
    (tmp_path / "masks").mkdir()
    write_nifti(tmp_path / "masks" / "a.nii.gz", labels, np.diag([1.0, 1, 1, 1]))
    shifted = nib.load(tmp_path / "b.nii.gz").affine.copy()
    shifted[:3, 3] += 2.0
    write_nifti(tmp_path / "masks" / "b.nii.gz", labels, shifted)
    write_nifti(tmp_path / "masks" / "c.nii.gz", labels[:, :, :4])
    volumes = tmp_path / "v.zarr"
    convert([tmp_path / f"{n}.nii.gz" for n in "abc"], volumes)
    summary = build_masks(tmp_path / "masks", volumes, tmp_path / "m.zarr")
    assert summary.failed == 3
    assert "spacing (1, 1, 1) mm vs (2, 3, 1) mm" in summary.failures["a"]
    assert "orientation RAS vs" in summary.failures["a"]
    assert "origin" in summary.failures["b"] and "spacing" not in summary.failures["b"]
    assert "shape (6, 7, 4) vs the volume's (6, 7, 5)" in summary.failures["c"]
    assert "masks/c.nii.gz" in summary.failures["c"]


def test_totalsegmentator_folders_with_a_class_map(
        tmp_path: Path, write_nifti: Callable[..., Path],
        to_ras: Callable[[np.ndarray], np.ndarray]) -> None:
    labels = labels_of((6, 7, 5))
    for volume_id in ("a", "b"):
        write_nifti(tmp_path / f"{volume_id}.nii.gz", labels * 1.0)
        folder = tmp_path / "seg" / volume_id
        folder.mkdir(parents=True)
        write_nifti(folder / "liver.nii.gz", (labels == 3).astype(np.uint8))
        write_nifti(folder / "spleen.nii.gz", (labels == 7).astype(np.uint8))
    # b's kidney overlaps its liver: one label per voxel, so b fails
    write_nifti(tmp_path / "seg" / "b" / "kidney.nii.gz", (labels > 0).astype(np.uint8))
    classes = tmp_path / "classes.json"
    classes.write_text(json.dumps({"1": "spleen", "2": "kidney", "5": "liver"}))
    volumes = tmp_path / "v.zarr"
    convert([tmp_path / "a.nii.gz", tmp_path / "b.nii.gz"], volumes)
    summary = build_masks(tmp_path / "seg", volumes, tmp_path / "m.zarr", labels=classes)
    assert summary.labels == {"spleen": 1, "kidney": 2, "liver": 5}
    assert list(summary.failures) == ["b"] and "overlaps" in summary.failures["b"]
    stored = MASKS.open(tmp_path / "m.zarr")
    assert stored.attrs["labels"] == {"spleen": 1, "kidney": 2, "liver": 5}
    expected = np.select([to_ras(labels) == 3, to_ras(labels) == 7], [5, 1], 0)
    np.testing.assert_array_equal(stored["mask"].values[0], expected)
    # a rerun redoes only b, once its overlap is gone
    (tmp_path / "seg" / "b" / "kidney.nii.gz").unlink()
    again = build_masks(tmp_path / "seg", volumes, tmp_path / "m.zarr", labels=classes)
    assert (again.converted, again.failed, again.skipped) == (1, 0, 1)
    assert (read_status(tmp_path / "m.zarr") == OK).all()
    with pytest.raises(InputError, match="other masks, volumes or labels"):
        build_masks(tmp_path / "seg", volumes, tmp_path / "m.zarr", labels={"liver": 1})


def test_a_changed_mask_is_kept_and_named_until_reconverted_and_its_checksum_follows(
        tmp_path: Path, write_nifti: Callable[..., Path]) -> None:
    labels = labels_of((6, 7, 5))
    for volume_id in ("a", "b"):
        write_nifti(tmp_path / f"{volume_id}.nii.gz", labels * 1.0)
        (tmp_path / "seg" / volume_id).mkdir(parents=True)
        write_nifti(tmp_path / "seg" / volume_id / "liver.nii.gz", (labels == 3).astype(np.uint8))
        write_nifti(tmp_path / "seg" / volume_id / "spleen.nii.gz", (labels == 7).astype(np.uint8))
    volumes, store = tmp_path / "v.zarr", tmp_path / "m.zarr"
    convert([tmp_path / "a.nii.gz", tmp_path / "b.nii.gz"], volumes)
    table = {"liver": 5, "spleen": 1}
    build_masks(tmp_path / "seg", volumes, store, labels=table)

    def stored() -> tuple[np.ndarray, np.ndarray]:
        ds = MASKS.open(store)
        masks, checksums = ds["mask"].values, ds["checksum"].values
        assert checksums.tolist() == [volume_checksum(m) for m in masks]
        return masks, checksums

    masks, checksums = stored()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RaptorzWarning)  # nothing changed: nothing said
        assert build_masks(tmp_path / "seg", volumes, store, labels=table).skipped == 2
    liver = np.zeros(labels.shape, np.uint8)
    liver[:2, :2, :2] = 1  # a's liver redrawn, inside its folder of binary masks
    write_nifti(tmp_path / "seg" / "a" / "liver.nii.gz", liver)
    with pytest.warns(RaptorzWarning, match=r"^a: mask changed since converted; kept"):
        assert build_masks(tmp_path / "seg", volumes, store, labels=table).converted == 0
    np.testing.assert_array_equal(stored()[1], checksums)
    again = build_masks(tmp_path / "seg", volumes, store, labels=table, reconvert_changed=True)
    assert (again.converted, again.failed, again.skipped) == (1, 0, 1)
    now, now_checksums = stored()
    assert now_checksums[0] != checksums[0] and now_checksums[1] == checksums[1]
    assert (now[0] == 5).sum() == 8 and not np.array_equal(now[0], masks[0])
    np.testing.assert_array_equal(now[1], masks[1])
    shutil.rmtree(tmp_path / "seg" / "b")
    with pytest.warns(RaptorzWarning, match=r"^b: no mask in the masks folder any more"):
        build_masks(tmp_path / "seg", volumes, store, labels=table, reconvert_changed=True)
    np.testing.assert_array_equal(stored()[1], now_checksums)


def test_binary_folders_without_a_table_are_numbered_by_name(
        tmp_path: Path, write_nifti: Callable[..., Path]) -> None:
    labels = labels_of((6, 7, 5))
    write_nifti(tmp_path / "a.nii.gz", labels * 1.0)
    write_nifti(tmp_path / "b.nii.gz", labels * 1.0)
    (tmp_path / "seg" / "a").mkdir(parents=True)
    write_nifti(tmp_path / "seg" / "a" / "tumour.nii.gz", (labels == 3).astype(np.uint8))
    write_nifti(tmp_path / "seg" / "a" / "edema.nii.gz", (labels == 7).astype(np.uint8))
    convert([tmp_path / "a.nii.gz", tmp_path / "b.nii.gz"], tmp_path / "v.zarr")
    summary = build_masks(tmp_path / "seg", tmp_path / "v.zarr", tmp_path / "m.zarr")
    assert summary.labels == {"edema": 1, "tumour": 2}
    assert "b: no mask in the masks folder" in summary.failures["b"]
    write_nifti(tmp_path / "seg" / "b.nii.gz", labels)  # a label map beside: ambiguous
    with pytest.raises(SettingsError, match="mixes label maps and folders"):
        build_masks(tmp_path / "seg", tmp_path / "v.zarr", tmp_path / "other.zarr")


def test_label_tables(tmp_path: Path) -> None:
    (tmp_path / "t.tsv").write_text("value\tname\n1\tspleen\n2\tkidney_right\n")
    assert read_label_table(tmp_path / "t.tsv") == {"spleen": 1, "kidney_right": 2}
    (tmp_path / "t.csv").write_text("liver,5\n")
    assert read_label_table(tmp_path / "t.csv") == {"liver": 5}
    (tmp_path / "t.json").write_text('{"liver": 5, "spleen": 1}')
    assert read_label_table(tmp_path / "t.json") == {"liver": 5, "spleen": 1}
    (tmp_path / "bad.json").write_text('{"liver": "five"}')
    with pytest.raises(InputError, match="bad.json.*no label value"):
        read_label_table(tmp_path / "bad.json")


@pytest.mark.requires_data
def test_real_prostate_label_map_in_lps(shared_data: Path, tmp_path: Path) -> None:
    """The prostate phantom: LPS, anisotropic voxels, labels 1, 7, 8, 9; NRRD masks."""
    roi = shared_data / "roi"
    (tmp_path / "masks").mkdir()
    shutil.copy(roi / "prostate_phantom_subvolume-label.nrrd",
                tmp_path / "masks" / "prostate_phantom_subvolume.nrrd")
    volumes = tmp_path / "v.zarr"
    convert([roi / "prostate_phantom_subvolume.nrrd"], volumes, workers=1)
    table = tmp_path / "labels.tsv"
    table.write_text("1\tgland\n7\tzone_a\n8\tzone_b\n9\tzone_c\n")
    summary = build_masks(tmp_path / "masks", volumes, tmp_path / "m.zarr", labels=table)
    assert summary.failed == 0
    import SimpleITK as sitk

    mask = MASKS.open(tmp_path / "m.zarr")["mask"].values[0]
    source = sitk.GetArrayFromImage(sitk.ReadImage(str(roi / "prostate_phantom_subvolume-label"
                                                             ".nrrd")))
    assert mask.shape == VOLUMES.open(volumes)["volume"].shape[1:] == source.shape[::-1]
    # reoriented, not resampled: every label keeps its voxels
    for value in (0, 1, 7, 8, 9):
        assert (mask == value).sum() == (source == value).sum() > 0


def test_a_volume_id_never_reaches_outside_the_masks_folder(tmp_path: Path) -> None:
    """Ids come from a volumes store, which may be hostile: ``../outside`` must not match
    a folder beside the masks folder, only the folder's own entries do."""
    from raptorz.ingest.masks import find_masks

    masks = tmp_path / "masks"
    (masks / "case1").mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "liver.nii.gz").write_bytes(b"")
    found = find_masks(masks, ["case1", "../outside", str(tmp_path / "outside")])
    assert found == {"case1": masks / "case1"}
