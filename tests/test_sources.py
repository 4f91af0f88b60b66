"""Resolving paths, folders, globs and manifests into volumes to convert."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from volume_files import volume, write_dicom_series, write_nifti, write_npz

from raptorz.errors import InputError, RaptorzError
from raptorz.ingest.sources import resolve_sources, write_labels


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    for name in ("a.nii.gz", "b.nii", "c.nii.gz"):
        write_nifti(tmp_path / name, volume())
    (tmp_path / "readme.txt").write_text("not listed")
    return tmp_path


def test_paths_folders_and_globs(folder: Path) -> None:
    assert [s.id for s in resolve_sources([folder])] == ["a", "b", "c"]
    assert [s.id for s in resolve_sources([str(folder / "*.nii.gz")])] == ["a", "c"]
    assert [s.kind for s in resolve_sources([folder / "b.nii"])] == ["nifti"]
    with pytest.raises(InputError, match=r"\*.zip: the pattern matches no file"):
        resolve_sources([str(folder / "*.zip")])


def test_manifest_start_many(folder: Path) -> None:
    manifest = folder / "list.txt"
    manifest.write_text("# volumes\nc.nii.gz\n\na.nii.gz\nb.nii\n")
    chosen = resolve_sources(manifest=manifest, start=1, many=1)
    assert [(s.id, s.path) for s in chosen] == [("a", str(folder / "a.nii.gz"))]
    assert [s.id for s in resolve_sources(manifest=manifest, folder=folder, start=1)] == [
        "a", "b"]
    with pytest.raises(InputError, match="start: 5 is past the last of the 3 volumes"):
        resolve_sources(manifest=manifest, start=5)


@pytest.mark.parametrize("name", ["../outside.nii.gz", "/etc/passwd", "sub/../../x.nii"])
def test_manifest_names_escaping_the_folder_are_refused(folder: Path, name: str) -> None:
    manifest = folder / "list.txt"
    manifest.write_text(f"a.nii.gz\n{name}\n")
    with pytest.raises(InputError, match=f"list.txt: line 2: '{name}' escapes --folder"):
        resolve_sources(manifest=manifest, folder=folder)


def test_empty_manifest_is_refused(tmp_path: Path) -> None:
    manifest = tmp_path / "empty.txt"
    manifest.write_text("\n# nothing\n")
    with pytest.raises(InputError, match="empty.txt: the manifest lists no volumes"):
        resolve_sources(manifest=manifest)


def test_duplicate_ids_are_refused(folder: Path) -> None:
    (folder / "again").mkdir()
    write_nifti(folder / "again" / "a.nii", volume())
    with pytest.raises(RaptorzError, match=r"1 duplicate volume ids \('a' from .*a.nii.gz and "
                       r".*again/a.nii\)"):
        resolve_sources([folder, folder / "again"])


def test_npz_manifest_and_labels_csv(tmp_path: Path) -> None:
    arrays = write_npz(tmp_path / "m.npz", {"train": 2, "val": 2, "test": 1})
    manifest = tmp_path / "names.txt"
    manifest.write_text("val_1\ntrain_0\n")
    chosen = resolve_sources(manifest=manifest, folder=tmp_path / "m.npz")
    assert [(s.entry, s.index) for s in chosen] == [("val_images", 1), ("train_images", 0)]
    csv = write_labels(chosen, tmp_path / "labels.csv")
    assert csv is not None
    expected = [f"val_1,val,{arrays['val_labels'][1, 0]}",
                f"train_0,train,{arrays['train_labels'][0, 0]}"]
    assert csv.read_text().splitlines() == ["id,split,label", *expected]
    manifest.write_text("val_7\n")
    with pytest.raises(InputError, match=r"names \['val_7'\] are not volumes of"):
        resolve_sources(manifest=manifest, folder=tmp_path / "m.npz")
    assert write_labels(resolve_sources([write_nifti(tmp_path / "x.nii", volume())]),
                        tmp_path / "none.csv") is None
    assert not np.any([p.name == "none.csv" for p in tmp_path.iterdir()])


def test_relative_paths_become_absolute(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(folder)
    assert [s.path for s in resolve_sources(["a.nii.gz", "./b.nii"])] == [
        str(folder / "a.nii.gz"), str(folder / "b.nii")]


def test_folder_of_dicom_series(tmp_path: Path) -> None:
    data = volume((4, 4, 3)).astype(np.float32)
    write_dicom_series(tmp_path / "dicom" / "s1", data)
    write_dicom_series(tmp_path / "dicom" / "s2", data)
    chosen = resolve_sources([tmp_path / "dicom"])
    assert [(s.id, s.kind) for s in chosen] == [("s1", "dicom"), ("s2", "dicom")]
