"""A fitted downstream model: saved safely, reloaded, and applied to new embeddings.

A model is a folder with ``model.json`` (task, targets, classes, the feature variable,
head settings and fit summary) and ``model.safetensors`` (the train statistics and the
head's weights). Neither needs pickle to load.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np
import pandas as pd
import torch
import xarray as xr
from safetensors.numpy import load_file, save_file

from raptorz import stores
from raptorz.downstream.features import Features, memory_budget, open_variable
from raptorz.downstream.heads import (
    Head,
    LinearHead,
    MLPHead,
    Scaling,
    build_mlp,
    to_output,
)
from raptorz.downstream.labels import FittedTask, store_index
from raptorz.downstream.settings import HeadSettings
from raptorz.errors import InputError
from raptorz.layouts import open_embeddings
from raptorz.stores import store_ids

MODEL_JSON: Final = "model.json"
MODEL_WEIGHTS: Final = "model.safetensors"


@dataclass(frozen=True)
class FittedModel:
    """Everything needed to predict from an embeddings store.

    Attributes
    ----------
    task, names, classes
        What is predicted: the task, the target names, a classification target's classes.
    feature, n_features
        The store variable the head reads, and its flattened length.
    settings, scaling, head
        How the head was fitted, the train statistics and the head.
    summary
        The fit's record (chosen penalties, epochs, inferred task...).
    """

    task: FittedTask
    names: tuple[str, ...]
    classes: tuple[str, ...]
    feature: str
    n_features: int
    settings: HeadSettings
    scaling: Scaling
    head: Head
    summary: dict[str, Any]

    def predict(self, features: Features, rows: np.ndarray) -> np.ndarray:
        """Class probabilities (classification, multilabel) or values of ``rows``."""
        return to_output(self.task, self.head.raw(features, rows, self.scaling), self.scaling)

    def columns(self) -> list[str]:
        """Prediction columns: one per class (``<target>_<class>``) or one per target."""
        if self.task == "classification":
            return [f"{self.names[0]}_{c}" for c in self.classes]
        return list(self.names)

    def save(self, folder: str | Path) -> Path:
        """Write ``model.json`` and ``model.safetensors`` into ``folder``; returns it."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        arrays = {**self.scaling.arrays(), **self.head.arrays()}
        save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, folder / MODEL_WEIGHTS)
        info = {"task": self.task, "names": list(self.names), "classes": list(self.classes),
                "feature": self.feature, "n_features": self.n_features,
                "settings": dataclasses.asdict(self.settings), "summary": self.summary}
        (folder / MODEL_JSON).write_text(json.dumps(stores.json_attr(info), indent=2))
        return folder


def load_model(folder: str | Path) -> FittedModel:
    """Read a model written by :meth:`FittedModel.save` (``raptorz fit``'s ``model/``).

    Raises
    ------
    InputError
        Where the folder lacks the model files or they are unreadable.
    """
    folder = Path(folder)
    try:
        info = json.loads((folder / MODEL_JSON).read_text())
        arrays = load_file(folder / MODEL_WEIGHTS)
    except (OSError, ValueError) as error:
        raise InputError(folder, f"not a raptorz model folder ({error})") from None
    settings = HeadSettings(**{**info["settings"],
                               "penalties": tuple(info["settings"]["penalties"])})
    scaling = Scaling(**{f.name: arrays[f.name] for f in dataclasses.fields(Scaling)})
    head: Head
    if settings.head == "linear":
        head = LinearHead(arrays["weight"], arrays["bias"], arrays["penalty"])
    else:
        state = {k.removeprefix("mlp."): torch.from_numpy(v) for k, v in arrays.items()
                 if k.startswith("mlp.")}
        last = max(int(k.split(".")[0]) for k in state)  # the output Linear layer
        n_out = state[f"{last}.bias"].shape[0]
        model = build_mlp(info["n_features"], n_out, settings.layers, settings.hidden,
                          settings.dropout)
        model.load_state_dict(state)
        head = MLPHead(model.eval())
    return FittedModel(info["task"], tuple(info["names"]), tuple(info["classes"]),
                       info["feature"], int(info["n_features"]), settings, scaling, head,
                       info["summary"])


def predict(store: str | Path, model: str | Path | FittedModel, *,
            ids: list[str] | None = None, memory_budget_size: str | int | None = None,
            id_column: str = "id") -> pd.DataFrame:
    """Predict from an embeddings store with a fitted model.

    Parameters
    ----------
    store
        The embeddings store; it must hold the model's feature variable.
    model
        A model folder or a loaded model.
    ids
        The volumes to predict (default: every volume whose embedding is ok).
    memory_budget_size
        As ``raptorz fit --memory-budget``.
    id_column
        The name of the id column of the result.

    Returns
    -------
    One row per volume: its id, then the model's prediction columns.
    """
    fitted = model if isinstance(model, FittedModel) else load_model(model)
    ds = open_embeddings(store)
    variable = open_variable(ds, store, fitted.feature)
    positions = _usable_positions(ds, store, ids)
    features = Features.open(variable, positions, memory_budget(memory_budget_size))
    if features.n_features != fitted.n_features:
        raise InputError(store, f"'{fitted.feature}' has {features.n_features} features; the "
                                f"model was fitted on {fitted.n_features}")
    values = fitted.predict(features, np.arange(len(positions)))
    frame = pd.DataFrame(values, columns=fitted.columns())
    frame.insert(0, id_column, store_ids(ds)[positions])
    return frame


def _usable_positions(ds: xr.Dataset, store: str | Path, ids: list[str] | None) -> np.ndarray:
    """Store positions of ``ids`` (default: all ok volumes); refuses unknown or failed ids.

    Ids match as in a labels CSV (exactly, or without a volume file's extension).
    """
    status = stores.read_status(store)
    if ids is None:
        return np.flatnonzero(status == stores.OK)
    found = store_index(np.asarray(ids, str), store_ids(ds))
    bad = (found < 0) | (status[found] != stores.OK)
    if bad.any():
        unknown = np.asarray(ids)[bad]
        raise InputError(store, f"{len(unknown)} id(s) have no ok embedding: "
                                f"{', '.join(unknown[:10])}")
    return found
