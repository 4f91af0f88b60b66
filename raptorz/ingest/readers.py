"""Readers: one 3D volume from any format ``raptorz convert`` knows.

NIfTI, MGH/MGZ, Analyze, MINC, AFNI (``+orig.HEAD``/``.BRIK``) and Philips PAR/REC are
read by nibabel, NRRD and MetaImage by SimpleITK
(:mod:`._itk`), DICOM by pydicom (:mod:`._dicom`); UK Biobank zips and MedMNIST npz files
here. Every reader yields the volume's voxels as stored and its voxel-to-world affine (RAS
millimetres, as NIfTI defines it); :func:`read_volume` then checks the shape, refuses
non-finite voxels and, by default, reorients the array to the closest canonical (RAS)
order so that axis 0 runs left to right, axis 1 posterior to anterior and axis 2 inferior
to superior whatever the scanner wrote.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gzip
import io
import math
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any, Final, Literal, cast

import nibabel as nib
import numpy as np
from nibabel.brikhead import AFNIImage
from nibabel.parrec import PARRECImage

from raptorz import locations
from raptorz.defaults import DEFAULT_MEMBER, SourceKind
from raptorz.errors import InputError, SettingsError
from raptorz.ingest._guard import (
    DEFAULT_MAX_VOLUME_BYTES,
    MAX_VOLUMES_PER_FILE,
    Compression,
    check_size,
    check_volume,
    compression_of,
)

Orientation = Literal["ras", "native"]

#: The MedMNIST splits, in the order their volumes are listed.
NPZ_SPLITS: Final = ("train", "val", "test")


@dataclasses.dataclass(frozen=True)
class Source:
    """One volume to read.

    Parameters
    ----------
    id
        The volume's name in the store (file name without extensions, or ``train_0``...).
    path
        The file or folder.
    kind
        Which reader reads it.
    entry
        ``npz``: the images array (``train_images``...); ``dicom``: the series
        (SeriesInstanceUID) to read from a folder of several; unused otherwise.
    index
        ``npz``: the volume's row in ``entry``.
    """

    id: str
    path: str
    kind: SourceKind
    entry: str = ""
    index: int = 0

    def __str__(self) -> str:
        return f"{self.path}::{self.id}" if self.kind == "npz" or self.entry else self.path


@dataclasses.dataclass(frozen=True)
class ReadOptions:
    """How sources are read.

    Parameters
    ----------
    member
        The volume inside a UK Biobank zip.
    max_member_bytes
        Largest decompressed size accepted for a zip member, or claimed by the header of
        a compressed volume whose size cannot be bounded otherwise (a guard against zip
        bombs and lying headers).
    orientation
        ``ras`` reorients to the closest canonical (RAS) array order; ``native`` keeps
        the order as stored (what the original tool does).
    max_volume_bytes
        Largest volume accepted, in bytes of float32 voxels, checked on the header of
        every format before anything is allocated (also the cap on an npz array, which
        is decompressed whole).
    fill_nonfinite
        Fill NaN and infinite voxels with this value, or the volume's smallest finite
        one (``"min"``); ``None`` refuses such volumes.
    storage_options
        fsspec options of sources given as URLs (``{"anon": True}``); not recorded.
    """

    member: str = DEFAULT_MEMBER
    max_member_bytes: int = 2**31
    orientation: Orientation = "ras"
    max_volume_bytes: int = DEFAULT_MAX_VOLUME_BYTES
    fill_nonfinite: float | Literal["min"] | None = None
    storage_options: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        fill = self.fill_nonfinite
        if not (fill is None or fill == "min" or (
                isinstance(fill, int | float) and not isinstance(fill, bool)
                and math.isfinite(fill))):
            raise SettingsError(f"expected a number or 'min', got {fill!r}",
                                option="fill_nonfinite")


@dataclasses.dataclass(frozen=True)
class Volume:
    """A volume as read: raw values (float32) in the chosen orientation, spacing in mm.

    ``note`` says what the user should know although the volume was read (e.g. an
    Analyze file's assumed orientation); empty otherwise. ``filled`` counts the
    non-finite voxels filled (:attr:`ReadOptions.fill_nonfinite`).
    """

    data: np.ndarray
    spacing: tuple[float, float, float]
    note: str = ""
    filled: int = 0


@dataclasses.dataclass(frozen=True)
class _Image:
    """A volume's header: stored shape and affine, how to load its voxels, a note."""

    shape: tuple[int, ...]
    affine: np.ndarray
    load: Callable[[], np.ndarray]
    note: str = ""


#: The image classes each nibabel reader accepts (nibabel picks one from the header).
_NIBABEL: Final[dict[SourceKind, tuple[type, ...]]] = {
    "nifti": (nib.Nifti1Image, nib.Nifti2Image),
    "mgh": (nib.MGHImage,),
    "analyze": (nib.AnalyzeImage,),  # Analyze 7.5, SPM's variants and NIfTI pairs
    "minc": (nib.Minc1Image, nib.Minc2Image),
    "afni": (AFNIImage,),
    "parrec": (PARRECImage,),
}
_ANALYZE_NOTE: Final = ("Analyze 7.5 stores no orientation: the array is assumed to run "
                        "right to left, posterior to anterior, inferior to superior (LAS, "
                        "nibabel's and FSL's convention); check left and right")


def _open_nibabel(source: Source, options: ReadOptions) -> _Image:
    try:
        loaded = nib.load(source.path)
    except ModuleNotFoundError as error:  # MINC2 is HDF5, read through h5py
        raise InputError(source.path, f"needs {error.name} to be read: "
                         'pip install "raptorz[minc]"') from None
    if not isinstance(loaded, _NIBABEL[source.kind]):
        raise InputError(source.path, f"is a {type(loaded).__name__}, not a "
                         f"{source.kind} volume")
    image: Any = loaded  # one of the classes above, all spatial images with data offsets
    header = image.header
    if source.kind == "minc" and len(image.shape) == 4:  # MINC puts time first
        raise InputError(source.path, f"is a 4D series of {image.shape[0]} frames (shape "
                         f"{image.shape}); pick one frame first, e.g. `mincreshape`")
    claimed = math.prod(int(n) for n in image.shape) * header.get_data_dtype().itemsize
    if source.kind == "minc":
        _check_minc(source.path, image, claimed, options)
    else:
        data_file = str(image.file_map["image"].filename)
        offset = int(header.get_data_offset())
        check_size(source.path, claimed, Path(data_file).stat().st_size - offset,
                   compression_of(data_file), options.max_member_bytes)
    check_volume(source.path, image.shape, options.max_volume_bytes)
    note = _ANALYZE_NOTE if source.kind == "analyze" and not isinstance(
        image, nib.Nifti1Pair) else ""
    return _Image(tuple(image.shape), image.affine,
                  lambda: image.get_fdata(dtype=np.float32, caching="unchanged"), note)


def _check_minc(path: str, image: Any, claimed: int, options: ReadOptions) -> None:
    """Refuse a MINC file whose image variable cannot hold the voxels its header claims.

    MINC1 (netCDF) stores them raw in the file; MINC2 (HDF5) in a dataset whose chunks
    may be compressed, or never written at all (HDF5 then makes up fill values): its
    allocated storage is what bounds them.
    """
    dataset = getattr(image.dataobj.minc_file, "_image", None)
    storage = getattr(getattr(dataset, "id", None), "get_storage_size", None)
    if storage is None:  # MINC1: a netCDF variable inside the file
        check_size(path, claimed, Path(path).stat().st_size, "raw", options.max_member_bytes)
        return
    filters = getattr(dataset, "compression", None)
    compression: Compression = ("raw" if filters is None else
                                "gzip" if filters == "gzip" else "other")
    check_size(path, claimed, int(storage()), compression, options.max_member_bytes)


def _member_image(source: Source, options: ReadOptions, with_data: bool) -> _Image:
    """The NIfTI member of a zip, read in memory through ``gzip`` and a ``FileHolder``."""
    with zipfile.ZipFile(source.path) as archive:
        try:
            info = archive.getinfo(options.member)
        except KeyError:
            raise InputError(source.path, f"has no member {options.member!r} (choose "
                             "another with --member)") from None
        cap = options.max_member_bytes
        if info.file_size > cap:
            raise InputError(source.path, f"member {options.member} is {info.file_size} "
                             f"bytes, over the cap of {cap}")
        with archive.open(info) as stream:
            fileobj: IO[bytes] | gzip.GzipFile = (gzip.GzipFile(fileobj=stream)
                                  if info.filename.endswith(".gz") else stream)
            holder = nib.FileHolder(f"{source.path}::{info.filename}", cast(io.IOBase, fileobj))
            image = nib.Nifti1Image.from_file_map({"header": holder, "image": holder})
            # The header says how many bytes the voxels take; refuse before inflating them.
            check_volume(source.path, image.shape, options.max_volume_bytes)
            needed = int(image.header.get_data_offset()) + math.prod(
                image.shape) * image.get_data_dtype().itemsize
            if needed > cap:
                raise InputError(source.path, f"member {options.member} would decompress "
                                 f"to {needed} bytes, over the cap of {cap}")
            data = image.get_fdata(dtype=np.float32) if with_data else np.empty(0, np.float32)
    return _Image(tuple(image.shape), image.affine, lambda: data)


def _open_zip(source: Source, options: ReadOptions) -> _Image:
    header = _member_image(source, options, with_data=False)
    return dataclasses.replace(
        header, load=lambda: _member_image(source, options, with_data=True).load())


def _version(path: str) -> tuple[int, int]:
    """What identifies a file's content in the caches below: its mtime and size."""
    stat = Path(path).stat()
    return stat.st_mtime_ns, stat.st_size


def npz_images(path: str, entry: str) -> tuple[int, ...]:
    """The shape of array ``entry`` of an ``.npz`` file, read from its header only.

    The shape is checked against the bytes the member stores (a header cannot claim
    more than its compressed data can hold), so it may size what follows.
    """
    return _npz_header(path, entry, _version(path))[0]


def npz_volumes(path: str, cap: int) -> dict[str, int]:
    """Volumes per split (``train``...) of a MedMNIST-style npz, from its headers only.

    Raises
    ------
    InputError
        Where an images array is not a numeric array of 3D volumes, claims more bytes
        than the file holds, decompresses to over ``cap`` bytes (it is decompressed
        whole), or the file claims over :data:`MAX_VOLUMES_PER_FILE` volumes.
    """
    with zipfile.ZipFile(path) as archive:
        names = set(archive.namelist())
    sizes: dict[str, int] = {}
    for split in NPZ_SPLITS:
        entry = f"{split}_images"
        if f"{entry}.npy" not in names:
            continue
        shape, itemsize = _npz_header(path, entry, _version(path))
        if len(shape) != 4:
            raise InputError(path, f"array {entry} has shape {shape}; MedMNIST images are "
                             "(N, X, Y, Z)")
        check_volume(path, shape[1:], cap)
        if math.prod(shape) * itemsize > cap:
            raise InputError(path, f"array {entry} of shape {shape} decompresses to "
                             f"{math.prod(shape) * itemsize} bytes, over the cap of {cap} "
                             "(it is decompressed whole; raise --max-volume-bytes if real)")
        sizes[split] = shape[0]
    if sum(sizes.values()) > MAX_VOLUMES_PER_FILE:
        raise InputError(path, f"claims {sum(sizes.values())} volumes, over the "
                         f"{MAX_VOLUMES_PER_FILE} one file may hold; split it")
    return sizes


@functools.lru_cache(maxsize=64)
def _npz_header(path: str, entry: str, version: tuple[int, int]) -> tuple[tuple[int, ...], int]:
    """Shape and item size of array ``entry``, checked against the bytes it stores."""
    with zipfile.ZipFile(path) as archive, archive.open(f"{entry}.npy") as stream:
        read_header = (np.lib.format.read_array_header_1_0
                       if np.lib.format.read_magic(stream) == (1, 0)
                       else np.lib.format.read_array_header_2_0)
        shape, _, dtype = read_header(stream)
        info = archive.getinfo(f"{entry}.npy")
    if dtype.hasobject:
        raise InputError(path, f"array {entry} holds Python objects; not a volume array")
    if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        raise InputError(path, f"array {entry} is compressed with zip method "
                         f"{info.compress_type}; numpy writes only stored or deflated arrays")
    # The zip directory's sizes are the file's word: the file's own size bounds them.
    stored = min(info.compress_size, Path(path).stat().st_size)
    try:
        check_size(path, math.prod(shape) * dtype.itemsize, stored,
                   "raw" if info.compress_type == zipfile.ZIP_STORED else "gzip", cap=0)
    except InputError as error:
        raise InputError(path, f"array {entry}: {error.problem}") from None
    return tuple(shape), dtype.itemsize


@functools.lru_cache(maxsize=2)
def _npz_array(path: str, entry: str, version: tuple[int, int]) -> np.ndarray:
    # A worker converts many volumes of one array in a row: decompress it once.
    with np.load(path, allow_pickle=False) as archive:
        return np.asarray(archive[entry])


def _open_npz(source: Source, options: ReadOptions) -> _Image:
    try:
        sizes = npz_volumes(source.path, options.max_volume_bytes)
    except InputError as error:
        raise InputError(source.path, "is not a MedMNIST-style npz: "
                         f"{error.problem}") from None
    if not source.entry or not sizes:
        raise InputError(source.path, "is not a MedMNIST-style npz: it has no readable "
                         "numeric array " + ", ".join(f"{s}_images" for s in NPZ_SPLITS))
    shape = npz_images(source.path, source.entry)[1:]
    return _Image(shape, np.eye(4),
                  lambda: _npz_array(source.path, source.entry, _version(source.path))[
                      source.index].astype(np.float32))


def _open_dicom(source: Source, options: ReadOptions) -> _Image:
    from raptorz.ingest._dicom import open_dicom  # pydicom is only imported where needed

    shape, affine, load = open_dicom(source.path, source.entry, options.max_volume_bytes)
    return _Image(shape, affine, load)


def _open_itk(source: Source, options: ReadOptions) -> _Image:
    from raptorz.ingest._itk import open_itk  # SimpleITK is an optional extra

    kind: Literal["nrrd", "metaimage"] = "nrrd" if source.kind == "nrrd" else "metaimage"
    shape, affine, load = open_itk(source.path, kind, options.max_member_bytes)
    return _Image(shape, affine, load)


_OPENERS: Final[dict[SourceKind, Callable[[Source, ReadOptions], _Image]]] = {
    **dict.fromkeys(_NIBABEL, _open_nibabel), "zip": _open_zip, "npz": _open_npz,
    "dicom": _open_dicom, "nrrd": _open_itk, "metaimage": _open_itk,
}


def _open(source: Source, options: ReadOptions) -> tuple[_Image, tuple[int, int, int]]:
    """Open ``source``; return its header and its 3D shape as stored."""
    if not Path(source.path).exists():
        raise InputError(source.path, "no such file or folder")
    try:
        image = _OPENERS[source.kind](source, options)
    except InputError:
        raise
    except Exception as error:  # every library raises its own types for a bad file
        raise InputError(source.path, f"cannot be read as {source.kind}: corrupt, truncated "
                         f"or another format ({type(error).__name__}: {error})") from None
    shape = image.shape
    check_volume(source.path, shape, options.max_volume_bytes)
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) == 4:
        raise InputError(source.path, f"is a 4D series of {shape[3]} frames (shape {shape}); "
                         "pick one frame first, e.g. nibabel's img.slicer[..., i] or "
                         "`fslroi in.nii.gz out.nii.gz i 1`")
    if len(shape) != 3 or min(shape) < 1:
        raise InputError(source.path, f"is not a 3D volume (shape {shape})")
    return image, (shape[0], shape[1], shape[2])


