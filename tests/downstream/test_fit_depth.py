"""The paper's heads: validated settings, and the MLP depth chosen on the validation split."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from raptorz.cli.main import main
from raptorz.downstream.fitting import FitSettings, fit
from raptorz.downstream.model import load_model, predict
from raptorz.downstream.settings import HeadSettings
from raptorz.errors import RaptorzError, SettingsError


@pytest.mark.parametrize(("field", "value", "message"), [
    ("layers", 0, "layers must be at least 1"),
    ("dropout", 2.0, "dropout must be in"),
    ("dropout", -0.1, "dropout must be in"),
    ("epochs", 0, "epochs must be at least 1"),
    ("head", "forest", "head must be linear or mlp"),
    ("penalties", (), "penalties must be positive"),
    ("depths", (0, 2), "depths must be at least 1"),
])
def test_head_settings_refuse_out_of_range(field: str, value: object, message: str) -> None:
    with pytest.raises(SettingsError, match=message) as error:
        HeadSettings(**{field: value})  # type: ignore[arg-type]
    assert isinstance(error.value, RaptorzError) and isinstance(error.value, ValueError)


def test_fit_settings_refuse_negative_bootstrap() -> None:
    with pytest.raises(SettingsError, match="bootstrap"):
        FitSettings(bootstrap=-1)


@pytest.mark.parametrize("option", [["--layers", "0"], ["--dropout", "2"], ["--epochs", "0"],
                                    ["--bootstrap", "-1"], ["--layers", "1,0"]])
def test_cli_maps_the_library_error_to_exit_2(tmp_path: Path, option: list[str],
                                              capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["fit", str(tmp_path / "absent.zarr"), "--labels", str(tmp_path / "l.csv"),
                 "-o", str(tmp_path / "out"), "--head", "mlp", *option])
    assert code == 2
    assert "must be" in capsys.readouterr().err


def test_cli_refuses_unreadable_layers(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "e.zarr", "--labels", "l.csv", "-o", "out", "--layers", "deep"])
    assert exit_.value.code == 2
    assert "expected N, N,N,... or auto" in capsys.readouterr().err


@pytest.fixture(scope="module")
def product(tmp_path_factory: pytest.TempPathFactory, write_embeddings: Callable[..., Path],
            write_labels: Callable[..., Path]) -> tuple[Path, Path]:
    """y = x0 * x1: no linear model beats the mean; one hidden layer fits it."""
    rng = np.random.default_rng(7)
    n = 600
    x = rng.normal(size=(n, 2))
    folder = tmp_path_factory.mktemp("depth")
    ids = [f"v{i}" for i in range(n)]
    store = write_embeddings(folder / "embeddings.zarr",
                             x.reshape(n, 1, 1, 2).astype(np.float32), ids, chunk=100)
    split = np.array(["train"] * 400 + ["val"] * 100 + ["test"] * 100)
    labels = write_labels(folder / "labels.csv", ids, split, {"y": x[:, 0] * x[:, 1]})
    return store, labels


def test_depth_chosen_on_validation_fits_what_one_layer_cannot(
        product: tuple[Path, Path], tmp_path: Path) -> None:
    store, labels = product
    head = HeadSettings(head="mlp", depths=(1, 2, 3), lr=1e-2, epochs=40, patience=40,
                        hidden=64)
    result = fit(store, labels, tmp_path / "out", FitSettings(head=head, bootstrap=50))
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["mlp_depth"] >= 2
    losses = metrics["fit"]["depth_validation_loss"]
    assert set(losses) == {"1", "2", "3"}
    # the chosen depth has the lowest validation loss, and one layer is far behind
    assert losses[str(metrics["mlp_depth"])] == min(losses.values())
    assert losses["1"] > 5 * min(losses.values())
    assert metrics["mean"]["R2"]["value"] > 0.7
    # the saved model is rebuilt at the chosen depth and predicts the same values
    model = load_model(tmp_path / "out" / "model")
    assert model.settings.layers == metrics["mlp_depth"]
    again = predict(store, model, ids=list(result.predictions["id"]))
    np.testing.assert_allclose(again["y"], result.predictions["y"], rtol=1e-5, atol=1e-6)


def test_one_layer_alone_cannot_fit_it(product: tuple[Path, Path], tmp_path: Path) -> None:
    """The control: the same target with a fixed single layer scores about nothing."""
    store, labels = product
    head = HeadSettings(head="mlp", layers=1, lr=1e-2, epochs=40, patience=40)
    metrics = fit(store, labels, tmp_path / "out", FitSettings(head=head, bootstrap=0)).metrics
    assert metrics["mlp_depth"] == 1
    assert metrics["mean"]["R2"]["value"] < 0.3  # chance level on 100 test rows; deep: > 0.7


def test_many_regression_targets_in_one_model(product: tuple[Path, Path], tmp_path: Path,
                                              write_labels: Callable[..., Path]) -> None:
    """As the original fits 199 IDPs at once: one MLP, one output per target."""
    store, _ = product
    rng = np.random.default_rng(3)
    n = 600
    ids = [f"v{i}" for i in range(n)]
    split = np.array(["train"] * 400 + ["val"] * 100 + ["test"] * 100)
    labels = write_labels(tmp_path / "many.csv", ids, split,
                          {f"t{j}": rng.normal(size=n) for j in range(12)})
    result = fit(store, labels, tmp_path / "out",
                 FitSettings(head=HeadSettings(head="mlp", epochs=2), bootstrap=0))
    assert list(result.predictions.columns) == ["id", *[f"t{j}" for j in range(12)]]
    assert result.model.head.arrays()["mlp.4.bias"].shape == (12,)


def test_cli_layers_auto_reports_the_depth(product: tuple[Path, Path], tmp_path: Path) -> None:
    store, labels = product
    assert main(["fit", str(store), "--labels", str(labels), "-o", str(tmp_path / "out"),
                 "--head", "mlp", "--layers", "auto", "--epochs", "2", "--bootstrap", "0"]) == 0
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["mlp_depth"] in (1, 2, 3)
    assert set(metrics["fit"]["depth_validation_loss"]) == {"1", "2", "3"}
    assert load_model(tmp_path / "out" / "model").settings.depths == (1, 2, 3)
