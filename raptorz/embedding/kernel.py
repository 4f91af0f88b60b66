"""The Raptor kernel: a block of volumes in, pooled tokens and their projections out.

Slices of every selected plane of every volume of the block stream through the encoder
in batches; a float64 running sum per (volume, plane) pools the tokens, so memory does
not depend on the number of slices. The host plans the block first (:func:`prepare_block`:
constant slices, batches, indices, pinned memory); the device's share
(:func:`pool_block`) uploads it once and takes, resizes and normalises every batch there,
the next batch prepared while the current one is encoded, with one host-device
synchronisation, the pooled result. Constant slices (all voxels equal) are encoded once
per distinct (value, shape) and added with their count. Projections are applied once to
the pooled tokens at the end (:func:`finish_block`, on the host: the mean of projections
is the projection of the mean), in float64, then stored as float32.

Plain numpy / torch, no Dask: a task on a worker (:mod:`raptorz.embedding.worker`) calls
these on blocks of its volumes, only :func:`pool_block` under its kernel lock.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from raptorz.embedding.blocks import BlockPlan, _constant_values
from raptorz.embedding.encoders import Encoder
from raptorz.embedding.projection import Projector, check_projectors, project_tokens
from raptorz.embedding.settings import KernelSettings, slice_indices
from raptorz.errors import InputError, RaptorzError


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
    RaptorzError
        Where the encoder's tokens of a volume were not finite (fp16 overflow).
    """
    settings = settings or KernelSettings()
    volumes = np.asarray(volumes)
    _check_block(volumes)
    check_projectors(tuple(projectors), encoder.embed_dim, encoder.name)
    result = pool_tokens(volumes, encoder, settings, progress=progress)
    if result.nonfinite.any():
        raise RaptorzError(nonfinite_problem(encoder) + f" (volumes "
                           f"{np.flatnonzero(result.nonfinite).tolist()} of the block)")
    return finish_block(result, encoder, projectors, settings)


def finish_block(pooled: Pooled, encoder: Encoder, projectors: Sequence[Projector],
                 settings: KernelSettings) -> BlockEmbedding:
    """The host's share after the device's: the projections and baselines of pooled means."""
    tokens = pooled.means[:, :, encoder.token_slice(settings.tokens)]
    return BlockEmbedding(
        projections=project_tokens(tokens, projectors),
        tokens=tokens.astype(np.float32) if settings.keep_tokens else None,
        avgpool=tokens.mean(axis=(1, 2)).astype(np.float32),
        slices=pooled.slices, constant_slices=pooled.constant_slices,
        batch_size=pooled.batch_size,
    )


def nonfinite_problem(encoder: Encoder) -> str:
    """The error of a volume whose pooled tokens are not finite."""
    return (f"encoder {encoder.name} gave non-finite tokens at precision "
            f"{getattr(encoder, 'precision', '?')} (an fp16 overflow?): use bf16 or fp32")


def default_batch_size(settings: KernelSettings, encoder: Encoder) -> int:
    """Slices per forward: the settings', else the device's default scaled to the input.

    A ViT's activations grow with its tokens, hence with the square of the input side:
    the defaults are sized for 224 px, and SAM's 1024 px would need about 26 GB of
    attention bias for 64 images.
    """
    if settings.batch_size is not None:
        return settings.batch_size
    base = settings.batch_for(encoder.device.type)
    return max(1, int(base * (224 / encoder.img_size) ** 2))


def pool_tokens(volumes: np.ndarray, encoder: Encoder, settings: KernelSettings, *,
                progress: Callable[[float], None] | None = None) -> Pooled:
    """Mean tokens ``(B, planes, T, dim)`` float64: :func:`prepare_block` then
    :func:`pool_block` (the host's planning, then the device's work)."""
    return pool_block(prepare_block(volumes, encoder, settings), encoder, progress=progress)


def prepare_block(volumes: np.ndarray, encoder: Encoder, settings: KernelSettings,
                  batch_size: int | None = None) -> BlockPlan:
    """Everything of a block the host can do before the device: the constant-slice check,
    the batches and their indices, in pinned memory on a CUDA encoder's host.

    The volumes are not checked again (:func:`volume_problem` did that as they were
    read); a worker runs this on its reader thread, outside the kernel lock.
    """
    picks = [slice_indices(volumes.shape[axis + 1], settings.subsample)
             for axis in settings.planes]
    constant = _constant_values(volumes, settings.planes) if settings.dedup else None
    return BlockPlan(volumes, settings, encoder, picks, constant,
                 batch_size or default_batch_size(settings, encoder))


