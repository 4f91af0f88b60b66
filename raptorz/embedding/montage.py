"""What the encoder sees: a montage of a volume's slices after preprocessing.

:func:`plane_montage` shows the slices exactly as the kernel hands them to the encoder
(one row per plane).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from raptorz.embedding.encoders import IMAGENET_MEAN, IMAGENET_STD
from raptorz.embedding.preprocessing import canvas_size, iter_slices, prepare_images
from raptorz.embedding.settings import PLANE_NAMES, KernelSettings, slice_indices

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

