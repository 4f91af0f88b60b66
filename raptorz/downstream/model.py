"""A fitted downstream model: saved safely, reloaded, and applied to new embeddings.

A model is a folder with ``model.json`` (task, targets, classes, the feature variable,
head settings and fit summary) and ``model.safetensors`` (the train statistics and the
head's weights). Neither needs pickle to load. A folder is not trusted: the JSON's types
and the arrays' names, shapes and dtypes are checked against each other before any
network is built or any array is read.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, get_args

import numpy as np
import pandas as pd
import torch
import xarray as xr
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from raptorz import stores
from raptorz.downstream.features import Features, feature_status, memory_budget, open_variable
from raptorz.downstream.heads import Head, MLPHead, build_mlp
from raptorz.downstream.labels import FittedTask, store_index
from raptorz.downstream.linear import LinearHead, Scaling, output_size, to_output
from raptorz.downstream.settings import HeadSettings
from raptorz.errors import InputError
from raptorz.layouts import open_embeddings
from raptorz.stores import store_ids

MODEL_JSON: Final = "model.json"
MODEL_WEIGHTS: Final = "model.safetensors"
#: Largest ``model.json`` read: a real one is a few kB (its fit summary included).
_MAX_JSON: Final = 16 * 2**20
#: Most arrays a weights file may hold: a deep MLP has a few dozen.
_MAX_ARRAYS: Final = 4096
#: Safetensors dtypes of the floating arrays numpy reads, and of torch's.
_FLOATS: Final = frozenset({"F16", "F32", "F64"})
_TORCH_DTYPES: Final = {torch.float32: "F32", torch.int64: "I64"}


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

    Everything is checked before it is used: the JSON's fields and types, then the
    names, shapes and dtypes of the arrays against what the JSON describes (read from
    the safetensors header, before any array), and only then are the arrays read and
    the head built.

    Raises
    ------
    InputError
        Naming the folder, where the model files are missing, unreadable, truncated, of
        the wrong types, or disagree with each other.
    """
    folder = Path(folder)
    info = _read_info(folder)
    settings = info["settings"]
    try:
        with safe_open(folder / MODEL_WEIGHTS, framework="numpy") as weights:
            names = list(weights.keys())
            if len(names) > _MAX_ARRAYS:
                raise InputError(folder, f"{MODEL_WEIGHTS} holds {len(names)} arrays, over "
                                 f"the {_MAX_ARRAYS} a model may hold")
            found = {name: (tuple(weights.get_slice(name).get_shape()),
                            weights.get_slice(name).get_dtype()) for name in names}
            _check_arrays(folder, info, settings, found)
            arrays = {name: weights.get_tensor(name) for name in names}
    except (OSError, SafetensorError) as error:
        raise InputError(folder, f"{MODEL_WEIGHTS} is missing, truncated or not a "
                         f"safetensors file ({type(error).__name__}: {error})") from None
    scaling = Scaling(**{f.name: arrays[f.name] for f in dataclasses.fields(Scaling)})
    head: Head
    if settings.head == "linear":
        head = LinearHead(arrays["weight"], arrays["bias"], arrays["penalty"])
    else:
        model = build_mlp(info["n_features"], _mlp_outputs(info), settings.layers,
                          settings.hidden, settings.dropout)
        model.load_state_dict({k.removeprefix("mlp."): torch.from_numpy(v)
                               for k, v in arrays.items() if k.startswith("mlp.")})
        head = MLPHead(model.eval())
    return FittedModel(info["task"], tuple(info["names"]), tuple(info["classes"]),
                       info["feature"], info["n_features"], settings, scaling, head,
                       info["summary"])


def _read_info(folder: Path) -> dict[str, Any]:
    """``model.json``, its fields' types checked, ``settings`` as :class:`HeadSettings`."""
    path = folder / MODEL_JSON
    try:
        with path.open("rb") as file:
            text = file.read(_MAX_JSON + 1)
        info = json.loads(text)
    except (OSError, ValueError) as error:  # ValueError: bad JSON or bad UTF-8
        hint = f"; the model is in {folder / 'model'}" if (folder / "model" / MODEL_JSON
                                                            ).is_file() else ""
        raise InputError(folder, f"not a raptorz model folder: {MODEL_JSON} cannot be read "
                         f"({type(error).__name__}: {error}){hint}") from None
    if len(text) > _MAX_JSON:
        raise InputError(folder, f"{MODEL_JSON} is over {_MAX_JSON} bytes; not a raptorz model")
    if not isinstance(info, dict):
        raise InputError(folder, f"{MODEL_JSON} holds a {type(info).__name__}, not an object")
    problems = [f"{key} must be {what}" for key, what, ok in [
        ("task", f"one of {get_args(FittedTask)}", info.get("task") in get_args(FittedTask)),
        ("names", "a non-empty list of strings", _strings(info.get("names"), least=1)),
        ("classes", "a list of strings", _strings(info.get("classes"), least=0)),
        ("feature", "a string", isinstance(info.get("feature"), str)),
        ("n_features", "a positive integer", _integer(info.get("n_features"))),
        ("settings", "an object of head settings", _settings_ok(info.get("settings"))),
        ("summary", "an object", isinstance(info.get("summary"), dict)),
    ] if not ok]
    if not problems and info["task"] == "classification" and len(info["classes"]) < 2:
        problems.append("classes must hold at least two classes for a classification")
    if problems:
        raise InputError(folder, f"{MODEL_JSON} is not a raptorz model: " + "; ".join(problems))
    try:
        info["settings"] = HeadSettings(**info["settings"])
    except (TypeError, ValueError) as error:  # SettingsError is a ValueError
        raise InputError(folder, f"{MODEL_JSON} has unusable head settings ({error})") from None
    return info


