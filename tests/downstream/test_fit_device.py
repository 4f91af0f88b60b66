"""The heads' device (#29): the linear head's torch float64 sums equal numpy's, ``--device``
end to end, invalid devices refused naming the option, and a GPU fit against a CPU fit."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from raptorz.cli.main import main
from raptorz.defaults import BATCH
from raptorz.downstream.fitting import FitSettings, fit
from raptorz.downstream.labels import FittedTask
from raptorz.downstream.linear import group_sums, group_sums_torch, resolve_device
from raptorz.downstream.settings import HeadSettings
from raptorz.errors import SettingsError

N = 90


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory,
         synthetic: Callable[..., tuple[np.ndarray, list[str], np.ndarray]],
         write_embeddings: Callable[..., Path], write_labels: Callable[..., Path]) -> dict:
    """90 volumes x 24 features in units of 8, a binary target."""
    folder = tmp_path_factory.mktemp("device")
    features, ids, split = synthetic(N, (2, 3, 4))
    score = features.reshape(N, -1) @ np.random.default_rng(1).normal(size=24)
    return {"store": write_embeddings(folder / "e.zarr", features, ids),
            "binary": write_labels(folder / "b.csv", ids, split,
                                   {"label": (score > np.median(score)).astype(int)})}


def _targets(task: FittedTask, n_out: int, rows: int, rng: np.random.Generator) -> np.ndarray:
    if task == "classification":
        return rng.integers(0, max(2, n_out), (rows, 1)).astype(np.float64)
    if task == "regression":
        return rng.normal(size=(rows, n_out))
    y = rng.integers(0, 2, (rows, n_out)).astype(np.float64)
    y[rng.random(y.shape) < 0.3] = np.nan  # missing labels add nothing
    return y


@pytest.mark.parametrize(("task", "n_out"), [("classification", 1), ("classification", 3),
                                             ("multilabel", 4), ("regression", 2)],
                         ids=["two classes", "three classes", "multilabel", "regression"])
def test_torch_sums_equal_numpy_sums(task: FittedTask, n_out: int) -> None:
    """Three models side by side over more rows than a batch: torch on the CPU (the path
    a GPU takes) gives numpy's losses and gradient sums."""
    rng = np.random.default_rng(0)
    rows, width, models = 2 * BATCH + 37, 11, 3
    x = (3 * rng.normal(size=(rows, width))).astype(np.float32)
    x.flags.writeable = False  # as a block arrives on a worker
    y = _targets(task, n_out, rows, rng)
    v, offset = rng.normal(size=(width, models * n_out)), rng.normal(size=models * n_out)
    expected = group_sums(x, y, task, v, offset, n_out)
    got = group_sums_torch(x, y, task, v, offset, n_out, torch.device("cpu"))
    for a, b in zip(got, expected, strict=True):
        assert a.dtype == np.float64 and a.shape == b.shape
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-10)
    assert np.all(np.isfinite(expected[0]))


def test_device_cpu_end_to_end(data: dict, tmp_path: Path) -> None:
    for head in ("linear", "mlp"):
        output = tmp_path / head
        assert main(["fit", str(data["store"]), "--labels", str(data["binary"]), "-o",
                     str(output), "--bootstrap", "0", "--max-iter", "10", "--epochs", "2",
                     "--head", head, "--device", "cpu"]) == 0
        assert json.loads((output / "metrics.json").read_text())["fit"]["device"] == "cpu"
        assert json.loads((output / "model" / "model.json").read_text()
                          )["settings"]["device"] == "cpu"


@pytest.mark.parametrize("name", ["tpu", "cuda:x", "gpu", ""])
def test_a_name_that_is_no_device_is_refused(name: str) -> None:
    with pytest.raises(SettingsError, match="device") as caught:
        HeadSettings(device=name)
    assert caught.value.option == "device"
    with pytest.raises(SettingsError, match="device"):
        resolve_device(name)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
def test_cuda_without_a_gpu_is_refused_naming_the_option(data: dict, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]
                                                         ) -> None:
    for name in ("cuda", "cuda:1"):
        with pytest.raises(SettingsError, match="CUDA") as caught:
            fit(data["store"], data["binary"], tmp_path / "r",
                FitSettings(head=HeadSettings(device=name), bootstrap=0))
        assert caught.value.option == "device"
    assert not (tmp_path / "r").exists()
    assert main(["fit", str(data["store"]), "--labels", str(data["binary"]), "-o",
                 str(tmp_path / "c"), "--device", "tpu"]) == 2
    assert "--device" in capsys.readouterr().err


@pytest.mark.requires_cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_fit_equals_the_cpu_fit(data: dict, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 11)).astype(np.float32)
    y = _targets("multilabel", 2, 300, rng)
    v, offset = rng.normal(size=(11, 4)), rng.normal(size=4)
    for a, b in zip(group_sums(x, y, "multilabel", v, offset, 2, "cuda"),
                    group_sums(x, y, "multilabel", v, offset, 2), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-10)
    for head in (HeadSettings(max_iter=20), HeadSettings(head="mlp", epochs=3)):
        fits = {device: fit(data["store"], data["binary"], tmp_path / f"{head.head}-{device}",
                            FitSettings(head=dataclasses.replace(head, device=device),
                                        bootstrap=0))
                for device in ("cpu", "cuda")}
        assert fits["cuda"].metrics["fit"]["device"].startswith("cuda")
        # float64 sums (linear) agree to rounding; the MLP's float32 kernels differ in
        # the order of their reductions.
        np.testing.assert_allclose(fits["cuda"].predictions.iloc[:, 1:],
                                   fits["cpu"].predictions.iloc[:, 1:], rtol=0,
                                   atol=1e-6 if head.head == "linear" else 1e-5)
