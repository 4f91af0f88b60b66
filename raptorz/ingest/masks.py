"""``masks.zarr``: label maps on the grids of a ``volumes.zarr``'s volumes (``raptorz masks``).

A mask is matched to its volume by id, in one of the two layouts segmentation tools write:

- one multi-label map per volume, ``FOLDER/<id>.nii.gz`` (any format ``raptorz convert``
  reads), its values named by a label table (``--labels``: JSON or TSV, e.g.
  TotalSegmentator's class map) or, without one, by the values themselves (``"1"``...);
- a folder of binary masks per volume, ``FOLDER/<id>/<structure>.nii.gz``
  (TotalSegmentator's default output), one label per structure: the table's value for
  its name, else the structures of all volumes numbered 1, 2... in name order.

Each mask must lie on its volume's source grid (shape, spacing, orientation and origin,
from the two files' headers: the volumes store keeps no affine, so the volume's source
header is read again). It is then reoriented as its volume was, and brought to the
store's shape as the volume was, by nearest-neighbour resampling (``--shape`` with
``--fit resample``) or the same zero padding, so that the stored mask lies voxel for voxel
on the stored volume. Labels are kept as integers (no intensity scaling).

The store is written chunk by chunk (the volumes store's chunking) through
:mod:`raptorz.stores`, so a rerun does only the masks not yet ok. Per volume it records its
mask source's identity (``source_size``, ``source_mtime``: a rerun reports masks changed
since, and reconverts them only when asked) and the ``checksum`` of the stored labels, which
region embeddings record: a mask converted again makes its region embeddings stale.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Final

import dask.array as da
import nibabel as nib
import numpy as np
import xarray as xr
from scipy import ndimage
from zarr.codecs import BloscCodec, BloscShuffle

from raptorz import stores
from raptorz.errors import InputError, RaptorzWarning, SettingsError
from raptorz.ingest._shape import fit_shape
from raptorz.ingest.conversion import source_identity, volume_checksum
from raptorz.ingest.readers import ReadOptions, Source, _open, _orientation
from raptorz.ingest.sources import SUFFIXES
from raptorz.layouts import MASKS, VOLUME_AXES, VOLUMES

#: Largest mismatch of two affines' entries (mm) still taken as one grid: the rounding of
#: headers written by different tools.
GRID_TOLERANCE: Final = 1e-3
#: Stored label type: TotalSegmentator's and FreeSurfer's values fit.
MASK_DTYPE: Final = np.uint16
#: Per-volume int64 variables: the mask source's identity when converted (total size,
#: latest modification time in ns) and the stored labels' checksum; older stores lack them.
TRACKING: Final = ("source_size", "source_mtime", "checksum")


@dataclasses.dataclass(frozen=True)
class MasksSummary:
    """The outcome of :func:`build_masks`: counts of this run, failures (id: error) and the
    store's labels (name: value)."""

    store: Path
    converted: int
    failed: int
    skipped: int
    failures: dict[str, str]
    labels: dict[str, int]


