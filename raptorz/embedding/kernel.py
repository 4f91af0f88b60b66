"""The Raptor kernel: a block of volumes in, pooled tokens and their projections out.

Slices of every selected plane of every volume of the block stream through the encoder
in batches of ``batch_size``; a float64 running sum per (volume, plane) pools the tokens,
so memory does not depend on the number of slices. The block is uploaded to the
encoder's device once and every batch is taken, resized and normalised there, the next
batch prepared while the current one is encoded, with no host-device synchronisation
inside the loop. Constant slices (all voxels equal)
are encoded once per distinct (value, shape) and added with their count. Projections
are applied once to the pooled tokens at the end (linearity: the mean of projections
is the projection of the mean), in float64, then stored as float32.

Plain numpy / torch, no Dask: a task on a worker (:mod:`raptorz.embedding.worker`) calls
:func:`embed_block` on blocks of its volumes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from raptorz.embedding.encoders import Encoder
from raptorz.embedding.preprocessing import canvas_size, prepare_slices
from raptorz.embedding.projection import Projector, check_projectors, project_tokens
from raptorz.embedding.settings import KernelSettings, slice_indices
from raptorz.errors import InputError


@dataclass
class BlockEmbedding:
    """Embeddings of a block of ``B`` volumes.

    Attributes
    ----------
    projections
        Projector name -> ``(B, planes, K, tokens)`` float32; ``.reshape(B, -1)`` is the
        original's flat vector (index ``((plane * K) + k) * T + t``).
    tokens
        ``(B, planes, tokens, dim)`` float32 mean tokens, when ``keep_tokens``.
    avgpool
        ``(B, dim)`` float32: the mean over slices, tokens and planes (the original's
        "avgpool" baseline; each plane weighs the same).
    slices
        Slices pooled (all volumes and planes), constant ones included.
    constant_slices
        Of those, the constant slices served by the dedup shortcut (0 without it).
    batch_size
        The largest batch the encoder ran: ``settings.batch_for(device)``, or less where a
        batch ran out of device memory and was halved.
    """

    projections: dict[str, np.ndarray]
    tokens: np.ndarray | None
    avgpool: np.ndarray
    slices: int
    constant_slices: int
    batch_size: int


def embed_volume(volume: np.ndarray, encoder: Encoder, projectors: Sequence[Projector],
                 settings: KernelSettings | None = None) -> BlockEmbedding:
    """Raptor embedding of one ``(X, Y, Z)`` volume in [0, 1] (a block with ``B = 1``).

    Examples
    --------
    >>> from raptorz.embedding.encoders import create_encoder  # doctest: +SKIP
    >>> from raptorz.embedding.projection import create_projector  # doctest: +SKIP
    >>> enc = create_encoder()  # doctest: +SKIP
    >>> emb = embed_volume(volume, enc, [create_projector(0, enc.embed_dim, 100)])  # doctest: +SKIP
    >>> emb.projections["seed0_d1024_k100"].reshape(-1).shape  # doctest: +SKIP
    (77100,)
    """
    return embed_block(np.asarray(volume)[None], encoder, projectors, settings)


def embed_block(volumes: np.ndarray, encoder: Encoder, projectors: Sequence[Projector],
                settings: KernelSettings | None = None, *,
                progress: Callable[[float], None] | None = None) -> BlockEmbedding:
    """Raptor embeddings of a block ``(B, X, Y, Z)`` of volumes in [0, 1].

    Parameters
    ----------
    volumes
        Float intensities in [0, 1] (any float dtype; float16 stores are fine).
    encoder
        From :func:`raptorz.embedding.encoders.create_encoder`.
    projectors
        Applied to the same pooled tokens (one pass over the slices for all).
    settings
        :class:`KernelSettings`; the defaults reproduce the original's layout.
    progress
        Called with each batch's share of the block, in volumes, as it is submitted.

    Returns
    -------
    BlockEmbedding

    Raises
    ------
    InputError
        For a block that is not 4-D, not floating point or holds NaN / infinite values,
        or a projector whose rows do not match the encoder width.
    """
    settings = settings or KernelSettings()
    volumes = np.asarray(volumes)
    _check_block(volumes)
    check_projectors(tuple(projectors), encoder.embed_dim, encoder.name)
    result = pool_tokens(volumes, encoder, settings, progress=progress)
    pooled = result.means[:, :, encoder.token_slice(settings.tokens)]
    return BlockEmbedding(
        projections=project_tokens(pooled, projectors),
        tokens=pooled.astype(np.float32) if settings.keep_tokens else None,
        avgpool=pooled.mean(axis=(1, 2)).astype(np.float32),
        slices=result.slices, constant_slices=result.constant_slices,
        batch_size=result.batch_size,
    )


def pool_tokens(volumes: np.ndarray, encoder: Encoder, settings: KernelSettings, *,
                progress: Callable[[float], None] | None = None) -> Pooled:
    """Mean tokens ``(B, planes, T, dim)`` float64, slices pooled, constant slices shortcut.

    The block is uploaded once; slices are taken, resized and normalised on the encoder's
    device, batch ``n + 1`` prepared by a helper thread while batch ``n`` is encoded. The
    only host-device synchronisations are the constant-slice check before the loop and the
    pooled result after it. ``progress`` receives each batch's share of the block, in
    volumes, as it is submitted.
    """
    plan = _plan(volumes, encoder, settings)
    sums, batch_size = encode_batches(plan, encoder, plan.batch_size, progress)
    means = sums.cpu().numpy() / plan.slices_per_group[:, None, None]
    return Pooled(means.reshape(len(volumes), len(settings.planes), *means.shape[1:]),
                  int(plan.slices_per_group.sum()), plan.constant_slices, batch_size)


def encode_batches(plan: _Plan, encoder: Encoder, batch_size: int,
                   progress: Callable[[float], None] | None = None) -> tuple[torch.Tensor, int]:
    """The hot loop: float64 token sums per group, on the device, and the batch size used.

    Nothing in it waits for the device: batch ``n + 1`` is prepared by a helper thread
    while batch ``n`` is encoded, and every index it needs was uploaded with the plan.
    """
    sums = torch.zeros(plan.groups, encoder.num_tokens, encoder.embed_dim,
                       dtype=torch.float64, device=encoder.device)
    forward = _Forward(encoder, batch_size)
    with ThreadPoolExecutor(1, thread_name_prefix="raptorz-prepare") as pool:
        ahead = pool.submit(plan.images, 0) if plan.batches else None
        for n, batch in enumerate(plan.batches):
            assert ahead is not None
            images = ahead.result()
            if n + 1 < len(plan.batches):
                ahead = pool.submit(plan.images, n + 1)
            tokens = forward(images).double()
            if batch.rows is not None:  # constant slices: one encoding serves many groups
                tokens = tokens[plan.index["rows"][batch.rows]]
                tokens *= plan.weights[batch.rows][:, None, None]
            sums.index_add_(0, plan.index["owners"][batch.owners], tokens)
            if progress is not None:
                progress(batch.volumes)
    return sums, forward.limit


@dataclass(frozen=True)
class Pooled:
    """What :func:`pool_tokens` returns: the means, slice counts and the batch size used."""

    means: np.ndarray
    slices: int
    constant_slices: int
    batch_size: int


@dataclass(frozen=True)
class _Batch:
    """One forward: its slices by run of one plane, and where their tokens are added."""

    runs: tuple[tuple[int, slice], ...]  # (plane position, span of the gather indices)
    owners: slice  # span of the owner indices: the group each row's tokens are added to
    rows: slice | None  # constant slices: span of the row and weight indices
    volumes: float  # the block's share, in volumes, that this batch completes


class _Plan:
    """Every batch of a block, worked out on the host before the loop, indices uploaded once."""

    def __init__(self, block: torch.Tensor, settings: KernelSettings, encoder: Encoder,
                 picks: list[np.ndarray], constant: list[np.ndarray] | None) -> None:
        count, planes = block.shape[0], settings.planes
        self.settings = settings
        self.encoder = encoder  # its own input: size, normalisation and resize rule
        self.canvas = canvas_size(tuple(block.shape[1:]), settings.resize)
        self.views = [block.movedim(axis + 1, 1) for axis in planes]  # (B, L, h, w) views
        self.groups = count * len(planes)
        per_volume = sum(len(p) for p in picks)
        self.slices_per_group = np.array([len(picks[g % len(planes)])
                                          for g in range(self.groups)], dtype=np.int64)
        host: dict[str, list[int]] = {"b": [], "s": [], "owners": [], "rows": []}
        weights: list[float] = []
        entries: list[tuple[int, int, int, int]] = []  # (plane position, b, slice, group)
        reps: dict[tuple[float, int], tuple[tuple[int, int, int], np.ndarray]] = {}
        for b in range(count):
            for position in range(len(planes)):
                group = b * len(planes) + position
                for s, value in zip(picks[position], _values(constant, position, b, picks),
                                    strict=True):
                    if np.isnan(value):
                        entries.append((position, b, int(s), group))
                        continue
                    key = (float(value), position)  # the plane fixes the slice's shape
                    if key not in reps:
                        reps[key] = ((position, b, int(s)), np.zeros(self.groups, np.int64))
                    reps[key][1][group] += 1
        self.constant_slices = int(sum(int(c.sum()) for _, c in reps.values()))
        self.batches: list[_Batch] = []
        self.batch_size = size = settings.batch_for(encoder.device.type)
        for first in range(0, len(entries), size):
            chunk = entries[first:first + size]
            runs = self._gather(host, [(p, b, s) for p, b, s, _ in chunk])
            owners = slice(len(host["owners"]), len(host["owners"]) + len(chunk))
            host["owners"] += [g for *_, g in chunk]
            self.batches.append(_Batch(runs, owners, None, len(chunk) / per_volume))
        items = list(reps.values())
        for first in range(0, len(items), size):
            represented = items[first:first + size]
            runs = self._gather(host, [where for where, _ in represented])
            uses = [(row, int(g), int(counts[g])) for row, (_, counts) in enumerate(represented)
                    for g in np.flatnonzero(counts)]
            owners = slice(len(host["owners"]), len(host["owners"]) + len(uses))
            rows = slice(len(host["rows"]), len(host["rows"]) + len(uses))
            host["owners"] += [g for _, g, _ in uses]
            host["rows"] += [row for row, _, _ in uses]
            weights += [float(n) for *_, n in uses]  # aligned with host["rows"]
            self.batches.append(_Batch(runs, owners, rows,
                                       sum(n for *_, n in uses) / per_volume))
        device = block.device
        self.index = {name: _upload(np.asarray(values, np.int64), device)
                      for name, values in host.items()}
        self.weights = _upload(np.asarray(weights, np.float64), device)

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

    def images(self, n: int) -> torch.Tensor:
        """The encoder input of batch ``n``, made on the device (no synchronisation)."""
        with torch.inference_mode():
            parts = [prepare_slices(self.views[position][self.index["b"][span],
                                                         self.index["s"][span]],
                                    img_size=self.encoder.img_size,
                                    preprocess=self.settings.preprocess,
                                    resize=self.settings.resize, canvas=self.canvas,
                                    mean=self.encoder.mean, std=self.encoder.std,
                                    fit=self.encoder.resize)
                     for position, span in self.batches[n].runs]
            return parts[0] if len(parts) == 1 else torch.cat(parts)


def _plan(volumes: np.ndarray, encoder: Encoder, settings: KernelSettings) -> _Plan:
    """Upload the block and plan its batches (one synchronisation: the constant check)."""
    block = _upload(np.ascontiguousarray(volumes), encoder.device)
    picks = [slice_indices(volumes.shape[axis + 1], settings.subsample)
             for axis in settings.planes]
    constant = _constant_values(block, settings.planes) if settings.dedup else None
    return _Plan(block, settings, encoder, picks, constant)


def _constant_values(block: torch.Tensor, planes: tuple[int, ...]) -> list[np.ndarray]:
    """Per plane, ``(B, L)``: a constant slice's value, NaN where the slice varies."""
    values = []
    for axis in planes:
        view = block.movedim(axis + 1, 1)
        low, high = view.amin(dim=(-2, -1)), view.amax(dim=(-2, -1))
        values.append(torch.where(low == high, low.float(), torch.nan))
    shapes = [v.shape for v in values]
    flat = torch.cat([v.reshape(-1) for v in values]).cpu().numpy()  # the one sync
    out, start = [], 0
    for shape in shapes:
        size = int(np.prod(shape))
        out.append(flat[start:start + size].reshape(shape))
        start += size
    return out


