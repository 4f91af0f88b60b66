"""The paper's ablations from one encoder run: K x seeds, plane subsets, few-shot sizes.

From an embeddings store written with ``--keep-tokens``, :func:`sweep` projects the stored
pooled tokens with the seeded projector of each ``(K, seed)`` (no encoder runs; the
projection is the one ``raptorz embed`` with ``raptorz projector --seed SEED --k K`` would
store), keeps each plane subset (``A``, ``CS``, ``ACS``...), subsamples the train split to
each few-shot size (seeded), fits the head and scores it on the test split. It writes
``runs.csv`` (one row per fit), ``summary.csv`` and ``summary.md`` (mean and standard
deviation across seeds, the paper's Tables 6-7) and ``score_vs_k.png``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import numpy as np
import pandas as pd
import xarray as xr

from raptorz import stores
from raptorz.downstream.features import REGION_SEPARATOR, Features, feature_status
from raptorz.downstream.fitting import FitSettings, fit_features
from raptorz.downstream.labels import SPLITS, encode_targets, match_embeddings, read_labels
from raptorz.downstream.tables import to_markdown
from raptorz.embedding.embeddings import project_stored_tokens, seeded_matrix
from raptorz.errors import InputError, SettingsError
from raptorz.layouts import open_embeddings, with_roi
from raptorz.stores import store_ids

#: The paper's plane subsets (Table 7).
PLANE_SUBSETS: Final = ("A", "C", "S", "AC", "CS", "AS", "ACS")
#: The paper's projector sizes (Table 6).
PAPER_KS: Final = (1, 5, 10, 100, 150)


@dataclass(frozen=True)
class SweepSettings:
    """What to sweep: every combination of the axes is fitted, once (no axis may repeat a value).

    Attributes
    ----------
    ks, seeds
        Projector widths and seeds (``raptorz projector --seed``).
    planes
        Plane subsets, each letters of the store's planes (``A``, ``AC``, ``ACS``...).
    train_sizes
        Train volumes per fit (few-shot), drawn with the run's seed; ``None``: all. A size
        must be below the train split's volumes (:func:`sweep` refuses it otherwise).
    fit
        The head and the scoring (``bootstrap`` 0 by default: the spread across seeds is
        what the sweep reports).
    """

    ks: tuple[int, ...] = PAPER_KS
    seeds: tuple[int, ...] = (0, 1, 2)
    planes: tuple[str, ...] = ("ACS",)
    train_sizes: tuple[int | None, ...] = (None,)
    fit: FitSettings = field(default_factory=lambda: FitSettings(bootstrap=0))

    def __post_init__(self) -> None:
        if not self.ks or min(self.ks) < 1 or not self.seeds or min(self.seeds) < 0:
            raise SettingsError(f"K must be at least 1 and seeds at least 0 (K {self.ks}, "
                                f"seeds {self.seeds})")
        if not self.planes or any(not p or len(set(p)) != len(p) or set(p) - set("ACS")
                                  for p in self.planes):
            raise SettingsError(f"plane subsets are letters of A, C, S, not {self.planes}")
        if not self.train_sizes or any(s is not None and s < 2 for s in self.train_sizes):
            raise SettingsError(f"train sizes must be at least 2, not {self.train_sizes}")
        for axis, values in (("K", self.ks), ("seeds", self.seeds),
                             ("plane subsets", self.planes), ("train sizes", self.train_sizes)):
            if len(set(values)) != len(values):
                raise SettingsError(f"{axis} must not repeat a value, not {values}: the "
                                    "runs would be fitted and counted in the summary twice")


def sweep(store: str | Path, labels: str | Path, output: str | Path,
          settings: SweepSettings | None = None, *,
          log: Callable[[str], None] = lambda message: None) -> pd.DataFrame:
    """Fit every combination of :class:`SweepSettings` from stored tokens; write the tables.

    Returns
    -------
    One row per fit: ``k``, ``seed``, ``planes``, ``train_size``, ``metric``, ``score``.

    Raises
    ------
    InputError
        Where the store holds no stored tokens (embed with ``--keep-tokens``), a plane
        subset names a plane the store lacks, the labels do not match the store, or a
        train size is not below the train split's volumes (it would repeat the ``all``
        runs).
    """
    settings = settings or SweepSettings()
    ds = open_embeddings(store)
    if "tokens" not in ds:
        raise InputError(store, "holds no stored tokens, so no new projections can be made "
                         "without the encoder; embed with --keep-tokens to sweep")
    stored_planes = [str(p) for p in ds["plane"].values.tolist()]
    for subset in settings.planes:
        if set(subset) - set(stored_planes):
            raise InputError(store, f"plane subset {subset!r}: the store holds planes "
                             f"{''.join(stored_planes)} only")
    # a region store: the regions named after the separator (FitSettings(projector="@liver"))
    region = (settings.fit.projector or "").partition(REGION_SEPARATOR)[2]
    status = feature_status(ds, "tokens" + REGION_SEPARATOR * bool(region) + region,
                            stores.read_status(store))
    regions = region.split(",") if region else None
    read = read_labels(labels, settings.fit.targets or None)
    kept, positions = match_embeddings(read, store_ids(ds), status, store,
                                       strict=settings.fit.strict)
    targets, reason = encode_targets(kept, settings.fit.task)
    rows = {name: np.flatnonzero(kept.split == name) for name in SPLITS}
    too_large = [s for s in settings.train_sizes if s is not None and s >= len(rows["train"])]
    if too_large:
        raise InputError(labels, f"train size(s) {', '.join(map(str, too_large))} not below "
                         f"the {len(rows['train'])} train volumes found in {store}: such a "
                         "run would fit all of them, as 'all' does; ask for smaller sizes "
                         "(or 'all')")
    metric = "pearson_r2" if targets.task == "regression" else "auroc"
    log(f"task: {targets.task} ({reason}); rows: "
        + ", ".join(f"{name} {len(r)}" for name, r in rows.items()))
    runs = []
    for k in settings.ks:
        for seed in settings.seeds:
            projected = project_stored_tokens(store, seeded_matrix(seed, ds.sizes["dim"], k),
                                              positions, regions=regions)
            for subset in settings.planes:
                chosen = np.take(projected, [stored_planes.index(p) for p in subset], axis=-3)
                variable = xr.DataArray(chosen, dims=with_roi(("id", "plane", "k", "token"),
                                                              regions is not None))
                features = Features.open(variable, np.arange(len(chosen)), chosen.nbytes + 1)
                for size in settings.train_sizes:
                    fitted_rows = {**rows, "train": _few(rows["train"], size, seed)}
                    head = dataclasses.replace(settings.fit.head, seed=seed)
                    fit = dataclasses.replace(settings.fit, head=head)
                    _, _, metrics = fit_features(features, targets, fitted_rows, fit,
                                                 feature=f"k{k}_seed{seed}_{subset}")
                    value = metrics["mean"][metric]["value"]
                    runs.append({"k": k, "seed": seed, "planes": subset,
                                 "train_size": len(fitted_rows["train"]), "metric": metric,
                                 "score": np.nan if value is None else value})
                    log(f"K={k} seed={seed} planes={subset} train={len(fitted_rows['train'])}:"
                        f" {metric} {runs[-1]['score']:.4f}")
    table = pd.DataFrame(runs)
    write_sweep(table, output)
    return table


def _few(train: np.ndarray, size: int | None, seed: int) -> np.ndarray:
    """``size`` train rows drawn with ``seed`` (all of them for ``None``)."""
    if size is None:
        return train
    return np.sort(np.random.default_rng(seed).choice(train, size, replace=False))


def summarize(runs: pd.DataFrame) -> pd.DataFrame:
    """Mean and sample standard deviation of the score across seeds, per configuration.

    ``seeds`` counts the runs each mean is over: one per seed (a run whose score is
    undefined, NaN, is left out of the mean and the count).
    """
    keys = ["k", "planes", "train_size", "metric"]
    grouped = runs.groupby(keys, sort=False)["score"]
    out = grouped.agg(mean="mean", std="std", seeds="count").reset_index()
    out["std"] = out["std"].fillna(0.0)  # one seed: no spread
    return out


def write_sweep(runs: pd.DataFrame, output: str | Path) -> None:
    """``runs.csv``, ``summary.csv``, ``summary.md`` (mean ± std) and ``score_vs_k.png``.

    The plot is drawn on a :class:`~matplotlib.figure.Figure` of its own: pyplot and the
    session's backend are left alone.
    """
    from matplotlib.figure import Figure

    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    runs.to_csv(output / "runs.csv", index=False)
    summary = summarize(runs)
    summary.to_csv(output / "summary.csv", index=False)
    text = summary[["k", "planes", "train_size", "metric", "seeds"]].copy()
    text["score"] = [f"{m:.4f} ± {s:.4f}" for m, s in zip(summary["mean"], summary["std"],
                                                          strict=True)]
    (output / "summary.md").write_text(to_markdown(text))
    figure = Figure(figsize=(5.5, 4))
    ax = figure.subplots()
    for (planes, size), line in summary.groupby(["planes", "train_size"], sort=False):
        line = line.sort_values("k")
        ax.errorbar(line["k"], line["mean"], yerr=line["std"], marker="o", capsize=3,
                    label=f"{planes}, train {size}")
    ax.set(xscale="log", xlabel="K (projections per token)",
           ylabel=f"test {runs['metric'].iloc[0]} (mean ± std over seeds)")
    ax.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(output / "score_vs_k.png", dpi=100)
