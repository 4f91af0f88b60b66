"""Region embeddings end to end on real scans and masks (issue #25): ``raptorz convert``,
``masks`` (a label map per CT volume, TotalSegmentator-style folders of binary masks for
the tumour and the lesion), ``embed --masks`` in both modes, ``info``, ``fit --region``
and ``predict`` with the tiny random ViT at a small ``--shape``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from raptorz.cli.main import main
from raptorz.layouts import REGION_ABSENT, open_embeddings, open_masks
from raptorz.stores import OK

#: Head CT sub-volumes (x, y, z corners; 96 x 96 x 40 voxels each).
CORNERS = [(x, y, z) for x in (40, 80, 120) for y in (40, 100) for z in (20, 60)]


@pytest.fixture(scope="module")
def sources(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Volumes ``src/*`` and masks ``seg/*``: CT blocks thresholded into bone (HU > 300)
    and soft tissue (0 to 100 HU) label maps; brain2 and breast1 with binary masks."""
    root = tmp_path_factory.mktemp("regions")
    (root / "src").mkdir()
    (root / "seg").mkdir()
    ct = nib.load(shared_data / "ct" / "ct_head.nii.gz")
    hu = np.asarray(ct.dataobj, np.int16)
    for n, (x, y, z) in enumerate(CORNERS):
        block = hu[x:x + 96, y:y + 96, z:z + 40]
        affine = ct.affine @ nib.affines.from_matvec(np.eye(3), [x, y, z])
        nib.save(nib.Nifti1Image(block, affine), root / "src" / f"ct_{n:02d}.nii.gz")
        labels = np.select([block > 300, (block >= 0) & (block <= 100)], [1, 2], 0)
        nib.save(nib.Nifti1Image(labels.astype(np.uint8), affine),
                 root / "seg" / f"ct_{n:02d}.nii.gz")
    roi = shared_data / "roi"
    for name, structure in (("brain2", "tumour"), ("breast1", "lesion")):
        shutil.copy(roi / f"{name}_image.nrrd", root / "src" / f"{name}.nrrd")
        (root / "seg" / name).mkdir()
        shutil.copy(roi / f"{name}_label.nrrd", root / "seg" / name / f"{structure}.nrrd")
    (root / "classes.tsv").write_text("1\tbone\n2\tsoft_tissue\n3\ttumour\n4\tlesion\n")
    return root


@pytest.fixture(scope="module")
def stores_made(sources: Path, tiny_vit_weights: tuple[str, Path]) -> Path:
    root = sources
    assert main(["convert", str(root / "src"), "-o", str(root / "v.zarr"),
                 "--shape", "12,12,8", "--workers", "1"]) == 0
    assert main(["masks", str(root / "seg"), str(root / "v.zarr"), "-o", str(root / "m.zarr"),
                 "--labels", str(root / "classes.tsv")]) == 0
    assert main(["projector", "--seed", "0", "--dim", "64", "--k", "4",
                 "-o", str(root / "p4.npy")]) == 0
    name, weights = tiny_vit_weights
    for mode, regions in (("onepass", "bone,soft_tissue,3"), ("crop", "all")):
        assert main(["embed", str(root / "v.zarr"), "-o", str(root / f"{mode}.zarr"),
                     "--projector", str(root / "p4.npy"), "--encoder", name,
                     "--weights", str(weights), "--workers", "1", "--dashboard-address",
                     ":0", "--masks", str(root / "m.zarr"), "--regions", regions,
                     "--region-mode", mode, "--margin-mm", "5",
                     *(["--keep-tokens"] if mode == "onepass" else [])]) == 0
    return root


@pytest.fixture(scope="module")
def labels(stores_made: Path) -> Path:
    """Bone volume fraction per CT block (from its label map); fixed splits."""
    rows = []
    for n in range(len(CORNERS)):
        seg = np.asarray(nib.load(stores_made / "seg" / f"ct_{n:02d}.nii.gz").dataobj)
        split = "train" if n < 6 else "val" if n < 9 else "test"
        rows.append({"id": f"ct_{n:02d}", "split": split, "bone": float((seg == 1).mean())})
    path = stores_made / "labels.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