def _values(constant: list[np.ndarray] | None, position: int, b: int,
            picks: list[np.ndarray]) -> np.ndarray:
    """The constant values of volume ``b``'s picked slices of a plane (NaN: not constant)."""
    if constant is None:
        return np.full(len(picks[position]), np.nan)
    return constant[position][b, picks[position]]


def _upload(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """``array`` on ``device``; on CUDA through pinned memory, without waiting."""
    tensor = torch.from_numpy(array)
    if device.type != "cuda":
        return tensor
    return tensor.pin_memory().to(device, non_blocking=True)


class _Forward:
    """The encoder's forward; a batch that runs out of device memory is halved and retried.

    ``limit`` is the largest batch that has fitted: later batches are split to it.
    """

    def __init__(self, encoder: Encoder, limit: int) -> None:
        self.encoder, self.limit = encoder, limit

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        outputs: list[torch.Tensor] = []
        start = 0
        while start < len(images):
            part = images[start:start + self.limit]
            try:
                outputs.append(self.encoder.encode(part))
            except torch.OutOfMemoryError:
                if len(part) == 1:
                    raise
                self.limit = len(part) // 2
                if self.encoder.device.type == "cuda":
                    torch.cuda.empty_cache()
                continue
            start += len(part)
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs)


def _check_block(volumes: np.ndarray) -> None:
    """Refuse blocks the kernel cannot embed, saying what is wrong."""
    if volumes.ndim != 4:
        raise InputError("volumes", f"expected a (B, X, Y, Z) block, got shape {volumes.shape}")
    if volumes.dtype.kind != "f":
        raise InputError("volumes", f"expected float intensities in [0, 1], got {volumes.dtype}")
    if min(volumes.shape) == 0:
        raise InputError("volumes", f"empty block of shape {volumes.shape}")
    if not np.isfinite(volumes).all():
        raise InputError("volumes", "holds NaN or infinite values")


def volume_problem(volume: np.ndarray) -> str:
    """Why the kernel would refuse this one ``(X, Y, Z)`` volume; empty where it would not.

    The run checks each volume before the block reaches the device, so that only a
    volume's own problem marks it failed and any later error is the task's.
    """
    try:
        _check_block(np.asarray(volume)[None])
    except InputError as error:
        return f"InputError: {error}"
    return ""
