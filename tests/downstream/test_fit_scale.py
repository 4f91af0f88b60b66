"""Fitting at scale (#29): the features held once, one pass serving every penalty, an MLP
epoch reading the data once, and a local uncompressed copy read after the first pass."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from raptorz import stores
from raptorz.downstream import heads
from raptorz.downstream.features import Features, statistics
from raptorz.downstream.fitting import FitSettings, fit
from raptorz.downstream.settings import HeadSettings
from raptorz.downstream.sums import FAN_IN, tree_reduce

N = 120
SHAPE = (2, 3, 4)

_PEAK = """
import json, sys, tracemalloc
import matplotlib.pyplot  # imported by the fit's plot: outside the count
from raptorz.downstream.fitting import FitSettings, fit
from raptorz.downstream.settings import HeadSettings
from raptorz.downstream.sums import FAN_IN, tree_reduce
store, labels, output = sys.argv[1:4]
settings = FitSettings(head=HeadSettings(max_iter=2), bootstrap=0)
tracemalloc.start()
fit(store, labels, output, settings)
print(json.dumps(tracemalloc.get_traced_memory()[1]))
"""


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory,
         synthetic: Callable[..., tuple[np.ndarray, list[str], np.ndarray]],
         write_embeddings: Callable[..., Path], write_labels: Callable[..., Path]) -> dict:
    """A store of 120 volumes x 24 features in units of 8, a binary and a regression target."""
    folder = tmp_path_factory.mktemp("scale")
    features, ids, split = synthetic(N, SHAPE)
    x = features.reshape(N, -1).astype(np.float64)
    score = x @ np.random.default_rng(1).normal(size=x.shape[1])
    store = write_embeddings(folder / "embeddings.zarr", features, ids)
    binary = write_labels(folder / "binary.csv", ids, split,
                          {"label": (score > np.median(score)).astype(int)})
    regression = write_labels(folder / "regression.csv", ids, split, {"y": 3 + score})
    return {"store": store, "binary": binary, "regression": regression, "split": split,
            "folder": folder}


def test_in_memory_fit_holds_the_features_once(
        tmp_path: Path, synthetic: Callable[..., tuple[np.ndarray, list[str], np.ndarray]],
        write_embeddings: Callable[..., Path], write_labels: Callable[..., Path]) -> None:
    """Peak traced memory of a fit whose features are held in memory: at most 1.5x them."""
    # 229 MB of float32 in units of 100 volumes (8 MB) as embed writes them: beside the
    # features a pass holds a few units being read (32 MB at most) and a float64 batch.
    n, width = 3000, 20_000
    features, ids, split = synthetic(n, (1, 100, 200))
    store = write_embeddings(tmp_path / "e.zarr", features, ids, chunk=100)
    labels = write_labels(tmp_path / "l.csv", ids, split,
                          {"label": np.random.default_rng(2).integers(0, 2, n)})
    del features
    done = subprocess.run([sys.executable, "-c", _PEAK, str(store), str(labels),
                           str(tmp_path / "out")], capture_output=True, text=True, check=True)
    peak = json.loads(done.stdout.strip().splitlines()[-1])
    assert peak <= 1.5 * n * width * 4, f"peak {peak / 2**20:.0f} MiB for 229 MiB of features"


@pytest.mark.parametrize("budget", [None, 1000], ids=["in memory", "streamed"])
def test_one_pass_serves_every_penalty(data: dict, tmp_path: Path, budget: int | None) -> None:
    settings = FitSettings(head=HeadSettings(max_iter=30), bootstrap=0, memory_budget=budget)
    result = fit(data["store"], data["binary"], tmp_path / "all", settings)
    path = result.metrics["fit"]["path"]
    rounds = result.metrics["fit"]["rounds"]
    # The longest optimizer sets the passes, not the sum of all five.
    assert rounds == max(p["evaluations"] for p in path) < sum(p["evaluations"] for p in path)
    load = 1 if budget is None else 0
    # (loading,) the statistics, the optimizers' rounds, val (every C at once), test
    assert result.metrics["passes"] == load + 1 + rounds + 1 + 1
    written = json.loads((tmp_path / "all" / "metrics.json").read_text())
    assert written["passes"] == result.metrics["passes"]
    # Side by side, each penalty reaches the optimum it reaches alone.
    chosen = result.model.summary["penalty"][0]
    alone = fit(data["store"], data["binary"], tmp_path / "alone",
                FitSettings(head=HeadSettings(max_iter=30, penalties=(chosen,)), bootstrap=0,
                            memory_budget=budget))
    np.testing.assert_allclose(result.predictions.iloc[:, 1:], alone.predictions.iloc[:, 1:],
                               atol=1e-6)


def test_regression_targets_side_by_side(data: dict, tmp_path: Path) -> None:
    settings = FitSettings(head=HeadSettings(tol=1e-10, max_iter=500), bootstrap=0)
    result = fit(data["store"], data["regression"], tmp_path / "r", settings)
    assert result.metrics["targets"]["y"]["R2"]["value"] > 0.99
    chosen = result.model.summary["penalty"][0]
    alone = fit(data["store"], data["regression"], tmp_path / "one",
                FitSettings(head=HeadSettings(tol=1e-10, max_iter=500, penalties=(chosen,)),
                            bootstrap=0))
    np.testing.assert_allclose(result.predictions["y"], alone.predictions["y"], rtol=1e-6)


def test_mlp_epoch_reads_the_train_rows_once(data: dict, tmp_path: Path) -> None:
    settings = FitSettings(head=HeadSettings(head="mlp", epochs=3, patience=5), bootstrap=0,
                           memory_budget=1000)
    result = fit(data["store"], data["binary"], tmp_path, settings)
    # the statistics, then per epoch the train rows and val, then test
    assert result.metrics["passes"] == 1 + 3 * 2 + 1


def test_mlp_windows_read_whole_groups(data: dict, projector_name: str, tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Train rows beyond one shuffle window: each window is whole store groups, every row
    once, and features in memory or streamed train the same MLP."""
    variable = stores.open_store(data["store"], "embeddings")[projector_name]
    features = Features.open(variable, np.arange(N), 0)
    monkeypatch.setattr(heads, "SHUFFLE_BYTES", 20 * 4 * features.n_features)
    train = np.flatnonzero(data["split"] == "train")
    windows = heads.epoch_windows(features, train, np.random.default_rng(0))
    assert len(windows) > 1
    np.testing.assert_array_equal(np.sort(np.concatenate(windows)), train)
    groups = {tuple(g) for g in features.groups(train)}
    assert {tuple(g) for w in windows for g in features.groups(w)} == groups
    head = HeadSettings(head="mlp", epochs=2, dropout=0.1)
    memory = fit(data["store"], data["binary"], tmp_path / "m",
                 FitSettings(head=head, bootstrap=0))
    streamed = fit(data["store"], data["binary"], tmp_path / "s",
                   FitSettings(head=head, bootstrap=0, memory_budget=1000))
    pd.testing.assert_frame_equal(memory.predictions, streamed.predictions, check_exact=True)


