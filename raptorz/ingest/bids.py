"""BIDS datasets: images chosen by entities, ids from the entities that vary, and a labels
CSV from ``participants.tsv`` (and ``sessions.tsv``) with a seeded split by subject.

BIDS names are parsed here (``key-value`` entities, a suffix, an extension: the layout
is simple and fixed by the specification) rather than through pybids: pybids brings a
dozen dependencies (SQLAlchemy, formulaic, the validator's schema...) and indexes the
whole dataset into a database first, 11 s for 4,000 files on a 2-core machine (at that
rate, minutes for a dataset of tens of thousands of files), where walking the subject
folders for the images asked for took 0.6 s. The sidecars of the images kept are read
with the BIDS inheritance principle (a ``T1w.json`` at the root applies to every T1w,
one beside the image overrides it).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Final

import numpy as np

from raptorz import locations
from raptorz.defaults import SPLIT_FRACTIONS
from raptorz.errors import InputError, RaptorzWarning, SettingsError
from raptorz.ingest.readers import Source

#: The image files read from a BIDS dataset.
IMAGE_EXTENSIONS: Final = (".nii.gz", ".nii")
#: Long entity names (the specification's, pybids's) -> the keys of file names.
ENTITY_KEYS: Final = {
    "subject": "sub", "session": "ses", "acquisition": "acq", "ceagent": "ce",
    "tracer": "trc", "reconstruction": "rec", "direction": "dir", "inversion": "inv",
    "mtransfer": "mt", "processing": "proc", "resolution": "res", "density": "den",
    "description": "desc", "hemisphere": "hemi", "segmentation": "seg", "modality": "mod",
}
#: Sidecar fields written per volume: the acquisition facts studies stratify by.
SIDECAR_FIELDS: Final = (
    "MagneticFieldStrength", "Manufacturer", "ManufacturersModelName", "SoftwareVersions",
    "ReceiveCoilName", "MRAcquisitionType", "RepetitionTime", "EchoTime", "InversionTime",
    "FlipAngle",
)
_MISSING: Final = frozenset({"", "n/a", "N/A", "NaN", "nan"})


@dataclasses.dataclass(frozen=True)
class BidsName:
    """A BIDS file name: its entities in order, its suffix and its extension."""

    entities: tuple[tuple[str, str], ...]
    suffix: str
    extension: str

    @classmethod
    def parse(cls, name: str) -> BidsName | None:
        """``sub-01_ses-2_T1w.nii.gz`` -> entities, ``T1w``, ``.nii.gz``; None if not BIDS."""
        stem, dot, rest = name.partition(".")
        *pairs, suffix = stem.split("_")
        entities = tuple(tuple(pair.split("-", 1)) for pair in pairs)
        if not suffix or "-" in suffix or any(len(e) != 2 or not all(e) for e in entities):
            return None
        return cls(tuple((k, v) for k, v in entities), suffix, dot + rest)

    def get(self, key: str) -> str | None:
        return dict(self.entities).get(key)


@dataclasses.dataclass(frozen=True)
class BidsQuery:
    """Which images of a BIDS dataset to convert, and how its subjects are split.

    Parameters
    ----------
    filters
        Entity (short or long name: ``ses`` or ``session``), ``suffix`` or ``datatype``
        -> the value it must have; ``suffix`` is required.
    derivatives
        Read the images of this pipeline's outputs instead (a folder under
        ``derivatives/`` of the dataset, e.g. ``fmriprep``, or a path).
    seed, fractions
        The split of the subjects into train, validation and test.
    """

    filters: Mapping[str, str]
    derivatives: str | None = None
    seed: int = 0
    fractions: tuple[float, float, float] = SPLIT_FRACTIONS

    @classmethod
    def parse(cls, filters: str | Mapping[str, str], derivatives: str | None = None,
              seed: int = 0, fractions: Sequence[float] = SPLIT_FRACTIONS) -> BidsQuery:
        """Check the options; ``filters`` may be text: ``suffix=T1w,ses=2``.

        Raises
        ------
        SettingsError
            For a filter that is not ``KEY=VALUE``, with no ``suffix``, or fractions that
            are not three non-negative numbers summing to 1 with some train.
        """
        if isinstance(filters, str):
            pairs = [item.partition("=") for item in filters.split(",") if item.strip()]
            if any(not sep or not k.strip() or not v.strip() for k, sep, v in pairs):
                raise SettingsError(f"expected ENTITY=VALUE[,ENTITY=VALUE...], got {filters!r}",
                                    option="bids")
            filters = {k.strip(): v.strip() for k, _, v in pairs}
        normal = {ENTITY_KEYS.get(k, k): str(v) for k, v in filters.items()}
        if "suffix" not in normal:
            raise SettingsError("name the images' suffix, e.g. suffix=T1w", option="bids")
        shares = tuple(float(f) for f in fractions)
        if (len(shares) != 3 or min(shares) < 0 or shares[0] == 0
                or not math.isclose(sum(shares), 1.0, abs_tol=1e-6)):
            raise SettingsError(f"expected TRAIN,VAL,TEST fractions summing to 1, got "
                                f"{fractions}", option="split_fractions")
        return cls(normal, derivatives, seed, (shares[0], shares[1], shares[2]))

    def matches(self, name: BidsName, datatype: str) -> bool:
        """Whether an image named ``name`` in a ``datatype`` folder is asked for."""
        for key, wanted in self.filters.items():
            found = (name.suffix if key == "suffix" else datatype if key == "datatype"
                     else name.get(key))
            if found is None or not (found == wanted or (
                    found.isdigit() and wanted.isdigit() and int(found) == int(wanted))):
                return False
        return True

    def __str__(self) -> str:
        return ",".join(f"{k}={v}" for k, v in self.filters.items())


def dataset_root(path: str | Path) -> Path:
    """``path`` where it is a BIDS dataset's root (it has ``dataset_description.json``)."""
    root = Path(os.path.abspath(path))
    if not (root / "dataset_description.json").is_file():
        raise InputError(root, "is not a BIDS dataset root: it has no "
                         "dataset_description.json (give the folder that holds it)")
    return root


