"""``raptorz info``: what a raptorz store holds, for any kind of store."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Final

import numpy as np
import xarray as xr

from raptorz import stores
from raptorz.errors import InputError

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


def store_info(path: str | Path) -> str:
    """A readable account of the raptorz store at ``path``: kind, counts by status,
    dimensions, variables (dtype, chunking, compression), attributes and failures.

    Works for every kind of raptorz store: only ``status``, ``error`` and the optional
    ``note`` variables are interpreted.
    """
    kind = stores.store_kind(path)
    if kind is None:
        raise InputError(path, "no raptorz store here")
    ds = xr.open_zarr(path, consolidated=False)
    lines = [f"{path}: raptorz {kind} store"]
    if "status" in ds:
        status = np.asarray(ds.status.values)
        counts = stores.status_counts(status)
        lines.append(f"volumes: {len(status)} ("
                     + ", ".join(f"{n} {name}" for name, n in counts.items()) + ")")
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
    return "\n".join(lines)
