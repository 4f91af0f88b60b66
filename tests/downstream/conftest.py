"""Fixtures of the fitting tests: small, seeded embeddings stores and labels CSVs.

Each writer is a fixture that returns the writing function (pytest's factory fixtures).
``benchmarks/bench_fit.py`` loads this file by its path for the same writers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import dask.array as da
import numpy as np
import pandas as pd
import pytest
import xarray as xr

from raptorz import stores

#: The feature variable (projector name) of :func:`_write_embeddings`'s stores.
_PROJECTOR = "proj_normal_d8_k4_run1"


def _write_embeddings(path: Path, features: np.ndarray, ids: Sequence[str], *,
                      chunk: int = 8, status: np.ndarray | None = None,
                      name: str = _PROJECTOR) -> Path:
    """An embeddings store laid out as ``raptorz embed`` writes it.

    ``features`` is ``(n, plane, k, token)``; its mean over ``k`` stands in for the
    ``avgpool`` baseline. Volumes whose ``status`` is not ok get no data, as a failed
    chunk of a real run.
    """
    n, planes, k, tokens = features.shape
    status = np.full(n, stores.OK, np.int8) if status is None else np.asarray(status, np.int8)
    dims = ("id", "plane", f"k_{name}", "token")
    template = xr.Dataset(
        {name: (dims, da.zeros(features.shape, chunks=(chunk, planes, k, tokens), dtype="f4")),
         "avgpool": (("id", "dim"), da.zeros((n, tokens), chunks=(chunk, tokens), dtype="f4")),
         **stores.status_variables(n, chunk)},
        coords={"id": stores.as_strings(ids), "plane": stores.as_strings("ACS"[:planes]),
                "token": np.arange(tokens)},
        attrs={"projectors": {name: {"seed": 0, "dim": 8, "k": k}}})
    stores.create_store(path, template, "embeddings")
    for region in stores.chunk_slices(n, chunk):
        ok = status[region] == stores.OK
        data = {name: xr.DataArray(np.where(ok[:, None, None, None], features[region], 0),
                                   dims=dims),
                "avgpool": xr.DataArray(features[region].mean(axis=(1, 2)), dims=("id", "dim"))}
        errors = ["" if good else "unreadable volume" for good in ok]
        stores.write_units(path, data, region, status[region], errors)
    return path


def _synthetic(n: int = 150, shape: tuple[int, int, int] = (3, 4, 5), seed: int = 0
               ) -> tuple[np.ndarray, list[str], np.ndarray]:
    """Seeded features ``(n, *shape)``, ids ``v0...``, and splits 60/20/20 in a shuffled order."""
    rng = np.random.default_rng(seed)
    features = rng.normal(2.0, 3.0, (n, *shape)).astype(np.float32)
    split = np.array(["train"] * (3 * n // 5) + ["val"] * (n // 5)
                     + ["test"] * (n - 3 * n // 5 - n // 5))
    return features, [f"v{i}" for i in range(n)], rng.permutation(split)


def _write_labels(path: Path, ids: Sequence[str], split: np.ndarray,
                  columns: dict[str, np.ndarray], id_column: str = "id") -> Path:
    """A labels CSV in the original's layout."""
    frame = pd.DataFrame({id_column: list(ids), "split": split, **columns})
    frame.to_csv(path, index=False)
    return path


@pytest.fixture(scope="session")
def projector_name() -> str:
    """The feature variable of the stores :func:`write_embeddings` writes by default."""
    return _PROJECTOR


@pytest.fixture(scope="session")
def write_embeddings() -> Callable[..., Path]:
    """``write_embeddings(path, features, ids, *, chunk=8, status=None, name=projector_name)
    -> path``: an embeddings store of ``features`` ``(n, plane, k, token)`` laid out as
    ``raptorz embed`` writes it (volumes whose ``status`` is not ok get no data)."""
    return _write_embeddings


@pytest.fixture(scope="session")
def synthetic() -> Callable[..., tuple[np.ndarray, list[str], np.ndarray]]:
    """``synthetic(n=150, shape=(3, 4, 5), seed=0) -> (features, ids, split)``: seeded
    features, ids ``v0...`` and splits 60/20/20 in a shuffled order."""
    return _synthetic


@pytest.fixture(scope="session")
def write_labels() -> Callable[..., Path]:
    """``write_labels(path, ids, split, columns, id_column="id") -> path``: a labels CSV in
    the original's layout."""
    return _write_labels
