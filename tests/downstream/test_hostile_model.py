"""Broken and hostile model folders for ``raptorz predict``: one message naming the folder,
exit code 2, checked before any network is built."""

from __future__ import annotations

import json
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from raptorz.cli.main import main
from raptorz.downstream.fitting import FitSettings, fit
from raptorz.downstream.settings import HeadSettings

N = 40


@pytest.fixture(scope="module")
def fitted(tmp_path_factory: pytest.TempPathFactory,
           synthetic: Callable[..., tuple[np.ndarray, list[str], np.ndarray]],
           write_embeddings: Callable[..., Path],
           write_labels: Callable[..., Path]) -> dict[str, Path]:
    """An embeddings store, and a linear and an MLP model fitted on it."""
    folder = tmp_path_factory.mktemp("models")
    features, ids, split = synthetic(N, (1, 2, 3))
    store = write_embeddings(folder / "embeddings.zarr", features, ids)
    labels = write_labels(folder / "labels.csv", ids, split,
                          {"label": (features.reshape(N, -1).sum(axis=1) > 0).astype(int)})
    out = {"store": store}
    for head in ("linear", "mlp"):
        fit(store, labels, folder / head,
            FitSettings(bootstrap=0, head=HeadSettings(head=head, hidden=8, epochs=2)))
        out[head] = folder / head / "model"
    return out


def _json(edit: Callable[[dict], None]) -> Callable[[Path], None]:
    def change(model: Path) -> None:
        info = json.loads((model / "model.json").read_text())
        edit(info)
        (model / "model.json").write_text(json.dumps(info))
    return change


def _arrays(edit: Callable[[dict], None]) -> Callable[[Path], None]:
    def change(model: Path) -> None:
        arrays = load_file(model / "model.safetensors")
        edit(arrays)
        save_file(arrays, model / "model.safetensors")
    return change


def _truncate(model: Path) -> None:
    data = (model / "model.safetensors").read_bytes()
    (model / "model.safetensors").write_bytes(data[: len(data) - 10])


_BROKEN: dict[str, tuple[str, Callable[[Path], None], str]] = {
    "truncated": ("mlp", _truncate, "model.safetensors is missing, truncated or not a "
                  "safetensors file"),
    "no weights": ("linear", lambda m: (m / "model.safetensors").unlink(),
                   "model.safetensors is missing"),
    "missing key": ("mlp", _arrays(lambda a: a.pop("mlp.4.bias")), "missing mlp.4.bias"),
    "extra key": ("linear", _arrays(lambda a: a.update(extra=np.zeros(1))), "unexpected extra"),
    "huge hidden": ("mlp", _json(lambda i: i["settings"].update(hidden=10**12)),
                    r"mlp.0.weight is F32 \[8, 6\], not F32 \[1000000000000, 6\]"),
    "deep": ("mlp", _json(lambda i: i["settings"].update(layers=10**9)),
             "describes 1000000000 layers but model.safetensors holds 13 arrays"),
    "wrong n_features": ("linear", _json(lambda i: i.update(n_features=7)),
                         r"feature_mean is F64 \[6\], not F16/F32/F64 \[7\]"),
    "string hidden": ("mlp", _json(lambda i: i["settings"].update(hidden="8")),
                      "settings must be an object of head settings"),
    "unknown setting": ("mlp", _json(lambda i: i["settings"].update(colour=1)),
                        "settings must be an object of head settings"),
    "names not a list": ("linear", _json(lambda i: i.update(names="label")),
                         "names must be a non-empty list of strings"),
    "no task": ("linear", _json(lambda i: i.pop("task")), "task must be one of"),
    "not an object": ("linear", lambda m: (m / "model.json").write_text("[1, 2]"),
                      "model.json holds a list, not an object"),
    "bad json": ("linear", lambda m: (m / "model.json").write_bytes(b"{\xff"),
                 "model.json cannot be read"),
    "integer weights": ("linear", _arrays(lambda a: a.update(weight=a["weight"].astype(int))),
                        r"weight is I64 \[6, 1\], not F16/F32/F64 \[6, 1\]"),
    "wrong class count": ("mlp", _json(lambda i: i.update(classes=["0", "1", "2"])),
                          r"mlp.4.weight is F32 \[2, 8\], not F32 \[3, 8\]"),
}


@pytest.mark.parametrize("case", list(_BROKEN))
def test_a_broken_model_folder_is_refused_naming_it(
        fitted: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str],
        case: str) -> None:
    head, breaks, message = _BROKEN[case]
    model = tmp_path / "model"
    shutil.copytree(fitted[head], model)
    breaks(model)
    start = time.perf_counter()
    code = main(["predict", str(fitted["store"]), "--model", str(model),
                 "-o", str(tmp_path / "p.csv")])
    assert time.perf_counter() - start < 10
    assert code == 2
    error = capsys.readouterr().err
    assert f"raptorz predict: error: {model}: " in error
    assert re.search(message, error), error
    assert not (tmp_path / "p.csv").exists()


def test_an_intact_model_still_predicts(fitted: dict[str, Path], tmp_path: Path) -> None:
    for head in ("linear", "mlp"):
        output = tmp_path / f"{head}.csv"
        assert main(["predict", str(fitted["store"]), "--model", str(fitted[head]),
                     "-o", str(output)]) == 0
        assert len(output.read_text().splitlines()) == N + 1
