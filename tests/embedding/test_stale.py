"""An embedding made from a volume that was converted again since is stale: ``raptorz
info`` lists it and ``embed`` on the existing output recomputes it, and only it. So is a
region embedding whose mask was converted again (``raptorz masks --reconvert-changed``)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from distributed import Client

from raptorz import stores
from raptorz.errors import RaptorzWarning
from raptorz.info import store_info
from raptorz.ingest.masks import build_masks
from raptorz.ingest.volumes import convert
from raptorz.layouts import open_embeddings, open_masks


def test_a_reconverted_volume_is_stale_until_embed_recomputes_it(
        tmp_path: Path, client: Client, tiny_vit_weights: tuple[str, Path],
        embed_tiny: Callable[..., Any], volume: Callable[..., np.ndarray],
        write_nifti: Callable[..., Path]) -> None:
    sources = [write_nifti(tmp_path / f"{name}.nii.gz", volume((8, 8, 8), seed=seed))
               for seed, name in enumerate("ab")]
    volumes, output = tmp_path / "volumes.zarr", tmp_path / "embeddings.zarr"
    convert(sources, volumes, chunk=1, workers=1)
    embed_tiny(volumes, output, client, tiny_vit_weights)
    before = open_embeddings(output)["p4"].values
    assert "stale" not in store_info(output)

    write_nifti(sources[0], volume((8, 8, 8), seed=7))
    convert(sources, volumes, workers=1, reconvert_changed=True)
    assert "stale: 1 volume(s) converted again since they were embedded: a" in \
        store_info(output)

    summary = embed_tiny(volumes, output, client, tiny_vit_weights)
    assert summary.computed == 1
    after = open_embeddings(output)["p4"].values
    assert not np.allclose(after[0], before[0])
    np.testing.assert_array_equal(after[1], before[1])
    assert stores.read_status(output).tolist() == [stores.OK, stores.OK]
    assert "stale" not in store_info(output)


def test_a_mask_converted_again_makes_its_region_embedding_stale_until_embed_recomputes_it(
        tmp_path: Path, client: Client, tiny_vit_weights: tuple[str, Path],
        embed_tiny: Callable[..., Any], volume: Callable[..., np.ndarray],
        write_nifti: Callable[..., Path], run_tolerance: dict[str, float]) -> None:
    def labels(cut: int) -> np.ndarray:
        mask = np.ones((8, 8, 8), np.int16)
        mask[:cut] = 2
        return mask

    sources = [write_nifti(tmp_path / f"{name}.nii.gz", volume((8, 8, 8), seed=seed))
               for seed, name in enumerate("ab")]
    (tmp_path / "seg").mkdir()
    seg = [write_nifti(tmp_path / "seg" / f"{name}.nii.gz", labels(4)) for name in "ab"]
    volumes, masks = tmp_path / "volumes.zarr", tmp_path / "masks.zarr"
    output = tmp_path / "regions.zarr"
    convert(sources, volumes, chunk=1, workers=1)
    table = {"labels": {"one": 1, "two": 2}}
    build_masks(tmp_path / "seg", volumes, masks, **table)
    regions = {"masks": masks, "regions": "all"}
    embed_tiny(volumes, output, client, tiny_vit_weights, **regions)
    before = open_embeddings(output)["p4"].values
    checksums = open_masks(masks)["checksum"].values
    assert "stale" not in store_info(output)

    write_nifti(seg[0], labels(2))  # the liver redrawn: a's mask changed
    with pytest.warns(RaptorzWarning, match="a: mask changed since converted; kept"):
        assert build_masks(tmp_path / "seg", volumes, masks, **table).converted == 0
    np.testing.assert_array_equal(open_masks(masks)["checksum"].values, checksums)
    assert "stale" not in store_info(output)  # the mask kept is the mask embedded

    rerun = build_masks(tmp_path / "seg", volumes, masks, reconvert_changed=True, **table)
    assert (rerun.converted, rerun.skipped) == (1, 1)
    now = open_masks(masks)["checksum"].values
    assert now[0] != checksums[0] and now[1] == checksums[1]
    assert "stale: 1 volume(s) whose mask was converted again since they were embedded " \
        "(the mask changed): a;" in store_info(output)
    assert "converted again since they were embedded: a" not in store_info(output)

    summary = embed_tiny(volumes, output, client, tiny_vit_weights, **regions)
    assert summary.computed == 1
    after = open_embeddings(output)["p4"].values
    assert not np.allclose(after[0], before[0])
    np.testing.assert_array_equal(after[1], before[1])
    assert "stale" not in store_info(output)
    assert embed_tiny(volumes, output, client, tiny_vit_weights, **regions).computed == 0
    embed_tiny(volumes, tmp_path / "fresh.zarr", client, tiny_vit_weights, **regions)
    fresh = open_embeddings(tmp_path / "fresh.zarr")
    np.testing.assert_allclose(after, fresh["p4"].values, **run_tolerance)
    np.testing.assert_array_equal(open_embeddings(output)["region_status"].values,
                                  fresh["region_status"].values)
