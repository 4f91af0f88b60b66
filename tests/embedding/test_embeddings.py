"""The embeddings.zarr store: template, race-safe creation, identity, export, reprojection."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
import zarr

from raptorz import stores
from raptorz.cli.main import main
from raptorz.embedding.embeddings import (
    add_projections,
    check_identity,
    create_embeddings,
    embeddings_template,
    export_npy,
    projector_names,
    stored_projectors,
    token_kind_coordinate,
)
from raptorz.embedding.projection import Projector, create_projector, project_tokens
from raptorz.errors import InputError, RaptorzError
from raptorz.layouts import open_embeddings

IDS = ["sub-01", "sub-02", "sub-03", "sub-04"]
DIM, TOKENS = 8, 5  # 1 CLS + 4 patch tokens


def _template(projectors: list[Projector], planes: tuple[int, ...] = (0, 2),
              batch_size: int = 8):
    return embeddings_template(
        IDS, plane_names=["A", "S"], projectors=projectors,
        token_kind=token_kind_coordinate(TOKENS, 1), embed_dim=DIM, keep_tokens=True,
        attrs={"settings": {"planes": planes, "batch_size": batch_size},
               "encoder": {"weights_checksum": "abc", "device": "cpu"},
               "source": {"path": "volumes.zarr", "attrs": {"created": "today"}},
               "projectors": {p.name: p.provenance() for p in projectors}})


def _filled_store(path: Path, projectors: list[Projector], seed: int = 0) -> np.ndarray:
    """A store whose volumes 0, 1 and 3 are ok (tokens drawn at random), 2 failed."""
    assert create_embeddings(path, _template(projectors))
    tokens = np.random.default_rng(seed).normal(size=(len(IDS), 2, TOKENS, DIM))
    tokens = tokens.astype(np.float32)
    for i in range(len(IDS)):
        if i == 2:
            stores.write_units(path, {}, slice(i, i + 1), np.array([stores.FAILED]), ["bad"])
            continue
        one = tokens[i:i + 1]
        data = {name: (("id", "plane", f"k_{name}", "token"), value)
                for name, value in project_tokens(one, projectors).items()}
        data["tokens"] = (("id", "plane", "token", "dim"), one)
        data["avgpool"] = (("id", "dim"), one.mean(axis=(1, 2)))
        stores.write_units(path, {k: xr.DataArray(v[1], dims=v[0]) for k, v in data.items()},
                           slice(i, i + 1), np.array([stores.OK]), [""])
    return tokens


def test_template_layout(tmp_path: Path) -> None:
    p5, p3 = create_projector(0, DIM, 5, "p5"), create_projector(1, DIM, 3, "p3")
    _filled_store(tmp_path / "e.zarr", [p5, p3])
    ds = open_embeddings(tmp_path / "e.zarr")
    assert ds["p5"].dims == ("id", "plane", "k_p5", "token")
    assert ds["p3"].shape == (4, 2, 3, TOKENS)
    assert ds["tokens"].dims == ("id", "plane", "token", "dim")
    assert list(ds["token_kind"].values) == ["cls", "patch", "patch", "patch", "patch"]
    assert list(ds["plane"].values) == ["A", "S"]
    assert ds["p5"].encoding["chunks"][0] == 1  # one volume per chunk: disjoint writers
    assert projector_names(ds) == ["p5", "p3"]
    matrices = {p.name: p.matrix for p in stored_projectors(ds)}
    np.testing.assert_array_equal(matrices["p5"], p5.matrix)
    assert np.isnan(ds["p5"][2].values).all()  # never written: the fill value
    assert token_kind_coordinate(7, 3)[:4].tolist() == [
        "cls", "register", "register", "patch"]
    assert token_kind_coordinate(7, 3, tokens="patch").tolist() == ["patch"] * 4
    assert token_kind_coordinate(7, 3, tokens="cls").tolist() == ["cls"]
    assert token_kind_coordinate(16, 0).tolist() == ["patch"] * 16  # a feature map grid
    with pytest.raises(RaptorzError, match="no CLS token"):
        token_kind_coordinate(16, 0, tokens="cls")


def test_creation_is_race_safe(tmp_path: Path) -> None:
    path = tmp_path / "e.zarr"
    projectors = [create_projector(0, DIM, 5, "p5")]
    created: list[bool] = []
    barrier = threading.Barrier(4)

    def create() -> None:
        barrier.wait()
        created.append(create_embeddings(path, _template(projectors)))

    threads = [threading.Thread(target=create) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(created) == [False, False, False, True]
    assert not [p for p in tmp_path.iterdir() if p.name != "e.zarr"]  # scratch copies gone
    assert list(open_embeddings(path)["id"].values) == IDS


def test_identity_mismatch_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "e.zarr"
    p5 = create_projector(0, DIM, 5, "p5")
    create_embeddings(path, _template([p5]))
    assert not create_embeddings(path, _template([p5], batch_size=64))  # no other numbers
    with pytest.raises(InputError, match="settings: store"):
        create_embeddings(path, _template([p5], planes=(0, 1, 2)))
    with pytest.raises(InputError, match="another projector named 'p5'"):
        create_embeddings(path, _template([create_projector(9, DIM, 5, "p5")]))
    with pytest.raises(InputError, match="no projector 'q'"):
        check_identity(path, IDS, {}, [create_projector(0, DIM, 5, "q").provenance()], keys=())
    with pytest.raises(InputError, match="other volume ids"):
        check_identity(path, IDS[:3], {}, [], keys=())
    with pytest.raises(InputError, match="reserved"):
        _template([create_projector(0, DIM, 5, "tokens")])


def test_export_npy_original_layout(tmp_path: Path) -> None:
    path = tmp_path / "e.zarr"
    projectors = [create_projector(0, DIM, 5, "p5"), create_projector(1, DIM, 3, "p3")]
    tokens = _filled_store(path, projectors)
    assert main(["export", str(path), "--npy", str(tmp_path / "npy")]) == 0
    assert sorted(p.name for p in (tmp_path / "npy" / "p5").iterdir()) == [
        "sub-01.npy", "sub-02.npy", "sub-04.npy"]  # the failed volume has no file
    vector = np.load(tmp_path / "npy" / "p3" / "sub-04.npy")
    assert vector.dtype == np.float32 and vector.shape == (2 * 3 * TOKENS,)
    # the original's flat index ((plane * K) + k) * T + t, against a float64 reference
    reference = np.einsum("ptd,dk->pkt", tokens[3].astype(np.float64), projectors[1].matrix)
    plane, k, t = 1, 2, 3
    assert vector[(plane * 3 + k) * TOKENS + t] == pytest.approx(reference[plane, k, t],
                                                                 rel=1e-6)
    np.testing.assert_allclose(vector, reference.reshape(-1), rtol=1e-6, atol=1e-6)
    with pytest.raises(InputError, match="no projector 'nope'"):
        export_npy(path, tmp_path / "x", ["nope"])


def test_reproject_from_stored_tokens(tmp_path: Path) -> None:
    path = tmp_path / "e.zarr"
    tokens = _filled_store(path, [create_projector(0, DIM, 5, "p5")])
    new = create_projector(7, DIM, 4, "seed7")
    np.save(tmp_path / "seed7.npy", new.matrix)
    assert main(["reproject", str(path), "--projector", str(tmp_path / "seed7.npy")]) == 0
    ds = open_embeddings(path)
    assert projector_names(ds) == ["p5", "seed7"]
    assert ds["seed7"].dims == ("id", "plane", "k_seed7", "token")
    # float64 reference of R^T @ tokens^T per plane; rtol 1e-6 for the float32 store
    reference = np.einsum("bptd,dk->bpkt", tokens.astype(np.float64), new.matrix)
    ok = [0, 1, 3]
    np.testing.assert_allclose(ds["seed7"].values[ok], reference[ok], rtol=1e-6, atol=1e-6)
    assert np.isnan(ds["seed7"].values[2]).all()
    assert add_projections(path, [new]) == []  # already there: nothing to do
    with pytest.raises(InputError, match="another projector named 'seed7'"):
        add_projections(path, [create_projector(8, DIM, 4, "seed7")])


def test_reproject_needs_tokens(tmp_path: Path) -> None:
    path = tmp_path / "e.zarr"
    p5 = create_projector(0, DIM, 5, "p5")
    template = _template([p5]).drop_vars("tokens")
    create_embeddings(path, template)
    with pytest.raises(InputError, match="keep-tokens"):
        add_projections(path, [create_projector(1, DIM, 2, "q")])
    assert main(["reproject", str(path), "--projector", str(tmp_path / "missing.npy")]) == 2
    volumes = tmp_path / "v.zarr"
    zarr.open_group(volumes, mode="w", zarr_format=3).attrs[stores.KIND_ATTR] = "volumes"
    with pytest.raises(InputError, match="v.zarr: holds a raptorz volumes store, not"):
        add_projections(volumes, [create_projector(1, DIM, 2, "q")])


def test_export_refuses_ids_that_are_paths(tmp_path: Path) -> None:
    path = tmp_path / "e.zarr"
    template = _template([create_projector(0, DIM, 5, "p5")])
    template = template.assign_coords(id=stores.as_strings(["a", "../escape", "c", "d"]))
    create_embeddings(path, template)
    stores.write_units(path, {}, slice(1, 2), np.array([stores.OK]), [""])
    with pytest.raises(InputError, match="'../escape' cannot be a file name"):
        export_npy(path, tmp_path / "npy")
    assert not (tmp_path / "escape").exists()
