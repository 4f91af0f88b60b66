"""Every raptorz store opens in xarray without a warning, and reads as raptorz reads it.

Stores carry consolidated metadata from their creation, and every step that changes
metadata consolidates again; a store without it (an older raptorz) opens with a one-line
hint, and ``raptorz info --repair`` consolidates it.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import xarray as xr
import zarr

from raptorz import stores
from raptorz.cli.main import main
from raptorz.embedding.embeddings import add_projections
from raptorz.embedding.projection import create_projector
from raptorz.errors import RaptorzWarning


def _assert_opens_as_raptorz_reads(path: Path, kind: str) -> None:
    """No warning from xarray's two openers; the same Dataset as raptorz's reader and as
    the arrays' own (unconsolidated) metadata give."""
    assert stores.consolidated_metadata_true(path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ours = stores.open_store(path, kind).load()
        xr.testing.assert_identical(xr.open_zarr(path).load(), ours)
        xr.testing.assert_identical(xr.open_dataset(path, engine="zarr").load(), ours)
    xr.testing.assert_identical(xr.open_zarr(path, consolidated=False).load(), ours)


@pytest.mark.slow
def test_every_kind_of_store_opens_without_warning(tmp_path: Path,
                                                   tiny_vit_weights: tuple[str, Path],
                                                   monkeypatch: pytest.MonkeyPatch,
                                                   converted: Callable[[Path, int, int], Path],
                                                   embed_tiny: Callable[..., Any],
                                                   run_projectors: list[Any],
                                                   thread_client: Callable[[], Any]) -> None:
    volumes = converted(tmp_path, 4, chunk=1)
    _assert_opens_as_raptorz_reads(volumes, "volumes")
    full, resumed, killed = (tmp_path / f"{name}.zarr" for name in ("full", "resumed", "killed"))
    write_region = stores.write_region

    def dies_before_status(path: str, data: dict, region: slice) -> None:
        if "status" in data and region.start == 1:
            raise MemoryError("the worker died here")
        write_region(path, data, region)

    with thread_client() as client:
        assert embed_tiny(volumes, full, client, tiny_vit_weights).ok == 4
        _assert_opens_as_raptorz_reads(full, "embeddings")
        assert add_projections(full, [create_projector(7, 64, 2, "p2")]) == ["p2"]
        _assert_opens_as_raptorz_reads(full, "embeddings")  # after reproject
        assert embed_tiny(volumes, resumed, client, tiny_vit_weights, many=2).ok == 2
        assert embed_tiny(volumes, resumed, client, tiny_vit_weights).computed == 2
        _assert_opens_as_raptorz_reads(resumed, "embeddings")  # after a resumed run
        monkeypatch.setattr(stores, "write_region", dies_before_status)
        assert embed_tiny(volumes, killed, client, tiny_vit_weights).pending == 1
    _assert_opens_as_raptorz_reads(killed, "embeddings")  # after a run that lost a task
    ds = stores.open_store(full, "embeddings")
    assert {"p4", "p2", "matrix_p2"} <= set(ds.data_vars)
    assert set(ds.attrs["projectors"]) == {run_projectors[0].name, "p2"}


def test_store_without_consolidated_metadata_hints_and_is_repaired(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        converted: Callable[[Path, int, int], Path]) -> None:
    with monkeypatch.context() as patch:  # as raptorz 0.1 wrote stores
        patch.setattr(stores, "consolidate", lambda path: None)
        store = converted(tmp_path, 3, chunk=2)
    assert not stores.has_consolidated_metadata(store)
    with pytest.warns(RuntimeWarning, match="consolidated metadata"):
        xr.open_zarr(store)  # what users saw
    with pytest.warns(RaptorzWarning) as hint:
        stores.open_store(store, "volumes")
    message = str(hint[0].message)
    assert f"run `raptorz info --repair {store}`" in message and "\n" not in message
    assert main(["info", str(store)]) == 0
    assert f"metadata: not consolidated; run `raptorz info --repair {store}`" in \
        capsys.readouterr().out
    assert main(["info", "--repair", str(store)]) == 0
    out = capsys.readouterr().out
    assert f"{store}: metadata consolidated" in out and "metadata: consolidated" in out
    _assert_opens_as_raptorz_reads(store, "volumes")
    assert main(["info", "--repair", str(store)]) == 0
    assert "nothing to repair" in capsys.readouterr().out


def test_stale_consolidated_metadata_is_reported_and_repaired(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        converted: Callable[[Path, int, int], Path]) -> None:
    store = converted(tmp_path, 2, chunk=2)
    # a variable's attributes changed by hand, after the store was consolidated
    zarr.open_array(store / "volume", mode="r+").attrs["reviewed"] = "yes"
    assert stores.has_consolidated_metadata(store)
    assert not stores.consolidated_metadata_true(store)
    assert "reviewed" not in xr.open_zarr(store).volume.attrs  # what users would see
    assert main(["info", str(store)]) == 0
    assert "metadata: stale consolidated" in capsys.readouterr().out
    assert main(["info", "--repair", str(store)]) == 0
    _assert_opens_as_raptorz_reads(store, "volumes")
    assert stores.open_store(store, "volumes").volume.attrs["reviewed"] == "yes"
