"""``raptorz fit --cluster`` (#29): the linear head's passes over the train rows on a real
2-worker LocalCluster give the single-machine fit's predictions."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from distributed import Client

from raptorz.cli.main import main
from raptorz.downstream.fitting import FitSettings, fit
from raptorz.downstream.settings import HeadSettings
from raptorz.errors import InputError

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
