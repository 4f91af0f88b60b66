"""What to convert: paths, folders, globs or a manifest, resolved into :class:`Source`\\ s.

Ids are file names without their extensions (a DICOM folder's name, or
``FOLDER_NUMBER_DESCRIPTION`` per series of a folder holding several; ``train_0``... for
a MedMNIST npz); they must be unique, which is checked before any work starts.
"""

from __future__ import annotations

import csv
import dataclasses
import glob
import os
import re
import warnings
import zipfile
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import numpy as np

from raptorz import locations, stores
from raptorz.defaults import DEFAULT_MIN_SLICES
from raptorz.errors import InputError, RaptorzError, RaptorzWarning, SettingsError
from raptorz.ingest._guard import DEFAULT_MAX_VOLUME_BYTES
from raptorz.ingest.bids import BidsQuery, bids_sources
from raptorz.ingest.readers import Source, SourceKind, npz_images, npz_volumes

if TYPE_CHECKING:
    from raptorz.ingest._dicom import Series

#: File endings the readers know, longest first so that ``.nii.gz`` wins over ``.gz``.
SUFFIXES: Final[dict[str, SourceKind]] = {
    ".nii.gz": "nifti", ".nii": "nifti", ".zip": "zip", ".npz": "npz",
    ".nrrd": "nrrd", ".nhdr": "nrrd", ".mha": "metaimage", ".mhd": "metaimage",
    ".mgz": "mgh", ".mgh": "mgh", ".hdr": "analyze", ".img": "analyze", ".mnc": "minc",
    ".brik.gz": "afni", ".brik": "afni", ".head": "afni", ".par": "parrec", ".rec": "parrec",
}
#: Data files of the formats whose header is another file: the header stands for both.
_HEADERS: Final = {".img": ".hdr", ".brik": ".head", ".brik.gz": ".head", ".rec": ".par"}
_GLOB_CHARS: Final = frozenset("*?[")


def _suffix(path: Path) -> str:
    name = path.name.lower()
    return next((s for s in SUFFIXES if name.endswith(s)), "")


def _has_header(path: Path, names: set[str]) -> bool:
    """Whether ``path`` is a data file whose header is among ``names`` (lower case)."""
    suffix = _suffix(path)
    return suffix in _HEADERS and (
        path.name[: -len(suffix)] + _HEADERS[suffix]).lower() in names


def _npz_sources(path: Path, selection: SeriesSelection) -> list[Source]:
    """One source per volume of a MedMNIST-style npz; one failing source if it is not.

    How many there are comes from the arrays' headers, checked first against the bytes
    the file holds and the caps (:func:`raptorz.ingest.readers.npz_volumes`).
    """
    try:
        sizes = npz_volumes(str(path), selection.max_volume_bytes)
    except (OSError, zipfile.BadZipFile, ValueError, InputError):
        sizes = {}
    if not sizes:  # let the reader report the problem as this file's failure
        return [Source(path.name.removesuffix(".npz"), str(path), "npz")]
    return [Source(f"{split}_{i}", str(path), "npz", f"{split}_images", i)
            for split, n in sizes.items() for i in range(n)]


@dataclasses.dataclass(frozen=True)
class SeriesSelection:
    """Which series of a DICOM folder holding several become volumes, and the volume cap.

    Parameters
    ----------
    names
        Keep only the series named here, by series number, description (any case), the
        id raptorz gives it, or SeriesInstanceUID; all when empty. Named series are kept
        whatever their size.
    min_slices
        Skip, with a warning, series of fewer slices, and localizers.
    max_volume_bytes
        The cap on one volume (and on an npz array), which bounds how many volumes an
        npz may yield.
    """

    names: tuple[str, ...] = ()
    min_slices: int = DEFAULT_MIN_SLICES
    max_volume_bytes: int = DEFAULT_MAX_VOLUME_BYTES


def _slug(text: str) -> str:
    return re.sub(r"[^0-9a-z]+", "_", text.lower()).strip("_")


