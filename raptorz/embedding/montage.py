"""Quality-control pictures: what the encoder sees, and how the embeddings spread.

:func:`plane_montage` shows a volume's slices after preprocessing, exactly as the kernel
hands them to the encoder (one row per plane). :func:`embedding_pca` projects a store's
embeddings on their first two principal components, coloured by a label column.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from raptorz.embedding.kernel import PLANE_NAMES, KernelSettings
from raptorz.embedding.preprocessing import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    canvas_size,
    iter_slices,
    prepare_images,
    slice_indices,
)

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def plane_montage(volume: np.ndarray, settings: KernelSettings | None = None, *,
                  slices: int = 5, img_size: int = 224) -> Figure:
    """Equidistant slices of each plane of ``volume`` as the encoder receives them.

    Parameters
    ----------
    volume
        ``(X, Y, Z)`` intensities in [0, 1] (e.g. ``open_volumes(path).volume[0].values``).
    settings
        The kernel settings (planes, preprocessing, resize mode) to show.
    slices
        Slices shown per plane.
    img_size
        The encoder's input size.
    """
    import matplotlib.pyplot as plt

    settings = settings or KernelSettings()
    volume = np.asarray(volume, dtype=np.float32)
    canvas = canvas_size(volume.shape, settings.resize)
    figure, axes = plt.subplots(len(settings.planes), slices, squeeze=False,
                                figsize=(2 * slices, 2.1 * len(settings.planes)))
    for row, axis in enumerate(settings.planes):
        length = volume.shape[axis]
        picks = slice_indices(length, 1)[np.linspace(0, length - 1, slices + 2)
                                         .round().astype(int)[1:-1]]
        images = prepare_images(np.stack(list(iter_slices(volume, axis, picks))),
                                img_size=img_size, preprocess=settings.preprocess,
                                resize=settings.resize, canvas=canvas)
        gray = images[:, 0].numpy() * IMAGENET_STD[0] + IMAGENET_MEAN[0]  # un-normalized
        for column, (image, index) in enumerate(zip(gray, picks, strict=True)):
            ax = axes[row, column]
            ax.imshow(image, cmap="gray", vmin=0, vmax=1)
            ax.set_title(f"{PLANE_NAMES[axis]} (axis {axis}) #{index}", fontsize=8)
            ax.axis("off")
    figure.suptitle(f"encoder input ({settings.preprocess}, {settings.resize}, "
                    f"{img_size} px)")
    figure.tight_layout()
    return figure


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
    """
    import matplotlib.pyplot as plt
    from sklearn.decomposition import PCA

    from raptorz.embedding.embeddings import open_embeddings
    from raptorz.features import open_variable
    from raptorz.stores import store_ids

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
    figure, ax = plt.subplots(figsize=(5, 4.5))
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
