"""Resolving paths, folders, globs and manifests into volumes to convert."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from raptorz.errors import InputError, RaptorzError, RaptorzWarning, SettingsError
from raptorz.ingest.readers import ReadOptions, read_volume
from raptorz.ingest.sources import resolve_sources, write_labels


@pytest.fixture
def folder(tmp_path: Path, volume: Callable[..., np.ndarray],
           write_nifti: Callable[..., Path]) -> Path:
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
    with pytest.raises(SettingsError, match="start: 5 is past the last of the 3 volumes"):
        resolve_sources(manifest=manifest, start=5)


@pytest.mark.parametrize("name", ["../outside.nii.gz", "/etc/passwd", "sub/../../x.nii"])
def test_manifest_names_escaping_the_folder_are_refused(folder: Path, name: str) -> None:
    manifest = folder / "list.txt"
    manifest.write_text(f"a.nii.gz\n{name}\n")
    with pytest.raises(InputError, match=f"list.txt: line 2: '{name}' escapes the folder"):
        resolve_sources(manifest=manifest, folder=folder)


def test_empty_manifest_is_refused(tmp_path: Path) -> None:
    manifest = tmp_path / "empty.txt"
    manifest.write_text("\n# nothing\n")
    with pytest.raises(InputError, match="empty.txt: the manifest lists no volumes"):
        resolve_sources(manifest=manifest)


def test_duplicate_ids_are_refused(folder: Path, volume: Callable[..., np.ndarray],
                                   write_nifti: Callable[..., Path]) -> None:
    (folder / "again").mkdir()
    write_nifti(folder / "again" / "a.nii", volume())
    with pytest.raises(RaptorzError, match=r"1 duplicate volume ids \('a' from .*a.nii.gz and "
                       r".*again/a.nii\)"):
        resolve_sources([folder, folder / "again"])


def test_npz_manifest_and_labels_csv(tmp_path: Path, volume: Callable[..., np.ndarray],
                                     write_nifti: Callable[..., Path],
                                     write_npz: Callable[..., dict]) -> None:
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


def test_folder_of_dicom_series(tmp_path: Path, volume: Callable[..., np.ndarray],
                                write_dicom_series: Callable[..., Path]) -> None:
    data = volume((4, 4, 3)).astype(np.float32)
    write_dicom_series(tmp_path / "dicom" / "s1", data)
    write_dicom_series(tmp_path / "dicom" / "s2", data)
    chosen = resolve_sources([tmp_path / "dicom"])
    assert [(s.id, s.kind) for s in chosen] == [("s1", "dicom"), ("s2", "dicom")]


def test_unreadable_npz_labels_are_reported(tmp_path: Path) -> None:
    """Images fine, labels missing, unreadable or short: a warning naming file and array."""
    images = np.zeros((2, 4, 4, 4), np.uint8)
    np.savez(tmp_path / "m.npz", train_images=images, train_labels=np.array([[1], [0]]),
             val_images=images, test_images=images,
             test_labels=np.array([{"a": 1}, None], dtype=object))
    chosen = resolve_sources([tmp_path / "m.npz"])
    with pytest.warns(RaptorzWarning) as caught:
        csv = write_labels(chosen, tmp_path / "labels.csv")
    messages = [str(w.message) for w in caught]
    assert len(messages) == 2
    assert messages[0].startswith(f"{tmp_path / 'm.npz'}: labels val_labels has no such array")
    assert messages[1].startswith(f"{tmp_path / 'm.npz'}: labels test_labels cannot be read")
    assert csv is not None and csv.read_text().splitlines() == [
        "id,split,label", "train_0,train,1", "train_1,train,0"]
    np.savez(tmp_path / "short.npz", train_images=images, train_labels=np.array([1]))
    with pytest.warns(RaptorzWarning, match=r"short.npz: labels train_labels has shape "
                      r"\(1, 1\), but there are 2 images"):
        assert write_labels(resolve_sources([tmp_path / "short.npz"]), tmp_path / "s.csv") is None


@pytest.fixture
def write_study(volume: Callable[..., np.ndarray], write_dicom_series: Callable[..., Path]
                ) -> Callable[[Path], dict[str, np.ndarray]]:
    """``write_study(folder) -> values``: two 12-slice series and a 3-slice localizer in one
    folder, files interleaved."""
    def write_study(folder: Path) -> dict[str, np.ndarray]:
        series = {
            "t1": (2, "T1 MPRAGE", volume((4, 5, 12), seed=1), ()),
            "flair": (3, "T2 FLAIR", volume((4, 5, 12), seed=2), ()),
            "loc": (1, "Localizer", volume((4, 5, 3), seed=3),
                    ("ORIGINAL", "PRIMARY", "LOCALIZER")),
        }
        out = {}
        for name, (number, description, data, image_type) in series.items():
            values = data.astype(np.float32) * 2 - 100  # what survives the slope of 2
            write_dicom_series(folder, values, names=name, number=number,
                               description=description, image_type=image_type)
            out[name] = values
        return out
    return write_study


def test_dicom_study_gives_one_volume_per_series_and_skips_the_localizer(
        tmp_path: Path, write_study: Callable[[Path], dict[str, np.ndarray]]) -> None:
    data = write_study(tmp_path / "study")
    with pytest.warns(RaptorzWarning, match=r"study: skipped DICOM series 1 'Localizer' "
                      r"\(a localizer\)") as caught:
        chosen = resolve_sources([tmp_path / "study"])
    assert len(caught) == 1
    assert [(s.id, s.kind) for s in chosen] == [("study_2_t1_mprage", "dicom"),
                                                ("study_3_t2_flair", "dicom")]
    assert str(chosen[0]) == f"{tmp_path / 'study'}::study_2_t1_mprage"
    for source, name in zip(chosen, ("t1", "flair"), strict=True):
        read = read_volume(source, ReadOptions(orientation="native"))
        np.testing.assert_array_equal(read.data, data[name])
    only = resolve_sources([tmp_path / "study"], series=["t2 flair"])
    assert [s.id for s in only] == ["study_3_t2_flair"]
    named = resolve_sources([tmp_path / "study"], series=["1", "study_2_t1_mprage"])
    assert [s.id for s in named] == ["study_1_localizer", "study_2_t1_mprage"]
    with pytest.warns(RaptorzWarning) as caught, pytest.raises(
            RaptorzError, match="nothing to convert: 0 volumes found"):
        resolve_sources([tmp_path / "study"], min_slices=13)
    assert [str(w.message).split(": ", 1)[1] for w in caught] == [
        "skipped DICOM series 1 'Localizer' (a localizer)",
        "skipped DICOM series 2 'T1 MPRAGE' (12 slices, under --min-slices 13)",
        "skipped DICOM series 3 'T2 FLAIR' (12 slices, under --min-slices 13)"]


def test_dicom_series_ids_are_made_unique(tmp_path: Path, volume: Callable[..., np.ndarray],
                                          write_dicom_series: Callable[..., Path]) -> None:
    for seed in (1, 2):
        write_dicom_series(tmp_path / "s", volume((4, 4, 3), seed=seed).astype(np.float32),
                           names=f"x{seed}", number=5, description="Repeat")
    write_dicom_series(tmp_path / "s", volume((4, 4, 3)).astype(np.float32), names="y")
    chosen = resolve_sources([tmp_path / "s"], min_slices=2)
    assert [s.id for s in chosen][:2] == ["s_5_repeat", "s_5_repeat_2"]
    assert chosen[2].id == f"s_{chosen[2].entry}"  # no number, no description: the UID


def test_dicom_study_through_the_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                     write_study: Callable[[Path], dict[str, np.ndarray]]) -> None:
    from raptorz.cli.main import main
    from raptorz.layouts import open_volumes

    write_study(tmp_path / "study")
    store = tmp_path / "all.zarr"
    with pytest.warns(RaptorzWarning, match="skipped DICOM series 1 'Localizer'"):
        assert main(["convert", str(tmp_path / "study"), "-o", str(store)]) == 0
    assert "2 converted, 0 failed" in capsys.readouterr().out
    assert list(open_volumes(store).id.values) == ["study_2_t1_mprage", "study_3_t2_flair"]
    one = tmp_path / "one.zarr"
    assert main(["convert", str(tmp_path / "study"), "-o", str(one), "--series", "3"]) == 0
    assert list(open_volumes(one).id.values) == ["study_3_t2_flair"]
