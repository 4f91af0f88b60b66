"""Downstream fitting: a head on ``embeddings.zarr`` and a labels CSV, scored on test.

:func:`fit` runs the paper's protocol end to end: it opens the store lazily, matches the
labels to the embeddings, standardizes the features with train statistics (one
streaming pass), fits a head (:mod:`raptorz.downstream.heads`), predicts the test split, scores it
with bootstrap intervals (:mod:`raptorz.downstream.metrics`) and writes ``results/``:

``predictions.csv``
    The test split in the original's layout: the id column, then one column per target
    (one per class, ``<target>_<class>``, with probabilities, for classification).
``metrics.json``
    Scores per target and averaged with 95% intervals, the task and why, the splits'
    sizes, the volumes left out and the fit's record.
``roc.png`` or ``predicted_vs_true.png``
    ROC curves (classification, multi-label) or predicted against true (regression).
``model/``
    The fitted model (:func:`raptorz.downstream.model.load_model`, ``raptorz predict``).

Features are held in memory when they fit the memory budget and streamed from the store
(through a local uncompressed copy where ``cache`` names a folder) otherwise; with a
``cluster``, the train rows are read once by its workers and held there
(:mod:`raptorz.downstream.remote`): the linear head's passes run on them, the MLP's
epochs gather their windows from them and train here. Every path computes the same
numbers (see :mod:`raptorz.downstream.features`); ``metrics.json`` counts the passes over
the features and names the device the head computed on
(:attr:`~raptorz.downstream.settings.HeadSettings.device`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from raptorz import stores
from raptorz.downstream.features import Features, feature_status, memory_budget, open_variable
from raptorz.downstream.heads import fit_head
from raptorz.downstream.labels import (
    SPLITS,
    Targets,
    Task,
    encode_targets,
    match_embeddings,
    read_labels,
)
from raptorz.downstream.linear import LocalPasses, Scaling, TrainPasses, resolve_device
from raptorz.downstream.metrics import evaluate, plot, table
from raptorz.downstream.model import FittedModel
from raptorz.downstream.remote import ClusterPasses, ClusterTarget, fit_client
from raptorz.downstream.settings import HeadSettings
from raptorz.errors import SettingsError
from raptorz.layouts import open_embeddings
from raptorz.stores import store_ids


@dataclass(frozen=True)
class FitSettings:
    """What to fit and how to score it.

    Attributes
    ----------
    projector
        The feature variable: a projector's name, ``avgpool`` or ``tokens``; by default
        the store's only projector.
    task
        ``auto`` (inferred from the targets and reported), ``classification``,
        ``multilabel`` or ``regression``.
    targets
        The target columns to fit (default: every column after ``split``).
    head
        The head and its training settings.
    memory_budget
        Bytes (or a size such as ``"4GB"``) the features may take in memory; above it they
        are streamed from the store. Default: half of the memory available at the start.
    cache
        A folder for an uncompressed local copy of streamed features (a memory-mapped
        file, filled by the first pass, read by the others, removed at the end).
    bootstrap
        Bootstrap resamples of the test split for the 95% intervals (0: none).
    strict
        Refuse labelled volumes that have no ok embedding instead of leaving them out.
    """

    projector: str | None = None
    task: Task = "auto"
    targets: tuple[str, ...] = ()
    head: HeadSettings = field(default_factory=HeadSettings)
    memory_budget: str | int | None = None
    cache: str | Path | None = None
    bootstrap: int = 1000
    strict: bool = False

    def __post_init__(self) -> None:
        if self.bootstrap < 0:
            raise SettingsError(f"bootstrap resamples must be at least 0, not {self.bootstrap}")


@dataclass(frozen=True)
class FitResult:
    """What :func:`fit` produced: the model, the test predictions and the scores."""

    model: FittedModel
    predictions: pd.DataFrame
    metrics: dict[str, Any]
    output: Path


def fit(store: str | Path, labels: str | Path, output: str | Path,
        settings: FitSettings | None = None, *, cluster: ClusterTarget | None = None,
        log: Callable[[str], None] = lambda message: None) -> FitResult:
    """Fit a head on an embeddings store, score it on the test split and write ``output``.

    Parameters
    ----------
    store
        ``embeddings.zarr``.
    labels
        A labels CSV: volume id first, a ``split`` column (train/val/test), then targets.
    output
        The results folder (created; files in it are replaced).
    settings
        What to fit; :class:`FitSettings` defaults when omitted.
    cluster
        Where the train rows are held and the linear head's passes over them run (the
        MLP's epochs gather their windows from there and train in this process): a Dask
        client, a cluster, a scheduler address or a function that starts a cluster
        (closed at the end); default this process. The predictions are the same (to 1e-6).
    log
        Called with one line per step (the CLI prints them).

    Raises
    ------
    InputError
        For every problem with the store or the labels, naming the file.

    Warns
    -----
    MissingEmbeddingsWarning
        Where labelled volumes without an ok embedding are left out (not ``strict``).

    Examples
    --------
    >>> result = fit("embeddings.zarr", "labels.csv", "results")  # doctest: +SKIP
    >>> result.metrics["mean"]["auroc"]["value"]  # doctest: +SKIP
    """
    settings = settings or FitSettings()
    resolve_device(settings.head.device)  # a device this machine lacks: refused at once
    ds = open_embeddings(store)
    variable = open_variable(ds, store, settings.projector)
    all_labels = read_labels(labels, settings.targets or None)
    status = feature_status(ds, settings.projector, stores.read_status(store))  # regions ok
    kept, positions = match_embeddings(all_labels, store_ids(ds), status, store,
                                       strict=settings.strict)
    targets, reason = encode_targets(kept, settings.task)
    log(f"task: {targets.task} ({reason}); targets: {', '.join(targets.names)}")
    # On a cluster, the workers hold the train rows: this process streams val and test.
    spread = cluster is not None
    budget = -1 if spread else memory_budget(settings.memory_budget)
    features = Features.open(variable, positions, budget, settings.cache)
    log(f"features '{variable.name}': {features.describe()}"
        + ("; train rows held on the cluster" if spread else ""))
    rows = {name: np.flatnonzero(kept.split == name) for name in SPLITS}
    log("rows: " + ", ".join(f"{name} {len(r)}" for name, r in rows.items()))

    summary = {"task_reason": reason, "store": str(store), "labels": str(labels)}
    with contextlib.ExitStack() as stack:
        client = stack.enter_context(fit_client(cluster)) if spread and cluster else None
        model, prediction, metrics = fit_features(features, targets, rows, settings,
                                                  feature=str(variable.name), summary=summary,
                                                  log=log, client=client)
    record = {k: v for k, v in model.summary.items() if k not in summary}
    regression = targets.task == "regression"
    test = rows["test"]
    truth = targets.values[test]
    log("test scores (95% bootstrap intervals):\n" + table(metrics))

    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    frame = pd.DataFrame(prediction, columns=model.columns())
    frame.insert(0, kept.id_column, kept.ids[test])
    frame.to_csv(output / "predictions.csv", index=False)
    left_out = sorted(set(all_labels.ids) - set(kept.ids))
    report = {"task": targets.task, "task_reason": reason, "head": settings.head.head,
              "mlp_depth": record.get("depth"),  # None for the linear head
              "feature": str(variable.name), "n": {k: len(r) for k, r in rows.items()},
              "left_out": left_out, **metrics, "passes": record["passes"], "fit": record}
    (output / "metrics.json").write_text(json.dumps(stores.json_attr(report), indent=2))
    plot_name = "predicted_vs_true.png" if regression else "roc.png"
    plot(targets.task, targets.names, targets.classes, truth, prediction, output / plot_name)
    model.save(output / "model")
    return FitResult(model, frame, report, output)


def fit_features(features: Features, targets: Targets, rows: dict[str, np.ndarray],
                 settings: FitSettings, *, feature: str, summary: dict[str, Any] | None = None,
                 log: Callable[[str], None] = lambda message: None, client: Any = None
                 ) -> tuple[FittedModel, np.ndarray, dict[str, Any]]:
    """Fit a head on ``features`` and score it on the test rows (what :func:`fit` and the
    sweeps share).

    Parameters
    ----------
    features
        The samples' features; ``targets.values`` and ``rows`` number the same samples.
    targets
        The encoded targets of every sample.
    rows
        Sample numbers of ``train``, ``val`` and ``test``.
    settings
        The head and the bootstrap of the scores.
    feature, summary
        The feature's name and what else the model's record should hold.
    client
        A Dask client: its workers hold the train rows (:class:`ClusterPasses`), the
        linear head's passes run there and the MLP's epochs gather their windows there.

    Returns
    -------
    The model, its test predictions and the scores of :func:`~raptorz.downstream.metrics.evaluate`.
    """
    passes: TrainPasses
    if client is None:
        passes = LocalPasses(features, rows["train"],
                             str(resolve_device(settings.head.device)))
    else:  # each worker resolves the device for its own sums
        passes = ClusterPasses(client, features, rows["train"], settings.head.device)
    try:
        return _fit_and_score(features, targets, rows, settings, passes, feature, summary,
                              log)
    finally:
        if isinstance(passes, ClusterPasses):
            passes.close()


def _fit_and_score(features: Features, targets: Targets, rows: dict[str, np.ndarray],
                   settings: FitSettings, passes: TrainPasses, feature: str,
                   summary: dict[str, Any] | None, log: Callable[[str], None]
                   ) -> tuple[FittedModel, np.ndarray, dict[str, Any]]:
    mean, std = passes.statistics()
    train_truth = targets.values[rows["train"]]
    regression = targets.task == "regression"
    n_targets = len(targets.names)
    scaling = Scaling(mean, std,
                      np.nanmean(train_truth, axis=0) if regression else np.zeros(n_targets),
                      np.nanstd(train_truth, axis=0) if regression else np.ones(n_targets))
    head, record = fit_head(targets.task, targets.values, len(targets.classes), features,
                            rows["train"], rows["val"], scaling, settings.head, log, passes)
    # The saved model rebuilds the MLP from ``layers``: record the depth chosen on val.
    head_settings = (dataclasses.replace(settings.head, layers=record["depth"])
                     if settings.head.head == "mlp" else settings.head)
    model = FittedModel(targets.task, targets.names, targets.classes, feature,
                        features.n_features, head_settings, scaling, head,
                        {**(summary or {}), **record})
    prediction = model.predict(features, rows["test"])
    # Passes over the features: loading them, the statistics, the head's, val and test.
    model.summary.update(passes=features.reads.passes,
                         read_gigabytes=features.reads.bytes / 1e9)
    metrics = evaluate(targets.task, targets.names, targets.values[rows["test"]], prediction,
                       resamples=settings.bootstrap, seed=settings.head.seed)
    return model, prediction, metrics
