"""``raptorz fit --cluster`` (#29): the train rows held on a real 2-worker LocalCluster, the
linear head's passes run there and the MLP's epochs gathered from there, give the
single-machine fit's predictions."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from dask.utils import key_split
from distributed import Client, get_task_stream

from raptorz.cli.main import main
from raptorz.downstream import heads
from raptorz.downstream.features import Features, open_variable
from raptorz.downstream.fitting import FitSettings, fit
from raptorz.downstream.remote import ClusterPasses
from raptorz.downstream.settings import HeadSettings
from raptorz.errors import InputError
from raptorz.layouts import open_embeddings

N = 150


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory,
         synthetic: Callable[..., tuple[np.ndarray, list[str], np.ndarray]],
         write_embeddings: Callable[..., Path], write_labels: Callable[..., Path]) -> dict:
    """150 volumes x 24 features in units of 8 (more groups than one sum takes at once),
    three classes and two regression targets."""
    folder = tmp_path_factory.mktemp("cluster")
    features, ids, split = synthetic(N, (2, 3, 4))
    score = features.reshape(N, -1) @ np.random.default_rng(1).normal(size=(24, 2))
    classes = np.digitize(score[:, 0], np.quantile(score[:, 0], [1 / 3, 2 / 3]))
    y = score + np.random.default_rng(2).normal(size=score.shape)
    return {"store": write_embeddings(folder / "e.zarr", features, ids),
            "classes": write_labels(folder / "c.csv", ids, split, {"grade": classes}),
            "regression": write_labels(folder / "r.csv", ids, split,
                                       {"a": y[:, 0], "b": y[:, 1]}),
            "features": features, "ids": ids, "split": split, "folder": folder}


@pytest.mark.parametrize("labels", ["classes", "regression"])
def test_cluster_fit_equals_the_single_machine_fit(data: dict, client: Client, tmp_path: Path,
                                                   labels: str) -> None:
    settings = FitSettings(head=HeadSettings(max_iter=15), bootstrap=0)
    alone = fit(data["store"], data[labels], tmp_path / "alone", settings)
    spread = fit(data["store"], data[labels], tmp_path / "spread", settings, cluster=client)
    np.testing.assert_allclose(spread.predictions.iloc[:, 1:], alone.predictions.iloc[:, 1:],
                               rtol=0, atol=1e-6)
    assert spread.model.summary["penalty"] == alone.model.summary["penalty"]
    assert spread.metrics["passes"] == alone.metrics["passes"]
    # On a streamed single-machine fit too (no pass loads the features first).
    streamed = fit(data["store"], data[labels], tmp_path / "streamed",
                   FitSettings(head=settings.head, bootstrap=0, memory_budget=1000))
    np.testing.assert_allclose(spread.predictions.iloc[:, 1:],
                               streamed.predictions.iloc[:, 1:], rtol=0, atol=1e-6)


@pytest.mark.parametrize("window", [None, 20], ids=["one window", "windows of 20 rows"])
def test_cluster_mlp_equals_the_single_machine_mlp(data: dict, client: Client, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch,
                                                   window: int | None) -> None:
    if window is not None:  # several windows of whole groups per epoch
        monkeypatch.setattr(heads, "SHUFFLE_BYTES", window * 4 * 24)
    settings = FitSettings(head=HeadSettings(head="mlp", epochs=3, patience=5, dropout=0.1,
                                             layers=3, hidden=16), bootstrap=0)
    alone = fit(data["store"], data["classes"], tmp_path / "alone", settings)
    with get_task_stream(client) as stream:
        spread = fit(data["store"], data["classes"], tmp_path / "spread", settings,
                     cluster=client)
    np.testing.assert_allclose(spread.predictions.iloc[:, 1:], alone.predictions.iloc[:, 1:],
                               rtol=0, atol=1e-6)
    assert spread.model.summary["validation_loss"] == pytest.approx(
        alone.model.summary["validation_loss"], abs=1e-6)
    # loading, the statistics, per epoch the train rows and val, then test
    assert spread.metrics["passes"] == alone.metrics["passes"] == 1 + 1 + 3 * 2 + 1
    written = json.loads((tmp_path / "spread" / "metrics.json").read_text())
    assert written["passes"] == spread.metrics["passes"]
    # The store is read once for the train rows, by the workers: one read per unit of 8.
    train = np.flatnonzero(data["split"] == "train")
    reads = [t for t in stream.data if key_split(t["key"]) == "load_group"]
    assert len(reads) == len(np.unique(train // 8))


def test_epoch_windows_come_from_the_workers_memory(data: dict, client: Client, tmp_path: Path,
                                                   projector_name: str,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Once the workers hold the train rows, an epoch's windows need no store: they equal
    the rows in memory with the store's chunks gone."""
    store = tmp_path / "e.zarr"
    shutil.copytree(data["store"], store)
    variable = open_variable(open_embeddings(store), store, projector_name)
    held = Features.open(variable, np.arange(N), 2**30)
    streamed = Features.open(variable, np.arange(N), -1)
    train = np.flatnonzero(data["split"] == "train")
    passes = ClusterPasses(client, streamed, train)
    try:
        for chunk in (store / projector_name / "c").iterdir():
            shutil.rmtree(chunk)
        monkeypatch.setattr(heads, "SHUFFLE_BYTES", 20 * 4 * 24)
        windows = heads.epoch_windows(streamed, train, np.random.default_rng(3))
        assert len(windows) > 1
        for rows in [*windows, train[::3][::-1]]:  # and part of groups, in reverse
            np.testing.assert_array_equal(passes.window(rows), held(rows))
        with pytest.raises(ValueError, match="not train rows"):
            passes.window(np.flatnonzero(data["split"] == "val"))
    finally:
        passes.close()


def test_cluster_refuses_nan_features_naming_the_ids(data: dict, client: Client, tmp_path: Path,
                                                     write_embeddings: Callable[..., Path]
                                                     ) -> None:
    holed = data["features"].copy()
    train = np.flatnonzero(data["split"] == "train")
    holed[train[[2, 40]], 1, 0] = np.nan
    store = write_embeddings(tmp_path / "holed.zarr", holed, data["ids"])
    names = "|".join(data["ids"][i] for i in train[[2, 40]])
    with pytest.raises(InputError, match=rf"{store}: .*NaN for 2 volume.*({names})"):
        fit(store, data["classes"], tmp_path / "out", FitSettings(bootstrap=0), cluster=client)


def test_cli_fits_on_a_scheduler_address(data: dict, client: Client, tmp_path: Path) -> None:
    output = tmp_path / "r"
    address = client.scheduler.address
    assert main(["fit", str(data["store"]), "--labels", str(data["classes"]), "-o",
                 str(output), "--bootstrap", "0", "--max-iter", "20",
                 "--cluster", address]) == 0
    alone = fit(data["store"], data["classes"], tmp_path / "alone",
                FitSettings(head=HeadSettings(max_iter=20), bootstrap=0))
    written = pd.read_csv(output / "predictions.csv")
    np.testing.assert_allclose(written.iloc[:, 1:], alone.predictions.iloc[:, 1:], atol=1e-6)
    assert json.loads((output / "metrics.json").read_text())["passes"] > 0