def _images_folder(root: Path, derivatives: str | None) -> Path:
    if derivatives is None:
        return root
    folder = root / "derivatives" / derivatives
    folder = folder if folder.is_dir() else Path(os.path.abspath(derivatives))
    if not folder.is_dir():
        found = sorted(p.name for p in (root / "derivatives").glob("*") if p.is_dir())
        raise InputError(root, f"has no derivatives {derivatives!r} (derivatives/ holds: "
                         f"{', '.join(found) or 'nothing'})")
    return folder


def _images(folder: Path) -> list[tuple[Path, BidsName]]:
    """Every NIfTI of the subjects' folders (``sub-*/[ses-*/]TYPE/``), by path."""
    found = []
    for path in sorted([*folder.glob("sub-*/*/sub-*"), *folder.glob("sub-*/ses-*/*/sub-*")]):
        name = BidsName.parse(path.name)
        if name and name.extension in IMAGE_EXTENSIONS and path.is_file():
            found.append((path, name))
    return found


#: The largest metadata file (sidecar, table) read from a BIDS dataset in object storage.
_METADATA_BYTES: Final = 16 * 2**20


def _metadata(name: str) -> bool:
    """Whether a file of a BIDS dataset is read for its metadata (sidecars and tables)."""
    return name.endswith(".json") or name == "participants.tsv" or name.endswith("_sessions.tsv")


def bids_sources(root: str | Path, query: BidsQuery,
                 storage_options: dict[str, Any] | None = None) -> list[Source]:
    """The images of the BIDS dataset ``root`` that ``query`` asks for, as sources.

    Ids keep the subject and the entities whose values vary among them: ``sub-01``,
    ``sub-01_ses-2``, ``sub-01_ses-2_run-1``... A ``root`` URL is walked in a local
    stand-in (:func:`raptorz.locations.mirror`: one listing, its sidecars and tables read
    with ``storage_options``); the sources are the images' URLs.

    Raises
    ------
    InputError
        Where ``root`` is not a BIDS root, has no such derivatives, or no image matches.
    """
    if locations.is_url(root):
        url = str(locations.location(root))
        with locations.mirror(url, storage_options, _metadata, _METADATA_BYTES) as local:
            return [dataclasses.replace(s, path=url + s.path[len(str(local)):])
                    for s in bids_sources(local, query)]
    folder = _images_folder(dataset_root(root), query.derivatives)
    every = _images(folder)
    kept = [(p, n) for p, n in every if query.matches(n, p.parent.name)]
    if not kept:
        suffixes = sorted({n.suffix for _, n in every})
        raise InputError(folder, f"no image matches {query} (of its {len(every)} NIfTI "
                         f"images, suffixes: {', '.join(suffixes) or 'none'})")
    keys = list(dict.fromkeys(k for _, n in kept for k, _ in n.entities))
    varying = {k for k in keys if k == "sub" or len({n.get(k) for _, n in kept}) > 1}
    return [Source("_".join(f"{k}-{v}" for k, v in name.entities if k in varying),
                   str(path), "nifti") for path, name in kept]


