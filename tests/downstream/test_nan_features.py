"""``fit`` and ``predict`` refuse features that hold NaN for a volume marked ok, naming the
store and the ids, whether the features are held in memory or streamed."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from raptorz.downstream.fitting import FitSettings, fit
from raptorz.downstream.model import predict
from raptorz.errors import InputError

N = 30


@pytest.mark.parametrize("budget", [None, "1KB"], ids=["in memory", "streamed"])
def test_nan_features_of_ok_volumes_are_refused(
        tmp_path: Path, budget: str | None,
        synthetic: Callable[..., tuple[np.ndarray, list[str], np.ndarray]],
        write_embeddings: Callable[..., Path], write_labels: Callable[..., Path]) -> None:
    features, ids, split = synthetic(N, (1, 2, 3))
    label = (features.reshape(N, -1).sum(axis=1) > 0).astype(int)
    labels = write_labels(tmp_path / "labels.csv", ids, split, {"label": label})
    clean = write_embeddings(tmp_path / "clean.zarr", features, ids, chunk=5)
    settings = FitSettings(bootstrap=5, memory_budget=budget)
    model = fit(clean, labels, tmp_path / "out", settings).model
    holed = features.copy()
    holed[[3, 17], 0, 1] = np.nan  # rows an interrupted projection leaves behind
    store = write_embeddings(tmp_path / "holed.zarr", holed, ids, chunk=5)
    with pytest.raises(InputError, match=rf"{store}: .*NaN.*(v3|v17)"):
        fit(store, labels, tmp_path / "out2", settings)
    with pytest.raises(InputError, match=rf"{store}: .*NaN.*(v3|v17)"):
        predict(store, model, memory_budget_size=budget)
