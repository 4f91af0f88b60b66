"""Intensity scaling of a volume to [0, 1]: the named, recorded presets of ``convert``.

A preset is a frozen :class:`Intensity`; its text form (``percentile:0.5,99.5``,
``range:0,1280``, ``ct:brain``...) is what the command line takes and what the store
records, so a store says exactly how its voxels were scaled.
"""

from __future__ import annotations

import dataclasses
from typing import Final, Literal

import numpy as np

from raptorz.errors import RaptorzError

IntensityMode = Literal["minmax", "percentile", "range", "divide", "ct"]

#: CT windows in Hounsfield units as (level, width), the usual radiology presets.
CT_WINDOWS: Final[dict[str, tuple[float, float]]] = {
    "brain": (40.0, 80.0),
    "subdural": (75.0, 215.0),
    "stroke": (40.0, 40.0),
    "temporal_bone": (600.0, 2800.0),
    "soft_tissue": (50.0, 400.0),
    "mediastinum": (50.0, 350.0),
    "liver": (30.0, 150.0),
    "lung": (-600.0, 1500.0),
    "bone": (400.0, 1800.0),
}

#: Percentiles of the ``percentile`` preset when none are given.
DEFAULT_PERCENTILES: Final = (0.5, 99.5)


@dataclasses.dataclass(frozen=True)
class Intensity:
    """How raw voxel values become intensities in [0, 1].

    Parameters
    ----------
    mode
        ``minmax``: per volume, ``(v - min) / (max - min)``.
        ``percentile``: per volume, clip to the ``low``-th and ``high``-th percentiles,
        then min-max (robust to a few hot voxels; the default for MRI).
        ``range``: clip to ``[low, high]`` in raw units and map it to [0, 1]
        (``range:0,1280`` is the original tool's UK Biobank scaling).
        ``divide``: ``v / high`` (``divide:256`` is the original's MedMNIST scaling).
        ``ct``: a CT window in Hounsfield units named by ``window``; ``low`` and ``high``
        are its edges, ``level -+ width / 2``.
    low, high
        The mode's parameters (see above); unused by ``minmax``.
    window
        The CT preset's name (``ct`` only).

    Every mode clips its result to [0, 1].
    """

    mode: IntensityMode
    low: float = 0.0
    high: float = 1.0
    window: str = ""

    def __str__(self) -> str:
        if self.mode == "minmax":
            return "minmax"
        if self.mode == "ct":
            return f"ct:{self.window}"
        if self.mode == "divide":
            return f"divide:{self.high:g}"
        return f"{self.mode}:{self.low:g},{self.high:g}"


def parse_intensity(text: str) -> Intensity:
    """Parse a preset's text form, e.g. ``"percentile:1,99"`` or ``"ct:lung"``.

    Examples
    --------
    >>> parse_intensity("range:0,1280")
    Intensity(mode='range', low=0.0, high=1280.0, window='')
    >>> str(parse_intensity("ct:brain"))
    'ct:brain'
    """
    mode, _, params = text.strip().partition(":")
    try:
        numbers = [float(part) for part in params.split(",")] if params else []
    except ValueError:
        numbers = [float("nan")]
    if mode == "minmax" and not params:
        return Intensity("minmax")
    if mode == "percentile" and not params:
        return Intensity("percentile", *DEFAULT_PERCENTILES)
    if mode == "percentile" and len(numbers) == 2 and 0 <= numbers[0] < numbers[1] <= 100:
        return Intensity("percentile", numbers[0], numbers[1])
    if mode == "range" and len(numbers) == 2 and numbers[0] < numbers[1]:
        return Intensity("range", numbers[0], numbers[1])
    if mode == "divide" and len(numbers) == 1 and numbers[0] > 0:
        return Intensity("divide", 0.0, numbers[0])
    if mode == "ct" and params in CT_WINDOWS:
        level, width = CT_WINDOWS[params]
        return Intensity("ct", level - width / 2, level + width / 2, params)
    raise RaptorzError(
        f"unknown intensity preset {text!r}: use minmax, percentile[:LO,HI] "
        "(0 <= LO < HI <= 100), range:LO,HI (LO < HI), divide:N (N > 0) or "
        f"ct:PRESET with PRESET one of {', '.join(CT_WINDOWS)}"
    )


def scale_intensity(volume: np.ndarray, intensity: Intensity) -> np.ndarray:
    """Scale ``volume`` (finite values) to [0, 1] as ``intensity`` says; float32 result.

    A constant volume comes out as zeros under ``minmax`` and ``percentile`` (there is
    no range to stretch); the caller notes it.
    """
    data = np.asarray(volume, dtype=np.float32)
    if intensity.mode in ("minmax", "percentile"):
        if intensity.mode == "minmax":
            low, high = float(data.min()), float(data.max())
        else:
            low, high = (float(v) for v in np.percentile(data, [intensity.low, intensity.high]))
        if high <= low:
            return np.zeros_like(data)
    elif intensity.mode == "divide":
        low, high = 0.0, intensity.high
    else:
        low, high = intensity.low, intensity.high
    scaled = (data - np.float32(low)) / np.float32(high - low)
    return np.clip(scaled, 0.0, 1.0, out=scaled)