def _check_size(path: Path) -> None:
    """Refuse a sidecar or table over :data:`_METADATA_BYTES` before reading it (a dataset
    is untrusted; a bucket's are capped the same when fetched)."""
    try:
        size = path.stat().st_size
    except OSError as error:
        raise InputError(path, f"cannot be read ({error})") from None
    if size > _METADATA_BYTES:
        raise InputError(path, f"holds {size} bytes, over the {_METADATA_BYTES // 2**20} MiB "
                         "a BIDS sidecar or table may take")


def _table(path: Path, key: str) -> dict[str, dict[str, str]]:
    """A BIDS ``.tsv`` as ``key`` value -> its other columns ("" where n/a); {} if none."""
    if not path.is_file():
        return {}
    _check_size(path)
    try:
        with path.open(newline="", encoding="utf-8-sig") as file:
            rows = list(csv.DictReader(file, delimiter="\t"))
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise InputError(path, f"cannot be read as a BIDS table ({error})") from None
    if rows and key not in rows[0]:
        raise InputError(path, f"has no {key} column (columns: {', '.join(rows[0])})")
    return {row[key].strip(): {c: "" if (v or "").strip() in _MISSING else (v or "").strip()
                               for c, v in row.items() if c and c != key} for row in rows}


def _prefixed(value: str, prefix: str) -> str:
    return value if value.startswith(prefix) else prefix + value


