"""Raptor restricted to regions: per-region pooling of a block's tokens, and region crops.

Two modes (:class:`~raptorz.embedding.settings.RegionSettings`):

``onepass``
    The block is encoded as without regions (:func:`~raptorz.embedding.kernel.pool_block`),
    and :class:`RegionPooling` weighs each batch's tokens as they stream through: for every
    region that an encoded slice cuts, a patch token counts where the region covers at
    least ``coverage`` of its patch's area, and the prefix tokens (CLS, registers) count
    for every slice that cuts the region. Each region's mean token at each position is the
    float64 sum of the tokens counted there over their count (0 where none was), so a mask
    covering the whole volume gives exactly the embedding without regions. The area a
    patch covers is the patch's square on the encoder's image mapped back onto the slice
    through the preprocessing's geometry (stretch, padding, SAM's longest side, the
    reference mode's crop) and intersected with the region's voxels (:func:`patch_fractions`).
``crop``
    Each region's bounding box plus a margin (mm) is cut out of the volume and embedded as
    a volume of its own (:func:`crop_box`, :func:`embed_crops`).

Both give a :class:`RegionEmbedding`: the block's embeddings with a region axis after the
volume axis, and a status per (volume, region): ok, or absent where the region cuts no
encoded slice of some plane (its projections are NaN).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final

import numpy as np
import torch
from scipy import ndimage

from raptorz import stores
from raptorz.embedding.blocks import BlockPlan, Use
from raptorz.embedding.encoders import Encoder
from raptorz.embedding.kernel import (
    _check_block,
    nonfinite_problem,
    pool_block,
    pool_tokens,
    prepare_block,
)
from raptorz.embedding.preprocessing import fitted_size
from raptorz.embedding.projection import Projector, check_projectors, project_tokens
from raptorz.embedding.settings import KernelSettings, RegionSettings
from raptorz.errors import InputError, RaptorzError
from raptorz.layouts import REGION_ABSENT

#: (slice, region) pairs added per ``index_add_``: bounds the temporary weighted tokens
#: (32 x 257 x 1024 float64 for DINOv2-L: 67 MB).
PAIRS_PER_ADD: Final = 32
#: Slack on the coverage threshold for area fractions summed in floating point.
COVERAGE_SLACK: Final = 1e-9


@dataclass
class RegionEmbedding:
    """Region embeddings of a block of ``B`` volumes and ``R`` regions.

    Attributes
    ----------
    projections
        Projector name -> ``(B, R, planes, K, tokens)`` float32 (NaN where absent).
    tokens
        ``(B, R, planes, tokens, dim)`` float32 mean tokens, with ``keep_tokens``.
    avgpool
        ``(B, R, dim)``: the mean over planes of the mean over the token positions the
        region covers.
    region_status
        ``(B, R)`` int8: ok, or :data:`~raptorz.layouts.REGION_ABSENT`.
    slices
        Slices encoded.
    """

    projections: dict[str, np.ndarray]
    tokens: np.ndarray | None
    avgpool: np.ndarray
    region_status: np.ndarray
    slices: int


def patch_grid(encoder: Encoder) -> int:
    """The side of the encoder's (square) patch grid."""
    return math.isqrt(encoder.num_tokens - encoder.num_prefix_tokens)


