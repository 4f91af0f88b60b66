"""NRRD (``.nrrd``, ``.nhdr``) and MetaImage (``.mha``, ``.mhd``) through SimpleITK.

SimpleITK is an optional extra (``pip install "raptorz[itk]"``). The text header is read
here first, to check the magic and to measure the voxel data on disk so that a truncated
file or a header that lies about the size is refused before ITK allocates the array. ITK
gives spacing, origin and direction cosines in LPS; the affine is flipped to NIfTI's RAS,
as ITK does itself when it writes a NIfTI, so one anatomy gives one array in every format.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final, Literal

import numpy as np

from raptorz.errors import InputError
from raptorz.ingest._guard import Compression, check_size

ItkFormat = Literal["nrrd", "metaimage"]

#: ITK's IO for each format: forced, so that a NIfTI renamed ``.nrrd`` is not read as NIfTI.
_IMAGE_IO: Final[dict[ItkFormat, str]] = {"nrrd": "NrrdImageIO", "metaimage": "MetaImageIO"}
#: Longest header read: real headers are a few kB; this bounds reading a non-header file.
_MAX_HEADER: Final = 1 << 20


@dataclasses.dataclass(frozen=True)
class _Layout:
    """Where a header's voxels are: bytes stored on disk (None if unknown), compression."""

    stored: int | None
    compression: Compression


def _sitk(path: str) -> Any:
    try:
        import SimpleITK
    except ImportError:
        raise InputError(path, 'reading NRRD and MetaImage needs SimpleITK: '
                         'pip install "raptorz[itk]"') from None
    return SimpleITK


def _data_files(header: Path, name: str) -> list[Path] | None:
    """The detached data files a header names; None for a pattern of numbered files."""
    words = name.split()
    if len(words) > 1 or "%" in name:
        return None
    data = header.parent / name
    if not data.is_file():
        raise InputError(header, f"its data file {data} is missing")
    return [data]


def _stored(files: list[Path] | None, skip: int) -> int | None:
    if files is None:
        return None
    return sum(f.stat().st_size for f in files) - max(skip, 0)


def _nrrd_layout(path: Path, text: bytes) -> _Layout:
    if not text.startswith(b"NRRD000"):
        raise InputError(path, "is not a NRRD file: it does not start with the NRRD magic")
    blank = re.search(rb"\r?\n\r?\n", text)  # a detached header may end with the file
    end, start = (blank.start(), blank.end()) if blank else (len(text), len(text))
    fields = {}
    for line in text[:end].decode("latin-1").splitlines()[1:]:
        key, sep, value = line.partition(":")
        if sep and not line.startswith("#"):
            fields[key.strip().lower().replace(" ", "")] = value.lstrip("=").strip()
    encoding = fields.get("encoding", "raw").lower()
    compression: Compression = ("raw" if encoding == "raw" else
                                "gzip" if encoding in ("gz", "gzip") else "other")
    skip = int(fields.get("byteskip", "0"))
    name = fields.get("datafile")
    files: list[Path] | None = [path]
    if name is None and not blank:
        raise InputError(path, "has no end to its NRRD header and no data file (truncated?)")
    if name is None:
        skip = skip + start if skip >= 0 else skip
    else:
        files = _data_files(path, name)
    if name is not None and name.upper().startswith("LIST"):
        files = None
    return _Layout(_stored(files, skip), compression)


def _metaimage_layout(path: Path, text: bytes) -> _Layout:
    fields, offset = {}, 0
    for line in text.splitlines(keepends=True):
        offset += len(line)
        key, sep, value = line.decode("latin-1").partition("=")
        if not sep:
            break
        fields[key.strip().lower()] = value.strip()
        if key.strip().lower() == "elementdatafile":
            break
    if "ndims" not in fields or "elementdatafile" not in fields:
        raise InputError(path, "is not a MetaImage header: no NDims or ElementDataFile")
    compressed = fields.get("compresseddata", "false").lower() == "true"
    compression: Compression = "gzip" if compressed else "raw"
    skip = int(fields.get("headersize", "0"))
    name = fields["elementdatafile"]
    if name.upper() == "LOCAL":
        files: list[Path] | None = [path]
        skip = offset + max(skip, 0)
    else:
        files = _data_files(path, name)
    if skip < 0:  # the data is the file's last bytes: at least as many as claimed
        skip = 0
    return _Layout(_stored(files, skip), compression)


def _layout(path: Path, kind: ItkFormat) -> _Layout:
    with path.open("rb") as file:
        text = file.read(_MAX_HEADER)
    return _nrrd_layout(path, text) if kind == "nrrd" else _metaimage_layout(path, text)


def _affine(image: Any) -> np.ndarray:
    """The voxel-to-RAS affine of ITK's (LPS) spacing, origin and direction cosines."""
    dim = min(image.GetDimension(), 3)
    affine = np.eye(4)
    direction = np.asarray(image.GetDirection(), float).reshape(
        image.GetDimension(), image.GetDimension())[:dim, :dim]
    affine[:dim, :dim] = direction * np.asarray(image.GetSpacing()[:dim], float)
    affine[:dim, 3] = image.GetOrigin()[:dim]
    affine[:2] *= -1  # ITK's physical space is LPS; NIfTI's is RAS
    return affine


def open_itk(
    source: str, kind: ItkFormat, cap: int,
) -> tuple[tuple[int, ...], np.ndarray, Callable[[], np.ndarray]]:
    """Shape, RAS affine and voxel loader of the NRRD or MetaImage file ``source``."""
    path = Path(source)
    layout = _layout(path, kind)
    sitk = _sitk(source)
    reader = sitk.ImageFileReader()
    reader.SetImageIO(_IMAGE_IO[kind])
    reader.SetFileName(source)
    reader.ReadImageInformation()
    components = reader.GetNumberOfComponents()
    if components != 1:
        raise InputError(source, f"has {components} values per voxel (a vector, tensor or "
                         "colour image); raptorz reads scalar volumes")
    shape = tuple(int(n) for n in reader.GetSize())
    itemsize = sitk.GetArrayViewFromImage(sitk.Image([1, 1], reader.GetPixelID())).itemsize
    check_size(source, int(np.prod(shape)) * itemsize, layout.stored, layout.compression, cap)

    def load() -> np.ndarray:
        array = sitk.GetArrayFromImage(reader.Execute())  # ITK's index order reversed
        if np.iscomplexobj(array):
            raise InputError(source, "holds complex voxels; raptorz reads real volumes")
        return np.ascontiguousarray(array.T, dtype=np.float32)

    return shape, _affine(reader), load
