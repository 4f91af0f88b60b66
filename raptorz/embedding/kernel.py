"""The Raptor kernel: a block of volumes in, pooled tokens and their projections out.

Slices of every selected plane of every volume of the block stream through the encoder
in batches of ``batch_size``; a float64 running sum per (volume, plane) pools the tokens,
so memory does not depend on the number of slices. Constant slices (all voxels equal)
are encoded once per distinct (value, shape) and added with their count. Projections
are applied once to the pooled tokens at the end (linearity: the mean of projections
is the projection of the mean), in float64, then stored as float32.

Plain numpy / torch: the distributed stage maps :func:`embed_block` over chunks.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from raptorz.embedding.encoders import Encoder
from raptorz.embedding.preprocessing import (
    PreprocessMode,
    ResizeMode,
    canvas_size,
    iter_slices,
    prepare_images,
    slice_indices,
)
from raptorz.embedding.projection import Projector, check_projectors
from raptorz.errors import InputError

#: The original's names of planes 0, 1, 2 (slices along array axes 0, 1, 2).
PLANE_NAMES = ("A", "C", "S")


@dataclass(frozen=True)
class KernelSettings:
    """How slices become pooled tokens (recorded verbatim in store provenance).

    Parameters
    ----------
    planes
        Array axes whose slices are encoded, in output order.
    preprocess
        ``default`` or ``reference`` (see :mod:`raptorz.embedding.preprocessing`).
    resize
        ``stretch``, ``pad`` or ``pad_shared``.
    tokens
        ``all`` (prefix + patch tokens, the original layout), ``patch`` (patch only) or
        ``cls`` (the CLS token only; refused for feature-map encoders such as SAM).
    subsample
        Keep every n-th slice along each axis (centered); 1 keeps all.
    batch_size
        Images per encoder forward.
    dedup
        Encode each distinct constant slice once (exact up to fp32 rounding).
    keep_tokens
        Also return the pooled tokens, so later projections need no encoder run.
    """

    planes: tuple[int, ...] = (0, 1, 2)
    preprocess: PreprocessMode = "default"
    resize: ResizeMode = "stretch"
    tokens: Literal["all", "patch", "cls"] = "all"
    subsample: int = 1
    batch_size: int = 64
    dedup: bool = True
    keep_tokens: bool = False

    def __post_init__(self) -> None:
        planes = tuple(int(p) for p in self.planes)
        if not planes or len(set(planes)) != len(planes) or not set(planes) <= {0, 1, 2}:
            raise ValueError(f"planes must be distinct axes among 0, 1, 2, got {self.planes}")
        object.__setattr__(self, "planes", planes)
        if self.subsample < 1 or self.batch_size < 1:
            raise ValueError("subsample and batch_size must be >= 1")
        for name, value, allowed in (
            ("preprocess", self.preprocess, ("default", "reference")),
            ("resize", self.resize, ("stretch", "pad", "pad_shared")),
            ("tokens", self.tokens, ("all", "patch", "cls")),
        ):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


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
    """

    projections: dict[str, np.ndarray]
    tokens: np.ndarray | None
    avgpool: np.ndarray
    slices: int
    constant_slices: int


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
                settings: KernelSettings | None = None) -> BlockEmbedding:
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
    pooled, slices, constant = pool_tokens(volumes, encoder, settings)
    pooled = pooled[:, :, encoder.token_slice(settings.tokens)]
    return BlockEmbedding(
        projections=project_tokens(pooled, projectors),
        tokens=pooled.astype(np.float32) if settings.keep_tokens else None,
        avgpool=pooled.mean(axis=(1, 2)).astype(np.float32),
        slices=slices, constant_slices=constant,
    )


def project_tokens(tokens: np.ndarray, projectors: Sequence[Projector]) -> dict[str, np.ndarray]:
    """Project pooled tokens ``(B, planes, T, dim)``: name -> ``(B, planes, K, T)`` float32.

    The matmul runs in float64 (``R^T @ tokens^T`` per plane, as in the method).
    """
    tokens = np.asarray(tokens, dtype=np.float64)
    check_projectors(tuple(projectors), tokens.shape[-1], "of these tokens")
    return {p.name: np.einsum("bptd,dk->bpkt", tokens, p.matrix).astype(np.float32)
            for p in projectors}