def _orientation(image: _Image, options: ReadOptions) -> np.ndarray:
    if options.orientation == "native":
        return np.array([[0, 1], [1, 1], [2, 1]], dtype=float)
    return nib.io_orientation(image.affine)


def _permute(values: tuple, ornt: np.ndarray) -> tuple:
    out = list(values)
    for axis, (target, _) in enumerate(ornt):
        out[int(target)] = values[axis]
    return tuple(out)


#: The data files read with a header, by the header's ending: fetched with it from a URL.
_DATA_FILES: Final = {".hdr": (".img", ".img.gz"), ".head": (".brik", ".brik.gz"),
                      ".par": (".rec",), ".mhd": (".raw", ".zraw"), ".nhdr": (".raw", ".raw.gz")}


def _fetched(source: Source, options: ReadOptions) -> contextlib.AbstractContextManager[Path]:
    """A local copy of URL ``source`` and its data file; none over 2x the volume cap."""
    header = next((h for h in _DATA_FILES if source.path.lower().endswith(h)), "")
    stem, ending = source.path[: len(source.path) - len(header)], source.path[-len(header):]
    data = tuple(stem + (d.upper() if ending.isupper() else d)
                 for d in _DATA_FILES.get(header, ()))
    cap = max(2 * options.max_volume_bytes, options.max_member_bytes)
    return locations.local_copy(source.path, options.storage_options, cap, data)


