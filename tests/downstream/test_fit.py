"""Downstream fitting on small, seeded embeddings stores written by the tests."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.linear_model import LogisticRegression, Ridge

from raptorz import stores
from raptorz.cli.main import main
from raptorz.downstream.features import Features, statistics
from raptorz.downstream.fitting import FitSettings, fit
from raptorz.downstream.heads import build_mlp
from raptorz.downstream.model import load_model, predict
from raptorz.downstream.settings import HeadSettings

N = 200
SHAPE = (2, 3, 4)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory,
         synthetic: Callable[..., tuple[np.ndarray, list[str], np.ndarray]],
         write_embeddings: Callable[..., Path]) -> dict:
    """A store of 200 volumes x 24 features, and targets that are functions of them."""
    folder = tmp_path_factory.mktemp("fit")
    features, ids, split = synthetic(N, SHAPE)
    x = features.reshape(N, -1).astype(np.float64)
    rng = np.random.default_rng(1)
    w = rng.normal(size=(x.shape[1], 3))
    score = x @ w
    return {
        "store": write_embeddings(folder / "embeddings.zarr", features, ids),
        "ids": ids, "split": split, "x": x, "folder": folder,
        "separable": (score[:, 0] > np.median(score[:, 0])).astype(int),
        # volumes far from the separating plane: a margin makes the classes separable
        "margin": np.abs(score[:, 0] - np.median(score[:, 0])) > 0.5 * score[:, 0].std(),
        "three": np.digitize(score[:, 1], np.quantile(score[:, 1], [1 / 3, 2 / 3])),
        "linear": 40.0 + 5.0 * score[:, 2],
        "multi": (score[:, :2] > 0).astype(int),
    }


@pytest.fixture
def labels(write_labels: Callable[..., Path]) -> Callable[..., Path]:
    """``labels(data, name, rows=None, **columns)``: a labels CSV of ``rows`` (default all
    volumes) with the given target columns."""
    def labels(data: dict, name: str, rows: np.ndarray | None = None,
               **columns: np.ndarray) -> Path:
        rows = np.arange(N) if rows is None else rows
        return write_labels(data["folder"] / f"{name}.csv", [data["ids"][i] for i in rows],
                            data["split"][rows], {k: v[rows] for k, v in columns.items()})
    return labels


def quick(**head: object) -> FitSettings:
    return FitSettings(head=HeadSettings(**head), bootstrap=50)  # type: ignore[arg-type]


def test_separable_classes_score_near_one(data: dict, tmp_path: Path,
                                          labels: Callable[..., Path]) -> None:
    # Only the volumes with a margin are labelled; the store's other volumes are unused.
    rows = np.flatnonzero(data["margin"])
    result = fit(data["store"], labels(data, "sep", rows, label=data["separable"]), tmp_path,
                 quick())
    assert result.model.task == "classification"
    assert result.metrics["targets"]["label"]["auroc"]["value"] > 0.99
    test = rows[data["split"][rows] == "test"]
    written = pd.read_csv(tmp_path / "predictions.csv")
    assert list(written.columns) == ["id", "label_0", "label_1"]
    assert list(written["id"]) == [data["ids"][i] for i in test]
    np.testing.assert_allclose(written[["label_0", "label_1"]].sum(axis=1), 1.0, rtol=1e-12)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    auroc = metrics["mean"]["auroc"]
    assert auroc["low"] <= auroc["value"] <= auroc["high"]
    assert metrics["n"] == {k: int(np.sum(data["split"][rows] == k)) for k in metrics["n"]}
    assert metrics["left_out"] == []
    assert metrics["fit"]["penalty"][0] in (0.01, 0.1, 1, 10, 100)
    assert (tmp_path / "roc.png").read_bytes()[:4] == b"\x89PNG"


def test_permuted_labels_score_near_half(data: dict, tmp_path: Path,
                                         labels: Callable[..., Path]) -> None:
    # Guards against leakage between splits: with labels unrelated to the features, test
    # AUROC must be near chance whatever the penalty chosen on val.
    permuted = np.random.default_rng(7).permutation(data["separable"])
    result = fit(data["store"], labels(data, "perm", label=permuted), tmp_path, quick())
    auroc = result.metrics["targets"]["label"]["auroc"]
    assert abs(auroc["value"] - 0.5) < 0.2
    assert auroc["low"] < 0.5 < auroc["high"]


def test_the_log_names_the_chosen_penalty_and_whether_it_converged(
        data: dict, tmp_path: Path, labels: Callable[..., Path]) -> None:
    lines: list[str] = []
    result = fit(data["store"], labels(data, "log", label=data["separable"]), tmp_path,
                 quick(max_iter=1), log=lines.append)
    chosen = result.model.head.penalty  # type: ignore[union-attr]
    line = next(line for line in lines if line.startswith("linear: chosen C="))
    assert line.startswith(f"linear: chosen C={chosen[0]:g} "), line
    assert line.endswith("did not converge: raise --max-iter"), line


def test_three_classes(data: dict, tmp_path: Path, labels: Callable[..., Path]) -> None:
    result = fit(data["store"], labels(data, "three", grade=data["three"]), tmp_path, quick())
    assert result.model.classes == ("0", "1", "2")
    assert list(result.predictions.columns) == ["id", "grade_0", "grade_1", "grade_2"]
    assert result.metrics["targets"]["grade"]["auroc"]["value"] > 0.9


def test_linear_function_is_recovered(data: dict, tmp_path: Path,
                                      labels: Callable[..., Path]) -> None:
    target = data["linear"].copy()
    target[::7] = np.nan  # missing values are masked for this target only
    csv = labels(data, "reg", score=target, other=data["linear"] * 2)
    result = fit(data["store"], csv, tmp_path, quick())
    assert result.model.task == "regression"
    for name in ("score", "other"):
        assert result.metrics["targets"][name]["pearson_r2"]["value"] > 0.99
        assert result.metrics["targets"][name]["R2"]["value"] > 0.99
    test = data["split"] == "test"
    # predictions come back in the targets' units
    np.testing.assert_allclose(result.predictions["other"], 2 * data["linear"][test], rtol=0.05)
    assert (tmp_path / "predicted_vs_true.png").is_file()


def test_multilabel_is_inferred(data: dict, tmp_path: Path, labels: Callable[..., Path]) -> None:
    csv = labels(data, "multi", a=data["multi"][:, 0], b=data["multi"][:, 1])
    result = fit(data["store"], csv, tmp_path, quick())
    assert result.model.task == "multilabel"
    assert result.metrics["mean"]["auroc"]["value"] > 0.9
    assert list(result.predictions.columns) == ["id", "a", "b"]


def test_linear_head_matches_scikit_learn(data: dict, tmp_path: Path,
                                          labels: Callable[..., Path]) -> None:
    """Float64 reference: each C's optimum equals scikit-learn's on standardized features."""
    train, test = data["split"] == "train", data["split"] == "test"
    mean, std = data["x"][train].mean(axis=0), data["x"][train].std(axis=0)
    z = (data["x"] - mean) / std
    for c in (0.1, 10.0):
        tight = FitSettings(head=HeadSettings(penalties=(c,), tol=1e-10, max_iter=1000),
                            bootstrap=0)
        ours = fit(data["store"], labels(data, "sk", label=data["three"]), tmp_path, tight)
        reference = LogisticRegression(C=c, tol=1e-10, max_iter=1000).fit(
            z[train], data["three"][train])
        np.testing.assert_allclose(ours.predictions.iloc[:, 1:],
                                   reference.predict_proba(z[test]), atol=1e-6)
        ours = fit(data["store"], labels(data, "skr", y=data["linear"]), tmp_path, tight)
        y = data["linear"]
        scale = y[train].std()
        ridge = Ridge(alpha=1 / c).fit(z[train], (y[train] - y[train].mean()) / scale)
        np.testing.assert_allclose(ours.predictions["y"],
                                   ridge.predict(z[test]) * scale + y[train].mean(),
                                   atol=1e-6 * scale)


@pytest.mark.parametrize(("head", "column"), [
    ({}, "three"), ({}, "linear"),
    ({"head": "mlp", "epochs": 3, "layers": 3, "dropout": 0.1}, "separable"),
])
def test_streaming_equals_in_memory(data: dict, tmp_path: Path, head: dict, column: str,
                                    labels: Callable[..., Path]) -> None:
    csv = labels(data, f"lazy_{column}", target=data[column])
    settings = quick(**head)
    memory = fit(data["store"], csv, tmp_path / "memory", settings)
    lazy = FitSettings(head=settings.head, bootstrap=50, memory_budget=1000)
    streamed = fit(data["store"], csv, tmp_path / "streamed", lazy)
    # Same batches, same float32 values, same arithmetic: the same numbers exactly.
    pd.testing.assert_frame_equal(memory.predictions, streamed.predictions, check_exact=True)
    assert memory.metrics["mean"] == streamed.metrics["mean"]


def test_streaming_statistics_are_exact(data: dict, projector_name: str) -> None:
    variable = stores.open_store(data["store"], "embeddings")[projector_name]
    rows = np.flatnonzero(data["split"] == "train")
    for budget in (0, 10**9):
        features = Features.open(variable, np.arange(N), budget)
        assert features.streaming == (budget == 0)
        mean, std = statistics(features, rows)
        np.testing.assert_allclose(mean, data["x"][rows].mean(axis=0), rtol=1e-12)
        np.testing.assert_allclose(std, data["x"][rows].std(axis=0), rtol=1e-12)
        np.testing.assert_array_equal(features(np.array([5, 2, 9])), data["x"][[5, 2, 9]])


def test_mlp_is_the_original_architecture() -> None:
    model = build_mlp(77100, 199, layers=3, hidden=256, dropout=0.0)
    assert [type(m).__name__ for m in model] == [
        "Linear", "BatchNorm1d", "ReLU", "Dropout", "Linear", "ReLU", "Dropout", "Linear"]
    assert (model[0].in_features, model[-1].out_features) == (77100, 199)


def test_mlp_is_deterministic_and_reloads(data: dict, tmp_path: Path,
                                          labels: Callable[..., Path]) -> None:
    csv = labels(data, "mlp", label=data["separable"])
    settings = quick(head="mlp", epochs=4, dropout=0.2, seed=3)
    first = fit(data["store"], csv, tmp_path / "a", settings)
    again = fit(data["store"], csv, tmp_path / "b", settings)
    pd.testing.assert_frame_equal(first.predictions, again.predictions, check_exact=True)
    other = fit(data["store"], csv, tmp_path / "c", quick(head="mlp", epochs=4, seed=4))
    assert not np.allclose(first.predictions.iloc[:, 1:], other.predictions.iloc[:, 1:])
    assert first.metrics["fit"]["epochs_run"] == 4
    reloaded = predict(data["store"], tmp_path / "a" / "model")
    by_id = reloaded.set_index("id").loc[first.predictions["id"]]
    np.testing.assert_allclose(by_id.to_numpy(), first.predictions.iloc[:, 1:].to_numpy(),
                               rtol=1e-6)


def test_linear_model_reloads_through_the_cli(data: dict, tmp_path: Path,
                                              labels: Callable[..., Path]) -> None:
    csv = labels(data, "cli", label=data["separable"])
    assert main(["fit", str(data["store"]), "--labels", str(csv), "-o", str(tmp_path / "r"),
                 "--bootstrap", "20", "--targets", "label"]) == 0
    ids = tmp_path / "ids.txt"
    ids.write_text("v3\nv1\n")
    out = tmp_path / "new.csv"
    assert main(["predict", str(data["store"]), "--model", str(tmp_path / "r" / "model"),
                 "-o", str(out), "--ids", str(ids)]) == 0
    written = pd.read_csv(tmp_path / "r" / "predictions.csv").set_index("id")
    again = pd.read_csv(out).set_index("id")
    assert list(again.index) == ["v3", "v1"]
    model = load_model(tmp_path / "r" / "model")
    assert model.settings.head == "linear"
    test_ids = [i for i in ("v3", "v1") if i in written.index]
    pd.testing.assert_frame_equal(again.loc[test_ids], written.loc[test_ids])


def test_features_choice(data: dict, tmp_path: Path, labels: Callable[..., Path]) -> None:
    csv = labels(data, "avg", label=data["separable"])
    result = fit(data["store"], csv, tmp_path, FitSettings(projector="avgpool", bootstrap=0))
    assert result.model.feature == "avgpool"
    assert result.model.n_features == SHAPE[2]
    assert result.metrics["mean"]["auroc"]["low"] is None  # no resamples, no interval
