"""Grouped scoring of several models on shared bootstrap resamples (the paper's Table 5).

Each target is scored by the squared Pearson correlation ``r^2`` between truth and
prediction on the test split (or, with ``metric="auroc"``, by the AUROC of a binary
target). A target ``t`` fitted as a binary classification has no column ``t`` in
``predictions.csv``; its ``t_1`` column, the probability of class 1, is scored.

A group of targets (e.g. the 8 hippocampus IDPs) scores the
mean ``r^2`` over its targets, with a 95% percentile interval from bootstrap resamples of
the test rows; or, with ``interval="original"``, as the original tool reports it: the
mean of the group's bootstrap values -/+ 1.95 of their standard deviations
(:func:`~raptorz.downstream.metrics.bootstrap_interval`). The resamples are drawn once and
shared by every target and every model, and saved (``resamples.npz``), so a model scored
later is scored on the very same rows and two models can be compared pair by pair: a
paired difference per resample. ``r^2`` and the resamples are those of ``raptorz fit``
(:func:`~raptorz.downstream.metrics.squared_pearson`: NaN for a constant prediction).

Groups come from a JSON file: ``{"name": ["col", ...]}`` names the target columns, and
``{"name": "word"}`` takes every target whose description contains ``word`` (case
ignored), the descriptions coming from a metadata CSV with ``field_id`` and
``description`` columns. A target column matches a field id exactly or as
``<field_id>-<instance>`` (UK Biobank's ``25005-2.0``).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal

import numpy as np
import pandas as pd

from raptorz.downstream.labels import read_labels
from raptorz.downstream.metrics import (
    INTERVALS,
    Interval,
    binary_auroc,
    bootstrap_indices,
    bootstrap_interval,
    squared_pearson,
)
from raptorz.downstream.tables import cells, to_latex, to_markdown
from raptorz.errors import InputError, SettingsError

#: The metadata CSV's columns: a target's field id and its description.
METADATA_COLUMNS: Final = ("field_id", "description")
#: ``r2``: squared Pearson correlation (the paper's IDP score); ``auroc``: binary targets.
Metric = Literal["r2", "auroc"]


@dataclass(frozen=True)
class Resamples:
    """Bootstrap resamples of the test rows, shared by every target and model.

    Attributes
    ----------
    ids
        The test ids, in the order the rows are numbered.
    indices
        ``(resamples, len(ids))`` row numbers, each row one resample with replacement.
    seed
        The seed they were drawn with.
    """

    ids: np.ndarray
    indices: np.ndarray
    seed: int

    @classmethod
    def draw(cls, ids: Sequence[str], resamples: int, seed: int) -> Resamples:
        """Draw ``resamples`` resamples of ``ids`` (:func:`~raptorz.downstream.metrics.
        bootstrap_indices`: those ``raptorz fit`` draws with the same seed)."""
        return cls(np.asarray(ids, str), bootstrap_indices(len(ids), resamples, seed), seed)

    def save(self, path: str | Path) -> Path:
        """Write ``ids``, ``indices`` and ``seed`` to an ``.npz`` file."""
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, ids=self.ids, indices=self.indices, seed=self.seed)
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> Resamples:
        """Read resamples saved by :meth:`save`."""
        try:
            with np.load(path, allow_pickle=False) as data:
                return cls(data["ids"].astype(str), data["indices"], int(data["seed"]))
        except (OSError, KeyError, ValueError) as error:
            raise InputError(path, f"not a raptorz resamples file ({error})") from None

    @classmethod
    def shared(cls, path: str | Path, ids: Sequence[str], resamples: int,
               seed: int) -> Resamples:
        """The resamples saved at ``path``, or new ones drawn and saved there.

        Raises
        ------
        InputError
            Where the saved resamples are of other test ids than ``ids``.
        """
        path = Path(path)
        if not path.exists():
            drawn = cls.draw(ids, resamples, seed)
            drawn.save(path)
            return drawn
        saved = cls.load(path)
        if sorted(saved.ids.tolist()) != sorted(map(str, ids)):
            raise InputError(path, "holds resamples of other test ids than these labels; "
                             "delete it or name another --resamples file")
        return saved


def read_metadata(path: str | Path) -> dict[str, str]:
    """Field id -> description, from a metadata CSV with ``field_id`` and ``description``.

    Raises
    ------
    InputError
        Where the file is missing, unreadable, or lacks either column.
    """
    path = Path(path)
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError,
            UnicodeDecodeError) as error:
        raise InputError(path, f"not a readable metadata CSV ({error})") from None
    missing = [c for c in METADATA_COLUMNS if c not in frame.columns]
    if missing:
        raise InputError(path, f"metadata CSV lacks column(s) {', '.join(missing)}; it needs "
                         f"{' and '.join(METADATA_COLUMNS)} (columns: "
                         f"{', '.join(map(str, frame.columns)) or 'none'})")
    return dict(zip(frame["field_id"].str.strip(), frame["description"], strict=True))


def describe_targets(targets: Sequence[str], metadata: Mapping[str, str]) -> dict[str, str]:
    """Each target's description: its own field id's, or ``<field_id>-<instance>``'s."""
    out = {}
    for target in targets:
        key = target if target in metadata else target.split("-", 1)[0]
        if key in metadata:
            out[target] = metadata[key]
    return out


