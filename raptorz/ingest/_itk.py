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
#: Most data files a header may name (one per slice at most, in practice).
_MAX_DATA_FILES: Final = 65_536


@dataclasses.dataclass(frozen=True)
class _Layout:
    """Where a header's voxels are: bytes stored on disk, and their compression."""

    stored: int
    compression: Compression


def _sitk(path: str) -> Any:
    try:
        import SimpleITK
    except ImportError:
        raise InputError(path, 'reading NRRD and MetaImage needs SimpleITK: '
                         'pip install "raptorz[itk]"') from None
    return SimpleITK


def _inside(header: Path, name: str) -> Path:
    """``name`` resolved (symlinks included) from the header's folder; refused outside it."""
    folder = header.parent.resolve()
    data = (folder / name).resolve()
    if not data.is_relative_to(folder):
        raise InputError(header, f"its data file {name!r} resolves to {data}, outside the "
                         f"header's folder {folder}; raptorz reads data files beside the "
                         "header only")
    return data


def _pattern(header: Path, value: str) -> list[str]:
    """The files of a numbered pattern ``FORMAT MIN MAX STEP [SUBDIM]`` (NRRD, MetaImage)."""
    match = re.fullmatch(r"([^%\s]*%0?\d*d[^%\s]*)\s+(-?\d+)\s+(-?\d+)\s+(-?\d+)(\s+\d+)?",
                         value)
    if match is None or int(match[4]) == 0:
        raise InputError(header, f"its data file pattern {value!r} is not FORMAT MIN MAX STEP "
                         "with one %d in FORMAT; raptorz reads no other")
    low, high, step = int(match[2]), int(match[3]), int(match[4])
    numbers = range(low, high + (1 if step > 0 else -1), step)
    if len(numbers) > _MAX_DATA_FILES:
        raise InputError(header, f"its data file pattern {value!r} names {len(numbers)} "
                         f"files, over the {_MAX_DATA_FILES} raptorz reads")
    return [match[1] % number for number in numbers]


def _data_files(header: Path, value: str, listed: list[str]) -> list[Path]:
    """The detached data files a header names, each checked to lie beside the header.

    ``value`` is the data file field, ``listed`` the header's lines after it (the names
    of a ``LIST``). NRRD's teem and MetaImage's MetaIO read these fields differently:
    every way either could read one (the whole value, its first word, each listed line
    and word) must stay in the header's folder, and the files read must exist.
    """
    words = value.split()
    others = [value, *words[:1]]
    if words and words[0].upper().startswith("LIST"):
        names = [line.strip() for line in listed if line.strip()]
        others += listed + [word for line in listed for word in line.split()]
        if not names or len(names) > _MAX_DATA_FILES:
            raise InputError(header, f"its data file LIST names {len(names)} files; raptorz "
                             f"reads 1 to {_MAX_DATA_FILES}")
    elif "%" in value:
        names = _pattern(header, value.strip())
    else:
        names = [value.strip()]
    for name in others:
        _inside(header, name)
    files = [_inside(header, name) for name in names]
    missing = [f for f in files if not f.is_file()]
    if missing:
        raise InputError(header, f"its data file {missing[0]} is missing")
    return files


def _stored(files: list[Path], skip: int) -> int:
    return sum(f.stat().st_size for f in files) - max(skip, 0)


def _lines(text: bytes) -> list[str]:
    """Header lines as teem and MetaIO split them: on newlines only, carriage returns cut."""
    return [line.rstrip("\r") for line in text.decode("latin-1").split("\n")]


def _nrrd_layout(path: Path, text: bytes) -> _Layout:
    if not text.startswith(b"NRRD000"):
        raise InputError(path, "is not a NRRD file: it does not start with the NRRD magic")
    blank = re.search(rb"\r?\n\r?\n", text)  # a detached header may end with the file
    end, start = (blank.start(), blank.end()) if blank else (len(text), len(text))
    fields: dict[str, str] = {}
    files: list[Path] = [path]
    named = False
    lines = _lines(text[:end])
    for number, line in enumerate(lines[1:], 1):
        key, sep, value = line.partition(":")
        key = key.strip().lower().replace(" ", "")
        if not sep or line.startswith("#"):
            continue
        fields[key] = value.lstrip("=").strip()
        if key == "datafile":  # checked at each occurrence: a repeated field is not skipped
            if len(text) >= _MAX_HEADER:
                raise InputError(path, f"is a detached header of over {_MAX_HEADER} bytes")
            files = _data_files(path, value.lstrip("=").lstrip(" \t"),
                                _lines(text)[number + 1:])
            named = True
    encoding = fields.get("encoding", "raw").lower()
    compression: Compression = ("raw" if encoding == "raw" else
                                "gzip" if encoding in ("gz", "gzip") else "other")
    skip = int(fields.get("byteskip", "0"))
    if not named and not blank:
        raise InputError(path, "has no end to its NRRD header and no data file (truncated?)")
    if not named:
        skip = skip + start if skip >= 0 else skip
    return _Layout(_stored(files, skip), compression)


def _metaimage_layout(path: Path, text: bytes) -> _Layout:
    fields: dict[str, str] = {}
    offset, data_offset = 0, 0
    files: list[Path] = []
    lines = text.split(b"\n")
    for number, raw in enumerate(lines):
        offset += len(raw) + 1
        key, sep, value = raw.decode("latin-1").rstrip("\r").partition("=")
        if not sep:
            break
        key = key.strip().lower()
        fields.setdefault(key, value.strip())
        if key == "elementdatafile":  # every occurrence is checked, the first one is read
            if not data_offset:
                data_offset = offset
            if value.strip().upper() != "LOCAL":
                if len(text) >= _MAX_HEADER:
                    raise InputError(path, f"is a header of over {_MAX_HEADER} bytes")
                listed = _lines(b"\n".join(lines[number + 1:]))
                checked = _data_files(path, value.lstrip(" \t"), listed)
                files = files or checked
            elif not files:
                files = [path]
    if "ndims" not in fields or "elementdatafile" not in fields:
        raise InputError(path, "is not a MetaImage header: no NDims or ElementDataFile")
    compressed = fields.get("compresseddata", "false").lower() == "true"
    compression: Compression = "gzip" if compressed else "raw"
    skip = int(fields.get("headersize", "0"))
    if files == [path]:
        skip = data_offset + max(skip, 0)
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
