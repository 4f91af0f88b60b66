"""A block's plan: every encoder batch of a block of volumes, worked out on the host.

:func:`raptorz.embedding.kernel.prepare_block` builds a :class:`BlockPlan` (which slices go
in which batch, in runs of one plane; constant slices served by one representative each;
where each row's tokens are added) in pinned memory; the kernel's device loop
(:func:`raptorz.embedding.kernel.encode_batches`) uploads it once and takes every batch
from it. :attr:`BlockPlan.uses` says which slices each row of each batch stands for, so
that a pooling besides the kernel's own (per region: :mod:`raptorz.embedding.regions`)
can weigh the same tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from raptorz.embedding.encoders import Encoder
from raptorz.embedding.preprocessing import canvas_size, prepare_slices
from raptorz.embedding.settings import KernelSettings

#: One encoded slice: (plane position, volume of the block, slice index).
Use = tuple[int, int, int]


@dataclass(frozen=True)
class _Batch:
    """One forward: its slices by run of one plane, and where their tokens are added."""

    runs: tuple[tuple[int, slice], ...]  # (plane position, span of the gather indices)
    owners: slice  # span of the owner indices: the group each row's tokens are added to
    rows: slice | None  # constant slices: span of the row and weight indices
    volumes: float  # the block's share, in volumes, that this batch completes

    @property
    def size(self) -> int:
        return self.runs[-1][1].stop - self.runs[0][1].start


class BlockPlan:
    """Every batch of a block, worked out on the host; :meth:`upload` moves it to a device."""

    def __init__(self, volumes: np.ndarray, settings: KernelSettings, encoder: Encoder,
                 picks: list[np.ndarray], constant: list[np.ndarray] | None,
                 size: int) -> None:
        count, planes = volumes.shape[0], settings.planes
        self.count, self.settings = count, settings
        self.encoder = encoder  # its own input: size, normalisation and resize rule
        pin = encoder.device.type == "cuda"
        self.block = _host(np.ascontiguousarray(volumes), pin)
        self.canvas = canvas_size(tuple(volumes.shape[1:]), settings.resize)
        self.groups = count * len(planes)
        per_volume = sum(len(p) for p in picks)
        self.slices_per_group = np.array([len(picks[g % len(planes)])
                                          for g in range(self.groups)], dtype=np.int64)
        host: dict[str, list[int]] = {"b": [], "s": [], "owners": [], "rows": []}
        weights: list[float] = []
        entries: list[tuple[int, int, int, int]] = []  # (plane position, b, slice, group)
        reps: dict[tuple[float, int], tuple[Use, np.ndarray, list[Use]]] = {}
        for b in range(count):
            for position in range(len(planes)):
                group = b * len(planes) + position
                values = np.full(len(picks[position]), np.nan) if constant is None else \
                    constant[position][b, picks[position]]  # NaN: the slice varies
                for s, value in zip(picks[position], values, strict=True):
                    if np.isnan(value):
                        entries.append((position, b, int(s), group))
                        continue
                    key = (float(value), position)  # the plane fixes the slice's shape
                    if key not in reps:
                        reps[key] = ((position, b, int(s)), np.zeros(self.groups, np.int64), [])
                    reps[key][1][group] += 1
                    reps[key][2].append((position, b, int(s)))
        self.constant_slices = int(sum(int(c.sum()) for _, c, _ in reps.values()))
        self.batches: list[_Batch] = []
        #: Per batch, per row of its forward: the slices whose tokens the row gives.
        self.uses: list[list[list[Use]]] = []
        self.batch_size = size
        for first in range(0, len(entries), size):
            chunk = entries[first:first + size]
            runs = self._gather(host, [(p, b, s) for p, b, s, _ in chunk])
            owners = slice(len(host["owners"]), len(host["owners"]) + len(chunk))
            host["owners"] += [g for *_, g in chunk]
            self.batches.append(_Batch(runs, owners, None, len(chunk) / per_volume))
            self.uses.append([[(p, b, s)] for p, b, s, _ in chunk])
        items = list(reps.values())
        for first in range(0, len(items), size):
            represented = items[first:first + size]
            runs = self._gather(host, [where for where, _, _ in represented])
            self.uses.append([served for *_, served in represented])
            uses = [(row, int(g), int(counts[g]))
                    for row, (_, counts, _) in enumerate(represented)
                    for g in np.flatnonzero(counts)]
            owners = slice(len(host["owners"]), len(host["owners"]) + len(uses))
            rows = slice(len(host["rows"]), len(host["rows"]) + len(uses))
            host["owners"] += [g for _, g, _ in uses]
            host["rows"] += [row for row, _, _ in uses]
            weights += [float(n) for *_, n in uses]  # aligned with host["rows"]
            self.batches.append(_Batch(runs, owners, rows,
                                       sum(n for *_, n in uses) / per_volume))
        self.index = {name: _host(np.asarray(values, np.int64), pin)
                      for name, values in host.items()}
        self.weights = _host(np.asarray(weights, np.float64), pin)
        self.views = [self.block.movedim(axis + 1, 1) for axis in planes]  # (B, L, h, w)

    def upload(self, device: torch.device) -> None:
        """Move the block and the indices to ``device`` (from pinned memory, no waiting)."""
        if self.block.device == device:
            return
        self.block = self.block.to(device, non_blocking=True)
        self.index = {name: values.to(device, non_blocking=True)
                      for name, values in self.index.items()}
        self.weights = self.weights.to(device, non_blocking=True)
        self.views = [self.block.movedim(axis + 1, 1) for axis in self.settings.planes]

    def _gather(self, host: dict[str, list[int]],
                where: list[tuple[int, int, int]]) -> tuple[tuple[int, slice], ...]:
        """Record the (b, slice) gather indices of ``where``, in runs of one plane."""
        runs: list[tuple[int, slice]] = []
        for position, b, s in where:
            n = len(host["b"])
            if runs and runs[-1][0] == position:
                runs[-1] = (position, slice(runs[-1][1].start, n + 1))
            else:
                runs.append((position, slice(n, n + 1)))
            host["b"].append(b)
            host["s"].append(s)
        return tuple(runs)

    def images(self, n: int, rows: slice | None = None) -> torch.Tensor:
        """The encoder input of batch ``n`` (its ``rows`` only, where given), made on the
        device (no synchronisation)."""
        first = self.batches[n].runs[0][1].start
        low, high = (first, first + self.batches[n].size) if rows is None else \
            (first + rows.start, first + rows.stop)
        spans = [(position, slice(max(span.start, low), min(span.stop, high)))
                 for position, span in self.batches[n].runs]
        with torch.inference_mode():
            parts = [prepare_slices(self.views[position][self.index["b"][span],
                                                         self.index["s"][span]],
                                    img_size=self.encoder.img_size,
                                    preprocess=self.settings.preprocess,
                                    resize=self.settings.resize, canvas=self.canvas,
                                    mean=self.encoder.mean, std=self.encoder.std,
                                    fit=self.encoder.resize)
                     for position, span in spans if span.start < span.stop]
            return parts[0] if len(parts) == 1 else torch.cat(parts)


def _constant_values(volumes: np.ndarray, planes: tuple[int, ...]) -> list[np.ndarray]:
    """Per plane, ``(B, L)``: a constant slice's value, NaN where the slice varies."""
    values = []
    for axis in planes:
        view = np.moveaxis(volumes, axis + 1, 1)
        low, high = view.min(axis=(-2, -1)), view.max(axis=(-2, -1))
        values.append(np.where(low == high, low.astype(np.float32), np.float32(np.nan)))
    return values


def _host(array: np.ndarray, pin: bool) -> torch.Tensor:
    """``array`` as a tensor; pinned where it will be copied to a GPU without waiting."""
    tensor = torch.from_numpy(array)
    return tensor.pin_memory() if pin else tensor