def resolve_groups(spec: Mapping[str, str | Sequence[str]], targets: Sequence[str],
                   descriptions: Mapping[str, str] | None, source: str | Path
                   ) -> dict[str, list[str]]:
    """Group name -> its target columns, from lists of columns or words in descriptions.

    Raises
    ------
    InputError
        Naming ``source`` where a group names an unknown target, a word group has no
        metadata to match against, or a group ends up empty.
    """
    groups: dict[str, list[str]] = {}
    for name, members in spec.items():
        if isinstance(members, str):
            if descriptions is None:
                raise InputError(source, f"group {name!r} is the word {members!r}: matching "
                                 "words needs a metadata CSV (--metadata)")
            chosen = [t for t in targets if members.lower() in descriptions.get(t, "").lower()]
            if not chosen:
                raise InputError(source, f"group {name!r}: no target's description contains "
                                 f"{members!r}")
        else:
            chosen = [str(m) for m in members]
            unknown = [m for m in chosen if m not in targets]
            if unknown:
                raise InputError(source, f"group {name!r} names unknown target(s) "
                                 f"{', '.join(unknown)}; targets are {', '.join(targets)}")
            if not chosen:
                raise InputError(source, f"group {name!r} is empty")
        groups[str(name)] = chosen
    return groups


def read_groups(path: str | Path, targets: Sequence[str],
                metadata: str | Path | None = None) -> dict[str, list[str]]:
    """Read a groups JSON file (see the module) and resolve it against ``targets``."""
    path = Path(path)
    try:
        spec = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise InputError(path, f"not a readable groups JSON file ({error})") from None
    if not isinstance(spec, dict) or not all(
            isinstance(v, str) or (isinstance(v, list) and all(isinstance(m, str) for m in v))
            for v in spec.values()):
        raise InputError(path, 'expected {"group": ["column", ...] or "word", ...}')
    descriptions = (describe_targets(targets, read_metadata(metadata))
                    if metadata is not None else None)
    return resolve_groups(spec, targets, descriptions, path)


@dataclass(frozen=True)
class ModelScores:
    """One model's ``r^2`` per target, on the full test split and on each resample."""

    name: str
    targets: tuple[str, ...]
    point: np.ndarray
    draws: np.ndarray

    def group(self, members: Sequence[str]) -> tuple[float, np.ndarray]:
        """The group's mean ``r^2`` over ``members``: on the test split, and per resample."""
        columns = [self.targets.index(m) for m in members]
        # A group whose targets are all NaN on a resample (constant) is NaN there: expected.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            return (float(np.nanmean(self.point[columns])),
                    np.nanmean(self.draws[:, columns], axis=1))


def read_predictions(path: str | Path, test_ids: Sequence[str] | np.ndarray,
                     targets: Sequence[str]
                     ) -> np.ndarray:
    """The columns ``targets`` of a ``predictions.csv``, rows in ``test_ids``' order.

    Raises
    ------
    InputError
        Where the file's ids are not exactly the labels' test ids, or a target column
        is missing.
    """
    path = Path(path)
    try:
        header = pd.read_csv(path, nrows=0).columns
        frame = pd.read_csv(path, dtype={header[0]: str})
    except (OSError, IndexError, pd.errors.ParserError, pd.errors.EmptyDataError,
            UnicodeDecodeError) as error:
        raise InputError(path, f"not a readable predictions CSV ({error})") from None
    ids = frame.iloc[:, 0].astype(str)
    wanted = set(map(str, test_ids))
    extra, missing = sorted(set(ids) - wanted), sorted(wanted - set(ids))
    if extra or missing or ids.duplicated().any():
        raise InputError(path, "its ids differ from the labels' test split: "
                         f"{len(missing)} test id(s) missing ({', '.join(missing[:5])}), "
                         f"{len(extra)} not in the test split ({', '.join(extra[:5])})"
                         + (", some repeated" if ids.duplicated().any() else ""))
    # a binary classification fit writes <t>_0, <t>_1: score the probability of class 1
    columns = [t if t in frame.columns else f"{t}_1" for t in targets]
    absent = [t for t, c in zip(targets, columns, strict=True) if c not in frame.columns]
    if absent:
        raise InputError(path, f"no prediction column(s) {', '.join(absent)} (nor "
                         f"{', '.join(f'{t}_1' for t in absent)})")
    frame = frame.set_index(ids)
    return frame.loc[list(map(str, test_ids)), columns].to_numpy(np.float64)


