"""What an embedding run must do, decided on the client before any worker starts: the
ids selected (whole units of the output), what is left to do, the tasks, and the checks of
the request against an existing store. No torch at import (:mod:`raptorz.embedding.runner`
imports this).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import xarray as xr

from raptorz import stores
from raptorz.defaults import RANDOM_WEIGHTS
from raptorz.embedding.settings import KernelSettings, slice_indices
from raptorz.embedding.worker import TASK_SLICES, EncoderOptions
from raptorz.errors import SettingsError
from raptorz.layouts import EMBEDDINGS, stale_volumes

#: Tasks a worker should get at least, so that every worker stays busy until the tail.
TASKS_PER_WORKER = 4


def weights_option(weights: str | Path | None) -> str | None:
    """``weights`` as workers receive it: ``None``, the string ``RANDOM_WEIGHTS``, or an
    absolute path (a ``Path`` is always a file, even one named ``random``)."""
    if weights is None or (isinstance(weights, str) and weights == RANDOM_WEIGHTS):
        return weights
    return str(Path(weights).resolve())


def check_encoder_asked(output: Path, options: EncoderOptions) -> None:
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


def volumes_to_do(volumes: Path, output: Path | None, selected: np.ndarray) -> np.ndarray:
    """Mask of selected volumes to embed: pending, failed while the source is ok, or
    stale (converted again since they were embedded)."""
    if output is None:
        return selected.copy()
    mine, theirs = stores.read_status(output), stores.read_status(volumes)
    retry = (mine == stores.FAILED) & (theirs == stores.OK)
    return selected & ((mine == stores.PENDING) | retry | stale_volumes(output, volumes))


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