class _Sidecars:
    """The merged JSON sidecars of images, by the BIDS inheritance principle."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.listed: dict[Path, list[tuple[Path, BidsName]]] = {}

    def _jsons(self, directory: Path) -> list[tuple[Path, BidsName]]:
        if directory not in self.listed:
            named = ((p, BidsName.parse(p.name)) for p in sorted(directory.glob("*.json")))
            self.listed[directory] = [(p, n) for p, n in named if n]
        return self.listed[directory]

    def of(self, image: Path) -> dict[str, object]:
        """Fields of every sidecar that applies to ``image``, the most specific last."""
        name = BidsName.parse(image.name)
        assert name is not None
        below = image.parent.relative_to(self.folder)
        merged: dict[str, object] = {}
        for directory in [*(self.folder / p for p in reversed(below.parents)), image.parent]:
            applies = [(len(n.entities), p) for p, n in self._jsons(directory)
                       if n.suffix == name.suffix and set(n.entities) <= set(name.entities)]
            for _, path in sorted(applies):
                _check_size(path)
                try:
                    fields = json.loads(path.read_text(encoding="utf-8"))
                except (OSError, UnicodeDecodeError, ValueError) as error:
                    raise InputError(path, f"is not a readable JSON sidecar ({error})") from None
                if isinstance(fields, dict):
                    merged.update(fields)
        return merged


def _splits(subjects: Iterable[str], seed: int,
            fractions: tuple[float, float, float]) -> dict[str, str]:
    """Each subject's split: a seeded permutation cut by ``fractions``; with three or
    more subjects, a split given a share gets at least one."""
    ordered = sorted(subjects)
    n = len(ordered)
    counts = [round(n * f) for f in fractions[1:]]
    if n >= 3:
        counts = [max(c, 1) if f > 0 else 0 for c, f in zip(counts, fractions[1:], strict=True)]
    val, test = counts
    val, test = min(val, n - 1), min(test, max(n - 1 - val, 0))
    names = ["val"] * val + ["test"] * test + ["train"] * (n - val - test)
    order = np.random.default_rng(seed).permutation(n)
    return {ordered[i]: names[rank] for rank, i in enumerate(order)}


def _listed(names: Sequence[str]) -> str:
    return ", ".join(names[:10]) + (f" and {len(names) - 10} more" if len(names) > 10 else "")


def _text(value: object) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def write_bids_labels(root: str | Path, query: BidsQuery, sources: Sequence[Source],
                      path: str | Path, storage_options: dict[str, Any] | None = None
                      ) -> str | Path:
    """Write the labels CSV of ``sources``, images of the BIDS dataset ``root``.

    Columns: ``id``, ``split`` (by subject, seeded: a subject's sessions share one),
    the columns of ``participants.tsv`` and of the subject's ``sessions.tsv`` (its value
    wins where both have a column), then the :data:`SIDECAR_FIELDS` some image's
    sidecars hold. The split depends only on the dataset's subjects (``participants.tsv``
    and its ``sub-*`` folders) and the seed: any selection, or part of one
    (``start``/``many``), of one dataset splits a subject alike.

    Warns
    -----
    RaptorzWarning
        Naming the subjects of ``participants.tsv`` without an image matching ``query``,
        and the images whose subject it lacks (written with empty participant columns).
    """
    if locations.is_url(root):  # in a local stand-in, as bids_sources
        url = str(locations.location(root))
        with locations.mirror(url, storage_options, _metadata, _METADATA_BYTES) as local, \
                warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            stand_ins = [dataclasses.replace(s, path=str(local) + s.path[len(url):])
                         for s in sources]
            written = write_bids_labels(local, query, stand_ins, path)
        for warning in caught:  # said again, naming the dataset's URL
            warnings.warn(str(warning.message).replace(str(local), url), warning.category,
                          stacklevel=2)
        return written
    root = dataset_root(root)
    participants = {_prefixed(k, "sub-"): v for k, v in
                    _table(root / "participants.tsv", "participant_id").items()}
    pictured = {Path(s.path).name.split("_")[0] for s in bids_sources(root, query)}
    subjects = set(participants) | {p.name for p in root.glob("sub-*") if p.is_dir()}
    split = _splits(subjects | pictured, query.seed, query.fractions)
    if not (root / "participants.tsv").is_file():
        warnings.warn(f"{root}: no participants.tsv; the labels CSV holds splits and "
                      "acquisition facts only", RaptorzWarning, stacklevel=3)
    elif unseen := sorted(set(participants) - pictured):
        warnings.warn(f"{root / 'participants.tsv'}: {len(unseen)} subject(s) have no image "
                      f"matching {query}: {_listed(unseen)}", RaptorzWarning, stacklevel=3)
    sidecars = _Sidecars(_images_folder(root, query.derivatives))
    rows: list[dict[str, str]] = []
    unlisted: list[str] = []
    sessions: dict[str, dict[str, dict[str, str]]] = {}
    for source in sources:
        name = BidsName.parse(Path(source.path).name)
        assert name is not None
        subject = f"sub-{name.get('sub')}"
        if participants and subject not in participants:
            unlisted.append(source.id)
        if subject not in sessions:
            table = _table(root / subject / f"{subject}_sessions.tsv", "session_id")
            sessions[subject] = {_prefixed(k, "ses-"): v for k, v in table.items()}
        session: dict[str, str] = sessions[subject].get(f"ses-{name.get('ses')}", {})
        facts = sidecars.of(Path(source.path))
        row: dict[str, str] = {**participants.get(subject, {}), **session,
               **{f: _text(facts[f]) for f in SIDECAR_FIELDS if f in facts}}
        rows.append({"id": source.id, "split": split[subject],
                     **{(f"participants_{c}" if c in ("id", "split") else c): v
                        for c, v in row.items()}})
    if unlisted:
        warnings.warn(f"{root / 'participants.tsv'}: lists no subject of {len(unlisted)} "
                      f"image(s), converted with no labels: {_listed(unlisted)}",
                      RaptorzWarning, stacklevel=3)
    columns = list(dict.fromkeys(c for row in rows for c in row))
    path = locations.location(path)
    with locations.open_file(path, "w", newline="") as file:
        writer = csv.DictWriter(file, columns, restval="")
        writer.writeheader()
        writer.writerows(rows)
    return path
