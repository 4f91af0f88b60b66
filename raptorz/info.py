"""``raptorz info``: what a raptorz store holds, for any kind of store."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Final

import numpy as np
import xarray as xr

from raptorz import stores
from raptorz.errors import InputError
from raptorz.layouts import REGION_STATUS_NAMES, stale_masks, stale_volumes

#: How many failures and notes are listed before the rest is counted.
LISTED: Final = 20


def _variable(name: str, var: xr.DataArray) -> str:
    dims = ", ".join(f"{d}={n}" for d, n in var.sizes.items())
    chunks = var.encoding.get("chunks")
    compressors = var.encoding.get("compressors") or ()
    codec = ", ".join(type(c).__name__ for c in compressors) or "none"
    return f"  {name}({dims}) {var.dtype} chunks={tuple(chunks or ())} compressors={codec}"


def _listing(title: str, ids: np.ndarray, texts: np.ndarray) -> list[str]:
    lines = [f"{title} ({len(ids)}):"] if len(ids) else []
    lines += [f"  {i}: {t}" for i, t in zip(ids[:LISTED], texts[:LISTED], strict=True)]
    if len(ids) > LISTED:
        lines.append(f"  ... and {len(ids) - LISTED} more")
    return lines


def _require_store(path: str | Path) -> str:
    kind = stores.store_kind(path)
    if kind is None:
        raise InputError(path, "no raptorz store here")
    return kind


def _metadata_state(path: str | Path) -> str:
    if stores.consolidated_metadata_true(path):
        return "consolidated"
    state = "stale" if stores.has_consolidated_metadata(path) else "not"
    return f"{state} consolidated; run `{stores.REPAIR_COMMAND} {path}`"


def repair_store(path: str | Path) -> bool:
    """Consolidate the metadata of the raptorz store at ``path`` where it is missing or stale.

    Stores written by older raptorz versions have none, so ``xr.open_zarr(path)`` warns and
    opens them slowly. Safe while a run writes the store (data writes change no metadata).

    Returns
    -------
    bool
        Whether anything had to be rewritten.
    """
    _require_store(path)
    with stores.store_lock(path, "info --repair"):
        if stores.consolidated_metadata_true(path):
            return False
        stores.consolidate(path)
        return True


def store_info(path: str | Path) -> str:
    """A readable account of the raptorz store at ``path``: kind, counts by status,
    dimensions, variables (dtype, chunking, compression), attributes and failures, and
    whether its metadata is consolidated (:func:`repair_store` where it is not).

    Works for every kind of raptorz store: only ``status``, ``error`` and the optional
    ``note`` variables are interpreted, and, in an embeddings store, the volumes converted
    again since they were embedded (stale) are listed, and in a region embeddings store
    those whose mask was converted again since.
    """
    kind = _require_store(path)
    ds = stores.open_dataset(path, hint=False)  # the state is a line of the account
    lines = [f"{path}: raptorz {kind} store", "metadata: " + _metadata_state(path)]
    if "status" in ds:
        status = stores.read_status(path)
        counts = stores.status_counts(status)
        lines.append(f"volumes: {len(status)} ("
                     + ", ".join(f"{n} {name}" for name, n in counts.items()) + ")")
    lines += _regions(ds)
    lines.append("dimensions: " + ", ".join(f"{d}={n}" for d, n in ds.sizes.items()))
    lines.append("variables:")
    lines += [_variable(str(name), var) for name, var in ds.data_vars.items()]
    attrs = {k: v for k, v in ds.attrs.items() if k != stores.KIND_ATTR}
    lines.append("attributes:")
    lines += ["  " + line for line in json.dumps(attrs, indent=2, default=str).splitlines()]
    ids = np.asarray(ds.id.values) if "id" in ds.coords else np.arange(ds.sizes.get("id", 0))
    if "status" in ds and "error" in ds:
        failed = status == stores.FAILED
        lines += _listing("failures", ids[failed], np.asarray(ds.error.values)[failed])
    if "note" in ds:
        notes = np.asarray(ds.note.values)
        lines += _listing("notes", ids[notes != ""], notes[notes != ""])
    lines += _stale(path, ds, ids)
    return "\n".join(lines)


def _regions(ds: xr.Dataset) -> list[str]:
    """Lines listing a store's regions: in a region embeddings store, how many volumes
    hold each (ok) and how many lack it (absent) or failed; in a masks store, the labels."""
    if "region_status" in ds:
        status = np.asarray(ds["region_status"].values)
        lines = [f"regions: {ds.sizes['roi']}"]
        for r, (name, label) in enumerate(zip(ds["roi"].values.tolist(),
                                              ds["roi_label"].values.tolist(), strict=True)):
            counts = ", ".join(f"{int((status[:, r] == code).sum())} {word}"
                               for code, word in enumerate(REGION_STATUS_NAMES)
                               if (status[:, r] == code).any())
            lines.append(f"  {name} (label {label}): {counts}")
        return lines
    labels = ds.attrs.get("labels") if "mask" in ds else None
    if not labels:
        return []
    return [f"regions: {len(labels)}: " + ", ".join(f"{n}={v}" for n, v in labels.items())]


def _stale(path: str | Path, ds: xr.Dataset, ids: np.ndarray) -> list[str]:
    """Lines naming an embeddings store's volumes converted again since they were embedded,
    and, in a region store, those whose mask was (the stores they record)."""
    lines = []
    volumes = (ds.attrs.get("source") or {}).get("path")
    if "source_checksum" in ds and volumes and stores.store_kind(volumes) == "volumes":
        lines += _stale_line(ids[stale_volumes(path, volumes)],
                             "volume(s) converted again since they were embedded")
    if "mask_checksum" in ds:
        lines += _stale_line(ids[stale_masks(path)], "volume(s) whose mask was converted "
                             "again since they were embedded (the mask changed)")
    return lines


def _stale_line(stale: np.ndarray, what: str) -> list[str]:
    if not len(stale):
        return []
    shown = ", ".join(map(str, stale[:LISTED])) + (
        f" and {len(stale) - LISTED} more" if len(stale) > LISTED else "")
    return [f"stale: {len(stale)} {what}: {shown}; `raptorz embed` on this store "
            "recomputes them"]