def _series_ids(folder: Path, series: Sequence[Series]) -> list[str]:
    """``FOLDER_NUMBER_DESCRIPTION`` per series (``FOLDER_UID`` where it has neither),
    with ``_2``, ``_3``... where repeated."""
    ids, seen = [], Counter[str]()
    for item in series:
        named = "_".join(filter(None, (str(item.number or ""), _slug(item.description))))
        base = f"{folder.name}_{named or item.uid}"
        seen[base] += 1
        ids.append(base if seen[base] == 1 else f"{base}_{seen[base]}")
    return ids


def _dicom_sources(folder: Path, selection: SeriesSelection) -> list[Source]:
    """One source per series of a DICOM folder; the folder itself where it holds one."""
    from raptorz.ingest._dicom import list_series  # pydicom only where DICOM is met

    try:
        series = list_series(folder)
    except (InputError, OSError, ValueError):  # the reader reports it as the folder's failure
        series = []
    if not series:
        return [Source(folder.name, str(folder), "dicom")]
    wanted = {name.lower() for name in selection.names}
    sources: list[Source] = []
    for item, volume_id in zip(series, _series_ids(folder, series), strict=True):
        source = Source(volume_id, str(folder), "dicom", entry=item.uid)
        if wanted:  # named series are kept whatever their size
            if wanted & {str(item.number), item.description.lower(), volume_id.lower(),
                          item.uid}:
                sources.append(source)
            continue
        why = ("a localizer" if item.localizer else
               f"{item.frames} slices, under --min-slices {selection.min_slices}"
               if item.frames < selection.min_slices else "")
        if why and len(series) > 1:
            warnings.warn(f"{folder}: skipped DICOM series {item.label} ({why})",
                          RaptorzWarning, stacklevel=4)
            continue
        sources.append(source)
    if wanted and not sources:
        warnings.warn(f"{folder}: none of its DICOM series is named by --series "
                      f"{' '.join(selection.names)}; skipped", RaptorzWarning, stacklevel=4)
    if len(series) == 1:  # a folder of one series is named after the folder, as always
        return [Source(folder.name, str(folder), "dicom")] if sources else []
    return sources


def _expand(path: Path, selection: SeriesSelection) -> list[Source]:
    """The sources at one path: a file, an npz's volumes, or a folder's contents."""
    suffix = _suffix(path)
    if suffix == ".npz" and path.is_file():
        return _npz_sources(path, selection)
    if path.is_dir():
        entries = sorted(p for p in path.iterdir() if not p.name.startswith("."))
        names = {p.name.lower() for p in entries}
        # a header and its data file (Analyze, AFNI, PAR/REC) are one volume
        inside = [p for p in entries if _suffix(p) and not _has_header(p, names)]
        if not inside and "dataset_description.json" in names:
            raise InputError(path, "is a BIDS dataset: choose its images by entities, e.g. "
                             "--bids suffix=T1w (bids= in Python)")
        if not inside and not any(p.is_file() for p in entries):  # a folder of series
            inside = [p for p in entries if p.is_dir()]
        if inside:
            return [source for p in inside for source in _expand(p, selection)]
        return _dicom_sources(path, selection)
    if suffix:
        return [Source(path.name[: -len(suffix)], str(path), SUFFIXES[suffix])]
    return [Source(path.name.removesuffix(".dcm"), str(path), "dicom")]


def _remote(url: str, storage_options: dict[str, Any] | None) -> list[Source]:
    """The sources at a URL: an object, a glob's matches, or a folder's files (or, where it
    holds none raptorz reads, its sub-folders'), each listed once, by its own prefix."""
    if _GLOB_CHARS & set(url.split("://", 1)[1]):
        found = locations.matches(url, storage_options)
        if not found:
            raise InputError(url, "the pattern matches no object")
        return [s for one in found for s in _remote(one, storage_options)]
    if not locations.is_folder(url, storage_options):
        suffix = _suffix(Path(locations.name(url)))
        if suffix in ("", ".npz"):
            raise InputError(url, "raptorz reads DICOM and npz files from object storage "
                             "only once downloaded (each other format, as it is)")
        return [Source(locations.name(url)[: -len(suffix)], url, SUFFIXES[suffix])]
    entries = [(u, folder) for u, folder in locations.listing(url, storage_options)
               if not locations.name(u).startswith(".")]
    names = {locations.name(u).lower() for u, _ in entries}
    inside = [u for u, folder in entries if not folder and _suffix(Path(locations.name(u)))
              and not _has_header(Path(locations.name(u)), names)]
    if not inside and "dataset_description.json" in names:
        raise InputError(url, "is a BIDS dataset: choose its images by entities, e.g. "
                         "--bids suffix=T1w (bids= in Python)")
    inside = inside or [u for u, folder in entries if folder]
    if not inside:
        raise InputError(url, "holds no file raptorz reads (DICOM folders must be "
                         "downloaded first)")
    return [s for one in inside for s in _remote(one, storage_options)]