def patch_spans(height: int, width: int, encoder: Encoder, settings: KernelSettings,
                canvas: int | None) -> tuple[tuple[float, float], tuple[float, float]]:
    """Per slice axis (rows, columns): ``(start, step)`` in voxels of the patch grid: patch
    ``i`` covers ``[start + i * step, start + (i + 1) * step)`` of the slice, as the
    preprocessing (:func:`~raptorz.embedding.preprocessing.prepare_slices`) places it."""
    patch = encoder.img_size / patch_grid(encoder)
    if settings.resize == "stretch":
        sides, offsets = (height, width), (0, 0)
    else:
        side = canvas if settings.resize == "pad_shared" and canvas else max(height, width)
        sides, offsets = (side, side), ((side - height) // 2, (side - width) // 2)
    fitted = fitted_size(sides, encoder.img_size, encoder.resize)
    spans = []
    for side, offset, size in zip(sides, offsets, fitted, strict=True):
        if settings.preprocess == "reference":  # resized to 8/7, then the center crop
            large = encoder.img_size * 8 // 7
            scale = side / large
            crop = int(round((large - encoder.img_size) / 2.0))
            spans.append((crop * scale - offset, patch * scale))
        else:
            spans.append((-float(offset), patch * side / size))
    return spans[0], spans[1]


def _overlap(length: int, grid: int, start: float, step: float) -> np.ndarray:
    """``(grid, length)``: the fraction of each patch's extent that each voxel covers."""
    low = start + np.arange(grid) * step
    voxel = np.arange(length)
    inside = np.minimum(low[:, None] + step, voxel[None] + 1) - np.maximum(low[:, None],
                                                                          voxel[None])
    return np.clip(inside, 0, None) / step


def patch_fractions(region: np.ndarray, spans: tuple[tuple[float, float], ...], grid: int,
                    full: tuple[int, int], rows: slice = slice(None),
                    columns: slice = slice(None)) -> np.ndarray:
    """The area fraction of each patch that the region covers, per slice.

    Parameters
    ----------
    region
        ``(L, h, w)`` booleans: the region on slices cut to ``rows`` and ``columns`` of
        the full slice (a bounding box).
    spans
        :func:`patch_spans` of the full slice.
    grid
        The patch grid's side.
    full
        The full slice's ``(height, width)``.

    Returns
    -------
    ``(L, grid * grid)`` float64, row-major over the grid as the patch tokens are.
    """
    across = _overlap(full[0], grid, *spans[0])[:, rows]
    down = _overlap(full[1], grid, *spans[1])[:, columns]
    fractions = across @ region.astype(np.float64) @ down.T
    return fractions.reshape(len(region), grid * grid)


def region_boxes(mask: np.ndarray, values: Sequence[int]) -> list[tuple[slice, ...] | None]:
    """Each region's bounding box in ``mask`` (``None`` where absent), in one pass."""
    found = ndimage.find_objects(mask, max_label=max(values))  # any integer type, no copy
    return [found[value - 1] for value in values]


class RegionPooling:
    """The per-region pooling of one block's tokens: a ``sink`` for
    :func:`~raptorz.embedding.kernel.pool_block`.

    Built on the host from the block's plan and masks (the weights of every (slice,
    region) pair, per batch); called on the device with each batch's tokens.

    Parameters
    ----------
    plan
        The block's :class:`~raptorz.embedding.blocks.BlockPlan` (its ``uses``).
    masks
        ``(B, X, Y, Z)`` integer labels of the block's volumes.
    values
        The regions' label values, in output order.
    encoder
        The block's encoder (its tokens, patch grid and input geometry).
    coverage
        The least fraction of a patch's area a region must cover for its token to count.
    """

    def __init__(self, plan: BlockPlan, masks: np.ndarray, values: Sequence[int],
                 encoder: Encoder, coverage: float) -> None:
        planes = plan.settings.planes
        count, regions, tokens = plan.count, len(values), encoder.num_tokens
        self.shape = (count, regions, len(planes))
        prefix, grid = encoder.num_prefix_tokens, patch_grid(encoder)
        weights: dict[Use, list[tuple[int, np.ndarray]]] = defaultdict(list)
        for b in range(count):
            for r, box in enumerate(region_boxes(masks[b], values)):
                if box is None:
                    continue
                inside = masks[b][box] == values[r]
                for position, axis in enumerate(planes):
                    across, down = (a for a in range(3) if a != axis)
                    spans = patch_spans(masks.shape[across + 1], masks.shape[down + 1],
                                        encoder, plan.settings, plan.canvas)
                    moved = np.moveaxis(inside, axis, 0)
                    fractions = patch_fractions(
                        moved, spans, grid, (masks.shape[across + 1], masks.shape[down + 1]),
                        box[across], box[down])
                    for i, s in enumerate(range(box[axis].start, box[axis].stop)):
                        if moved[i].any():
                            weight = np.ones(tokens, np.float32)
                            weight[prefix:] = fractions[i] >= coverage - COVERAGE_SLACK
                            weights[(position, b, s)].append((r, weight))
        self.counts = np.zeros((count * regions * len(planes), tokens))
        self.cut = np.zeros(count * regions * len(planes), np.int64)  # slices cutting
        self.batches: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        for rows in plan.uses:
            pairs: list[tuple[int, int, np.ndarray]] = []
            for row, served in enumerate(rows):
                for position, b, s in served:
                    for r, weight in weights.get((position, b, s), ()):
                        target = (b * regions + r) * len(planes) + position
                        pairs.append((row, target, weight))
                        self.counts[target] += weight
                        self.cut[target] += 1
            self.batches.append((torch.tensor([p[0] for p in pairs], dtype=torch.int64),
                                 torch.tensor([p[1] for p in pairs], dtype=torch.int64),
                                 torch.from_numpy(np.array([p[2] for p in pairs], np.float32)
                                                  .reshape(len(pairs), tokens))))
        self.sums: torch.Tensor | None = None

    def __call__(self, n: int, tokens: torch.Tensor) -> None:
        """Add batch ``n``'s float64 tokens ``(rows, T, D)`` to the regions' sums."""
        if self.sums is None:
            self.sums = torch.zeros(len(self.cut), *tokens.shape[1:], dtype=torch.float64,
                                    device=tokens.device)
        rows, targets, weights = (t.to(tokens.device) for t in self.batches[n])
        for first in range(0, len(rows), PAIRS_PER_ADD):
            part = slice(first, first + PAIRS_PER_ADD)
            self.sums.index_add_(0, targets[part],
                                 tokens[rows[part]] * weights[part, :, None].double())

    def means(self, dim: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The mean tokens ``(B, R, planes, T, dim)`` (0 where no token counted), the
        counts ``(B, R, planes, T)`` and which regions are present ``(B, R)``."""
        sums = (np.zeros((len(self.cut), self.counts.shape[1], dim)) if self.sums is None
                else self.sums.cpu().numpy())
        means = sums / np.maximum(self.counts, 1)[:, :, None]
        present = np.asarray((self.cut.reshape(self.shape) > 0).all(axis=2))
        return (means.reshape(*self.shape, *means.shape[1:]),
                self.counts.reshape(*self.shape, -1), present)


def finish_regions(means: np.ndarray, counts: np.ndarray, present: np.ndarray,
                   encoder: Encoder, projectors: Sequence[Projector],
                   settings: KernelSettings, slices: int) -> RegionEmbedding:
    """Projections and baselines of region means; absent regions get NaN."""
    kept = encoder.token_slice(settings.tokens)
    tokens, covered = means[..., kept, :], counts[..., kept] > 0
    count, regions = tokens.shape[:2]
    flat = tokens.reshape(count * regions, *tokens.shape[2:])
    projections = {name: value.reshape(count, regions, *value.shape[1:])
                   for name, value in project_tokens(flat, projectors).items()}
    per_plane = tokens.sum(axis=3) / np.maximum(covered.sum(axis=3), 1)[..., None]
    avgpool = per_plane.mean(axis=2).astype(np.float32)
    for value in (*projections.values(), avgpool):
        value[~present] = np.nan
    stored = tokens.astype(np.float32) if settings.keep_tokens else None
    if stored is not None:
        stored[~present] = np.nan
    status = np.where(present, stores.OK, REGION_ABSENT).astype(np.int8)
    return RegionEmbedding(projections, stored, avgpool, status, slices)


def pool_regions(volumes: np.ndarray, masks: np.ndarray, values: Sequence[int],
                 encoder: Encoder, settings: KernelSettings, coverage: float, *,
                 progress: Callable[[float], None] | None = None,
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """One-pass region means of a block: :class:`RegionPooling` on the kernel's batches."""
    plan = prepare_block(volumes, encoder, settings)
    pooling = RegionPooling(plan, masks, values, encoder, coverage)
    pooled = pool_block(plan, encoder, progress=progress, sink=pooling)
    if pooled.nonfinite.any():
        raise RaptorzError(nonfinite_problem(encoder))
    return *pooling.means(encoder.embed_dim), pooled.slices


def crop_box(mask: np.ndarray, value: int, spacing: Sequence[float],
             margin_mm: float) -> tuple[slice, ...] | None:
    """The bounding box of ``value`` in ``mask`` plus ``margin_mm`` on every side (in
    voxels of ``spacing``, rounded up, clipped to the volume); ``None`` where absent."""
    box = region_boxes(mask, [value])[0]
    if box is None:
        return None
    pad = [math.ceil(margin_mm / float(s) - 1e-9) for s in spacing]
    return tuple(slice(max(0, b.start - p), min(n, b.stop + p))
                 for b, p, n in zip(box, pad, mask.shape, strict=True))


def embed_crops(volume: np.ndarray, mask: np.ndarray, values: Sequence[int],
                spacing: Sequence[float], encoder: Encoder, settings: KernelSettings,
                margin_mm: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Crop-mode region means of one volume: each region's box embedded on its own."""
    planes, tokens = len(settings.planes), encoder.num_tokens
    means = np.zeros((1, len(values), planes, tokens, encoder.embed_dim))
    present = np.zeros((1, len(values)), bool)
    slices = 0
    for r, value in enumerate(values):
        box = crop_box(mask, value, spacing, margin_mm)
        if box is None:
            continue
        pooled = pool_tokens(np.ascontiguousarray(volume[box])[None], encoder, settings)
        if pooled.nonfinite.any():
            raise RaptorzError(nonfinite_problem(encoder) + f" (the box of label {value})")
        means[0, r], present[0, r], slices = pooled.means[0], True, slices + pooled.slices
    return means, np.ones((*means.shape[:4],)), present, slices


def embed_regions(volume: np.ndarray, mask: np.ndarray, values: Sequence[int],
                  encoder: Encoder, projectors: Sequence[Projector],
                  settings: KernelSettings | None = None,
                  regions: RegionSettings | None = None,
                  spacing: Sequence[float] = (1.0, 1.0, 1.0)) -> RegionEmbedding:
    """Region embeddings of one ``(X, Y, Z)`` volume in [0, 1] and its label ``mask``.

    Parameters
    ----------
    volume, mask
        The volume and its integer labels on the same grid.
    values
        The label value of each region, in output order.
    encoder, projectors, settings
        As for :func:`~raptorz.embedding.kernel.embed_volume`.
    regions
        :class:`~raptorz.embedding.settings.RegionSettings` (one pass, by default).
    spacing
        Voxel spacing in mm (the crop margin's unit).

    Returns
    -------
    RegionEmbedding
        With ``B = 1``.
    """
    settings, regions = settings or KernelSettings(), regions or RegionSettings()
    volume, mask = np.asarray(volume), np.asarray(mask)
    _check_block(volume[None])
    if mask.shape != volume.shape or mask.dtype.kind not in "iu":
        raise InputError("mask", f"must be integer labels of the volume's shape {volume.shape},"
                         f" not {mask.dtype} of shape {mask.shape}")
    if not values or min(values) < 1:
        raise InputError("values", f"must be label values of at least 1, not {list(values)}")
    check_projectors(tuple(projectors), encoder.embed_dim, encoder.name)
    if regions.mode == "crop":
        pooled = embed_crops(volume, mask, values, spacing, encoder, settings,
                             regions.margin_mm)
    else:
        pooled = pool_regions(volume[None], mask[None], values, encoder, settings,
                              regions.coverage)
    return finish_regions(*pooled[:3], encoder, projectors, settings, pooled[3])
