"""The shared resumable-store mechanics, on real Zarr v3 stores on disk."""

from __future__ import annotations

from pathlib import Path

import dask.array as da
import numpy as np
import pytest
import xarray as xr
import zarr

from raptorz import stores
from raptorz.errors import InputError


def _template(n: int, chunk: int) -> xr.Dataset:
    data = xr.DataArray(da.zeros((n, 3), chunks=(chunk, 3), dtype="f4"), dims=("id", "x"))
    return xr.Dataset(
        {"data": data, **stores.status_variables(n, chunk)},
        coords={"id": stores.as_strings(f"v{i}" for i in range(n))},
    )


def test_chunk_written_then_marked(tmp_path: Path) -> None:
    path = tmp_path / "s.zarr"
    stores.create_store(path, _template(5, 2), "test")
    assert stores.store_kind(path) == "test"
    assert stores.chunks_to_do(stores.read_status(path), 2) == [
        slice(0, 2), slice(2, 4), slice(4, 5)]
    block = xr.DataArray(np.arange(6, dtype="f4").reshape(2, 3), dims=("id", "x"))
    stores.write_units(path, {"data": block}, slice(2, 4), np.array([1, 2]), ["", "bad"])
    ds = stores.open_store(path, "test")
    np.testing.assert_array_equal(ds.data.values[2:4], block.values)
    assert list(ds.error.values) == ["", "", "", "bad", ""]
    assert list(ds.id.values) == ["v0", "v1", "v2", "v3", "v4"]
    status = stores.read_status(path)
    assert stores.status_counts(status) == {"pending": 3, "ok": 1, "failed": 1}
    # the failed volume keeps its chunk on the to-do list
    assert stores.chunks_to_do(status, 2) == [slice(0, 2), slice(2, 4), slice(4, 5)]
    assert stores.chunks_to_do(status, 2, within=slice(0, 1)) == [slice(0, 2)]


def test_existing_paths_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "s.zarr"
    stores.create_store(path, _template(2, 2), "volumes")
    with pytest.raises(InputError, match="holds a raptorz volumes store, not embeddings"):
        stores.require_kind(path, "embeddings")
    # a process that loses the race to create a store leaves the winner's intact
    assert not stores.create_store(path, _template(3, 1), "volumes")
    assert stores.open_store(path, "volumes").sizes["id"] == 2
    assert not list(tmp_path.glob(".*.tmp"))
    not_a_store = tmp_path / "notes.txt"
    not_a_store.write_text("hello")
    with pytest.raises(InputError, match="notes.txt"):
        stores.store_kind(not_a_store)


def test_a_store_opened_once_writes_units_and_finds_arrays_its_metadata_lacks(
        tmp_path: Path) -> None:
    path = tmp_path / "s.zarr"
    stores.create_store(path, _template(5, 2), "test")
    # an array added after the metadata was consolidated (as an older raptorz left it)
    zarr.open_group(path, mode="r+", use_consolidated=False).create_array(
        "extra", shape=(5,), chunks=(2,), dtype="i8", dimension_names=["id"])
    opened = stores.OpenStore(path)
    assert opened.attrs[stores.KIND_ATTR] == "test"
    assert "extra" not in opened.names() and "data" in opened and "nothing" not in opened
    assert opened.dims("extra") == ("id",)  # opened from its own metadata
    block = xr.DataArray(np.arange(6, dtype="f4").reshape(2, 3), dims=("id", "x"))
    stores.write_units(opened, {"data": block, "extra": xr.DataArray([7, 8], dims="id")},
                       slice(0, 2), np.array([1, 2]), ["", "bad"])
    ds = stores.open_dataset(path)
    np.testing.assert_array_equal(ds.data.values[:2], block.values)
    assert np.isnan(ds.data.values[2:]).all()  # the other units keep their fill value
    assert zarr.open_array(path / "extra")[:].tolist() == [7, 8, 0, 0, 0]
    assert list(ds.error.values) == ["", "bad", "", "", ""]
    assert stores.read_status(path).tolist() == [1, 2, 0, 0, 0]
    with pytest.raises(ValueError, match=r"data\[2:4\] is \('id', 'x'\) \(2, 3\), not "
                       r"\('id', 'y'\)"):
        stores.write_region(opened, {"data": block.rename(x="y")}, slice(2, 4))
    with pytest.raises(KeyError, match="nothing"):
        stores.write_region(path, {"nothing": xr.DataArray([1, 2], dims="id")}, slice(2, 4))
    # a name from a (hostile) store's attributes never leads out of the store
    zarr.create_array(tmp_path / "outside", shape=(5,), dtype="i8", fill_value=0,
                      dimension_names=("id",))
    for name in ("../outside", "a/../../outside", ".."):
        with pytest.raises(KeyError):
            stores.write_region(path, {name: xr.DataArray([1, 2], dims="id")}, slice(2, 4))
    assert zarr.open_array(tmp_path / "outside")[:].tolist() == [0] * 5