def test_local_copy_serves_the_passes_after_the_first(data: dict, projector_name: str,
                                                      tmp_path: Path) -> None:
    store = tmp_path / "embeddings.zarr"
    shutil.copytree(data["store"], store)
    variable = stores.open_store(store, "embeddings")[projector_name]
    rows = np.flatnonzero(data["split"] == "train")
    cached = Features.open(variable, np.arange(N), 0, cache=tmp_path / "cache")
    assert cached.streaming and cached.local is not None
    first = statistics(cached, rows)
    assert list((tmp_path / "cache").iterdir()) == []  # the copy's file is unlinked at once
    # The store's chunks gone, a second pass reads the copy alone.
    for chunk in (store / projector_name / "c").iterdir():
        shutil.rmtree(chunk)
    again = statistics(cached, rows)
    np.testing.assert_array_equal(first[0], again[0])
    np.testing.assert_array_equal(first[1], again[1])


def test_cached_fit_equals_the_streamed_one(data: dict, tmp_path: Path) -> None:
    streamed = fit(data["store"], data["binary"], tmp_path / "s",
                   FitSettings(bootstrap=0, memory_budget=1000))
    cached = fit(data["store"], data["binary"], tmp_path / "c",
                 FitSettings(bootstrap=0, memory_budget=1000, cache=tmp_path / "cache"))
    pd.testing.assert_frame_equal(streamed.predictions, cached.predictions, check_exact=True)


def test_partial_sums_combine_in_a_fixed_order() -> None:
    """Streamed here or listed on workers, a pass's parts combine in the same groups."""
    def listed(parts: list[str]) -> str:
        while len(parts) > 1:
            parts = [p[0] if len(p) == 1 else "(" + "+".join(p) + ")"
                     for p in (parts[i:i + FAN_IN] for i in range(0, len(parts), FAN_IN))]
        return parts[0]

    for count in (1, 2, FAN_IN, FAN_IN + 1, FAN_IN**2, FAN_IN**2 + 3, 150):
        parts = [str(i) for i in range(count)]
        assert tree_reduce(iter(parts), lambda p: "(" + "+".join(p) + ")") == listed(parts)
    assert tree_reduce(iter([]), lambda p: "".join(p)) is None
