"""The conversion kernel: read, scale and shape one chunk's volumes and write them.

Plain numpy and file I/O, no Dask: :func:`raptorz.ingest.volumes.convert` maps
:func:`convert_chunk` over the store's chunks, in process or on a cluster. A task
returns a small :class:`ChunkResult`, never arrays.

A task converts only the volumes it is given of its chunk and writes the others back as
they are stored (the chunk is written whole): a resume never touches a volume already
converted. Each volume converted gets its source's identity (:func:`source_identity`)
and the ``checksum`` of its stored voxels (:func:`volume_checksum`), which the
embeddings made from it record: where it differs, the volume changed since.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Final, Literal

import numpy as np
import xarray as xr

from raptorz import locations, stores
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
        fill = self.read.fill_nonfinite
        return stores.json_attr({
            # fill_nonfinite only where set: stores made before it existed resume
            "reader": {"member": self.read.member,
                       "max_member_bytes": self.read.max_member_bytes,
                       **({} if fill is None else {"fill_nonfinite": fill})},
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


#: Per-volume variables of a source's identity (:func:`source_identity`), the volume's
#: checksum and its non-finite voxels filled; stores of older raptorz versions lack them.
TRACKING: Final = ("source_size", "source_mtime", "source_sha256", "checksum",
                   "filled_voxels")
#: The identity of a source that is gone.
GONE: Final = (-1, -1, "")


def source_identity(source: Source, content: bool = False,
                    storage_options: dict[str, Any] | None = None) -> tuple[int, int, str]:
    """``(size, mtime_ns, sha256)`` of a source's file, or of a DICOM folder's files
    (total size, latest time), or of an object (its metadata, with ``storage_options``);
    the hash ("" unless ``content``) reads every byte. :data:`GONE` where it is not there."""
    if locations.is_url(source.path):
        try:
            size, mtime = locations.identity(source.path, storage_options)
        except OSError:
            return GONE
        return size, mtime, _sha256([source.path], storage_options) if content else ""
    path = Path(source.path)
    try:
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        stats = [f.stat() for f in files]
    except OSError:
        return GONE
    return (sum(s.st_size for s in stats), max((s.st_mtime_ns for s in stats), default=0),
            _sha256(files) if content else "")


def _sha256(files: Sequence[str | Path], storage_options: dict[str, Any] | None = None) -> str:
    sha = hashlib.sha256()
    for file in files:
        with locations.open_file(file, "rb", storage_options) as stream:
            while block := stream.read(2**20):
                sha.update(block)
    return sha.hexdigest()


def volume_checksum(voxels: np.ndarray) -> int:
    """A 64-bit checksum (blake2b) of a volume's stored voxels, as a signed int64: equal
    contents, equal checksums, so a killed and resumed run records what an uninterrupted
    one does."""
    digest = hashlib.blake2b(np.ascontiguousarray(voxels).tobytes(), digest_size=8)
    return int(np.frombuffer(digest.digest(), np.int64)[0])


def convert_chunk(path: str, region: slice, sources: Sequence[Source], settings: Settings,
                  redo: Sequence[int], refused: Mapping[int, str],
                  hash_sources: bool = False) -> ChunkResult:
    """Convert volumes ``redo`` of one chunk, mark ``refused`` ones failed, and write the
    whole chunk, its other volumes written back as stored.

    Parameters
    ----------
    path, region, sources
        The store, the chunk's ``id`` slice and its sources.
    settings
        How volumes are read and shaped.
    redo
        Positions in the chunk of the volumes to (re)convert.
    refused
        Position -> error of volumes to mark failed without reading them (excluded, or
        one that killed its worker).
    hash_sources
        Record each converted source's sha256 too.

    Returns
    -------
    ChunkResult
        Of the volumes converted or refused only.
    """
    n = len(sources)
    stored = VOLUMES.read(path).isel(id=region)
    kept = [j for j in range(n) if j not in redo and j not in refused]
    volume = np.full((n, *settings.shape), np.nan, settings.dtype)
    spacing = np.full((n, 3), np.nan)
    original = np.zeros((n, 3), np.int32)
    status, errors, notes = [stores.FAILED] * n, [""] * n, [""] * n
    tracked = [name for name in TRACKING if name in stored]
    tracking = {name: np.zeros(n, np.int64) for name in tracked}
    if "source_sha256" in tracking:
        tracking["source_sha256"] = np.full(n, "", object)
    if kept:  # read back only then: the chunk of a first run holds nothing yet, and the
        # status and error chunks of one a kill tore cannot be decoded
        for name in tracked:
            tracking[name][kept] = np.asarray(stored[name].values)[kept]
        volume[kept] = stored["volume"].values[kept]
        spacing[kept] = stored["spacing"].values[kept]
        original[kept] = stored["original_shape"].values[kept]
        for j in kept:
            status[j], errors[j] = int(stored["status"][j]), str(stored["error"][j].values)
            notes[j] = str(stored["note"][j].values)
    for j, error in refused.items():
        errors[j] = error
    for j in redo:
        source = sources[j]
        if "source_size" in tracking:  # before reading: a later change shows on a rerun
            size, mtime, digest = source_identity(source, hash_sources,
                                                  settings.read.storage_options)
            tracking["source_size"][j], tracking["source_mtime"][j] = size, mtime
            tracking["source_sha256"][j] = digest
        try:
            read = read_volume(source, settings.read)
            low, high = float(read.data.min()), float(read.data.max())
            notes[j] = "; ".join(filter(None, (
                read.note, f"constant volume (every voxel is {low:g})" if low == high else "")))
            scaled = scale_intensity(read.data, settings.scaling(source.kind))
            volume[j], spacing[j] = fit_shape(scaled, read.spacing, settings.shape,
                                              settings.fit, str(source))
            original[j] = read.data.shape
            if "filled_voxels" in tracking:
                tracking["filled_voxels"][j] = read.filled
            status[j] = stores.OK
        except InputError as error:
            errors[j] = str(error)
        except Exception as error:  # record it: one bad volume never stops the others
            errors[j] = f"{source}: {type(error).__name__}: {error}"
    if "checksum" in tracking:
        for j in (*redo, *refused):
            tracking["checksum"][j] = volume_checksum(volume[j])
    data = {
        "volume": xr.DataArray(volume, dims=VOLUMES.dims["volume"]),
        "spacing": xr.DataArray(spacing, dims=("id", "axis")),
        "original_shape": xr.DataArray(original, dims=("id", "axis")),
        "note": xr.DataArray(stores.as_strings(notes), dims="id"),
        **{name: xr.DataArray(stores.as_strings(values) if name == "source_sha256" else
                              values, dims="id") for name, values in tracking.items()},
    }
    stores.write_units(path, data, region, np.asarray(status), errors)
    done = sorted((*redo, *refused))
    return ChunkResult([sources[j].id for j in done], [status[j] for j in done],
                       [errors[j] for j in done], [notes[j] for j in done])