def auroc(truth: np.ndarray, prediction: np.ndarray,
          indices: np.ndarray | None = None) -> np.ndarray:
    """AUROC of one binary target over the rows ``indices``, as :func:`squared_pearson`
    (NaN for a resample with one class)."""
    index = np.arange(len(truth))[None] if indices is None else indices
    out = np.empty(len(index))
    for b, rows in enumerate(index):
        y, p = truth[rows], prediction[rows]
        seen = ~(np.isnan(y) | np.isnan(p))
        out[b] = binary_auroc(y[seen], p[seen])
    return out if indices is not None else out[0]


def score_model(name: str, truth: np.ndarray, prediction: np.ndarray,
                targets: Sequence[str], resamples: Resamples,
                metric: Metric = "r2") -> ModelScores:
    """The metric of every target on the test split and on each shared resample."""
    function = squared_pearson if metric == "r2" else auroc
    point = np.array([function(truth[:, j], prediction[:, j]) for j in range(len(targets))])
    draws = np.stack([function(truth[:, j], prediction[:, j], resamples.indices)
                      for j in range(len(targets))], axis=1)
    return ModelScores(name, tuple(targets), point, draws)


def group_table(models: Sequence[ModelScores], groups: Mapping[str, Sequence[str]],
                interval: Interval = "percentile") -> pd.DataFrame:
    """One row per model: each group's mean ``r^2`` and its 95% bootstrap interval.

    Columns ``model``, then ``<group>``, ``<group>_low``, ``<group>_high`` per group; the
    value and interval as :func:`~raptorz.downstream.metrics.bootstrap_interval` forms
    them (``interval``).
    """
    rows = []
    for model in models:
        row: dict[str, object] = {"model": model.name}
        for group, members in groups.items():
            value, low, high = bootstrap_interval(*model.group(members), interval)
            row.update({group: value, f"{group}_low": low, f"{group}_high": high})
        rows.append(row)
    return pd.DataFrame(rows)


def paired_differences(first: ModelScores, second: ModelScores,
                       groups: Mapping[str, Sequence[str]],
                       interval: Interval = "percentile") -> pd.DataFrame:
    """``first - second`` per group, paired on the shared resamples.

    Columns: ``group``, ``difference`` (on the test split; with ``interval="original"``
    the mean of the per-resample differences), ``low``, ``high`` (95% interval of the
    per-resample differences, formed as ``interval`` says) and ``p_not_better``: the share
    of resamples where ``first`` does not beat ``second`` (a one-sided bootstrap p-value).
    """
    rows = []
    for group, members in groups.items():
        a, a_draws = first.group(members)
        b, b_draws = second.group(members)
        diff = a_draws - b_draws
        value, low, high = bootstrap_interval(a - b, diff, interval)
        seen = diff[~np.isnan(diff)]
        rows.append({"group": group, "difference": value, "low": low, "high": high,
                     "p_not_better": float(np.mean(seen <= 0)) if len(seen) else np.nan})
    return pd.DataFrame(rows)


@dataclass(frozen=True)
class ScoreResult:
    """What :func:`score_predictions` produced."""

    table: pd.DataFrame
    differences: pd.DataFrame | None
    models: tuple[ModelScores, ...]
    groups: dict[str, list[str]]
    resamples: Resamples
    interval: Interval = "percentile"


