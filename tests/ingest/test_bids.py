"""BIDS datasets: images by entities, ids, labels from participants.tsv, derivatives."""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from raptorz.cli.main import main
from raptorz.downstream.labels import encode_targets, read_labels, store_index
from raptorz.errors import InputError, RaptorzWarning, SettingsError
from raptorz.ingest.bids import BidsQuery, bids_sources
from raptorz.ingest.volumes import convert
from raptorz.layouts import open_volumes

MNI = "space-MNI152NLin2009cAsym"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory, volume: Callable[..., np.ndarray],
            write_nifti: Callable[..., Path]) -> Path:
    """Six subjects of two sessions (sub-01's second of two runs), a T2w, a subject listed
    with no image (sub-07), one with images but not listed (sub-08), sidecars at the root
    and beside one image, sub-01's sessions.tsv, and fMRIPrep derivatives of sub-01."""
    root = tmp_path_factory.mktemp("bids") / "ds"
    root.mkdir()
    (root / "dataset_description.json").write_text(json.dumps(
        {"Name": "tiny", "BIDSVersion": "1.9.0"}))
    (root / "T1w.json").write_text(json.dumps(
        {"MagneticFieldStrength": 3, "Manufacturer": "Siemens", "EchoTime": 0.003}))
    rows = ["participant_id\tage\tsex"] + [
        f"sub-{s:02d}\t{20 + 7 * s}\t{'MF'[s % 2]}" for s in range(1, 8)]
    (root / "participants.tsv").write_text("\n".join(rows) + "\n")
    seed = 0
    for s in (*range(1, 7), 8):
        for ses in (1, 2):
            anat = root / f"sub-{s:02d}" / f"ses-{ses}" / "anat"
            anat.mkdir(parents=True)
            runs = ("_run-1", "_run-2") if (s, ses) == (1, 2) else ("",)
            for run in runs:
                seed += 1
                write_nifti(anat / f"sub-{s:02d}_ses-{ses}{run}_T1w.nii.gz",
                            volume((6, 7, 5), seed=seed))
    (root / "sub-01/ses-1/anat/sub-01_ses-1_T2w.nii.gz").write_bytes(
        (root / "sub-01/ses-1/anat/sub-01_ses-1_T1w.nii.gz").read_bytes())
    (root / "sub-02/ses-2/anat/sub-02_ses-2_T1w.json").write_text(json.dumps(
        {"MagneticFieldStrength": 1.5, "ManufacturersModelName": "Avanto"}))
    (root / "sub-01/sub-01_sessions.tsv").write_text(
        "session_id\tage\tscanner_site\nses-1\t27.5\tA\nses-2\t29\tn/a\n")
    anat = root / "derivatives/fmriprep/sub-01/ses-1/anat"
    anat.mkdir(parents=True)
    (root / "derivatives/fmriprep/dataset_description.json").write_text(json.dumps(
        {"Name": "fMRIPrep", "BIDSVersion": "1.9.0", "DatasetType": "derivative"}))
    write_nifti(anat / f"sub-01_ses-1_{MNI}_desc-preproc_T1w.nii.gz", volume((6, 7, 5)))
    write_nifti(anat / f"sub-01_ses-1_{MNI}_desc-brain_mask.nii.gz",
                np.ones((6, 7, 5), np.uint8))
    return root


def _ids(root: Path, filters: str, derivatives: str | None = None) -> list[str]:
    return [s.id for s in bids_sources(root, BidsQuery.parse(filters, derivatives))]


def test_ids_keep_the_entities_that_vary(dataset: Path) -> None:
    assert _ids(dataset, "suffix=T1w")[:4] == [
        "sub-01_ses-1", "sub-01_ses-2_run-1", "sub-01_ses-2_run-2", "sub-02_ses-1"]
    assert _ids(dataset, "suffix=T1w,session=2,run=2") == ["sub-01"]
    assert _ids(dataset, "suffix=T1w,ses=1") == [f"sub-{s:02d}" for s in (*range(1, 7), 8)]
    assert _ids(dataset, "suffix=T2w,datatype=anat") == ["sub-01"]
    assert _ids(dataset, f"suffix=T1w,{MNI[:5]}={MNI[6:]},desc=preproc", "fmriprep") == [
        "sub-01"]
    assert _ids(dataset, "suffix=mask,desc=brain", "fmriprep") == ["sub-01"]


def _rows(path: Path) -> dict[str, dict[str, str]]:
    with path.open(newline="") as file:
        return {row["id"]: row for row in csv.DictReader(file)}