def _strings(value: object, least: int) -> bool:
    return isinstance(value, list) and len(value) >= least and all(
        isinstance(v, str) for v in value)


def _integer(value: object, least: int = 1) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def _settings_ok(value: object) -> bool:
    """Whether ``value`` holds head settings of the types :class:`HeadSettings` declares."""
    if not isinstance(value, dict):
        return False
    defaults = {f.name: f.default for f in dataclasses.fields(HeadSettings)}
    for key, given in value.items():
        default = defaults.get(key, dataclasses.MISSING)
        if isinstance(default, bool) or default is dataclasses.MISSING:
            return False
        if isinstance(default, tuple):
            ok = isinstance(given, list) and all(
                isinstance(v, int | float) and not isinstance(v, bool) for v in given)
        elif isinstance(default, float):
            ok = isinstance(given, int | float) and not isinstance(given, bool)
        elif isinstance(default, int):
            ok = _integer(given, least=0)
        else:
            ok = isinstance(given, type(default))
        if not ok:
            return False
    return True


def _mlp_outputs(info: dict[str, Any]) -> int:
    """The MLP's outputs: one per class, else one per target."""
    return len(info["classes"]) if info["task"] == "classification" else len(info["names"])


def _check_arrays(folder: Path, info: dict[str, Any], settings: HeadSettings,
                  found: dict[str, tuple[tuple[int, ...], str]]) -> None:
    """Refuse arrays whose names, shapes or dtypes are not those the JSON describes.

    ``found`` maps each array to its shape and safetensors dtype, from the file's header.
    """
    n, task, targets = info["n_features"], info["task"], len(info["names"])
    expected: dict[str, tuple[tuple[int, ...], frozenset[str]]] = {
        **{f"feature_{s}": ((n,), _FLOATS) for s in ("mean", "std")},
        **{f"target_{s}": ((targets,), _FLOATS) for s in ("mean", "std")},
    }
    if settings.head == "linear":
        n_out = output_size(task, targets, len(info["classes"]))
        expected |= {"weight": ((n, n_out), _FLOATS), "bias": ((n_out,), _FLOATS),
                     "penalty": ((1 if task == "classification" else n_out,), _FLOATS)}
    elif settings.layers > len(found):  # bounds the network described before it is built
        raise InputError(folder, f"{MODEL_JSON} describes {settings.layers} layers but "
                         f"{MODEL_WEIGHTS} holds {len(found)} arrays")
    else:
        with torch.device("meta"):  # shapes and dtypes only: nothing is allocated
            network = build_mlp(n, _mlp_outputs(info), settings.layers, settings.hidden,
                                settings.dropout)
        expected |= {f"mlp.{k}": (tuple(v.shape) or (1,), frozenset({_TORCH_DTYPES[v.dtype]}))
                     for k, v in network.state_dict().items()}
    missing = sorted(expected.keys() - found.keys())
    extra = sorted(found.keys() - expected.keys())
    wrong = [f"{k} is {found[k][1]} {list(found[k][0])}, not {'/'.join(sorted(kinds))} "
             f"{list(shape)}" for k, (shape, kinds) in expected.items()
             if k in found and (found[k][0] != shape or found[k][1] not in kinds)]
    problems = ([f"missing {', '.join(missing[:5])}"] if missing else []) + (
        [f"unexpected {', '.join(extra[:5])}"] if extra else []) + wrong[:5]
    if problems:
        raise InputError(folder, f"{MODEL_WEIGHTS} does not match the {settings.head} head "
                         f"{MODEL_JSON} describes ({n} features): " + "; ".join(problems))


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
    positions = _usable_positions(ds, store, ids, fitted.feature)
    features = Features.open(variable, positions, memory_budget(memory_budget_size))
    if features.n_features != fitted.n_features:
        raise InputError(store, f"'{fitted.feature}' has {features.n_features} features; the "
                                f"model was fitted on {fitted.n_features}")
    values = fitted.predict(features, np.arange(len(positions)))
    frame = pd.DataFrame(values, columns=fitted.columns())
    frame.insert(0, id_column, store_ids(ds)[positions])
    return frame


def _usable_positions(ds: xr.Dataset, store: str | Path, ids: list[str] | None,
                      feature: str | None = None) -> np.ndarray:
    """Store positions of ``ids`` (default: all ok volumes, with the regions of ``feature``
    ok); refuses unknown or failed ids.

    Ids match as in a labels CSV (exactly, or without a volume file's extension).
    """
    status = feature_status(ds, feature, stores.read_status(store))
    if ids is None:
        return np.flatnonzero(status == stores.OK)
    found = store_index(np.asarray(ids, str), store_ids(ds))
    bad = (found < 0) | (status[found] != stores.OK)
    if bad.any():
        unknown = np.asarray(ids)[bad]
        raise InputError(store, f"{len(unknown)} id(s) have no ok embedding: "
                                f"{', '.join(unknown[:10])}")
    return found