def probe_shape(source: Source, options: ReadOptions) -> tuple[int, int, int]:
    """The shape ``source`` will have once read, from its header only (a source in object
    storage is fetched whole)."""
    if locations.is_url(source.path):
        with _fetched(source, options) as copy:
            return probe_shape(dataclasses.replace(source, path=str(copy)), options)
    image, shape = _open(source, options)
    return _permute(shape, _orientation(image, options))


def read_volume(source: Source, options: ReadOptions) -> Volume:
    """Read ``source``: raw float32 voxels in the chosen orientation and their spacing.

    Raises
    ------
    InputError
        Naming the file and the problem: missing, unreadable, not 3D, a 4D series,
        or voxels that are NaN or infinite (refused unless ``options.fill_nonfinite``;
        refused all the same where no voxel is finite).
    """
    if locations.is_url(source.path):  # the readers need a file: a local copy, for the read
        with _fetched(source, options) as copy:
            return read_volume(dataclasses.replace(source, path=str(copy)), options)
    image, shape = _open(source, options)
    try:
        data = np.asarray(image.load(), dtype=np.float32).reshape(shape)
    except InputError:
        raise
    except Exception as error:
        raise InputError(source.path, f"cannot read the voxels, truncated or corrupt? "
                         f"({type(error).__name__}: {error})") from None
    finite = np.isfinite(data)
    bad = int(data.size - np.count_nonzero(finite))
    if bad and (options.fill_nonfinite is None or bad == data.size):
        raise InputError(source.path, f"{bad} of {data.size} voxels are NaN or infinite; "
                         "raptorz refuses such volumes (fix or mask them first, or fill "
                         "them: --fill-nonfinite VALUE|min, fill_nonfinite= in Python)")
    if bad:
        fill = (data[finite].min() if options.fill_nonfinite == "min"
                else options.fill_nonfinite)
        data = np.where(finite, data, np.float32(fill))
    ornt = _orientation(image, options)
    spacing = _permute(tuple(float(v) for v in nib.affines.voxel_sizes(image.affine)), ornt)
    return Volume(nib.apply_orientation(data, ornt), spacing, image.note, bad)