def read_label_table(path: str | Path) -> dict[str, int]:
    """Region names and values from a JSON or TSV / CSV table.

    JSON: ``{"1": "spleen", ...}`` (TotalSegmentator's class map, value to name) or
    ``{"spleen": 1, ...}``. TSV / CSV: two columns, a value and a name in either order,
    an optional header line.

    Raises
    ------
    InputError
        Naming the file, where it cannot be read or a value is not a positive integer.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as error:
        raise InputError(path, f"cannot read the label table ({error.strerror})") from None
    pairs: list[tuple[str, str]] = []
    if path.suffix.lower() == ".json":
        try:
            table = json.loads(text)
        except json.JSONDecodeError as error:
            raise InputError(path, f"is not JSON ({error})") from None
        if not isinstance(table, dict):
            raise InputError(path, "must hold one object of value: name or name: value")
        pairs = [(str(k), str(v)) for k, v in table.items()]
    else:
        dialect = "excel-tab" if "\t" in text else "excel"
        rows = [r for r in csv.reader(text.splitlines(), dialect) if any(c.strip() for c in r)]
        pairs = [(r[0].strip(), r[1].strip()) for r in rows if len(r) >= 2]
        if pairs and not any(p.isdigit() for p in pairs[0]):
            pairs = pairs[1:]  # a header line
    labels: dict[str, int] = {}
    for a, b in pairs:
        value, name = (a, b) if a.isdigit() else (b, a)
        if not value.isdigit() or int(value) == 0 or int(value) > np.iinfo(MASK_DTYPE).max:
            raise InputError(path, f"entry ({a!r}, {b!r}) has no label value in 1.."
                             f"{np.iinfo(MASK_DTYPE).max}")
        if name in labels and labels[name] != int(value):
            raise InputError(path, f"names {name!r} twice, with values {labels[name]} "
                             f"and {value}")
        labels[name] = int(value)
    if not labels:
        raise InputError(path, "holds no labels")
    return labels


def _suffix(path: Path) -> str:
    name = path.name.lower()
    return next((s for s in SUFFIXES if name.endswith(s)), "")


def _structures(folder: Path) -> dict[str, Path]:
    """A folder of binary masks: structure name -> file."""
    return {p.name[:-len(_suffix(p))]: p for p in sorted(folder.iterdir())
            if _suffix(p) and not p.name.startswith(".")}


def find_masks(folder: Path, ids: list[str]) -> dict[str, Path]:
    """Per volume id, its mask: ``FOLDER/<id>/`` (binary masks) or ``FOLDER/<id>.<ext>``.

    Only the folder's own entries are matched (an id is never joined to the folder as a
    path), so that an id such as ``../x`` in a volumes store cannot reach outside it.
    """
    entries = sorted(folder.iterdir())
    folders = {p.name: p for p in entries if p.is_dir()}
    files = {p.name[:-len(_suffix(p))]: p for p in entries if p.is_file() and _suffix(p)}
    found = {}
    for volume_id in ids:
        if volume_id in folders:
            found[volume_id] = folders[volume_id]
        elif volume_id in files:
            found[volume_id] = files[volume_id]
    return found


def _source(path: Path, volume_id: str) -> Source:
    if path.is_dir():
        return Source(volume_id, str(path), "dicom")
    return Source(volume_id, str(path), SUFFIXES[_suffix(path)])


def grid_difference(mask: tuple[tuple[int, ...], np.ndarray],
                    volume: tuple[tuple[int, ...], np.ndarray]) -> str:
    """How the grid ``(shape, affine)`` of a mask differs from its volume's; "" if not."""
    (shape, affine), (theirs, reference) = mask, volume
    differ = []
    if tuple(shape) != tuple(theirs):
        differ.append(f"shape {tuple(shape)} vs the volume's {tuple(theirs)}")
    spacing, spacing_ref = nib.affines.voxel_sizes(affine), nib.affines.voxel_sizes(reference)
    if not np.allclose(spacing, spacing_ref, atol=GRID_TOLERANCE):
        differ.append(f"spacing {_mm(spacing)} mm vs {_mm(spacing_ref)} mm")
    codes, codes_ref = "".join(nib.aff2axcodes(affine)), "".join(nib.aff2axcodes(reference))
    if codes != codes_ref:
        differ.append(f"orientation {codes} vs {codes_ref}")
    elif not np.allclose(affine[:3, :3], reference[:3, :3], atol=GRID_TOLERANCE):
        differ.append("direction cosines differ (up to "
                      f"{np.abs(affine[:3, :3] - reference[:3, :3]).max():.3g} mm per voxel)")
    if not np.allclose(affine[:3, 3], reference[:3, 3], atol=GRID_TOLERANCE):
        differ.append(f"origin {_mm(affine[:3, 3])} mm vs {_mm(reference[:3, 3])} mm")
    return "; ".join(differ)


def _mm(values: np.ndarray) -> str:
    return "(" + ", ".join(f"{v:.4g}" for v in values) + ")"


def _labels_of(path: Path, source: Source, options: ReadOptions,
               grid: tuple[tuple[int, ...], np.ndarray]) -> np.ndarray:
    """One label file's integer voxels as stored, after checking its grid."""
    image, shape = _open(source, options)
    difference = grid_difference((shape, image.affine), grid)
    if difference:
        raise InputError(path, f"does not lie on its volume's grid: {difference}")
    data = np.asarray(image.load(), np.float32).reshape(shape)
    if not np.isfinite(data).all() or (data != np.round(data)).any() or data.min() < 0:
        raise InputError(path, "holds values that are not non-negative integers: not a "
                         "label map")
    return data.astype(np.int64)


