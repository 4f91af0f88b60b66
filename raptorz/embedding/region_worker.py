"""A task's region work on a worker (``raptorz embed --masks``): read the masks of a block,
build its one-pass pooling or embed its crops, and finish its region embeddings.

:mod:`raptorz.embedding.worker` calls these for a task whose
:class:`~raptorz.embedding.settings.RegionRequest` is set; like it, this module imports
torch (through :mod:`raptorz.embedding.regions`) only inside the functions that run on
workers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from raptorz import stores
from raptorz.embedding.embeddings import contiguous_runs
from raptorz.embedding.projection import Projector
from raptorz.embedding.settings import KernelSettings, RegionRequest
from raptorz.layouts import MASKS, VOLUMES

if TYPE_CHECKING:
    from raptorz.embedding.blocks import BlockPlan
    from raptorz.embedding.encoders import Encoder
    from raptorz.embedding.regions import RegionEmbedding, RegionPooling
    from raptorz.embedding.worker import _Read


@dataclass
class RegionBlock:
    """A block's regions: its volumes' masks and spacings, and the one-pass pooling
    (``None`` in crop mode)."""

    masks: np.ndarray
    spacing: np.ndarray
    pooling: RegionPooling | None = None


def read_masks(request: RegionRequest, volumes: str,
               read: _Read) -> tuple[np.ndarray, np.ndarray]:
    """The masks and spacings of the volumes ``read`` holds; those whose mask is not ok
    leave ``read`` (its block, usable ids, checksums) for its errors. The masks' checksums
    (read before their labels: a mask converted again meanwhile then shows as stale) go to
    ``read.mask_checksums``."""
    usable, errors = read.usable, read.errors
    store = MASKS.read(request.masks)
    status = stores.read_status(request.masks)[usable]
    error = np.asarray(store["error"].values, object)[usable] if len(usable) else []
    for index, state, text in zip(usable, status, error, strict=True):
        if state != stores.OK:
            errors[int(index)] = f"mask not converted ({stores.STATUS_NAMES[state]})" + (
                f": {text}" if text else "")
    keep = status == stores.OK
    good = usable[keep]
    read.mask_checksums = (np.asarray(store["checksum"].values)[good] if "checksum" in store
                           else np.zeros(len(good), np.int64))
    parts = [np.asarray(store["mask"][run].values) for run in contiguous_runs(good)]
    masks = np.concatenate(parts) if parts else np.empty((0, *store["mask"].shape[1:]),
                                                        store["mask"].dtype)
    spacing = np.asarray(VOLUMES.read(volumes)["spacing"].values)[good]
    read.block, read.usable, read.checksums = read.block[keep], good, read.checksums[keep]
    return masks, spacing


def plan_regions(request: RegionRequest, plan: BlockPlan | None, masks: np.ndarray,
                 spacing: np.ndarray, encoder: Encoder) -> RegionBlock:
    """The reader thread's share: the one-pass weights of every batch (on the host)."""
    from raptorz.embedding.regions import RegionPooling

    if request.settings.mode == "crop" or plan is None:
        return RegionBlock(masks, spacing)
    return RegionBlock(masks, spacing, RegionPooling(plan, masks, request.values, encoder,
                                                     request.settings.coverage))


def embed_crops_block(request: RegionRequest | None, block: np.ndarray, regions: RegionBlock,
                      encoder: Encoder, projectors: list[Projector],
                      settings: KernelSettings) -> RegionEmbedding:
    """Crop mode: every region of every volume of the block, each embedded on its own."""
    from raptorz.embedding.regions import embed_crops, finish_regions

    assert request is not None
    parts = [embed_crops(volume, mask, request.values, spacing, encoder, settings,
                         request.settings.margin_mm)
             for volume, mask, spacing in zip(block, regions.masks, regions.spacing,
                                              strict=True)]
    return finish_regions(np.concatenate([p[0] for p in parts]),
                          np.concatenate([p[1] for p in parts]),
                          np.concatenate([p[2] for p in parts]), encoder, projectors,
                          settings, sum(p[3] for p in parts))


def finish_onepass(regions: RegionBlock, keep: np.ndarray, slices: int, encoder: Encoder,
                   projectors: list[Projector], settings: KernelSettings) -> RegionEmbedding:
    """One-pass region embeddings of the block's volumes ``keep`` (those with finite tokens)."""
    from raptorz.embedding.regions import finish_regions

    assert regions.pooling is not None
    means, counts, present = regions.pooling.means(encoder.embed_dim)
    return finish_regions(means[keep], counts[keep], present[keep], encoder, projectors,
                          settings, slices)
