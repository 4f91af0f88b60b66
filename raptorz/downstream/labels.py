"""Labels for downstream fitting: the original tool's labels CSV, checked and encoded.

The layout is the original's: the first column is the volume id, a ``split`` column says
``train``, ``val`` or ``test``, and every other column is a target::

    id,split,age,sex_male
    IXI012-HH-1211_T1,train,38.78,1

Every problem is reported as an :class:`~raptorz.errors.InputError` naming the CSV.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal

import numpy as np
import pandas as pd

from raptorz import locations, stores
from raptorz.errors import InputError, RaptorzWarning

Task = Literal["auto", "classification", "multilabel", "regression"]
FittedTask = Literal["classification", "multilabel", "regression"]

SPLITS: Final = ("train", "val", "test")
#: Extensions the original strips from a volume's file name to name its embedding.
ID_SUFFIXES: Final = (".nii.gz", ".nii", ".zip", ".npy")
#: ``auto`` treats one integer-valued column with at most this many values as classes.
MAX_AUTO_CLASSES: Final = 20


class MissingEmbeddingsWarning(RaptorzWarning):
    """Some labelled volumes have no usable embedding and were left out."""


@dataclass(frozen=True)
class Labels:
    """The rows of a labels CSV that are fitted and scored.

    Attributes
    ----------
    path
        The CSV, for messages.
    id_column
        The name of its first column (kept for the predictions' layout).
    ids
        The volume ids as written in the CSV.
    split
        ``train``, ``val`` or ``test`` per row.
    targets
        The target columns, one per target, in the CSV's order.
    """

    path: str | Path
    id_column: str
    ids: np.ndarray
    split: np.ndarray
    targets: pd.DataFrame

    def select(self, rows: np.ndarray) -> Labels:
        """The labels restricted to ``rows`` (integer positions)."""
        return Labels(self.path, self.id_column, self.ids[rows], self.split[rows],
                      self.targets.iloc[rows].reset_index(drop=True))


@dataclass(frozen=True)
class Targets:
    """Targets encoded for a head.

    Attributes
    ----------
    task
        The task fitted.
    names
        The target columns.
    values
        ``(n, len(names))`` float64: class indices (classification), 0/1 (multilabel) or
        values (regression); NaN where a target is missing (masked per target).
    classes
        The class labels of a classification target (as text), else empty.
    """

    task: FittedTask
    names: tuple[str, ...]
    values: np.ndarray
    classes: tuple[str, ...] = ()


def read_labels(path: str | Path, targets: Sequence[str] | None = None) -> Labels:
    """Read and check a labels CSV.

    Parameters
    ----------
    path
        The CSV: volume id first, a ``split`` column, then one column per target.
    targets
        The target columns to keep (default: all of them).

    Raises
    ------
    InputError
        Where the file is missing or unreadable, has no ``split`` column, an unknown
        split name, a repeated id, or no (or an unknown) target column.
    """
    path = locations.location(path)  # pandas reads a URL through fsspec
    if not (locations.exists(path) if isinstance(path, str) else path.is_file()):
        raise InputError(path, "labels file not found")
    try:
        header = pd.read_csv(path, nrows=0).columns
        frame = pd.read_csv(path, dtype={header[0]: str, "split": str} if len(header) else None)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as error:
        raise InputError(path, f"not a readable CSV ({error})") from None
    layout = "expected the volume id first, a 'split' column (train/val/test), then targets"
    if "split" not in frame.columns:
        raise InputError(path, f"no 'split' column (columns: {', '.join(map(str, header))}); "
                               f"{layout}")
    id_column = str(header[0])
    if id_column == "split":
        raise InputError(path, f"the first column must be the volume id; {layout}")
    split = frame["split"].astype(str).str.strip().str.lower().to_numpy()
    unknown = sorted(set(split) - set(SPLITS))
    if unknown:
        raise InputError(path, f"unknown split name(s) {unknown}; use train, val or test")
    ids = frame[id_column].astype(str).str.strip().to_numpy()
    repeated = pd.Series(ids)[pd.Series(ids).duplicated()].unique()
    if len(repeated):
        raise InputError(path, f"{len(repeated)} id(s) appear more than once, e.g. "
                               f"{', '.join(repeated[:5])}")
    columns = [c for c in frame.columns if c not in (id_column, "split")]
    if targets:
        missing = [t for t in targets if t not in columns]
        if missing:
            raise InputError(path, f"no target column(s) {missing}; targets are {columns}")
        columns = list(targets)
    if not columns:
        raise InputError(path, f"no target columns; {layout}")
    return Labels(path, id_column, ids, split, frame[columns].reset_index(drop=True))



def store_index(label_ids: np.ndarray, store_ids: np.ndarray) -> np.ndarray:
    """The position of each label id in the store's ids; -1 where it has none.

    An id matches exactly, or after stripping the extension the original drops when it
    names a volume's embedding (``.nii.gz``, ``.nii``, ``.zip``, ``.npy``).
    """
    where = {str(name): i for i, name in enumerate(store_ids)}
    found = np.full(len(label_ids), -1, np.int64)
    for row, name in enumerate(label_ids):
        if name in where:
            found[row] = where[name]
            continue
        for suffix in ID_SUFFIXES:
            if name.endswith(suffix) and name[: -len(suffix)] in where:
                found[row] = where[name[: -len(suffix)]]
                break
    return found


def match_embeddings(labels: Labels, store_ids: np.ndarray, status: np.ndarray,
                     store: str | Path, *, strict: bool = False) -> tuple[Labels, np.ndarray]:
    """Keep the labelled volumes that have an ``ok`` embedding.

    Returns
    -------
    labels, rows
        The labels of the kept volumes and their positions in the store.

    Raises
    ------
    InputError
        With ``strict``, where any labelled volume has no embedding or a failed one;
        always, where a split is left with no rows.

    Warns
    -----
    MissingEmbeddingsWarning
        Listing the volumes left out (without ``strict``).
    """
    found = store_index(labels.ids, store_ids)
    usable = found >= 0
    usable[usable] = status[found[usable]] == stores.OK
    if not usable.all():
        absent = labels.ids[found < 0]
        bad = labels.ids[(found >= 0) & ~usable]
        parts = [f"{len(names)} {what} ({', '.join(names[:10])}{', ...' * (len(names) > 10)})"
                 for names, what in ((absent, "have no embedding"),
                                     (bad, "have a failed or pending embedding")) if len(names)]
        message = f"labelled volumes missing from {store}: {'; '.join(parts)}"
        if strict:
            raise InputError(labels.path, message)
        warnings.warn(f"{labels.path}: {message}; they are left out", MissingEmbeddingsWarning,
                      stacklevel=2)
    kept = labels.select(np.flatnonzero(usable))
    for name in SPLITS:
        if not np.any(kept.split == name):
            raise InputError(labels.path, f"the {name} split has no rows with an embedding "
                                          f"in {store}")
    return kept, found[usable]


def infer_task(labels: Labels) -> tuple[FittedTask, str]:
    """Infer the task from the targets; returns it and the reason, for the user."""
    frame = labels.targets
    numeric = [pd.api.types.is_numeric_dtype(frame[c]) for c in frame.columns]
    if len(frame.columns) == 1:
        column = frame.iloc[:, 0].dropna()
        if not numeric[0]:
            return "classification", f"'{frame.columns[0]}' holds text labels"
        values = column.unique()
        if np.all(values == np.round(values)) and len(values) <= MAX_AUTO_CLASSES:
            return "classification", (f"'{frame.columns[0]}' holds {len(values)} integer "
                                      f"values (at most {MAX_AUTO_CLASSES} count as classes)")
    if not all(numeric):
        text = [c for c, n in zip(frame.columns, numeric, strict=True) if not n]
        raise InputError(labels.path, f"text target column(s) {text} can only be fitted as a "
                                      "single classification target; choose one with --targets")
    if len(frame.columns) > 1 and frame.isin([0, 1]).where(frame.notna(), True).all().all():
        return "multilabel", f"{len(frame.columns)} targets, all 0/1"
    return "regression", f"{len(frame.columns)} numeric target(s)"


def encode_targets(labels: Labels, task: Task) -> tuple[Targets, str]:
    """Encode the targets for ``task`` (``auto`` inferred) and check them on train.

    Returns
    -------
    targets, reason
        The encoded targets and why the task is what it is.

    Raises
    ------
    InputError
        Where a target is constant on train, a classification target is missing on some
        rows or has a class that train lacks, or a target is not numeric where it must be.
    """
    if task == "auto":
        fitted, reason = infer_task(labels)
    else:
        fitted, reason = task, "chosen with --task"
    frame, train = labels.targets, labels.split == "train"
    names = tuple(str(c) for c in frame.columns)
    if fitted == "classification":
        if len(names) != 1:
            raise InputError(labels.path, f"classification fits one target column, got {names};"
                                          " choose one with --targets, or use --task multilabel")
        column = frame.iloc[:, 0]
        if column.isna().any():
            raise InputError(labels.path, f"{int(column.isna().sum())} row(s) have no value in "
                                          f"'{names[0]}' (e.g. {labels.ids[column.isna()][0]})")
        text = column.map(_class_name).to_numpy()
        classes = tuple(sorted(set(text), key=_class_order))
        if len(set(text[train])) < len(classes):
            raise InputError(labels.path, f"target '{names[0]}' has classes that train lacks: "
                                          f"{sorted(set(classes) - set(text[train]))}")
        if len(classes) < 2:
            raise InputError(labels.path, f"target '{names[0]}' is constant on train")
        index = {name: i for i, name in enumerate(classes)}
        values = np.array([index[t] for t in text], np.float64)[:, None]
        return Targets(fitted, names, values, classes), reason
    try:
        values = frame.to_numpy(np.float64)
    except ValueError:
        raise InputError(labels.path, f"{fitted} needs numeric targets; columns {names}") from None
    if fitted == "multilabel" and not np.isin(values[~np.isnan(values)], (0, 1)).all():
        raise InputError(labels.path, f"multilabel targets must be 0 or 1; columns {names}")
    for j, name in enumerate(names):
        observed = values[train, j][~np.isnan(values[train, j])]
        if len(observed) == 0 or np.all(observed == observed[0]):
            detail = " (all values missing)" if len(observed) == 0 else ""
            raise InputError(labels.path, f"target '{name}' is constant on train{detail}")
    return Targets(fitted, names, values), reason


def _class_name(value: object) -> str:
    """A class label as text; integer-valued numbers lose their ``.0``."""
    if isinstance(value, float | np.floating) and float(value).is_integer():
        return str(int(value))
    return str(value)


def _class_order(name: str) -> tuple[int, float, str]:
    """Numeric class names sort by value, before text ones."""
    try:
        return (0, float(name), name)
    except ValueError:
        return (1, 0.0, name)
