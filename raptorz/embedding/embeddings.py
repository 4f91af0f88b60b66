"""The ``embeddings.zarr`` store: Raptor embeddings labelled by id, plane, k and token.

Layout (an xarray Dataset in a Zarr v3 group written through :mod:`raptorz.stores`):

``<projector>(id, plane, k_<projector>, token)`` float32
    One variable per projector, named after it. Projectors may differ in ``K``, so each
    has its own ``k_<projector>`` dimension.
``matrix_<projector>(dim, k_<projector>)`` float64
    The projection matrix itself, so the store says exactly how it was projected and
    workers read the matrices from the store rather than through the task graph.
``tokens(id, plane, token, dim)`` float32, only with ``keep_tokens``
    The pooled, unprojected tokens: enough for new projections without the encoder
    (:func:`add_projections`).
``avgpool(id, dim)`` float32
    The original's "avgpool" baseline: the tokens' mean over slices, tokens and planes.
``source_checksum(id)`` int64
    The ``checksum`` of the volume each embedding was made from: where the volumes
    store's differs now, the volume was converted again since and its embedding is stale
    (:func:`raptorz.layouts.stale_volumes`); ``raptorz embed`` recomputes it.
``status(id)``, ``error(id)``
    Per volume: pending / ok / failed and the error text.

A region store (``embed --masks``, docs/regions.md): a ``roi`` dimension (names; their
labels in ``roi_label``) after ``id``, ``region_status(id, roi)``, a ``regions`` attribute
and ``mask_checksum(id)``, as ``source_checksum`` (:func:`raptorz.layouts.stale_masks`).

Coordinates: ``id`` (the volume ids of ``volumes.zarr``), ``plane`` (``A``, ``C``, ``S``
of the chosen planes), ``token`` (index) with ``token_kind(token)`` = ``cls``,
``register`` or ``patch``. Attributes: ``projectors`` (name -> seed, dim, k, checksum),
``encoder``, ``settings``, ``source`` (the volumes store's path and attributes),
versions and time. A rerun must match the :func:`identity` of these.

Every ``id``-indexed variable is written in *units* of volumes (:func:`unit_size`, one file
per unit per variable): tasks and ``--start`` / ``--many`` ranges hold whole units, so
that writers never share one. A unit is one Zarr chunk, or a shard of smaller chunks
(down to one volume: an embedding is ~300 KB at K = 100) where it would hold more than
:data:`INNER_BYTES`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Final

import dask.array as da
import numpy as np
import xarray as xr
import zarr

from raptorz import layouts, locations, stores
from raptorz.embedding.projection import Projector, check_projectors, project, project_ok
from raptorz.embedding.settings import TokenSelection, token_kinds, token_slice
from raptorz.errors import InputError
from raptorz.layouts import EMBEDDINGS, k_dim, open_embeddings, projection_dims

#: Volumes per written unit (a Zarr chunk, or a shard: see :data:`INNER_BYTES`) in a large
#: store: one file per 100 volumes per variable. Writers never share a unit; a task
#: writes whole ones.
UNIT_VOLUMES: Final = 100
#: Units at least, in a smaller store, so that that many workers can share its work.
MIN_UNITS: Final = 16
#: Most bytes of one Zarr chunk inside a unit: a unit of small embeddings is one chunk
#: (each chunk costs a fixed encode/decode in Zarr), one of large ones is read in parts.
INNER_BYTES: Final = 2**20
MATRIX_PREFIX: Final = "matrix_"
RESERVED: Final = frozenset({"tokens", "avgpool", "source_checksum", "status", "error",
                             "id", "plane", "token", "roi", "roi_label", "region_status",
                             "token_kind", "dim", "mask_checksum"})


def unit_size(n: int) -> int:
    """Volumes per written unit of a new store of ``n`` volumes (see :data:`UNIT_VOLUMES`)."""
    return max(1, min(UNIT_VOLUMES, n // MIN_UNITS))


def store_unit(path: str | Path) -> int:
    """Volumes per written unit of the store at ``path`` (its status chunk; 1 in stores
    written before units existed)."""
    status = zarr.open_array(locations.join(path, "status"), mode="r", zarr_format=3)
    return int(status.chunks[0])


def token_kind_coordinate(num_tokens: int, num_prefix_tokens: int, *,
                          tokens: TokenSelection = "all") -> np.ndarray:
    """The ``token_kind`` coordinate of a store: ``cls`` / ``register`` / ``patch`` per
    token kept by ``tokens`` (see :func:`~raptorz.embedding.settings.token_slice`)."""
    kinds = token_kinds(num_tokens, num_prefix_tokens)
    return stores.as_strings(kinds[token_slice(num_prefix_tokens, tokens)])


def embeddings_template(
    ids: Sequence[str],
    *,
    plane_names: Sequence[str],
    projectors: Sequence[Projector],
    token_kind: np.ndarray,
    embed_dim: int,
    keep_tokens: bool,
    attrs: Mapping[str, Any],
    unit: int | None = None,
    regions: Mapping[str, int] | None = None,
) -> xr.Dataset:
    """The lazy template of an embeddings store (nothing computed).

    With ``regions`` (name -> label value), a region embeddings store: a ``roi``
    dimension after ``id`` and ``region_status(id, roi)``.

    Every ``id``-indexed variable is stored in units of ``unit`` volumes (default
    :func:`unit_size`), one file per unit: a Zarr chunk, or a Zarr shard of smaller
    chunks where a unit would hold more than :data:`INNER_BYTES` (:func:`inner_chunk`),
    so that one volume still reads without its whole unit.
    """
    n, p, t = len(ids), len(plane_names), len(token_kind)
    unit = unit or unit_size(n)
    # projectors are sized from the encoder's width: refuse a mismatch before any work
    encoder = attrs.get("encoder") or {}
    check_projectors(tuple(projectors), embed_dim, encoder.get("encoder", "of this store"))
    for projector in projectors:
        if projector.name in RESERVED or projector.name.startswith(MATRIX_PREFIX):
            raise InputError(projector.name, "this projector name is reserved in the store; "
                             "rename the projector file")
    variables: dict[str, xr.DataArray] = {}
    roi = () if regions is None else (len(regions),)
    for projector in projectors:
        variables[projector.name] = _lazy((n, *roi, p, projector.k, t),
                                          projection_dims(projector.name, bool(roi)), unit)
        variables[MATRIX_PREFIX + projector.name] = xr.DataArray(
            projector.matrix, dims=("dim", k_dim(projector.name)))
    if keep_tokens:
        variables["tokens"] = _lazy((n, *roi, p, t, embed_dim),
                                    layouts.with_roi(EMBEDDINGS.dims["tokens"], bool(roi)), unit)
    variables["avgpool"] = _lazy((n, *roi, embed_dim),
                                 layouts.with_roi(EMBEDDINGS.dims["avgpool"], bool(roi)), unit)
    if regions is not None:
        variables["region_status"] = xr.DataArray(da.zeros(
            (n, *roi), chunks=(unit, *roi), dtype=np.int8), dims=layouts.with_roi(("id",)),
            attrs=layouts.REGION_STATUS_ATTRS)
    for what in ("volume", "mask")[:2 if regions is not None else 1]:  # stale ones: redone
        variables["source_checksum" if what == "volume" else "mask_checksum"] = xr.DataArray(
            da.zeros(n, chunks=unit, dtype=np.int64), dims=("id",),
            attrs={"long_name": f"checksum of the {what} embedded (see {what}s.zarr)"})
    variables.update(stores.status_variables(n, unit))
    coords = {
        "id": stores.as_strings(ids),
        "plane": stores.as_strings(plane_names),
        "token": np.arange(t),
        "token_kind": ("token", token_kind),
    }
    if regions is not None:
        coords[layouts.ROI] = stores.as_strings(regions)
        coords["roi_label"] = (layouts.ROI, np.asarray(list(regions.values()), np.int64))
    return xr.Dataset(variables, coords=coords, attrs=stores.json_attr(dict(attrs)))


def inner_chunk(unit: int, volume_bytes: int) -> int:
    """Volumes per Zarr chunk in a unit: the most that divides ``unit`` and holds at most
    :data:`INNER_BYTES` (at least one volume)."""
    fits = max(1, INNER_BYTES // max(1, volume_bytes))
    return max(d for d in range(1, unit + 1) if unit % d == 0 and d <= fits)


def _lazy(shape: tuple[int, ...], dims: tuple[str, ...], unit: int) -> xr.DataArray:
    array = xr.DataArray(da.zeros(shape, chunks=(unit, *shape[1:]), dtype=np.float32),
                         dims=dims)
    inner = inner_chunk(unit, 4 * int(np.prod(shape[1:])))
    array.encoding["chunks"] = (inner, *shape[1:])
    if inner < unit:
        array.encoding["shards"] = (unit, *shape[1:])
    return array


def create_embeddings(path: str | Path, template: xr.Dataset) -> bool:
    """Create the store at ``path`` from ``template``, or check the one already there.

    Creation is race-safe for processes that start at once: each writes its template
    beside ``path`` and renames it into place (atomic on a POSIX file system); a loser
    discards its copy and checks the winner's store like any existing one.

    Returns
    -------
    bool
        Whether this call created the store.

    Raises
    ------
    InputError
        Where an existing store was made for other ids, source, encoder, settings or
        projectors (:func:`check_identity`).
    """
    path = locations.location(path)
    if stores.store_kind(path) is None and stores.create_store(path, template, EMBEDDINGS.kind):
        return True
    check_identity(path, template["id"].values, template.attrs,
                   list(template.attrs["projectors"].values()))
    return False


#: Attributes that may differ between runs into one store: they change no stored number
#: (the volumes store's checksum changes with any volume converted again: those volumes
#: are stale and recomputed, the others stay valid).
VOLATILE: Final = {"settings": ("batch_size",), "encoder": ("device", "weights_source"),
                   "source": ("checksum",)}
IDENTITY_KEYS: Final = ("source", "settings", "encoder", "regions")


def identity(attrs: Mapping[str, Any]) -> dict[str, Any]:
    """What a run into a store must share with it: the source store's attributes, the
    kernel settings and the encoder (weights checksum, precision...), less :data:`VOLATILE`.
    """
    attrs = stores.json_attr(dict(attrs))
    out = {key: attrs.get(key) for key in IDENTITY_KEYS}
    out["source"] = (out["source"] or {}).get("attrs")
    for key, volatile in VOLATILE.items():
        value = out[key]
        if isinstance(value, dict):
            out[key] = {k: v for k, v in value.items() if k not in volatile}
    if isinstance(out["encoder"], dict):
        # stores from before tf32 was recorded were all made on CPUs: no TF32
        out["encoder"].setdefault("tf32", False)
    return out


def check_identity(path: str | Path, ids: Sequence[str] | np.ndarray,
                   attrs: Mapping[str, Any], projectors: Sequence[Mapping[str, Any]],
                   keys: Sequence[str] = IDENTITY_KEYS) -> None:
    """Refuse an existing store made for other ids, source, settings, encoder or projectors.

    Parameters
    ----------
    path
        The existing embeddings store.
    ids
        The volume ids of the source store.
    attrs
        The attributes of the run (as a new store would get them).
    projectors
        Provenance of the projectors asked for: each must be in the store, the same.
    keys
        The parts of the :func:`identity` to compare (a check before the encoder is
        loaded leaves out ``encoder``).
    """
    existing = open_embeddings(path)
    if list(existing["id"].values.tolist()) != [str(i) for i in ids]:
        raise InputError(path, "was made for other volume ids than this volumes store; "
                         "write to a new output")
    theirs, mine = identity(existing.attrs), identity(attrs)
    differ = [key for key in keys if mine[key] != theirs[key]]
    if differ:
        details = "; ".join(f"{key}: store {theirs[key]!r}, now {mine[key]!r}"
                            for key in differ)
        raise InputError(path, f"was made with other settings ({details}); rerun with the "
                         "same ones or write to a new output")
    stored = existing.attrs.get("projectors", {})
    for projector in projectors:
        name = projector["name"]
        if name not in stored:
            raise InputError(path, f"has no projector {name!r}; add it from stored tokens "
                             "with `raptorz reproject`, or write to a new output")
        if stored[name]["checksum"] != projector["checksum"]:
            raise InputError(path, f"holds another projector named {name!r} (checksum "
                             f"{stored[name]['checksum'][:12]}...); write to a new output")


def projector_names(ds: xr.Dataset) -> list[str]:
    """The names of the projector variables of an embeddings Dataset."""
    return list(ds.attrs.get("projectors", {}))


def stored_projectors(ds: xr.Dataset, *, unlisted: bool = False) -> list[Projector]:
    """The projectors of an embeddings Dataset, with their matrices read from the store;
    with ``unlisted``, also those not listed yet (a reproject under way adds them)."""
    info = ds.attrs.get("projectors", {})
    names = [str(v)[len(MATRIX_PREFIX):] for v in ds.data_vars
             if str(v).startswith(MATRIX_PREFIX)] if unlisted else list(info)
    return [Projector(name, ds[MATRIX_PREFIX + name].values, info.get(name, {}).get("seed"))
            for name in names]


def export_npy(path: str | Path, directory: str | Path,
               projectors: Sequence[str] | None = None) -> int:
    """Write the original tool's layout: ``DIRECTORY/<projector>/<id>.npy``.

    Each file is the volume's ``(plane, k, token)`` embedding as a flat float32 vector in
    row-major order (index ``((plane * K) + k) * T + t``), as the original saves it.
    Only volumes whose status is ok are written.

    Returns
    -------
    int
        The number of files written.
    """
    ds = open_embeddings(path)
    names = list(projectors) if projectors is not None else projector_names(ds)
    for name in names:
        if name not in projector_names(ds):
            raise InputError(path, f"has no projector {name!r} (it has "
                             f"{', '.join(projector_names(ds))})")
    done = np.flatnonzero(stores.read_status(path) == stores.OK)
    ids = ds["id"].values.tolist()
    for index in done:
        if ids[index] in ("", ".", "..") or Path(ids[index]).name != ids[index]:
            raise InputError(path, f"volume id {ids[index]!r} cannot be a file name")
    written = 0
    for name in names:
        folder = Path(directory) / name
        folder.mkdir(parents=True, exist_ok=True)
        for index in done:
            vector = np.asarray(ds[name][index].values, dtype=np.float32).reshape(-1)
            np.save(folder / f"{ids[index]}.npy", vector)
            written += 1
    return written


def add_projections(path: str | Path, projectors: Sequence[Projector],
                    *, block: int = 64) -> list[str]:
    """Project the stored pooled tokens with new ``projectors``, without any encoder.

    Needs a store written with ``keep_tokens``. Each new projector becomes a variable
    (and its matrix) like those of the embedding run; later ``raptorz embed`` resumes of
    the same store compute it too. A projector already in the store with the same
    checksum is skipped. The store's consolidated metadata is rewritten after the new
    variables are added and again after the attributes list them. The whole step holds
    the store's lock (:func:`raptorz.stores.store_lock`): two at once on one store both
    end up listed. A unit is filled under its lock (:func:`raptorz.stores.unit_lock`) for
    its volumes ok then; a task that commits it later finds the new variables and fills them.

    Returns
    -------
    list of str
        The names of the projectors added.

    Raises
    ------
    InputError
        Where another process holds the store's lock for longer than
        :data:`~raptorz.stores.LOCK_SECONDS` (it is named), besides the checks above.
    """
    with stores.store_lock(path, "reproject"):  # reads the projector list, writes it back
        return _add_projections(path, projectors, block)


def _add_projections(path: str | Path, projectors: Sequence[Projector],
                     block: int) -> list[str]:
    ds = stores.open_store(path, EMBEDDINGS.kind)  # under the lock: the attributes as now
    if "tokens" not in ds:
        raise InputError(path, "holds no pooled tokens (embed with --keep-tokens to allow "
                         "new projections without the encoder)")
    stored = ds.attrs.get("projectors", {})
    new = [p for p in projectors if p.name not in stored]
    for projector in projectors:
        if projector.name in stored and stored[projector.name]["checksum"] != projector.checksum:
            raise InputError(path, f"already holds another projector named {projector.name!r}")
        if projector.dim != ds.sizes["dim"]:
            raise InputError(projector.name, f"has {projector.dim} rows; the stored tokens "
                             f"have width {ds.sizes['dim']}")
    if not new:
        return []
    unit = store_unit(path)
    regions = (dict(zip(ds[layouts.ROI].values.tolist(), ds["roi_label"].values.tolist(),
                        strict=True)) if layouts.ROI in ds.dims else None)
    template = embeddings_template(
        list(ds["id"].values), plane_names=list(ds["plane"].values), projectors=new,
        token_kind=ds["token_kind"].values, embed_dim=ds.sizes["dim"], keep_tokens=False,
        attrs={}, unit=unit, regions=regions)
    added = template[[name for p in new for name in (p.name, MATRIX_PREFIX + p.name)]]
    added.attrs = dict(ds.attrs)  # appending rewrites the group's attributes
    added.drop_vars([c for c in added.coords if c in ds.coords]).to_zarr(
        path, mode="a", compute=False, consolidated=False)
    stores.consolidate(path)  # new variables: readers see them (the attrs list them last)
    per_write = max(1, block // unit) * unit  # whole units: a shard is written whole
    for start in range(0, ds.sizes["id"], per_write):
        span = slice(start, min(start + per_write, ds.sizes["id"]))
        with stores.unit_lock(path, span):  # a task commits these units before or after
            ok = stores.read_status(path, span) == stores.OK
            if ok.any():
                projected = project_ok(ds["tokens"][span].values, ok, new)
                xr.Dataset({name: (projection_dims(name, regions is not None), value)
                            for name, value in projected.items()}).to_zarr(
                    path, region={"id": span}, consolidated=False)
    stores.update_attrs(path, {"projectors": {**stored, **{p.name: p.provenance()
                                                           for p in new}}})
    return [p.name for p in new]


def contiguous_runs(indices: np.ndarray) -> list[slice]:
    """Sorted integer ``indices`` as the fewest contiguous slices."""
    if len(indices) == 0:
        return []
    breaks = np.flatnonzero(np.diff(indices) != 1) + 1
    return [slice(int(run[0]), int(run[-1]) + 1) for run in np.split(indices, breaks)]


# --- Readers for the downstream sweeps: projections of the stored tokens, no encoder ------


def seeded_matrix(seed: int, dim: int, k: int) -> np.ndarray:
    """The ``(dim, k)`` projector ``raptorz projector --seed SEED`` makes (the original's
    ``np.random.seed(seed); np.random.randn(dim, k)``), for projecting stored tokens."""
    from raptorz.embedding.projection import make_projector

    return make_projector(seed, dim, k)


def project_stored_tokens(path: str | Path, matrix: np.ndarray, positions: np.ndarray,
                          *, block: int = 64, regions: Sequence[str] | None = None) -> np.ndarray:
    """Project the stored pooled tokens of the volumes at ``positions`` with ``matrix``.

    Computed as ``raptorz embed`` and :func:`add_projections` do (float64 matmul, float32
    result), reading the tokens in blocks of ``block`` volumes.

    Parameters
    ----------
    path
        An embeddings store written with ``keep_tokens``.
    matrix
        ``(dim, k)`` projection matrix.
    positions
        Store positions of the volumes, in the order wanted.
    regions
        In a region store: the regions to project (``roi`` after ``id`` in the result).

    Returns
    -------
    ``(len(positions), plane, k, token)`` float32.

    Raises
    ------
    InputError
        Where the store holds no tokens (embed with ``--keep-tokens``) or ``matrix`` has
        another width than the tokens.
    """
    ds = open_embeddings(path)
    if "tokens" not in ds:
        raise InputError(path, "holds no stored tokens: embed with --keep-tokens to make new "
                         "projections (sweeps, reproject) without the encoder")
    matrix = np.asarray(matrix, np.float64)
    if matrix.shape[0] != ds.sizes["dim"]:
        raise InputError(path, f"the tokens have width {ds.sizes['dim']}; the projector has "
                         f"{matrix.shape[0]} rows")
    tokens = xr.open_zarr(path, consolidated=False, chunks=None)["tokens"]
    tokens = tokens if regions is None else tokens.sel(roi=list(regions))
    positions = np.asarray(positions, np.int64)
    out = np.empty((len(positions), *tokens.shape[1:-2], matrix.shape[1], tokens.shape[-2]),
                   np.float32)
    for start in range(0, len(positions), block):
        rows = positions[start:start + block]
        order = np.argsort(rows, kind="stable")  # read in store order, restore the order asked
        values = np.asarray(tokens.isel(id=rows[order]).values, np.float64)
        out[start + order] = project(values, matrix)
    return out