def pool_tokens(volumes: np.ndarray, encoder: Encoder,
                settings: KernelSettings) -> tuple[np.ndarray, int, int]:
    """Mean tokens ``(B, planes, T, dim)`` float64, slices pooled, constant slices shortcut."""
    count, _, _, _ = volumes.shape
    planes = settings.planes
    groups = count * len(planes)
    sums = torch.zeros(groups, encoder.num_tokens, encoder.embed_dim, dtype=torch.float64,
                       device=encoder.device)
    slices_per_group = np.zeros(groups, dtype=np.int64)
    # (value, shape) -> a representative slice (a view), and its count in each group
    constants: dict[tuple[float, tuple[int, ...]], tuple[np.ndarray, np.ndarray]] = {}
    canvas = canvas_size(volumes.shape[1:], settings.resize)

    def encode_into(batch: list[np.ndarray], rows: list[int], owners: list[int],
                    weights: list[float] | None = None) -> None:
        """Add the tokens of ``batch[rows]`` (times ``weights``) to the sums of ``owners``."""
        tokens = encoder.encode(_images(batch, encoder, settings, canvas)).double()
        picked = tokens[torch.as_tensor(rows, device=tokens.device)]
        if weights is not None:
            picked *= torch.as_tensor(weights, dtype=torch.float64,
                                      device=tokens.device)[:, None, None]
        sums.index_add_(0, torch.as_tensor(owners, device=sums.device), picked)

    batch: list[np.ndarray] = []
    owners: list[int] = []
    for group, image in _stream(volumes, settings):
        slices_per_group[group] += 1
        if settings.dedup and image.min() == image.max():
            key = (float(image.flat[0]), image.shape)
            if key not in constants:
                constants[key] = (image, np.zeros(groups, dtype=np.int64))
            constants[key][1][group] += 1
            continue
        batch.append(image)
        owners.append(group)
        if len(batch) == settings.batch_size:
            encode_into(batch, list(range(len(batch))), owners)
            batch, owners = [], []
    if batch:
        encode_into(batch, list(range(len(batch))), owners)
    reps = list(constants.values())
    for start in range(0, len(reps), settings.batch_size):
        chunk = reps[start:start + settings.batch_size]
        # each representative is encoded once and added to every group with its count
        uses = [(row, int(g), float(counts[g])) for row, (_, counts) in enumerate(chunk)
                for g in np.flatnonzero(counts)]
        encode_into([image for image, _ in chunk], [u[0] for u in uses],
                    [u[1] for u in uses], [u[2] for u in uses])
    means = sums.cpu().numpy() / slices_per_group[:, None, None]
    n_constant = int(sum(int(c.sum()) for _, c in reps))
    return (means.reshape(count, len(planes), *means.shape[1:]),
            int(slices_per_group.sum()), n_constant)


def _stream(volumes: np.ndarray, settings: KernelSettings) -> Iterator[tuple[int, np.ndarray]]:
    """(group = volume * planes + plane position, slice) for every slice, in order."""
    for b, volume in enumerate(volumes):
        for position, axis in enumerate(settings.planes):
            indices = slice_indices(volume.shape[axis], settings.subsample)
            for image in iter_slices(volume, axis, indices):
                yield b * len(settings.planes) + position, image


def _images(batch: list[np.ndarray], encoder: Encoder, settings: KernelSettings,
            canvas: int | None) -> torch.Tensor:
    """Encoder input of slices of possibly different shapes (one resize per shape run)."""
    runs: list[torch.Tensor] = []
    start = 0
    for end in range(1, len(batch) + 1):
        if end == len(batch) or batch[end].shape != batch[start].shape:
            runs.append(prepare_images(np.stack(batch[start:end]), img_size=encoder.img_size,
                                       preprocess=settings.preprocess,
                                       resize=settings.resize, canvas=canvas,
                                       device=encoder.device, mean=encoder.mean,
                                       std=encoder.std, fit=encoder.resize))
            start = end
    return torch.cat(runs)


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