@pytest.mark.slow
@pytest.mark.requires_data
def test_both_modes_store_every_region_with_its_status(stores_made: Path) -> None:
    """A region is ok exactly where the stored mask holds it (every voxel lies on a slice
    of each plane), absent elsewhere; its projections are finite exactly where ok."""
    masks = open_masks(stores_made / "m.zarr")["mask"].values
    for mode, labels in (("onepass", [1, 2, 3]), ("crop", [1, 2, 3, 4])):
        store = open_embeddings(stores_made / f"{mode}.zarr")
        assert store["p4"].dims == ("id", "roi", "plane", "k_p4", "token")
        assert store["roi_label"].values.tolist() == labels
        assert store.attrs["regions"]["mode"] == mode
        held = np.array([[(mask == label).any() for label in labels] for mask in masks])
        status = store["region_status"].values
        np.testing.assert_array_equal(status, np.where(held, OK, REGION_ABSENT))
        assert np.isfinite(store["p4"].values[held]).all()
        assert np.isnan(store["p4"].values[~held]).all()
    ids = store["id"].values.tolist()
    assert ids[:2] == ["brain2", "breast1"]
    assert held[2:, :2].all() and held[1, 3]  # every block's bone and soft tissue; the lesion
    assert store["roi"].values.tolist() == ["bone", "soft_tissue", "tumour", "lesion"]
    assert store.attrs["regions"]["margin_mm"] == 5


@pytest.mark.slow
@pytest.mark.requires_data
def test_info_lists_regions(stores_made: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", str(stores_made / "onepass.zarr")]) == 0
    out = capsys.readouterr().out
    assert "tumour (label 3): " in out and " absent" in out
    assert main(["info", str(stores_made / "m.zarr")]) == 0
    assert "bone=1, soft_tissue=2, tumour=3, lesion=4" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.requires_data
def test_fit_and_predict_on_a_region(stores_made: Path, labels: Path) -> None:
    """Bone volume fraction per CT block, fitted on the bone and soft tissue features."""
    results = stores_made / "results"
    assert main(["fit", str(stores_made / "onepass.zarr"), "--labels",
                 str(labels), "-o", str(results), "--region",
                 "bone,soft_tissue", "--bootstrap", "0"]) == 0
    model = json.loads((results / "model" / "model.json").read_text())
    assert model["feature"] == "p4@bone,soft_tissue"
    assert np.isfinite(pd.read_csv(results / "predictions.csv")["bone"]).all()
    out = stores_made / "predicted.csv"
    assert main(["predict", str(stores_made / "onepass.zarr"), "--model",
                 str(results / "model"), "-o", str(out)]) == 0
    predicted = pd.read_csv(out)
    # every CT block holds both regions; brain2 and breast1 hold no bone: left out
    assert sorted(predicted.iloc[:, 0]) == [f"ct_{n:02d}" for n in range(len(CORNERS))]
    assert main(["fit", str(stores_made / "onepass.zarr"), "--labels",
                 str(labels), "-o", str(stores_made / "r2"),
                 "--bootstrap", "0"]) == 2  # a region store needs --region


@pytest.mark.slow
@pytest.mark.requires_data
def test_sweep_on_a_region(stores_made: Path, labels: Path) -> None:
    output = stores_made / "sweep"
    assert main(["sweep", str(stores_made / "onepass.zarr"), "--labels", str(labels), "-o",
                 str(output), "--region", "bone", "--k", "2,3", "--seeds", "0",
                 "--planes", "A,ACS"]) == 0
    runs = pd.read_csv(output / "runs.csv")
    assert len(runs) == 4 and np.isfinite(runs["score"]).all()


@pytest.mark.slow
@pytest.mark.requires_data
def test_reproject_a_region_store(stores_made: Path) -> None:
    """A new projector of a region store's stored tokens keeps the ``roi`` dimension:
    each region's projection of its own pooled tokens (float64 reference, 1e-6), NaN
    where the region is absent."""
    path = stores_made / "onepass.zarr"
    assert main(["projector", "--seed", "7", "--dim", "64", "--k", "3",
                 "-o", str(stores_made / "q3.npy")]) == 0
    assert main(["reproject", str(path), "--projector", str(stores_made / "q3.npy")]) == 0
    store = open_embeddings(path)
    assert store["q3"].dims == ("id", "roi", "plane", "k_q3", "token")
    tokens = store["tokens"].values.astype(np.float64)
    expected = np.einsum("irptd,dk->irpkt", tokens, np.load(stores_made / "q3.npy"))
    ok = store["region_status"].values == OK
    np.testing.assert_allclose(store["q3"].values[ok], expected[ok], rtol=1e-6, atol=1e-6)
    assert np.isnan(store["q3"].values[~ok]).all()
    assert "q3" in store.attrs["projectors"]
