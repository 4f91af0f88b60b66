"""DICOM series: a folder of single-frame files, or one multi-frame file.

A folder may hold several series (a study): :func:`list_series` tells them apart by
their SeriesInstanceUID, and :func:`open_dicom` reads the one it is asked for.

Slices are ordered by their position along the slice normal (never by file name or
instance number), rescale slope and intercept are applied per slice, and the affine is
built from the headers in LPS and turned into NIfTI's RAS. Axis 0 of the array runs
along a row (the column index), axis 1 down the columns, axis 2 along the normal.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

import numpy as np
import pydicom
from pydicom.misc import is_dicom

from raptorz.errors import InputError


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


_SERIES_TAGS: Final = ["SeriesInstanceUID", "SeriesNumber", "SeriesDescription", "ImageType",
                       "NumberOfFrames"]


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


def list_series(path: str | Path) -> list[Series]:
    """The series in the DICOM folder (or file) ``path``, by series number, from headers."""
    found: dict[str, list[Any]] = {}
    for file in _files(Path(path)):
        dataset = pydicom.dcmread(file, stop_before_pixels=True, specific_tags=_SERIES_TAGS)
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


def _slices(path: Path, series: str) -> tuple[list[_Slice], Any]:
    """Every frame of the series at ``path`` (all, or ``series``), unsorted, and a header."""
    files = _files(path)
    slices, first = [], None
    for file in files:
        dataset = pydicom.dcmread(file, stop_before_pixels=True)
        if series and str(dataset.get("SeriesInstanceUID", "")) != series:
            continue
        if first is None:
            first = dataset
        frames = int(dataset.get("NumberOfFrames") or 1)
        if frames > 1 and len(files) > 1 and not series:
            raise InputError(path, f"mixes a multi-frame file ({file.name}) with other "
                             "files; give the multi-frame file on its own")
        slices += [_slice(file, dataset, i if frames > 1 else None) for i in range(frames)]
    if series and not slices:
        raise InputError(path, f"holds no DICOM series {series}")
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
    source: str, series: str = "",
) -> tuple[tuple[int, int, int], np.ndarray, Callable[[], np.ndarray]]:
    """Shape, RAS affine and voxel loader of the DICOM series at ``source``.

    ``series`` is a SeriesInstanceUID: the series to read from a folder of several.
    """
    path = Path(source)
    slices, first = _slices(path, series)
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
