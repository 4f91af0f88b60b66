"""The shape policy: every volume of a store has one shape."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Literal

import numpy as np
from scipy import ndimage

from raptorz.errors import InputError, RaptorzError
from raptorz.ingest.readers import ReadOptions, Source, probe_shape

Fit = Literal["resample", "pad"]


def fit_shape(
    data: np.ndarray,
    spacing: tuple[float, float, float],
    shape: tuple[int, int, int],
    fit: Fit | None,
    source: str,
) -> tuple[np.ndarray, tuple[float, float, float]]:
    """Bring ``data`` to ``shape``; return it and its new voxel spacing.

    ``resample`` interpolates linearly (voxel edges aligned, so the field of view is
    kept and the spacing scales); ``pad`` pads with zeros or crops, centred, keeping
    the spacing. ``fit=None`` refuses any volume of another shape.
    """
    if data.shape == shape:
        return data, spacing
    if fit is None:
        raise InputError(source, f"has shape {data.shape} but the store holds "
                         f"{shape}; convert with --shape X,Y,Z to resample or pad")
    if fit == "resample":
        factors = [t / s for t, s in zip(shape, data.shape, strict=True)]
        data = ndimage.zoom(data, factors, order=1, mode="nearest", grid_mode=True)
        new = tuple(float(sp / f) for sp, f in zip(spacing, factors, strict=True))
        return data, (new[0], new[1], new[2])
    out = np.zeros(shape, data.dtype)
    source_index, target_index = [], []
    for size, target in zip(data.shape, shape, strict=True):
        keep = min(size, target)
        a, b = (size - keep) // 2, (target - keep) // 2
        source_index.append(slice(a, a + keep))
        target_index.append(slice(b, b + keep))
    out[tuple(target_index)] = data[tuple(source_index)]
    return out, spacing


def native_shape(sources: Sequence[Source], read: ReadOptions) -> tuple[int, int, int]:
    """The one shape all readable sources share; refuse where they disagree."""
    shapes: dict[tuple[int, int, int], list[str]] = defaultdict(list)
    problems = []
    for source in sources:
        try:
            shapes[probe_shape(source, read)].append(source.id)
        except InputError as error:  # the task records it as this volume's failure
            problems.append(str(error))
    if len(shapes) > 1:
        listing = "; ".join(f"{shape}: {', '.join(ids[:3])}{' ...' * (len(ids) > 3)}"
                            for shape, ids in shapes.items())
        raise RaptorzError(f"the volumes have {len(shapes)} shapes ({listing}); a store "
                           "holds one shape: pass --shape X,Y,Z (and --fit resample|pad)")
    if not shapes:
        raise RaptorzError(f"none of the {len(sources)} volumes can be read: "
                           + "; ".join(problems[:3]))
    return next(iter(shapes))
