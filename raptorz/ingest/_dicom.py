"""DICOM series: a folder of single-frame files, or one multi-frame file.

A folder may hold several series (a study): :func:`list_series` tells them apart by
their SeriesInstanceUID, and :func:`open_dicom` reads the one it is asked for. Each
file's header is read once per process (a folder's scan is kept until a file changes)
and checked against the file's size before anything is sized from it.

Slices are ordered by their position along the slice normal (never by file name or
instance number), rescale slope and intercept are applied per slice, and the affine is
built from the headers in LPS and turned into NIfTI's RAS. Axis 0 of the array runs
along a row (the column index), axis 1 down the columns, axis 2 along the normal.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

import numpy as np
import pydicom
from pydicom.misc import is_dicom
from pydicom.uid import UID

from raptorz.errors import InputError
from raptorz.ingest._guard import check_size, check_volume


@dataclasses.dataclass(frozen=True)
class _Slice:
    """Where one 2D frame lies and how its stored values become real ones."""

    file: Path
    frame: int | None
    series: str
    position: np.ndarray
    orientation: np.ndarray
    pixel_spacing: tuple[float, float]
    slope: float
    intercept: float


def _item(dataset: Any, frame: int | None, group: str, keyword: str) -> Any:
    """``keyword`` of ``frame``: per-frame group, else shared group, else top level."""
    places = []
    if frame is not None and "PerFrameFunctionalGroupsSequence" in dataset:
        places.append(dataset.PerFrameFunctionalGroupsSequence[frame])
    if "SharedFunctionalGroupsSequence" in dataset:
        places.append(dataset.SharedFunctionalGroupsSequence[0])
    for place in places:
        if group in place and keyword in place[group].value[0]:
            return place[group].value[0][keyword].value
    return dataset.get(keyword)


def _slice(file: Path, dataset: Any, frame: int | None) -> _Slice:
    orientation = _item(dataset, frame, "PlaneOrientationSequence", "ImageOrientationPatient")
    position = _item(dataset, frame, "PlanePositionSequence", "ImagePositionPatient")
    spacing = _item(dataset, frame, "PixelMeasuresSequence", "PixelSpacing")
    slope = _item(dataset, frame, "PixelValueTransformationSequence", "RescaleSlope")
    intercept = _item(dataset, frame, "PixelValueTransformationSequence", "RescaleIntercept")
    if position is None:  # no geometry in the header: stack frames at the slice step
        step = dataset.get("SpacingBetweenSlices") or dataset.get("SliceThickness") or 1
        position = [0.0, 0.0, float(step) * (frame or 0)]
    return _Slice(
        file, frame, str(dataset.get("SeriesInstanceUID", "")), np.asarray(position, float),
        np.asarray(orientation if orientation is not None else [1, 0, 0, 0, 1, 0], float),
        (float(spacing[0]), float(spacing[1])) if spacing is not None else (1.0, 1.0),
        float(slope if slope is not None else 1), float(intercept or 0),
    )


@dataclasses.dataclass(frozen=True)
class Series:
    """One series of a DICOM folder, as its headers describe it.

    ``frames`` counts its 2D images (slices); ``localizer`` is set where its ImageType
    says LOCALIZER (a scout or survey, not a volume).
    """

    uid: str
    number: int | None
    description: str
    frames: int
    localizer: bool

    @property
    def label(self) -> str:
        """How a user names it: number and description, else the UID."""
        described = repr(self.description) if self.description else ""
        return " ".join(filter(None, (str(self.number or ""), described))) or self.uid


#: Folders whose scans are kept: a conversion works through one folder's series in a row.
_SCANS: Final = 2


def _files(path: Path) -> list[Path]:
    """The DICOM files at ``path``: the folder's, or the file itself."""
    if path.is_dir():
        files = sorted(f for f in path.iterdir() if f.is_file() and is_dicom(f))
        if not files:
            raise InputError(path, "is a folder holding no volume files and no DICOM files")
        return files
    if not is_dicom(path):
        raise InputError(path, "is not a volume: not a format raptorz reads (see `raptorz "
                         "convert --help`), nor DICOM")
    return [path]


def _listing(path: Path) -> tuple[tuple[str, int, int], ...]:
    """What identifies the files at ``path`` in the scan cache: names, mtimes, sizes."""
    files = sorted(path.iterdir()) if path.is_dir() else [path]
    stats = ((f.name, f.stat()) for f in files if f.is_file())
    return tuple((name, stat.st_mtime_ns, stat.st_size) for name, stat in stats)


def _scan(path: Path) -> tuple[tuple[Path, Any], ...]:
    """Every DICOM file at ``path`` with its header (no pixels), each read once."""
    return _scan_listed(path, _listing(path))


@functools.lru_cache(maxsize=_SCANS)
def _scan_listed(path: Path, listing: tuple[tuple[str, int, int], ...]
                 ) -> tuple[tuple[Path, Any], ...]:
    headers = []
    for file in _files(path):
        dataset = pydicom.dcmread(file, stop_before_pixels=True)
        _check_pixels(file, dataset)
        headers.append((file, dataset))
    return tuple(headers)


