"""Two commands on one store: metadata steps take the store's lock (naming its holder to
the one that waits); a status chunk that cannot be read is an error, not a torn chunk."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from raptorz import stores
from raptorz.embedding.embeddings import (
    create_embeddings,
    embeddings_template,
    token_kind_coordinate,
)
from raptorz.embedding.projection import create_projector
from raptorz.errors import InputError, RaptorzWarning
from raptorz.layouts import open_embeddings

DIM = 16


def _token_store(path: Path, n: int = 64, unit: int = 8) -> Path:
    """An embeddings store with pooled tokens and one projector, every volume ok."""
    rng = np.random.default_rng(0)
    projector = create_projector(0, DIM, 2, "p0")
    template = embeddings_template(
        [f"v{i}" for i in range(n)], plane_names=["A", "C"], projectors=[projector],
        token_kind=token_kind_coordinate(17, 1), embed_dim=DIM, keep_tokens=True,
        attrs={"projectors": {"p0": projector.provenance()}}, unit=unit)
    create_embeddings(path, template)
    for region in stores.chunk_slices(n, unit):
        size = region.stop - region.start
        tokens = rng.normal(size=(size, 2, 17, DIM)).astype(np.float32)
        stores.write_units(path, {"tokens": xr.DataArray(tokens, dims=template.tokens.dims)},
                           region, np.full(size, stores.OK), [""] * size)
    return path


def test_a_status_chunk_that_cannot_be_read_fails_naming_the_store(tmp_path: Path) -> None:
    store = _token_store(tmp_path / "e.zarr")
    chunk = store / "status" / "c" / "1"
    chunk.unlink()
    chunk.symlink_to(chunk.name)  # a link to itself: opening it fails (ELOOP), as EIO would
    with pytest.raises(InputError, match=rf"{store}.*status.*cannot be read"):
        stores.read_status(store)


def test_two_reprojects_at_once_both_end_up_listed(tmp_path: Path) -> None:
    store = _token_store(tmp_path / "e.zarr", n=1024, unit=64)
    files = []
    for seed in (1, 2):
        files.append(tmp_path / f"q{seed}.npy")
        np.save(files[-1], create_projector(seed, DIM, 3, f"q{seed}").matrix)
    runs = [subprocess.Popen([sys.executable, "-m", "raptorz.cli.main", "reproject", str(store),
                              "--projector", str(file)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for file in files]
    outputs = [run.communicate(timeout=300) for run in runs]
    assert [run.returncode for run in runs] == [0, 0], outputs
    ds = open_embeddings(store)
    assert sorted(ds.attrs["projectors"]) == ["p0", "q1", "q2"]
    for name in ("q1", "q2"):
        assert not np.isnan(ds[name].values).any()
    assert stores.consolidated_metadata_true(store)


def test_a_held_lock_names_its_holder_to_the_one_that_waits(tmp_path: Path) -> None:
    store = _token_store(tmp_path / "e.zarr")
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom raptorz import stores\n"
         "with stores.store_lock(sys.argv[1], 'holding it'):\n"
         "    print('held', flush=True)\n    time.sleep(60)\n", str(store)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        began = time.monotonic()
        with pytest.warns(RaptorzWarning, match=rf"{store}: waiting.*pid {holder.pid}"), \
                pytest.raises(InputError, match=rf"{store}.*locked by "
                              rf"{socket.gethostname()} pid {holder.pid} \(holding it, since"), \
                stores.store_lock(store, "test", timeout=0.5):
            pass
        assert time.monotonic() - began < 30
    finally:
        holder.kill()
        holder.communicate()
    with stores.store_lock(store, "test", timeout=5):  # a dead holder holds nothing
        assert os.path.exists(store / "status")