def pool_block(plan: BlockPlan, encoder: Encoder, *, limit: int | None = None,
               progress: Callable[[float], None] | None = None,
               sink: Callable[[int, torch.Tensor], None] | None = None) -> Pooled:
    """The device's share of a block: upload, encode, and the one synchronisation.

    ``limit``: the largest batch known to fit (a worker's earlier out-of-memory error),
    below the plan's batches. The pooled sums are checked for finiteness at that
    synchronisation: ``Pooled.nonfinite`` marks the volumes whose tokens overflowed.
    ``sink(n, tokens)`` also gets each batch's float64 tokens, one row per forward row
    (``plan.uses[n]`` says which slices each stands for): another pooling of them.
    """
    plan.upload(encoder.device)
    sums, batch_size = encode_batches(plan, encoder, min(limit or plan.batch_size,
                                                         plan.batch_size), progress, sink)
    means = sums.cpu().numpy() / plan.slices_per_group[:, None, None]  # the one sync
    means = means.reshape(plan.count, -1, *means.shape[1:])
    return Pooled(means, int(plan.slices_per_group.sum()), plan.constant_slices, batch_size,
                  np.asarray(~np.isfinite(means).all(axis=(1, 2, 3))))


def encode_batches(plan: BlockPlan, encoder: Encoder, batch_size: int,
                   progress: Callable[[float], None] | None = None,
                   sink: Callable[[int, torch.Tensor], None] | None = None,
                   ) -> tuple[torch.Tensor, int]:
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
            images = forward.prepared(ahead)
            if n + 1 < len(plan.batches):
                ahead = pool.submit(plan.images, n + 1)
            tokens = forward(plan, n, images)
            if sink is not None:
                sink(n, tokens)
            if batch.rows is not None:  # constant slices: one encoding serves many groups
                tokens = tokens[plan.index["rows"][batch.rows]]
                tokens *= plan.weights[batch.rows][:, None, None]
            sums.index_add_(0, plan.index["owners"][batch.owners], tokens)
            if progress is not None:
                progress(batch.volumes)
    return sums, forward.limit


@dataclass(frozen=True)
class Pooled:
    """What :func:`pool_block` returns: the means, slice counts, the batch size used and
    which volumes' means are not finite."""

    means: np.ndarray
    slices: int
    constant_slices: int
    batch_size: int
    nonfinite: np.ndarray

    def select(self, keep: np.ndarray) -> Pooled:
        """The volumes ``keep`` (a mask) of the block."""
        return Pooled(self.means[keep], self.slices, self.constant_slices, self.batch_size,
                      self.nonfinite[keep])


def _plan(volumes: np.ndarray, encoder: Encoder, settings: KernelSettings) -> BlockPlan:
    """A block's plan, already on the encoder's device."""
    plan = prepare_block(volumes, encoder, settings)
    plan.upload(encoder.device)
    return plan


class _Forward:
    """The encoder's forward; a batch that runs out of device memory is halved and retried.

    ``limit`` is the largest batch that has fitted: later batches are split to it. The
    batch's preparation and the joining of its parts are retried the same way.
    """

    def __init__(self, encoder: Encoder, limit: int) -> None:
        self.encoder, self.limit = encoder, limit

    def prepared(self, ahead: Future[torch.Tensor]) -> torch.Tensor | None:
        """The batch prepared ahead, or ``None`` where that ran out of memory."""
        try:
            return ahead.result()
        except torch.OutOfMemoryError:
            pass
        self._free()  # outside the except block: its traceback holds the failed tensors
        return None

    def __call__(self, plan: BlockPlan, n: int, images: torch.Tensor | None) -> torch.Tensor:
        """The float64 tokens of batch ``n`` (``images``: prepared ahead, or ``None``)."""
        size = plan.batches[n].size
        while True:
            try:
                return self._parts(plan, n, images, size)
            except torch.OutOfMemoryError:
                if min(self.limit, size) == 1:
                    raise
                self.limit = min(self.limit, size) // 2
                images = None  # prepare the parts one by one
            self._free()

    def _parts(self, plan: BlockPlan, n: int, images: torch.Tensor | None,
               size: int) -> torch.Tensor:
        outputs: list[torch.Tensor] = []
        for start in range(0, size, self.limit):
            rows = slice(start, min(size, start + self.limit))
            part = images[rows] if images is not None else plan.images(n, rows)
            outputs.append(self.encoder.encode(part).double())
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs)

    def _free(self) -> None:
        if self.encoder.device.type == "cuda":
            torch.cuda.empty_cache()


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