def score_predictions(labels: str | Path, predictions: Mapping[str, str | Path], *,
                      groups: str | Path | Mapping[str, str | Sequence[str]] | None = None,
                      metadata: str | Path | None = None,
                      resamples: str | Path | None = None, bootstrap: int = 1000,
                      seed: int = 0, compare: tuple[str, str] | None = None,
                      metric: Metric = "r2", interval: Interval = "percentile"
                      ) -> ScoreResult:
    """Score several models' ``predictions.csv`` on shared resamples, grouped.

    Parameters
    ----------
    labels
        The labels CSV the models were fitted with; its test split is scored.
    predictions
        Model name -> its ``predictions.csv`` (``raptorz fit``'s layout).
    groups
        A groups JSON file, or the same mapping; default: one group ``all`` of every
        target the first model predicts.
    metadata
        The metadata CSV for word groups (``field_id``, ``description``).
    resamples
        An ``.npz`` file of shared resamples: read when it exists, else drawn
        (``bootstrap`` of them, ``seed``) and written there. Default: drawn, not saved.
    compare
        Two model names: their paired differences, the first minus the second.
    metric
        ``r2`` (squared Pearson) or ``auroc`` (binary targets, 0/1).
    interval
        ``percentile`` (default): each group's value on the whole test split, with the 2.5
        and 97.5 percentiles of its bootstrap values. ``original``: the original tool's
        report (``scripts/ucla/score_ukbb20252.py``), the mean of the bootstrap values
        -/+ 1.95 of their standard deviations (``ddof=0``); the same for ``compare``.

    Raises
    ------
    InputError
        For a groups file naming an unknown target, a metadata CSV without its columns,
        predictions whose ids are not the labels' test ids, an unknown compared model.
    """
    if bootstrap < 1:
        raise SettingsError(f"bootstrap resamples must be at least 1, not {bootstrap}")
    if interval not in INTERVALS:
        raise SettingsError(f"interval must be one of {', '.join(INTERVALS)}, not {interval!r}")
    read = read_labels(labels)
    test = read.split == "test"
    test_ids = read.ids[test].astype(str)
    names = [str(c) for c in read.targets.columns]
    if isinstance(groups, Mapping):
        descriptions = (describe_targets(names, read_metadata(metadata))
                        if metadata is not None else None)
        resolved = resolve_groups(groups, names, descriptions, "groups")
    elif groups is not None:
        resolved = read_groups(groups, names, metadata)
    else:
        resolved = {"all": _predicted(names, next(iter(predictions.values())), labels)}
    targets = list(dict.fromkeys(t for members in resolved.values() for t in members))
    try:
        truth = read.targets.loc[test, targets].to_numpy(np.float64)
    except ValueError:
        raise InputError(labels, f"targets {', '.join(targets)} must be numeric to score "
                         f"{metric}") from None
    if metric == "auroc" and not np.isin(truth[~np.isnan(truth)], (0, 1)).all():
        raise InputError(labels, f"auroc scores binary 0/1 targets; {', '.join(targets)} "
                         "are not")
    shared = (Resamples.shared(resamples, test_ids, bootstrap, seed) if resamples is not None
              else Resamples.draw(test_ids, bootstrap, seed))
    # The resample rows number the saved ids: put the truth in that order.
    order = pd.Index(test_ids).get_indexer(shared.ids)
    truth = truth[order]
    models = tuple(score_model(name, truth, read_predictions(path, shared.ids, targets),
                               targets, shared, metric) for name, path in predictions.items())
    table = group_table(models, resolved, interval)
    differences = None
    if compare is not None:
        by_name = {m.name: m for m in models}
        unknown = [c for c in compare if c not in by_name]
        if unknown:
            raise SettingsError(f"no model named {', '.join(unknown)}; models are "
                                f"{', '.join(by_name)}", option="compare")
        differences = paired_differences(by_name[compare[0]], by_name[compare[1]], resolved,
                                         interval)
    return ScoreResult(table, differences, models, resolved, shared, interval)


def _predicted(names: Sequence[str], path: str | Path, labels: str | Path) -> list[str]:
    """The label targets that ``path`` predicts (as ``t`` or a binary fit's ``t_1``)."""
    try:
        columns = set(pd.read_csv(path, nrows=0).columns[1:])
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError,
            UnicodeDecodeError) as error:
        raise InputError(path, f"not a readable predictions CSV ({error})") from None
    chosen = [t for t in names if t in columns or f"{t}_1" in columns]
    if not chosen:
        raise InputError(path, f"predicts none of the targets of {labels} "
                         f"({', '.join(names)})")
    return chosen


def write_scores(result: ScoreResult, folder: str | Path) -> list[Path]:
    """Write ``scores.csv``, ``scores.md``, ``scores.tex`` (and ``differences.csv``,
    ``differences.md`` with a comparison) and ``groups.json`` into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    text = cells(result.table, list(result.groups))
    written = {"scores.csv": result.table.to_csv(index=False), "scores.md": to_markdown(text),
               "scores.tex": to_latex(text),
               "groups.json": json.dumps(result.groups, indent=2)}
    if result.differences is not None:
        written["differences.csv"] = result.differences.to_csv(index=False)
        written["differences.md"] = to_markdown(result.differences.round(4))
    for name, content in written.items():
        (folder / name).write_text(content)
    return [folder / name for name in written]
