"""What an embedding run must do, decided on the client before any worker starts: the
ids selected (whole units of the output), what is left to do, the tasks, and the checks of
the request against an existing store, and the repair of projections an older raptorz
left unfilled (:func:`fill_missing_projections`). No torch at import
(:mod:`raptorz.embedding.runner` imports this).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import xarray as xr

from raptorz import locations, stores
from raptorz.defaults import RANDOM_WEIGHTS
from raptorz.embedding.embeddings import store_unit, stored_projectors
from raptorz.embedding.projection import project_tokens
from raptorz.embedding.settings import (
    KernelSettings,
    RegionRequest,
    RegionSettings,
    slice_indices,
)
from raptorz.embedding.worker import TASK_SLICES, EncoderOptions
from raptorz.errors import InputError, SettingsError
from raptorz.layouts import EMBEDDINGS, MASKS, stale_masks, stale_volumes

#: Tasks a worker should get at least, so that every worker stays busy until the tail.
TASKS_PER_WORKER = 4


def weights_option(weights: str | Path | None) -> str | None:
    """``weights`` as workers receive it: ``None``, the string ``RANDOM_WEIGHTS``, or an
    absolute path (a ``Path`` is always a file, even one named ``random``)."""
    if weights is None or (isinstance(weights, str) and weights == RANDOM_WEIGHTS):
        return weights
    return str(Path(weights).resolve())


def check_encoder_asked(output: str | Path, options: EncoderOptions) -> None:
    """On a store with nothing left to do, refuse an encoder, weights or precision that
    differ from the store's: the call asks for embeddings the store does not hold. (With
    work to do, every worker checks its encoder against the store.)

    Only what the call names and the store's record does not say already is loaded: the
    encoder is built in this process, on the CPU, to compare its weights' checksum.
    """
    recorded = EMBEDDINGS.open(output).attrs.get("encoder") or {}
    if options.precision is not None and options.precision != recorded.get("precision"):
        raise SettingsError(f"{output} holds embeddings at {recorded.get('precision')}, not "
                            f"{options.precision}: write them to a new output",
                            option="precision")
    same_weights = options.weights is None or options.weights == recorded.get("weights_source")
    if same_weights and options.name == recorded.get("encoder"):
        return
    from raptorz.embedding.encoders import create_encoder

    asked = create_encoder(options.name, weights=options.weights, precision="fp32",
                           device="cpu", pack=False).provenance()
    if (asked["encoder"], asked["weights_checksum"]) != \
            (recorded.get("encoder"), recorded.get("weights_checksum")):
        raise SettingsError(
            f"{output} holds embeddings of {recorded.get('encoder')} with weights "
            f"{str(recorded.get('weights_checksum'))[:12]}..., not of {asked['encoder']} with "
            f"weights {asked['weights_checksum'][:12]}...: write them to a new output",
            option="encoder/weights")


def select_ids(n: int, start: int, many: int | None, unit: int = 1) -> np.ndarray:
    """Boolean mask of the ids ``start`` to ``start + many``, whole units of the output.

    Separate processes may write disjoint ranges of one store at once, so a range must
    start and end on unit boundaries (or at the last volume): never two writers in a unit.
    """
    stop = stores.id_range(n, start, many).stop  # the range checks convert makes too
    if start % unit or (stop % unit and stop != n):
        # the nearest whole units: a start rounded down, a stop to the nearer boundary
        low = start // unit * unit
        high = min(n, max(low + unit, (stop + unit // 2) // unit * unit))
        raise SettingsError(f"the output is written in units of {unit} volumes and a range "
                            f"must hold whole units: start={low}, many={high - low} (or "
                            f"another multiple of {unit})", option="start/many")
    mask = np.zeros(n, bool)
    mask[start:stop] = True
    return mask


def volumes_to_do(volumes: str | Path, output: str | Path | None,
                  selected: np.ndarray) -> np.ndarray:
    """Mask of selected volumes to embed: pending, failed while the source is ok, or
    stale (converted again since they were embedded; in a region store, their mask too:
    the masks store it records)."""
    if output is None:
        return selected.copy()
    mine, theirs = stores.read_status(output), stores.read_status(volumes)
    retry = (mine == stores.FAILED) & (theirs == stores.OK)
    stale = stale_volumes(output, volumes) | stale_masks(output)
    return selected & ((mine == stores.PENDING) | retry | stale)


def slices_per_volume(source: xr.Dataset, settings: KernelSettings) -> int:
    """Slices the kernel encodes per volume of the store (every volume has one shape)."""
    shape = source["volume"].shape[1:]
    return sum(len(slice_indices(shape[axis], settings.subsample)) for axis in settings.planes)


def plan_tasks(todo: np.ndarray, unit: int, slices_per_volume: int, workers: int) -> list[slice]:
    """The output's units holding a volume to do, as tasks of about :data:`TASK_SLICES`.

    Smaller where that would leave fewer than :data:`TASKS_PER_WORKER` tasks a worker,
    so that every worker stays busy until the tail of the run; at least one unit, and a
    task only joins neighbouring units.
    """
    n = len(todo)
    units = [slice(s, min(s + unit, n)) for s in range(0, n, unit)]
    wanted = [u for u in units if todo[u].any()]
    volumes = int(todo.sum())
    by_work = max(1, TASK_SLICES // max(1, slices_per_volume))
    by_workers = max(1, -(-volumes // (TASKS_PER_WORKER * workers)))
    size = max(1, min(by_work, by_workers) // unit)  # units per task
    tasks: list[slice] = []
    for u in wanted:
        last = tasks[-1] if tasks else None
        if last is not None and last.stop == u.start and (last.stop - last.start) < size * unit:
            tasks[-1] = slice(last.start, u.stop)
        else:
            tasks.append(u)
    return tasks


def region_request(masks: str | Path, regions: str | list[str], settings: RegionSettings,
                   ids: np.ndarray) -> RegionRequest:
    """The regions asked (names, label values, or ``"all"``) of the masks store ``masks``.

    Raises
    ------
    InputError
        Where the masks store was made for other volume ids.
    SettingsError
        Naming the regions the masks store does not hold, and listing those it holds.
    """
    store = MASKS.open(masks)
    if stores.store_ids(store).tolist() != ids.tolist():
        raise InputError(masks, "holds the masks of other volume ids than this volumes "
                         "store; make it with `raptorz masks` from this volumes store")
    labels: dict[str, int] = store.attrs.get("labels") or {}
    asked = [r.strip() for r in (regions.split(",") if isinstance(regions, str) else regions)
             if r.strip()]
    chosen: dict[str, int] = {}
    unknown = []
    if asked == ["all"]:
        chosen = dict(sorted(labels.items(), key=lambda item: item[1]))
    by_value = {str(v): n for n, v in labels.items()}
    for region in [] if asked == ["all"] else asked:
        name = region if region in labels else by_value.get(region)
        if name is None:
            unknown.append(region)
        else:
            chosen[name] = labels[name]
    if unknown or not chosen:
        raise SettingsError(f"{masks} has no region {', '.join(unknown) or '(none asked)'}; "
                            f"it has: {', '.join(labels) or 'none'} (or 'all')",
                            option="regions")
    return RegionRequest(str(locations.resolved(masks)), tuple(chosen), tuple(chosen.values()),
                         settings)


def fill_missing_projections(output: str | Path, within: slice, *, block: int = 64) -> int:
    """Fill, from the stored tokens, every listed projection that holds NaN for a volume
    marked ok in ``within`` where its tokens give numbers; the number of volumes filled.

    Older raptorz versions left such holes where ``raptorz reproject`` ran during an
    embedding run (the run finished volumes after the reproject had read their status).
    Only for the caller's own range (whole units), before its tasks write it: other jobs
    write theirs. A store without tokens has none (a reproject needs them).
    """
    ds = EMBEDDINGS.read(output)
    projectors = stored_projectors(ds)
    if "tokens" not in ds or not projectors:
        return 0
    ok = stores.read_status(output, within) == stores.OK
    step = max(1, block // store_unit(output)) * store_unit(output)  # whole units
    filled = 0
    for start in range(within.start, within.stop, step):
        span = slice(start, min(start + step, within.stop))
        rows = np.flatnonzero(ok[span.start - within.start:span.stop - within.start])
        if not len(rows):
            continue
        stored = {p.name: np.asarray(ds[p.name][span].values) for p in projectors}
        holes = rows[np.logical_or.reduce([np.isnan(v[rows]).reshape(len(rows), -1).any(1)
                                           for v in stored.values()])]
        if not len(holes):
            continue
        made = project_tokens(np.asarray(ds["tokens"][span.start + holes].values), projectors)
        changed = np.zeros(len(holes), bool)
        for name, value in made.items():
            gap = np.isnan(stored[name][holes]) & ~np.isnan(value)
            changed |= gap.reshape(len(holes), -1).any(1)
            stored[name][holes] = np.where(gap, value, stored[name][holes])
        if changed.any():
            stores.write_region(output, {name: xr.DataArray(value, dims=ds[name].dims)
                                         for name, value in stored.items()}, span)
            filled += int(changed.sum())
    return filled
