"""Small, seeded embeddings stores and labels CSVs for the fitting tests and benchmark."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import dask.array as da
import numpy as np
import pandas as pd
import xarray as xr

from raptorz import stores

PROJECTOR = "proj_normal_d8_k4_run1"


def write_embeddings(path: Path, features: np.ndarray, ids: Sequence[str], *,
                     chunk: int = 8, status: np.ndarray | None = None,
                     name: str = PROJECTOR) -> Path:
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


def synthetic(n: int = 150, shape: tuple[int, int, int] = (3, 4, 5), seed: int = 0
              ) -> tuple[np.ndarray, list[str], np.ndarray]:
    """Seeded features ``(n, *shape)``, ids ``v0...``, and splits 60/20/20 in a shuffled order."""
    rng = np.random.default_rng(seed)
    features = rng.normal(2.0, 3.0, (n, *shape)).astype(np.float32)
    split = np.array(["train"] * (3 * n // 5) + ["val"] * (n // 5)
                     + ["test"] * (n - 3 * n // 5 - n // 5))
    return features, [f"v{i}" for i in range(n)], rng.permutation(split)


def write_labels(path: Path, ids: Sequence[str], split: np.ndarray,
                 columns: dict[str, np.ndarray], id_column: str = "id") -> Path:
    """A labels CSV in the original's layout."""
    frame = pd.DataFrame({id_column: list(ids), "split": split, **columns})
    frame.to_csv(path, index=False)
    return path
