"""Baselines under the same fit and scoring: raw voxels (downsampled, PCA on train), avgpool."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import dask.array as da
import numpy as np
import pandas as pd
import pytest
import xarray as xr

from raptorz import stores
from raptorz.cli.main import main
from raptorz.downstream.baselines import VOXELS, VoxelSettings, downsample, voxel_baseline
from raptorz.errors import InputError
from raptorz.layouts import open_embeddings


def write_volumes(path: Path, volumes: np.ndarray, ids: list[str], status: np.ndarray) -> Path:
    """A volumes store as ``raptorz convert`` lays it out (volume(id, x, y, z), status)."""
    n = len(ids)
    template = xr.Dataset(
        {"volume": (("id", "x", "y", "z"), da.zeros(volumes.shape, chunks=(4, *volumes.shape[1:]),
                                                    dtype="f2")),
         **stores.status_variables(n, 4)},
        coords={"id": stores.as_strings(ids)})
    stores.create_store(path, template, "volumes")
    for region in stores.chunk_slices(n, 4):
        data = {"volume": xr.DataArray(volumes[region].astype("f2"), dims=("id", "x", "y", "z"))}
        stores.write_units(path, data, region, status[region],
                           ["" if s == stores.OK else "bad" for s in status[region]])
    return path


def test_downsample_is_the_block_mean() -> None:
    rng = np.random.default_rng(0)
    volumes = rng.random((2, 8, 12, 4))
    expected = volumes.reshape(2, 4, 2, 4, 3, 4, 1).mean(axis=(2, 4, 6)).reshape(2, -1)
    np.testing.assert_allclose(downsample(volumes, 4), expected, rtol=1e-12)


def test_voxel_baseline_pca_fitted_on_train_only(tmp_path: Path,
                                                 write_labels: Callable[..., Path]) -> None:
    from sklearn.decomposition import PCA

    rng = np.random.default_rng(1)
    n = 20
    volumes = rng.random((n, 8, 8, 8)).astype(np.float16)
    ids = [f"vol{i}" for i in range(n)]
    status = np.full(n, stores.OK, np.int8)
    status[5] = stores.FAILED
    path = write_volumes(tmp_path / "volumes.zarr", volumes, ids, status)
    split = np.array(["train"] * 12 + ["val"] * 4 + ["test"] * 4)
    labels = write_labels(tmp_path / "labels.csv", [f"{i}.nii.gz" for i in ids], split,
                          {"y": rng.normal(size=n)})
    out = voxel_baseline(path, labels, tmp_path / "voxels.zarr", VoxelSettings(grid=2,
                                                                               components=4))
    ds = open_embeddings(out)
    values = ds[VOXELS].values
    assert values.shape == (n, 4)
    assert list(stores.read_status(out)) == [stores.FAILED if i == 5 else stores.OK
                                             for i in range(n)]
    small = downsample(volumes.astype(np.float64), 2)
    train = [i for i in range(12) if i != 5]
    reference = PCA(4, svd_solver="full").fit(small[train]).transform(small)
    signs = np.sign((values * reference).sum(axis=0))
    ok = status == stores.OK
    np.testing.assert_allclose(values[ok], (reference * signs)[ok], rtol=1e-4, atol=1e-5)
    assert json.dumps(ds.attrs["baseline"]["grid"]) == "2"
    with pytest.raises(InputError, match="already exists"):
        voxel_baseline(path, labels, out)


@pytest.mark.slow
@pytest.mark.requires_data
def test_ixi_raptor_avgpool_and_voxels_in_one_table(
        shared_data: Path, tmp_path: Path, tiny_vit_weights: tuple[str, Path],
        capsys: pytest.CaptureFixture[str]) -> None:
    """The 40 IXI scans: three models fitted and scored on the same resamples, via the CLI."""
    labels = shared_data / "ixi" / "labels.csv"
    volumes = tmp_path / "ixi.zarr"
    assert main(["convert", str(shared_data / "ixi" / "t1"), "-o", str(volumes),
                 "--workers", "1"]) == 0
    projector = tmp_path / "proj_k4.npy"
    assert main(["projector", "--seed", "0", "--dim", "64", "--k", "4", "-o",
                 str(projector)]) == 0
    name, weights = tiny_vit_weights
    embeddings = tmp_path / "embeddings.zarr"
    assert main(["embed", str(volumes), "-o", str(embeddings), "--projector", str(projector),
                 "--encoder", name, "--weights", str(weights), "--workers", "1",
                 "--dashboard-address", ":0", "--subsample", "8", "--planes", "A,C"]) == 0
    voxels = tmp_path / "voxels.zarr"
    assert main(["baseline", str(volumes), "--labels", str(labels), "-o", str(voxels),
                 "--grid", "12", "--components", "16"]) == 0
    fit = ["--labels", str(labels), "--targets", "age", "--bootstrap", "0"]
    assert main(["fit", str(embeddings), *fit, "-o", str(tmp_path / "raptor")]) == 0
    assert main(["fit", str(embeddings), *fit, "--projector", "avgpool",
                 "-o", str(tmp_path / "avgpool")]) == 0
    assert main(["fit", str(voxels), *fit, "--projector", "voxels",
                 "-o", str(tmp_path / "voxels")]) == 0
    capsys.readouterr()
    assert main(["score", *[f"{m}={tmp_path / m / 'predictions.csv'}"
                            for m in ("raptor", "avgpool", "voxels")],
                 "--labels", str(labels), "-o", str(tmp_path / "table"), "--bootstrap", "200",
                 "--compare", "raptor", "voxels"]) == 0
    printed = capsys.readouterr().out
    table = pd.read_csv(tmp_path / "table" / "scores.csv")
    assert list(table["model"]) == ["raptor", "avgpool", "voxels"]
    assert table["all"].between(0, 1).all()
    # (r^2 near 0 can lie below its bootstrap interval: resampled r^2 is biased upwards)
    assert (table["all_low"] <= table["all_high"]).all()
    metrics = json.loads((tmp_path / "voxels" / "metrics.json").read_text())
    assert metrics["feature"] == "voxels" and metrics["n"]["test"] == 8
    # the table's r^2 of each model is the one its own fit reported
    for model in ("raptor", "avgpool", "voxels"):
        own = json.loads((tmp_path / model / "metrics.json").read_text())
        row = table.set_index("model").loc[model]
        assert row["all"] == pytest.approx(own["mean"]["pearson_r2"]["value"], abs=1e-9)
    print("\nIXI age, 8 test scans, tiny random ViT (K=4, planes A,C):\n" + printed)
