"""Bad labels and stores for ``raptorz fit``: each a clear message naming the file."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from raptorz import stores
from raptorz.cli.main import main
from raptorz.downstream.fitting import FitSettings, fit
from raptorz.downstream.labels import MissingEmbeddingsWarning, read_labels, store_index
from raptorz.downstream.model import load_model, predict
from raptorz.errors import InputError, SettingsError

N = 40
QUICK = FitSettings(bootstrap=10)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory,
          synthetic: Callable[..., tuple[np.ndarray, list[str], np.ndarray]],
          write_embeddings: Callable[..., Path]) -> dict:
    """40 volumes chunked by one (as ``raptorz embed`` writes), two of them failed."""
    features, ids, split = synthetic(N, (1, 2, 3))
    status = np.full(N, stores.OK)
    status[[4, 9]] = stores.FAILED
    path = write_embeddings(tmp_path_factory.mktemp("errors") / "embeddings.zarr", features, ids,
                            chunk=1, status=status)
    label = (features.reshape(N, -1).sum(axis=1) > 0).astype(int)
    return {"path": path, "ids": ids, "split": split, "label": label, "status": status}


@pytest.fixture
def csv(write_labels: Callable[..., Path]) -> Callable[..., Path]:
    """``csv(tmp_path, store, ids=None, **columns)``: a labels CSV of ``ids`` (default all)."""
    def csv(tmp_path: Path, store: dict, ids: list[str] | None = None,
            **columns: np.ndarray) -> Path:
        ids = ids or store["ids"]
        columns = columns or {"label": store["label"][:len(ids)]}
        return write_labels(tmp_path / "labels.csv", ids, store["split"][:len(ids)], columns)
    return csv


def ok_only(store: dict) -> list[str]:
    return [i for i, s in zip(store["ids"], store["status"], strict=True) if s == stores.OK]


def test_missing_and_failed_are_left_out_with_a_warning(store: dict, tmp_path: Path,
                                                        csv: Callable[..., Path]) -> None:
    ids = [*store["ids"][:-1], "ghost"]
    labels = csv(tmp_path, store, ids)
    with pytest.warns(MissingEmbeddingsWarning, match=r"1 have no embedding \(ghost\).*"
                      r"2 have a failed or pending embedding \(v4, v9\)"):
        result = fit(store["path"], labels, tmp_path / "out", QUICK)
    assert result.metrics["left_out"] == ["ghost", "v4", "v9"]
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["left_out"] == [
        "ghost", "v4", "v9"]
    with pytest.raises(InputError, match="labels.csv: labelled volumes missing") as error:
        fit(store["path"], labels, tmp_path / "strict", FitSettings(strict=True))
    assert "ghost" in str(error.value)


def test_cli_exit_codes(store: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                        csv: Callable[..., Path]) -> None:
    base = ["fit", str(store["path"]), "-o", str(tmp_path / "out"), "--bootstrap", "5"]
    assert main([*base, "--labels", str(csv(tmp_path, store, ok_only(store)))]) == 0
    assert main([*base, "--labels", str(csv(tmp_path, store))]) == 1  # two left out
    assert "warning:" in capsys.readouterr().err
    assert main([*base, "--labels", str(csv(tmp_path, store)), "--strict"]) == 2
    assert main([*base, "--labels", str(tmp_path / "absent.csv")]) == 2
    assert "absent.csv: labels file not found" in capsys.readouterr().err


def test_ids_match_without_file_extensions(store: dict, tmp_path: Path,
                                           csv: Callable[..., Path]) -> None:
    ids = [f"{name}.nii.gz" for name in ok_only(store)]
    found = store_index(np.array(ids), np.array(store["ids"]))
    assert (found >= 0).all()
    result = fit(store["path"], csv(tmp_path, store, ids, label=store["label"][found]),
                 tmp_path / "out", QUICK)
    assert result.predictions["id"].str.endswith(".nii.gz").all()


def test_unknown_projector_lists_the_choices(store: dict, tmp_path: Path, projector_name: str,
                                             csv: Callable[..., Path]) -> None:
    with pytest.raises(SettingsError, match=f"projector: .*embeddings.zarr has no projector or "
                                            "feature variable 'nope'; available: "
                                            f"{projector_name}, avgpool"):
        fit(store["path"], csv(tmp_path, store), tmp_path, FitSettings(projector="nope"))


@pytest.mark.parametrize(("text", "message"), [
    ("id,label\nv0,1\n", "no 'split' column"),
    ("id,split,label\nv0,training,1\n", r"unknown split name\(s\) \['training'\]"),
    ("id,split,label\nv0,train,1\nv0,val,0\n", "1 id\\(s\\) appear more than once"),
    ("id,split\nv0,train\n", "no target columns"),
])
def test_malformed_labels(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(InputError, match=f"bad.csv: {message}"):
        read_labels(path)


def test_unknown_target_column(store: dict, tmp_path: Path, csv: Callable[..., Path]) -> None:
    with pytest.raises(InputError, match=r"no target column\(s\) \['age'\]"):
        fit(store["path"], csv(tmp_path, store), tmp_path, FitSettings(targets=("age",)))


def test_empty_split(store: dict, tmp_path: Path, write_labels: Callable[..., Path]) -> None:
    ok = ok_only(store)
    split = np.where(store["split"] == "val", "train", store["split"])
    labels = write_labels(tmp_path / "labels.csv", ok, split[:len(ok)],
                          {"label": store["label"][:len(ok)]})
    with pytest.raises(InputError, match="labels.csv: the val split has no rows"):
        fit(store["path"], labels, tmp_path, QUICK)


def test_constant_targets(store: dict, tmp_path: Path, csv: Callable[..., Path]) -> None:
    ok = ok_only(store)
    train = store["split"][:len(ok)] == "train"
    constant = np.where(train, 5.0, np.arange(len(ok)))
    with pytest.raises(InputError, match="labels.csv: target 'y' is constant on train"):
        fit(store["path"], csv(tmp_path, store, ok, y=constant), tmp_path,
            FitSettings(task="regression"))
    one_class = np.where(train, 1, 0)
    with pytest.raises(InputError, match="target 'label' has classes that train lacks"):
        fit(store["path"], csv(tmp_path, store, ok, label=one_class), tmp_path, QUICK)


def test_missing_targets(store: dict, tmp_path: Path, csv: Callable[..., Path]) -> None:
    ok = ok_only(store)
    label = store["label"][:len(ok)].astype(float)
    label[3] = np.nan
    with pytest.raises(InputError, match="1 row\\(s\\) have no value in 'label'"):
        fit(store["path"], csv(tmp_path, store, ok, label=label), tmp_path,
            FitSettings(task="classification"))
    allnan = np.where(store["split"][:len(ok)] == "train", np.nan, 1.0)
    with pytest.raises(InputError, match=r"target 'y' is constant on train \(all values missing"):
        fit(store["path"], csv(tmp_path, store, ok, y=allnan, z=label), tmp_path, QUICK)


def test_text_targets(store: dict, tmp_path: Path, csv: Callable[..., Path]) -> None:
    ok = ok_only(store)
    names = np.where(store["label"][:len(ok)] == 1, "tumour", "normal")
    result = fit(store["path"], csv(tmp_path, store, ok, kind=names), tmp_path / "o", QUICK)
    assert result.model.classes == ("normal", "tumour")
    with pytest.raises(InputError, match=r"text target column\(s\) \['kind'\]"):
        fit(store["path"], csv(tmp_path, store, ok, kind=names, other=store["label"][:len(ok)]),
            tmp_path, QUICK)


def test_predict_refuses_other_features(
        store: dict, tmp_path: Path,
        synthetic: Callable[..., tuple[np.ndarray, list[str], np.ndarray]],
        write_embeddings: Callable[..., Path], csv: Callable[..., Path]) -> None:
    fit(store["path"], csv(tmp_path, store, ok_only(store)), tmp_path / "out", QUICK)
    features, ids, _ = synthetic(4, (1, 2, 4))
    other = write_embeddings(tmp_path / "other.zarr", features, ids)
    with pytest.raises(InputError, match="other.zarr: 'proj_normal_d8_k4_run1' has 8 features; "
                                         "the model was fitted on 6"):
        predict(other, tmp_path / "out" / "model")
    with pytest.raises(InputError, match=r"embeddings.zarr: 2 id\(s\) have no ok embedding: "
                                         "v4, ghost"):
        predict(store["path"], tmp_path / "out" / "model", ids=["v1", "v4", "ghost"])
    with pytest.raises(InputError, match="not a raptorz model folder") as error:
        load_model(tmp_path)
    assert "the model is in" not in str(error.value)
    # the results folder given for its model/: the message points to it
    with pytest.raises(InputError, match=r"the model is in .*out/model$"):
        load_model(tmp_path / "out")
