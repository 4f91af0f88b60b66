"""What to convert: paths, folders, globs or a manifest, resolved into :class:`Source`\\ s.

Ids are file names without their extensions (a DICOM folder's name, ``train_0``... for
a MedMNIST npz); they must be unique, which is checked before any work starts.
"""

from __future__ import annotations

import csv
import glob
import os
import zipfile
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Final

import numpy as np

from raptorz import stores
from raptorz.errors import InputError, RaptorzError
from raptorz.ingest.readers import NPZ_SPLITS, Source, SourceKind, npz_images

#: File endings the readers know, longest first so that ``.nii.gz`` wins over ``.gz``.
SUFFIXES: Final[dict[str, SourceKind]] = {
    ".nii.gz": "nifti", ".nii": "nifti", ".zip": "zip", ".npz": "npz",
}
_GLOB_CHARS: Final = frozenset("*?[")


def _suffix(path: Path) -> str:
    name = path.name.lower()
    return next((s for s in SUFFIXES if name.endswith(s)), "")


def _npz_sources(path: Path) -> list[Source]:
    """One source per volume of a MedMNIST-style npz; one failing source if it is not."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = set(archive.namelist())
        sizes = {s: npz_images(str(path), f"{s}_images")[0]
                 for s in NPZ_SPLITS if f"{s}_images.npy" in names}
    except (OSError, zipfile.BadZipFile, ValueError, InputError):
        sizes = {}
    if not sizes:  # let the reader report the problem as this file's failure
        return [Source(path.name.removesuffix(".npz"), str(path), "npz")]
    return [Source(f"{split}_{i}", str(path), "npz", f"{split}_images", i)
            for split, n in sizes.items() for i in range(n)]


def _expand(path: Path) -> list[Source]:
    """The sources at one path: a file, an npz's volumes, or a folder's contents."""
    suffix = _suffix(path)
    if suffix == ".npz" and path.is_file():
        return _npz_sources(path)
    if path.is_dir():
        entries = sorted(p for p in path.iterdir() if not p.name.startswith("."))
        inside = [p for p in entries if _suffix(p)]
        if not inside and not any(p.is_file() for p in entries):  # a folder of series
            inside = [p for p in entries if p.is_dir()]
        if inside:
            return [source for p in inside for source in _expand(p)]
        return [Source(path.name, str(path), "dicom")]
    if suffix:
        return [Source(path.name[: -len(suffix)], str(path), SUFFIXES[suffix])]
    return [Source(path.name.removesuffix(".dcm"), str(path), "dicom")]


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


def _from_manifest(manifest: Path, folder: Path) -> list[Source]:
    names = _manifest_names(manifest)
    if _suffix(folder) == ".npz":  # the original's --npz: the names are the npz's ids
        by_id = {s.id: s for s in _npz_sources(folder)}
        missing = [name for name in names if name not in by_id]
        if missing:
            raise InputError(manifest, f"names {missing[:5]} are not volumes of {folder}")
        return [by_id[name] for name in names]
    root = folder.resolve()
    sources = []
    for number, name in enumerate(names, 1):
        path = folder / name
        if not path.resolve().is_relative_to(root):
            raise InputError(manifest, f"line {number}: {name!r} escapes --folder {folder}")
        sources += _expand(path)
    return sources


def resolve_sources(
    sources: Sequence[str | Path] = (),
    *,
    folder: str | Path | None = None,
    manifest: str | Path | None = None,
    start: int = 0,
    many: int | None = None,
) -> list[Source]:
    """Resolve paths, folders, globs and a manifest into the volumes to convert.

    Parameters
    ----------
    sources
        Files (NIfTI, zip, npz, DICOM), folders (of such files, or one DICOM series)
        and globs.
    folder
        Where the manifest's names live (default: the manifest's folder); an ``.npz``
        here makes the manifest's names ids of that npz, as the original's ``--npz``.
    manifest
        A text file, one name a line (blank lines and ``#`` comments skipped).
    start, many
        Keep ``many`` volumes from the ``start``-th on (all when ``many`` is None).

    Raises
    ------
    InputError
        For a ``start`` / ``many`` that select nothing (:func:`raptorz.stores.id_range`),
        a glob matching nothing or a manifest name that escapes ``folder``.
    RaptorzError
        For two volumes with the same id.
    """
    resolved: list[Source] = []
    # Absolute paths: the store records them, and a rerun from elsewhere compares equal.
    for text in (os.path.abspath(source) for source in sources):
        if not Path(text).exists() and _GLOB_CHARS & set(text):
            matches = sorted(glob.glob(text))
            if not matches:
                raise InputError(text, "the pattern matches no file")
            resolved += [s for match in matches for s in _expand(Path(match))]
        else:
            resolved += _expand(Path(text))
    if manifest is not None:
        manifest = Path(manifest)
        root = Path(os.path.abspath(folder if folder else manifest.parent))
        resolved += _from_manifest(manifest, root)
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


def write_labels(sources: Sequence[Source], path: str | Path) -> Path | None:
    """Write the labels of the npz volumes among ``sources`` as the original's CSV.

    Columns: ``id``, ``split``, then ``label`` (or ``label_0``, ``label_1``... for
    several targets). Returns the CSV's path, or ``None`` where no source has labels.
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
            try:
                with np.load(source.path, allow_pickle=False) as archive:
                    arrays[key] = np.asarray(archive[key[1]]).reshape(-1, 1) if (
                        np.ndim(archive[key[1]]) == 1) else np.asarray(archive[key[1]])
            except (KeyError, OSError, ValueError):
                arrays[key] = np.empty((0, 0))
        labels = arrays[key]
        if source.index < len(labels):
            width = max(width, labels.shape[1])
            rows.append([source.id, split, *labels[source.index].tolist()])
    if not rows:
        return None
    path = Path(path)
    columns = ["label"] if width == 1 else [f"label_{j}" for j in range(width)]
    with path.open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["id", "split", *columns])
        writer.writerows(rows)
    return path