@dataclasses.dataclass(frozen=True)
class _Job:
    """What a chunk needs besides its ids: the store's read options, shape policy, labels."""

    options: ReadOptions
    shape: tuple[int, int, int]
    fit: str | None
    labels: Mapping[str, int]
    named: bool  # the labels come from a table (a multi-label value must be in it)


def _one_mask(mask: Path, volume_source: str, volume_id: str, job: _Job) -> np.ndarray:
    """The stored label map of one volume: read, checked, reoriented, shaped."""
    if "::" in volume_source:
        raise InputError(volume_source, "masks need volumes converted from one file or "
                         "DICOM folder each (not an npz entry or one series of several)")
    volume_image, volume_shape = _open(_source(Path(volume_source), volume_id), job.options)
    grid = (volume_shape, volume_image.affine)
    if mask.is_dir():
        structures = _structures(mask)
        if not structures:
            raise InputError(mask, "holds no mask files")
        labels = np.zeros(volume_shape, np.int64)
        for name, path in structures.items():
            if name not in job.labels:
                raise InputError(path, f"structure {name!r} is not in the label table")
            binary = _labels_of(path, _source(path, name), job.options, grid) > 0
            overlap = binary & (labels > 0)
            if overlap.any():
                others = sorted(n for n, v in job.labels.items()
                                if v in set(np.unique(labels[overlap]).tolist()))
                raise InputError(path, f"overlaps {', '.join(others)} in "
                                 f"{int(overlap.sum())} voxels; one label per voxel")
            labels[binary] = job.labels[name]
    else:
        labels = _labels_of(mask, _source(mask, volume_id), job.options, grid)
        values = set(np.unique(labels).tolist()) - {0}
        unknown = sorted(values - set(job.labels.values())) if job.named else []
        if unknown:
            raise InputError(mask, f"holds label values {unknown[:10]} that the label "
                             "table does not name")
        if max(values, default=0) > np.iinfo(MASK_DTYPE).max:
            raise InputError(mask, f"holds label {max(values)}, over the "
                             f"{np.iinfo(MASK_DTYPE).max} a mask store holds")
    oriented = nib.apply_orientation(labels, _orientation(volume_image, job.options))
    return fit_labels(oriented, job.shape, job.fit, str(mask)).astype(MASK_DTYPE)


def fit_labels(labels: np.ndarray, shape: tuple[int, int, int], fit: str | None,
               source: str) -> np.ndarray:
    """Bring a label map to ``shape`` as :func:`~raptorz.ingest._shape.fit_shape` brings
    its volume: nearest-neighbour where the volume was resampled (same grid geometry:
    voxel edges aligned), the same zero padding or crop where it was padded."""
    if fit == "resample" and labels.shape != shape:
        factors = [t / s for t, s in zip(shape, labels.shape, strict=True)]
        return ndimage.zoom(labels, factors, order=0, mode="nearest", grid_mode=True)
    return fit_shape(labels, (1.0, 1.0, 1.0), shape, "pad" if fit == "pad" else None,
                     source)[0]


def _template(ids: list[str], shape: tuple[int, ...], chunk: int,
              attrs: dict[str, object]) -> xr.Dataset:
    n = len(ids)
    ds = xr.Dataset(
        {"mask": (MASKS.dims["mask"], da.zeros((n, *shape), chunks=(chunk, *shape),
                                               dtype=MASK_DTYPE),
                  {"long_name": "region labels on the volume's grid (0: background)"}),
         "source": ("id", stores.as_strings([""] * n)),
         **{name: ("id", da.zeros(n, chunks=chunk, dtype=np.int64)) for name in TRACKING},
         **stores.status_variables(n, chunk)},
        coords={"id": stores.as_strings(ids), "axis": stores.as_strings(VOLUME_AXES)},
        attrs={**stores.provenance(), **attrs})
    ds["mask"].encoding["compressors"] = [BloscCodec(cname="zstd", clevel=3,
                                                     shuffle=BloscShuffle.bitshuffle)]
    ds["source"].encoding["chunks"] = (chunk,)
    return ds


