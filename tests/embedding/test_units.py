"""Written units: a large embeddings store keeps one file per unit of volumes per variable.

The unit is one Zarr chunk, or a shard of chunks of at most 1 MiB; tasks, resumes and
``--start/--many`` ranges all work in whole units
(stores of fewer than 32 volumes have units of one).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
from distributed import Client

from raptorz import stores
from raptorz.cluster import create_cluster
from raptorz.embedding.embeddings import _lazy, inner_chunk, store_unit, unit_size
from raptorz.embedding.encoders import create_encoder
from raptorz.embedding.kernel import embed_block
from raptorz.embedding.projection import create_projector
from raptorz.embedding.runner import embed
from raptorz.embedding.settings import KernelSettings
from raptorz.errors import SettingsError
from raptorz.ingest.volumes import convert
from raptorz.layouts import open_embeddings, open_volumes

SETTINGS = KernelSettings(planes=(0,), subsample=4, batch_size=64)
PROJECTOR = create_projector(0, 64, 4, "p4")


@pytest.fixture(scope="module")
def volumes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("units")
    images = np.random.default_rng(5).integers(0, 256, (48, 8, 8, 8), np.uint8)
    np.savez(folder / "m.npz", train_images=images, train_labels=np.zeros((48, 1)),
             val_images=images[:0], val_labels=np.zeros((0, 1)), test_images=images[:0],
             test_labels=np.zeros((0, 1)))
    convert([folder / "m.npz"], folder / "volumes.zarr", workers=1)
    return folder / "volumes.zarr"


@pytest.fixture(scope="module")
def client() -> Iterator[Client]:
    """The one-worker local cluster ``embed`` starts by itself, started once for the module."""
    with create_cluster("local", workers=1, dashboard_address=":0") as cluster, \
            Client(cluster, set_as_default=False) as client:
        yield client


def test_unit_sizes() -> None:
    assert [unit_size(n) for n in (1, 31, 48, 1600, 100_000)] == [1, 1, 3, 100, 100]


def test_a_unit_is_one_chunk_of_small_embeddings_and_a_shard_of_large_ones() -> None:
    """Each Zarr chunk costs a fixed encode: small embeddings go a unit to a chunk; a
    DINOv2-L projection at K = 100 (308 KB a volume) stays readable a few volumes at a time."""
    assert inner_chunk(100, 2_560) == 100  # 256 KB: the whole unit
    assert inner_chunk(100, 3 * 100 * 257 * 4) == 2  # 2 x 308 KB: 3 do not divide 100
    assert inner_chunk(100, 2**21) == 1  # a volume over 1 MiB is a chunk alone
    assert inner_chunk(3, 400_000) == 1 and inner_chunk(48, 100_000) == 8
    small = _lazy((400, 1, 4, 5), ("id", "plane", "k", "token"), 100)
    large = _lazy((400, 3, 100, 257), ("id", "plane", "k", "token"), 100)
    assert small.encoding == {"chunks": (100, 1, 4, 5)}
    assert large.encoding == {"chunks": (2, 3, 100, 257), "shards": (100, 3, 100, 257)}


def test_a_store_of_units_equals_the_kernel_and_resumes_by_unit(
        client: Client, volumes: Path, tmp_path: Path,
        tiny_vit_weights: tuple[str, Path]) -> None:
    name, weights = tiny_vit_weights
    output = tmp_path / "e.zarr"
    summary = embed(volumes, output, [PROJECTOR], encoder=name, weights=weights,
                    settings=SETTINGS, cluster=client, progress=False)
    assert summary.ok == 48 and store_unit(output) == 3
    files = [p for p in (output / "p4").rglob("*") if p.is_file() and p.name != "zarr.json"]
    assert len(files) == 16  # one file per unit of 3 volumes
    block = open_volumes(volumes)["volume"].values
    reference = embed_block(block, create_encoder(name, weights=weights, device="cpu"), [PROJECTOR],
                            SETTINGS).projections["p4"]
    np.testing.assert_allclose(open_embeddings(output)["p4"].values, reference,
                               rtol=1e-5, atol=1e-6)
    # volume 4 failed in the kernel (its source is fine): a rerun retries it alone and
    # writes its unit (3, 4, 5) whole, keeping 3 and 5 as they were
    ds = open_embeddings(output)
    data = {name: xr.DataArray(ds[name][3:6].values, dims=ds[name].dims)
            for name in ("p4", "avgpool")}
    data["p4"][1] = np.nan
    stores.write_units(output, data, slice(3, 6), np.array([1, 2, 1]),
                       ["", "RuntimeError: stand-in", ""])
    again = embed(volumes, output, [PROJECTOR], encoder=name, weights=weights,
                  settings=SETTINGS, cluster=client, progress=False)
    assert (again.ok, again.computed) == (48, 1)
    np.testing.assert_allclose(open_embeddings(output)["p4"].values, reference,
                               rtol=1e-5, atol=1e-6)


def test_a_range_must_hold_whole_units(client: Client, volumes: Path, tmp_path: Path,
                                       tiny_vit_weights: tuple[str, Path]) -> None:
    name, weights = tiny_vit_weights
    with pytest.raises(SettingsError, match="units of 3 volumes.*start=3, many=6"):
        embed(volumes, tmp_path / "e.zarr", [PROJECTOR], encoder=name, weights=weights,
              settings=SETTINGS, start=4, many=4, cluster=client,
              progress=False)
    part = embed(volumes, tmp_path / "e.zarr", [PROJECTOR], encoder=name, weights=weights,
                 settings=SETTINGS, start=3, many=6, cluster=client,
                 progress=False)
    assert (part.total, part.ok) == (6, 6)
    assert xr.open_zarr(tmp_path / "e.zarr", consolidated=False)["status"].values.sum() == 6