def test_convert_writes_participants_sessions_and_sidecars_split_by_subject(
        dataset: Path, tmp_path: Path) -> None:
    with pytest.warns(RaptorzWarning) as caught:
        summary = convert([dataset], tmp_path / "t1.zarr", bids={"suffix": "T1w"})
    messages = [str(w.message) for w in caught]
    assert any("1 subject(s) have no image matching suffix=T1w: sub-07" in m for m in messages)
    assert any("lists no subject of 2 image(s), converted with no labels: sub-08_ses-1, "
               "sub-08_ses-2" in m for m in messages)
    assert summary.ok and summary.converted == 15 and summary.labels is not None
    rows = _rows(summary.labels)
    assert list(rows) == list(open_volumes(tmp_path / "t1.zarr").id.values)
    assert list(next(iter(rows.values()))) == [
        "id", "split", "age", "sex", "scanner_site", "MagneticFieldStrength", "Manufacturer",
        "EchoTime", "ManufacturersModelName"]
    assert rows["sub-01_ses-1"]["age"] == "27.5" and rows["sub-01_ses-1"]["scanner_site"] == "A"
    assert rows["sub-01_ses-2_run-1"]["age"] == "29" and rows["sub-01_ses-2_run-1"][
        "scanner_site"] == ""
    assert rows["sub-03_ses-2"]["age"] == "41" and rows["sub-03_ses-2"]["sex"] == "F"
    assert rows["sub-08_ses-1"]["age"] == "" and rows["sub-08_ses-1"]["split"]
    assert (rows["sub-02_ses-2"]["MagneticFieldStrength"], rows["sub-02_ses-1"][
        "MagneticFieldStrength"]) == ("1.5", "3")
    assert rows["sub-02_ses-2"]["ManufacturersModelName"] == "Avanto"
    assert rows["sub-02_ses-2"]["Manufacturer"] == "Siemens"
    by_subject: dict[str, set[str]] = {}
    for volume_id, row in rows.items():
        by_subject.setdefault(volume_id.split("_")[0], set()).add(row["split"])
    assert all(len(splits) == 1 for splits in by_subject.values())
    assert {s for splits in by_subject.values() for s in splits} == {"train", "val", "test"}
    # another selection of the dataset splits each subject alike; another seed does not
    with pytest.warns(RaptorzWarning):
        again = convert([dataset], tmp_path / "ses1.zarr", bids="suffix=T1w,ses=1")
    assert again.labels is not None
    assert {i: r["split"] for i, r in _rows(again.labels).items()} == {
        s: next(iter(splits)) for s, splits in by_subject.items()}
    with pytest.warns(RaptorzWarning):
        other = convert([dataset], tmp_path / "seed.zarr", bids="suffix=T1w,ses=1",
                        split_seed=5, labels_out=tmp_path / "seed.csv")
    assert other.labels == tmp_path / "seed.csv"
    assert {i: r["split"] for i, r in _rows(other.labels).items()} != {
        s: next(iter(splits)) for s, splits in by_subject.items()}


def test_refusals(dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "v.zarr"
    with pytest.raises(InputError, match="is not a BIDS dataset root: it has no "
                       "dataset_description.json"):
        convert([dataset / "sub-01"], out, bids="suffix=T1w")
    with pytest.raises(InputError, match="ds: is a BIDS dataset: choose its images by "
                       "entities, e.g. --bids suffix=T1w"):
        convert([dataset], out)
    with pytest.raises(InputError, match=r"no image matches suffix=FLAIR \(of its 16 NIfTI "
                       r"images, suffixes: T1w, T2w\)"):
        convert([dataset], out, bids="suffix=FLAIR")
    with pytest.raises(InputError, match="has no derivatives 'freesurfer' .derivatives/ "
                       "holds: fmriprep"):
        convert([dataset], out, bids="suffix=T1w", bids_derivatives="freesurfer")
    with pytest.raises(SettingsError, match="bids: name the images' suffix"):
        convert([dataset], out, bids="ses=1")
    with pytest.raises(SettingsError, match="bids: expected ENTITY=VALUE"):
        convert([dataset], out, bids="T1w")
    with pytest.raises(SettingsError, match="bids: reads one BIDS dataset"):
        convert([dataset, dataset], out, bids="suffix=T1w")
    with pytest.raises(SettingsError, match="split_fractions: expected TRAIN,VAL,TEST"):
        convert([dataset], out, bids="suffix=T1w", split_fractions=(0.5, 0.5, 0.5))
    with pytest.raises(SettingsError, match="bids_derivatives: .* give bids= too"):
        convert([dataset], out, bids_derivatives="fmriprep")
    assert not out.exists()


def test_cli_writes_labels_that_fit_reads(dataset: Path, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    store = tmp_path / "t1.zarr"
    with pytest.warns(RaptorzWarning) as caught:
        code = main(["convert", str(dataset), "-o", str(store), "--bids", "suffix=T1w,ses=1",
                     "--split-seed", "3", "--split-fractions", "0.5,0.25,0.25"])
    assert code == 0 and len(caught) == 2
    out = capsys.readouterr().out
    path = tmp_path / "t1.labels.csv"
    assert "7 converted, 0 failed" in out and f"labels: {path}" in out
    labels = read_labels(path, ["age"])
    ids = open_volumes(store).id.values
    assert sorted(labels.ids) == sorted(ids) and (store_index(labels.ids, ids) >= 0).all()
    assert {"train", "val", "test"} == set(labels.split)
    targets, _ = encode_targets(labels, "regression")
    assert np.isnan(targets.values[list(labels.ids).index("sub-08")]).all()
    assert main(["convert", str(dataset), "-o", str(store), "--bids", "suffix=T1w",
                 "--bids-derivatives", "nope"]) == 2
    assert "has no derivatives 'nope'" in capsys.readouterr().err


@pytest.mark.filterwarnings("ignore::raptorz.errors.RaptorzWarning")  # sub-07, sub-08
def test_an_oversized_sidecar_is_refused_before_it_is_read(dataset: Path,
                                                           tmp_path: Path) -> None:
    """A dataset is untrusted: a sidecar over 16 MiB (sparse here: nothing is written) is
    refused by its size, naming the file, not read into memory."""
    import shutil

    root = tmp_path / "ds"
    shutil.copytree(dataset, root)
    with (root / "T1w.json").open("r+b") as file:
        file.truncate(17 * 2**20)
    with pytest.raises(InputError, match=r"T1w\.json: holds 17825792 bytes, over the 16 MiB"):
        convert([root], tmp_path / "v.zarr", bids="suffix=T1w")
