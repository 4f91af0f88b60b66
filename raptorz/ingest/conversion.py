"""The conversion kernel: read, scale and shape one chunk's volumes and write them.

Plain numpy and file I/O, no Dask: :func:`raptorz.ingest.volumes.convert` maps
:func:`convert_chunk` over the store's chunks, in process or on a cluster. A task
returns a small :class:`ChunkResult`, never arrays.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Literal

import numpy as np
import xarray as xr

from raptorz import stores
from raptorz.defaults import DEFAULT_INTENSITY
from raptorz.errors import InputError
from raptorz.ingest._shape import Fit, fit_shape
from raptorz.ingest.intensity import Intensity, parse_intensity, scale_intensity
from raptorz.ingest.readers import ReadOptions, Source, SourceKind, read_volume
from raptorz.layouts import VOLUMES

Dtype = Literal["float16", "float32"]


@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything a task needs besides its sources; recorded in the store's attrs."""

    read: ReadOptions
    intensity: Intensity | None
    shape: tuple[int, int, int]
    fit: Fit | None
    dtype: Dtype

    def scaling(self, kind: SourceKind) -> Intensity:
        """The intensity preset for a volume read by the reader ``kind``."""
        return self.intensity or parse_intensity(DEFAULT_INTENSITY[kind])

    def record(self) -> dict[str, object]:
        """The settings as the store's ``convert`` attribute (JSON)."""
        return stores.json_attr({
            "reader": {"member": self.read.member,
                       "max_member_bytes": self.read.max_member_bytes},
            "intensity": str(self.intensity) if self.intensity else "auto",
            "intensity_defaults": DEFAULT_INTENSITY if self.intensity is None else {},
            "orientation": self.read.orientation,
            "shape_policy": {"shape": self.shape, "fit": self.fit or "none"},
            "dtype": self.dtype,
        })


@dataclasses.dataclass(frozen=True)
class ChunkResult:
    """What a task reports: per volume of its chunk, the status, error and note."""

    ids: list[str]
    status: list[int]
    errors: list[str]
    notes: list[str]


def item_bytes(settings: Settings) -> int:
    """Uncompressed bytes of one stored volume."""
    return int(np.prod(settings.shape)) * np.dtype(settings.dtype).itemsize


def convert_chunk(path: str, region: slice, sources: Sequence[Source],
                   settings: Settings) -> ChunkResult:
    """Read, scale and shape one chunk's volumes and write the whole chunk."""
    n = len(sources)
    volume = np.full((n, *settings.shape), np.nan, settings.dtype)
    spacing = np.full((n, 3), np.nan)
    original = np.zeros((n, 3), np.int32)
    status, errors, notes = [stores.FAILED] * n, [""] * n, [""] * n
    for j, source in enumerate(sources):
        try:
            read = read_volume(source, settings.read)
            low, high = float(read.data.min()), float(read.data.max())
            notes[j] = "; ".join(filter(None, (
                read.note, f"constant volume (every voxel is {low:g})" if low == high else "")))
            scaled = scale_intensity(read.data, settings.scaling(source.kind))
            volume[j], spacing[j] = fit_shape(scaled, read.spacing, settings.shape,
                                              settings.fit, str(source))
            original[j] = read.data.shape
            status[j] = stores.OK
        except InputError as error:
            errors[j] = str(error)
        except Exception as error:  # record it: one bad volume never stops the others
            errors[j] = f"{source}: {type(error).__name__}: {error}"
    data = {
        "volume": xr.DataArray(volume, dims=VOLUMES.dims["volume"]),
        "spacing": xr.DataArray(spacing, dims=("id", "axis")),
        "original_shape": xr.DataArray(original, dims=("id", "axis")),
        "note": xr.DataArray(stores.as_strings(notes), dims="id"),
    }
    stores.write_units(path, data, region, np.asarray(status), errors)
    return ChunkResult([s.id for s in sources], status, errors, notes)
