"""An embedding made from a volume that was converted again since is stale: ``raptorz
info`` lists it and ``embed`` on the existing output recomputes it, and only it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from distributed import Client

from raptorz import stores
from raptorz.info import store_info
from raptorz.ingest.volumes import convert
from raptorz.layouts import open_embeddings


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
