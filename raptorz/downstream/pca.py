"""How the embeddings spread: a store's embeddings on two principal components.

:func:`embedding_pca` colours each volume by a label column and marks it by split.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from raptorz.downstream.features import open_variable
from raptorz.layouts import open_embeddings
from raptorz.stores import store_ids

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def embedding_pca(store: str | Path, labels: str | Path, *, feature: str | None = None,
                  target: str | None = None) -> Figure:
    """The embeddings of ``store`` on their first two principal components.

    Parameters
    ----------
    store
        ``embeddings.zarr``.
    labels
        A labels CSV (id, split, targets); volumes are coloured by ``target`` (default:
        the first target column) and marked by split.
    feature
        A projector's name, ``avgpool`` or ``tokens`` (default: the only projector).

    Returns
    -------
    A :class:`~matplotlib.figure.Figure` of its own, outside pyplot (a notebook shows it as
    a cell's value; ``savefig`` writes it); the session's backend is left alone.
    """
    from matplotlib.figure import Figure
    from sklearn.decomposition import PCA

    ds = open_embeddings(store)
    variable = open_variable(ds, store, feature)
    table = pd.read_csv(labels)
    target = target or [c for c in table.columns[1:] if c != "split"][0]
    ids = store_ids(ds)
    position = {volume_id: i for i, volume_id in enumerate(ids)}
    table = table[table.iloc[:, 0].astype(str).isin(position)]
    rows = np.array([position[str(i)] for i in table.iloc[:, 0]])
    values = variable.isel(id=np.sort(rows)).values.reshape(len(rows), -1)
    values = values[np.argsort(np.argsort(rows))]  # back to the table's order
    points = PCA(n_components=2).fit_transform(values)
    figure = Figure(figsize=(5, 4.5))
    ax = figure.subplots()
    markers = {"train": "o", "val": "s", "test": "^"}
    for split, marker in markers.items():
        mask = (table["split"] == split).to_numpy()
        drawn = ax.scatter(points[mask, 0], points[mask, 1], c=table[target].to_numpy()[mask],
                           marker=marker, cmap="viridis", label=split, edgecolors="k",
                           linewidths=0.3)
    figure.colorbar(drawn, ax=ax, label=target)
    ax.set(xlabel="PC 1", ylabel="PC 2", title=f"{variable.name}: PCA coloured by {target}")
    ax.legend(title="split")
    figure.tight_layout()
    return figure