def build_masks(masks: str | Path, volumes: str | Path, output: str | Path, *,
                labels: str | Path | Mapping[str, int] | None = None,
                reconvert_changed: bool = False,
                progress: Callable[[int, int], None] | None = None) -> MasksSummary:
    """Convert the masks in the folder ``masks`` onto the grids of ``volumes``' volumes.

    Parameters
    ----------
    masks
        A folder of ``<id>.<ext>`` label maps and / or ``<id>/`` folders of binary masks.
    volumes
        The ``volumes.zarr`` they belong to (ids, sources, orientation and shape policy).
    output
        The ``masks.zarr`` to create, or to resume (the same masks, volumes and labels).
    labels
        Region names: a JSON / TSV table (:func:`read_label_table`) or a mapping.
    reconvert_changed
        On a rerun, convert again the masks whose source changed since (another file, or
        its size or modification time); without it they are reported (a
        :class:`~raptorz.errors.RaptorzWarning`) and kept as converted.
    progress
        Called as ``progress(done, total)`` at the start and after each chunk.

    Returns
    -------
    MasksSummary
        A volume without a mask, or whose mask cannot be read or does not lie on its
        grid, is failed with its reason; the others are ok.
    """
    folder, output = Path(masks).resolve(), Path(output)
    if not folder.is_dir():
        raise InputError(folder, "is not a folder of masks")
    source = VOLUMES.open(volumes)
    ids = stores.store_ids(source).tolist()
    table = dict(labels) if isinstance(labels, Mapping) else \
        read_label_table(labels) if labels is not None else {}
    found = find_masks(folder, ids)
    if not found:
        raise InputError(folder, f"holds no mask named after any of the {len(ids)} volume ids "
                         f"of {volumes} (e.g. {ids[0]}.nii.gz or {ids[0]}/)")
    named = bool(table)
    if not named and len({p.is_dir() for p in found.values()}) > 1:
        raise SettingsError(f"{folder} mixes label maps and folders of binary masks: name "
                            "the labels with a table, so that one value means one region",
                            option="labels")
    if not named:  # binary masks: their names, numbered in order
        names = sorted({n for p in found.values() if p.is_dir() for n in _structures(p)})
        table = {name: value for value, name in enumerate(names, 1)}
    convert = source.attrs["convert"]
    options = ReadOptions(convert["reader"]["member"], convert["reader"]["max_member_bytes"],
                          convert["orientation"])
    policy = convert["shape_policy"]
    job = _Job(options, tuple(policy["shape"]), None if policy["fit"] == "none"
               else policy["fit"], table, named)
    attrs = {"labels": table, "named": named,
             "source": {"masks": str(folder), "volumes": str(Path(volumes).resolve())}}
    if not MASKS.exists(output):
        chunk = int(source["volume"].encoding["chunks"][0])
        stores.create_store(output, _template(ids, source["volume"].shape[1:], chunk, attrs),
                            MASKS.kind)
    stored = MASKS.open(output)
    if stores.store_ids(stored).tolist() != ids or stored.attrs.get("source") != \
            stores.json_attr(attrs["source"]) or stored.attrs.get("named") != named or \
            (named and stored.attrs.get("labels") != table):
        raise InputError(output, "was made from other masks, volumes or labels; rerun with "
                         "the same ones to resume, or choose another output")
    status = stores.read_status(output)
    chunk = int(stored["status"].encoding["chunks"][0])
    redo = _to_redo(output, ids, found, status, reconvert_changed)
    total = int(redo.sum())
    if progress:
        progress(0, total)
    volume_sources = np.asarray(source["source"].values).tolist()
    failures: dict[str, str] = {}
    converted = finished = 0
    for region in [r for r in stores.chunk_slices(len(ids), chunk) if redo[r].any()]:
        converted += _chunk(output, region, ids, volume_sources, found, job, redo, status,
                            failures)
        finished += int(redo[region].sum())
        if progress:
            progress(finished, total)
    if not named:  # multi-label maps without a table: every value present, by itself
        present = np.unique(np.concatenate([np.unique(MASKS.read(output)["mask"][r].values)
                                            for r in stores.chunk_slices(len(ids), chunk)]))
        table = {**table, **{str(v): int(v) for v in present
                             if v and int(v) not in table.values()}}
        with stores.store_lock(output, "masks"):
            stores.update_attrs(output, {"labels": table})
    return MasksSummary(output, converted, len(failures), len(ids) - total, failures, table)