def _manifest_names(manifest: Path) -> list[str]:
    try:
        lines = manifest.read_text().splitlines()
    except OSError as error:
        raise InputError(manifest, f"cannot read the manifest ({error.strerror})") from None
    names = [line.strip() for line in lines]
    names = [name for name in names if name and not name.startswith("#")]
    if not names:
        raise InputError(manifest, "the manifest lists no volumes")
    return names


def _from_manifest(manifest: Path, folder: Path, selection: SeriesSelection) -> list[Source]:
    names = _manifest_names(manifest)
    if _suffix(folder) == ".npz":  # the original's --npz: the names are the npz's ids
        by_id = {s.id: s for s in _npz_sources(folder, selection)}
        missing = [name for name in names if name not in by_id]
        if missing:
            raise InputError(manifest, f"names {missing[:5]} are not volumes of {folder}")
        return [by_id[name] for name in names]
    root = folder.resolve()
    sources = []
    for number, name in enumerate(names, 1):
        path = folder / name
        if not path.resolve().is_relative_to(root):
            raise InputError(manifest, f"line {number}: {name!r} escapes the folder {folder}")
        sources += _expand(path, selection)
    return sources


def resolve_sources(
    sources: Sequence[str | Path] = (),
    *,
    folder: str | Path | None = None,
    manifest: str | Path | None = None,
    start: int = 0,
    many: int | None = None,
    series: Sequence[str] = (),
    min_slices: int = DEFAULT_MIN_SLICES,
    max_volume_bytes: int = DEFAULT_MAX_VOLUME_BYTES,
    bids: BidsQuery | None = None,
    storage_options: dict[str, Any] | None = None,
) -> list[Source]:
    """Resolve paths, folders, globs, a manifest or a BIDS dataset into the volumes to
    convert.

    Parameters
    ----------
    sources
        Files (NIfTI, NRRD, MetaImage, MGH/MGZ, Analyze, MINC, AFNI, PAR/REC, zip, npz,
        DICOM), folders (of such files, or of DICOM files: one volume per series) and
        globs; with ``bids``, one BIDS dataset root.
    folder
        Where the manifest's names live (default: the manifest's folder); an ``.npz``
        here makes the manifest's names ids of that npz, as the original's ``--npz``.
    manifest
        A text file, one name a line (blank lines and ``#`` comments skipped).
    start, many
        Keep ``many`` volumes from the ``start``-th on (all when ``many`` is None).
    series, min_slices
        In a DICOM folder holding several series: keep only the series named (by
        number, description, id or UID), else all but localizers and series of fewer
        than ``min_slices`` slices, which are skipped with a
        :class:`~raptorz.errors.RaptorzWarning`. Ids are ``FOLDER_NUMBER_DESCRIPTION``.
    max_volume_bytes
        The cap on one volume's float32 bytes (and on an npz array): an npz whose
        headers claim more, or more than the file holds, is one failing source.
    bids
        Read ``sources``, one BIDS dataset root, for the images this query names
        (:func:`raptorz.ingest.bids.bids_sources`; ids ``sub-01``, ``sub-01_ses-2``...).
    storage_options
        fsspec options for sources given as URLs (objects, prefixes, globs, a BIDS root).

    Raises
    ------
    InputError
        For a ``start`` / ``many`` that select nothing (:func:`raptorz.stores.id_range`),
        a glob matching nothing, a manifest name that escapes ``folder``, a BIDS root
        given without ``bids``, or with ``bids`` a folder that is not a BIDS root or has
        no image matching.
    SettingsError
        For ``bids`` with other than one source, or with a manifest.
    RaptorzError
        For two volumes with the same id.
    """
    selection = SeriesSelection(tuple(series), min_slices, max_volume_bytes)
    resolved: list[Source] = []
    if bids is not None:
        if len(sources) != 1 or manifest is not None:
            raise SettingsError("reads one BIDS dataset: give its root as the only source, "
                                "and no manifest", option="bids")
        root = sources[0] if locations.is_url(sources[0]) else os.path.abspath(sources[0])
        resolved, sources = bids_sources(root, bids, storage_options), ()
    for given in sources:
        if locations.is_url(given):
            resolved += _remote(str(locations.location(given)), storage_options)
            continue
        # Absolute paths: the store records them, and a rerun from elsewhere compares equal.
        text = os.path.abspath(given)
        if not Path(text).exists() and _GLOB_CHARS & set(text):
            matches = sorted(glob.glob(text))
            if not matches:
                raise InputError(text, "the pattern matches no file")
            resolved += [s for match in matches for s in _expand(Path(match), selection)]
        else:
            resolved += _expand(Path(text), selection)
    if manifest is not None:
        manifest = Path(manifest)
        root = Path(os.path.abspath(folder if folder else manifest.parent))
        resolved += _from_manifest(manifest, root, selection)
    if not resolved:
        raise RaptorzError("nothing to convert: 0 volumes found (every DICOM series was "
                           "skipped, or the inputs hold no volume)")
    selected = resolved[stores.id_range(len(resolved), start, many)]
    seen: dict[str, list[str]] = defaultdict(list)
    for source in selected:
        seen[source.id].append(str(source))
    duplicates = {i: paths for i, paths in seen.items() if len(paths) > 1}
    if duplicates:
        listing = "; ".join(f"{i!r} from {' and '.join(p)}" for i, p in
                            list(duplicates.items())[:5])
        raise RaptorzError(f"{len(duplicates)} duplicate volume ids ({listing}); ids are "
                           "file names without extensions: rename, or convert separately")
    return selected