def _check_pixels(file: Path, dataset: Any) -> None:
    """Refuse a header that claims more frames or pixels than ``file`` can hold."""
    frames, rows, columns = (int(dataset.get(k) or 1) for k in
                             ("NumberOfFrames", "Rows", "Columns"))
    samples = int(dataset.get("SamplesPerPixel") or 1)
    bits = frames * rows * columns * samples * int(dataset.get("BitsAllocated") or 16)
    claimed = (bits + 7) // 8
    size = file.stat().st_size
    syntax = UID(str(getattr(dataset.get("file_meta"), "TransferSyntaxUID", "") or
                     "1.2.840.10008.1.2"))
    if syntax.is_deflated:
        check_size(file, claimed, size, "gzip", cap=0)
    elif syntax.is_compressed:  # each frame is at least one 8-byte item of encapsulated data
        if 8 * frames > size:
            raise InputError(file, f"claims {frames} compressed frames but holds {size} "
                             "bytes: truncated, or a header that lies about the size")
    else:
        check_size(file, claimed, size, "raw", cap=0)


def list_series(path: str | Path) -> list[Series]:
    """The series in the DICOM folder (or file) ``path``, by series number, from headers."""
    found: dict[str, list[Any]] = {}
    for _, dataset in _scan(Path(path)):
        found.setdefault(str(dataset.get("SeriesInstanceUID", "")), []).append(dataset)
    series = []
    for uid, headers in found.items():
        number = headers[0].get("SeriesNumber")
        image_type = [str(v).upper() for v in (headers[0].get("ImageType") or [])]
        series.append(Series(
            uid, int(number) if number not in (None, "") else None,
            str(headers[0].get("SeriesDescription") or ""),
            sum(int(h.get("NumberOfFrames") or 1) for h in headers), "LOCALIZER" in image_type))
    return sorted(series, key=lambda s: (s.number is None, s.number or 0, s.uid))


def _slices(path: Path, series: str, cap: int) -> tuple[list[_Slice], Any]:
    """Every frame of the series at ``path`` (all, or ``series``), unsorted, and a header.

    The volume the headers describe is held to ``cap`` bytes (as float32) before a
    frame is listed.
    """
    scan = _scan(path)
    chosen = [(file, dataset) for file, dataset in scan
              if not series or str(dataset.get("SeriesInstanceUID", "")) == series]
    if series and not chosen:
        raise InputError(path, f"holds no DICOM series {series}")
    first = chosen[0][1]
    frames = sum(int(dataset.get("NumberOfFrames") or 1) for _, dataset in chosen)
    check_volume(path, (int(first.get("Columns") or 1), int(first.get("Rows") or 1), frames),
                 cap)
    slices = []
    for file, dataset in chosen:
        frames = int(dataset.get("NumberOfFrames") or 1)
        if frames > 1 and len(scan) > 1 and not series:
            raise InputError(path, f"mixes a multi-frame file ({file.name}) with other "
                             "files; give the multi-frame file on its own")
        slices += [_slice(file, dataset, i if frames > 1 else None) for i in range(frames)]
    if series and any(s.frame is not None for s in slices) and len(
            {s.file for s in slices}) > 1:
        raise InputError(path, f"series {series} mixes a multi-frame file with other files")
    uids = sorted({s.series for s in slices})
    if len(uids) > 1:
        raise InputError(path, f"mixes {len(uids)} DICOM series ({', '.join(uids)}); "
                         "convert the folder to get one volume per series")
    if len(slices) < 2:
        raise InputError(path, "is a single 2D DICOM image, not a 3D series")
    return slices, first


def open_dicom(
    source: str, series: str, cap: int,
) -> tuple[tuple[int, int, int], np.ndarray, Callable[[], np.ndarray]]:
    """Shape, RAS affine and voxel loader of the DICOM series at ``source``.

    ``series`` is a SeriesInstanceUID: the series to read from a folder of several
    (empty: the only one); ``cap`` the largest volume accepted, in float32 bytes.
    """
    path = Path(source)
    slices, first = _slices(path, series, cap)
    orientation = slices[0].orientation
    if any(not np.allclose(s.orientation, orientation, atol=1e-4) for s in slices):
        raise InputError(path, "holds slices of different orientations")
    row, column = orientation[:3], orientation[3:]
    normal = np.cross(row, column)
    slices.sort(key=lambda s: float(s.position @ normal))
    distances = np.diff([float(s.position @ normal) for s in slices])
    if np.any(distances < 1e-6):
        raise InputError(path, "holds two slices at the same position (several echoes "
                         "or repeats?); give one volume's slices only")
    step = float(np.median(distances))
    rows, columns = int(first.Rows), int(first.Columns)
    affine = np.eye(4)
    affine[:3, 0] = row * slices[0].pixel_spacing[1]
    affine[:3, 1] = column * slices[0].pixel_spacing[0]
    affine[:3, 2] = normal * step
    affine[:3, 3] = slices[0].position
    affine[:2] *= -1  # DICOM's patient axes are LPS; NIfTI's are RAS

    def load() -> np.ndarray:
        volume = np.empty((columns, rows, len(slices)), np.float32)
        cache: dict[Path, np.ndarray] = {}
        for k, item in enumerate(slices):
            if item.file not in cache:
                cache = {item.file: pydicom.dcmread(item.file).pixel_array}
            pixels = cache[item.file]
            frame = pixels if item.frame is None else pixels[item.frame]
            if frame.shape != (rows, columns):
                raise InputError(item.file, f"has a {frame.shape} image; the series is "
                                 f"{(rows, columns)}")
            volume[:, :, k] = frame.T.astype(np.float32) * item.slope + item.intercept
        return volume

    return (columns, rows, len(slices)), affine, load