def _to_redo(output: Path, ids: list[str], found: Mapping[str, Path], status: np.ndarray,
             reconvert_changed: bool) -> np.ndarray:
    """Mask of the masks to convert: those not ok, and, with ``reconvert_changed``, those
    whose source changed since (another file, size or time); the others changed (or gone)
    are reported, and kept."""
    redo = status != stores.OK
    stored = MASKS.read(output)
    if "source_size" not in stored or redo.all():  # an older raptorz recorded no identities
        return redo
    sources = np.asarray(stored["source"].values, object)
    size, mtime = stored["source_size"].values, stored["source_mtime"].values
    gone: list[str] = []
    changed: list[int] = []
    for j in map(int, np.flatnonzero(~redo)):
        path = found.get(ids[j])
        if path is None:
            gone.append(ids[j])
        elif str(path) != sources[j] or _identity(path) != (size[j], mtime[j]):
            changed.append(j)
    if gone:
        warnings.warn(f"{_listed(gone)}: no mask in the masks folder any more; kept as "
                      "converted", RaptorzWarning, stacklevel=3)
    if changed and not reconvert_changed:
        warnings.warn(f"{_listed([ids[j] for j in changed])}: mask changed since converted; "
                      "kept as converted (reconvert_changed=True, `raptorz masks "
                      "--reconvert-changed`, converts them again)", RaptorzWarning, stacklevel=3)
    redo[changed] = reconvert_changed
    return redo


def _listed(names: list[str]) -> str:
    return ", ".join(names[:10]) + (f" and {len(names) - 10} more" if len(names) > 10 else "")


def _identity(path: Path) -> tuple[int, int]:
    """A mask source's (size, modification time in ns): of a folder, its files' total and
    latest."""
    size, mtime, _ = source_identity(_source(path, ""))
    return size, mtime


def _chunk(output: Path, region: slice, ids: list[str], volume_sources: list[str],
           found: Mapping[str, Path], job: _Job, redo: np.ndarray, status: np.ndarray,
           failures: dict[str, str]) -> int:
    """Convert the masks ``redo`` of one chunk and write the chunk whole (the others as
    stored); how many are ok."""
    stored = MASKS.read(output).isel(id=region)
    n = region.stop - region.start
    kept = np.flatnonzero(~redo[region])
    mask = np.zeros((n, *stored["mask"].shape[1:]), MASK_DTYPE)
    sources = np.full(n, "", object)
    errors = np.full(n, "", object)
    new_status = np.full(n, stores.FAILED, np.int8)
    tracking = {name: np.zeros(n, np.int64) for name in TRACKING if name in stored}
    if len(kept):  # read back only then: a first run's chunk holds nothing yet
        mask[kept] = stored["mask"].values[kept]
        sources[kept] = np.asarray(stored["source"].values, object)[kept]
        new_status[kept] = stores.OK
        for name, values in tracking.items():
            values[kept] = np.asarray(stored[name].values)[kept]
    ok = 0
    for j in np.flatnonzero(redo[region]).tolist():
        volume_id = ids[region.start + j]
        path = found.get(volume_id)
        try:
            if path is None:
                raise InputError(volume_id, "no mask in the masks folder (expected "
                                 f"{volume_id}.nii.gz or a folder {volume_id}/)")
            if "source_size" in tracking:  # before reading: a later change shows on a rerun
                tracking["source_size"][j], tracking["source_mtime"][j] = _identity(path)
            mask[j] = _one_mask(path, volume_sources[region.start + j], volume_id, job)
            sources[j], new_status[j] = str(path), stores.OK
            ok += 1
        except InputError as error:
            errors[j] = str(error)
            failures[volume_id] = str(error)
        if "checksum" in tracking:
            tracking["checksum"][j] = volume_checksum(mask[j])
    stores.write_units(output, {
        "mask": xr.DataArray(mask, dims=MASKS.dims["mask"]),
        "source": xr.DataArray(stores.as_strings(sources.tolist()), dims="id"),
        **{name: xr.DataArray(values, dims="id") for name, values in tracking.items()}},
        region, new_status, [str(e) for e in errors])
    status[region] = new_status
    return ok