def _labels(path: str, key: str, images: int) -> np.ndarray:
    """Array ``key`` of the npz at ``path`` as rows; warns and gives no rows if unusable."""
    problem = ""
    try:
        shape = npz_images(path, key)  # checked against the bytes it stores, before loading
        rows = (*shape, 1) if len(shape) == 1 else shape
        if len(rows) != 2 or rows[0] != images:
            problem = (f"has shape {rows}, but there are {images} images: one row of labels "
                       "per image is expected")
        else:
            with np.load(path, allow_pickle=False) as archive:
                labels = np.asarray(archive[key]).reshape(rows)
    except KeyError:
        problem = "has no such array"
    except (OSError, ValueError, zipfile.BadZipFile, InputError) as error:
        problem = f"cannot be read ({type(error).__name__}: {error})"
    if problem:
        warnings.warn(f"{path}: labels {key} {problem}; no labels written for these "
                      "images (they are converted all the same)", RaptorzWarning,
                      stacklevel=3)
        return np.empty((0, 0))
    return labels


def write_labels(sources: Sequence[Source], path: str | Path) -> str | Path | None:
    """Write the labels of the npz volumes among ``sources`` as the original's CSV.

    Columns: ``id``, ``split``, then ``label`` (or ``label_0``, ``label_1``... for
    several targets). Returns the CSV's path, or ``None`` where no source has labels.
    An images array whose labels are missing, unreadable or of the wrong length gets no
    labels, with a :class:`~raptorz.errors.RaptorzWarning` naming the file and the array.
    """
    rows: list[list[object]] = []
    width = 0
    arrays: dict[tuple[str, str], np.ndarray] = {}
    for source in sources:
        if source.kind != "npz" or not source.entry:
            continue
        split = source.entry.removesuffix("_images")
        key = (source.path, f"{split}_labels")
        if key not in arrays:
            arrays[key] = _labels(source.path, key[1],
                                  npz_images(source.path, source.entry)[0])
        labels = arrays[key]
        if source.index < len(labels):
            width = max(width, labels.shape[1])
            rows.append([source.id, split, *labels[source.index].tolist()])
    if not rows:
        return None
    path = locations.location(path)
    columns = ["label"] if width == 1 else [f"label_{j}" for j in range(width)]
    with locations.open_file(path, "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["id", "split", *columns])
        writer.writerows(rows)
    return path
