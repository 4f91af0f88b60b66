"""Sweeps from one ``--keep-tokens`` embed of AdrenalMNIST3D with a tiny random-weight ViT."""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import xarray as xr

from raptorz.cli.main import main
from raptorz.downstream.fitting import FitSettings, fit
from raptorz.downstream.settings import HeadSettings
from raptorz.downstream.sweeps import SweepSettings, sweep, write_sweep
from raptorz.embedding.embeddings import add_projections, project_stored_tokens, seeded_matrix
from raptorz.embedding.projection import create_projector
from raptorz.errors import InputError
from raptorz.layouts import open_embeddings

#: A subset of the official splits (CPU time): enough to tell K = 1 from K = 100.
SUBSET = {"train": 60, "val": 30, "test": 60}


def _embed(volumes: Path, output: Path, vit: tuple[str, Path], projectors: list[Path],
           *extra: str) -> None:
    name, weights = vit
    argv = ["embed", str(volumes), "-o", str(output), "--encoder", name, "--weights",
            str(weights), "--workers", "1", "--dashboard-address", ":0", "--subsample", "2"]
    for projector in projectors:
        argv += ["--projector", str(projector)]
    assert main([*argv, *extra]) == 0


@pytest.fixture(scope="module")
def adrenal(shared_data: Path, tmp_path_factory: pytest.TempPathFactory,
            tiny_vit_weights: tuple[str, Path]) -> dict:
    """volumes.zarr, one embed with --keep-tokens and projector seed 1 K 10, its labels."""
    folder = tmp_path_factory.mktemp("sweep")
    manifest = folder / "manifest.txt"
    manifest.write_text("".join(f"{split}_{i}\n" for split, n in SUBSET.items()
                                for i in range(n)))
    volumes = folder / "adrenal.zarr"
    assert main(["convert", "--folder", str(shared_data / "medmnist" / "adrenalmnist3d.npz"),
                 "--manifest", str(manifest), "-o", str(volumes), "--workers", "1"]) == 0
    projector = folder / "seed1_k10.npy"
    assert main(["projector", "--seed", "1", "--dim", "64", "--k", "10", "-o",
                 str(projector)]) == 0
    store = folder / "tokens.zarr"
    _embed(volumes, store, tiny_vit_weights, [projector], "--keep-tokens")
    return {"folder": folder, "volumes": volumes, "store": store, "projector": projector,
            "labels": folder / "adrenal.labels.csv"}


#: A quick linear head for the many fits of a sweep (one penalty, few iterations).
QUICK = ["--penalties", "0.1", "--max-iter", "30"]


@pytest.mark.slow
@pytest.mark.requires_data
def test_sweep_k_and_seeds(adrenal: dict, tmp_path: Path,
                           capsys: pytest.CaptureFixture[str]) -> None:
    """Table 6: K in {1, 10, 100} x 3 seeds, mean and std across seeds."""
    out = tmp_path / "k"
    assert main(["sweep", str(adrenal["store"]), "--labels", str(adrenal["labels"]),
                 "-o", str(out), "--k", "1,10,100", "--seeds", "0,1,2", *QUICK]) == 0
    printed = capsys.readouterr().out
    assert "| k | planes | train_size | metric | seeds | score |" in printed
    runs = pd.read_csv(out / "runs.csv", dtype={"planes": str})
    assert len(runs) == 3 * 3 and set(runs["planes"]) == {"ACS"}
    assert runs["score"].between(0, 1).all()
    summary = pd.read_csv(out / "summary.csv").set_index("k")
    assert (summary["seeds"] == 3).all()
    expected = runs.groupby("k")["score"]
    np.testing.assert_allclose(summary["mean"], expected.mean().loc[summary.index], atol=1e-12)
    np.testing.assert_allclose(summary["std"], expected.std(ddof=1).loc[summary.index],
                               atol=1e-12)
    assert (out / "score_vs_k.png").stat().st_size > 1000
    # seeds differ in their projector, so K = 1 scores differ across seeds
    assert runs[runs["k"] == 1]["score"].nunique() > 1
    print("\n" + (out / "summary.md").read_text())


@pytest.mark.slow
@pytest.mark.requires_data
def test_sweep_plane_subsets(adrenal: dict, tmp_path: Path) -> None:
    """Table 7: the 7 plane subsets x 3 seeds, from the same stored tokens."""
    out = tmp_path / "planes"
    assert main(["sweep", str(adrenal["store"]), "--labels", str(adrenal["labels"]),
                 "-o", str(out), "--k", "10", "--seeds", "0,1,2", "--planes", "all",
                 *QUICK]) == 0
    runs = pd.read_csv(out / "runs.csv", dtype={"planes": str})
    assert len(runs) == 7 * 3
    assert list(dict.fromkeys(runs["planes"])) == ["A", "C", "S", "AC", "CS", "AS", "ACS"]
    summary = pd.read_csv(out / "summary.csv", dtype={"planes": str})
    assert len(summary) == 7 and (summary["seeds"] == 3).all()
    print("\n" + (out / "summary.md").read_text())


@pytest.mark.slow
@pytest.mark.requires_data
def test_sweep_projections_equal_a_fresh_embed(adrenal: dict, tiny_vit_weights: tuple[str, Path],
                                               tmp_path: Path) -> None:
    """The sweep's K=10 seed=1 projections are those of a fresh embed with that projector."""
    fresh = tmp_path / "fresh.zarr"
    _embed(adrenal["volumes"], fresh, tiny_vit_weights, [adrenal["projector"]],
           "--start", "0", "--many", "9")  # a whole unit: 150 volumes, 9 a unit
    name = adrenal["projector"].stem
    positions = np.arange(9)
    swept = project_stored_tokens(adrenal["store"], seeded_matrix(1, 64, 10), positions)
    embedded = open_embeddings(fresh)[name].isel(id=positions).values
    np.testing.assert_allclose(swept, embedded, rtol=1e-6, atol=1e-6)
    # and the sweep's score for that projector is the fit of that projection as a store
    # variable. Made from the stored tokens (add_projections), as the sweep makes it: the
    # embed's own variable projects the float64 pooled tokens, not their float32 copy, so
    # it differs by float32 rounding (1e-7 relative), and with 30 val volumes that is
    # enough to flip a near tie in the AUROC.
    store = tmp_path / "tokens.zarr"
    shutil.copytree(adrenal["store"], store)
    assert add_projections(store, [create_projector(1, 64, 10, name="again")]) == ["again"]
    ds = open_embeddings(store)
    np.testing.assert_allclose(ds["again"].values, ds[name].values, rtol=1e-6, atol=1e-6)
    head = FitSettings(bootstrap=0, head=HeadSettings(penalties=(0.01,)))
    table = sweep(store, adrenal["labels"], tmp_path / "one",
                  SweepSettings(ks=(10,), seeds=(1,), planes=("ACS",), fit=head))
    fitted = fit(store, adrenal["labels"], tmp_path / "fit",
                 dataclasses.replace(head, projector="again")).metrics["mean"]["auroc"]["value"]
    assert table["score"].iloc[0] == fitted


@pytest.mark.slow
@pytest.mark.requires_data
def test_few_shot_sizes(adrenal: dict, tmp_path: Path) -> None:
    quick = FitSettings(bootstrap=0, head=HeadSettings(penalties=(0.1,), max_iter=30))
    table = sweep(adrenal["store"], adrenal["labels"], tmp_path / "few",
                  SweepSettings(ks=(10,), seeds=(0, 1), planes=("ACS",),
                                train_sizes=(10, 30, None), fit=quick))
    assert sorted(set(table["train_size"])) == [10, 30, SUBSET["train"]]
    assert len(table) == 2 * 3


def test_sweep_needs_stored_tokens(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        synthetic: Callable[..., tuple[np.ndarray, list[str], np.ndarray]],
        write_embeddings: Callable[..., Path], write_labels: Callable[..., Path]) -> None:
    features, ids, split = synthetic(20, (1, 2, 3))
    store = write_embeddings(tmp_path / "e.zarr", features, ids)
    labels = write_labels(tmp_path / "l.csv", ids, split, {"y": np.arange(20.0)})
    with pytest.raises(InputError, match=r"e.zarr: holds no stored tokens.*--keep-tokens"):
        sweep(store, labels, tmp_path / "out", SweepSettings(ks=(1,), seeds=(0,)))
    assert main(["sweep", str(store), "--labels", str(labels), "-o", str(tmp_path / "o")]) == 2
    assert "embed with --keep-tokens" in capsys.readouterr().err
    with pytest.raises(InputError, match="--keep-tokens"):
        project_stored_tokens(store, seeded_matrix(0, 3, 2), np.arange(3))


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"ks": (0,)}, "K must be at least 1"), ({"planes": ("AX",)}, "plane subsets"),
    ({"train_sizes": (1,)}, "train sizes"),
    ({"ks": (1, 5, 1)}, "K must not repeat a value"),
    ({"seeds": (0, 0)}, "seeds must not repeat a value"),
    ({"planes": ("A", "A")}, "plane subsets must not repeat a value"),
    ({"train_sizes": (4, None, None)}, "train sizes must not repeat a value"),
])
def test_sweep_settings_refuse_bad_axes(kwargs: dict, message: str) -> None:
    from raptorz.errors import SettingsError

    with pytest.raises(SettingsError, match=message):
        SweepSettings(**kwargs)


def _token_store(path: Path, n: int = 20, dim: int = 8, tokens: int = 4) -> tuple[Path, list[str]]:
    """A small embeddings store with pooled tokens, laid out as ``embed --keep-tokens``."""
    from raptorz import stores
    from raptorz.embedding.embeddings import embeddings_template, token_kind_coordinate

    ids = [f"v{i}" for i in range(n)]
    projector = create_projector(0, dim, 2, name="seed0_k2")
    template = embeddings_template(ids, plane_names="ACS", projectors=(projector,),
                                   token_kind=token_kind_coordinate(tokens, 0), embed_dim=dim,
                                   keep_tokens=True, attrs={}, unit=n)
    stores.create_store(path, template, "embeddings")
    pooled = np.random.default_rng(0).normal(size=(n, 3, tokens, dim)).astype(np.float32)
    projected = np.einsum("nptd,dk->npkt", pooled.astype(np.float64), projector.matrix)
    data = {"tokens": xr.DataArray(pooled, dims=("id", "plane", "token", "dim")),
            projector.name: xr.DataArray(projected.astype(np.float32),
                                         dims=("id", "plane", "k_seed0_k2", "token")),
            "avgpool": xr.DataArray(pooled.mean(axis=(1, 2)), dims=("id", "dim"))}
    stores.write_units(path, data, slice(0, n), np.full(n, stores.OK, np.int8), [""] * n)
    return path, ids


@pytest.fixture(scope="module")
def small_tokens(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """20 volumes with stored tokens: 8 train, 6 val, 6 test, a regression target."""
    folder = tmp_path_factory.mktemp("tokens")
    store, ids = _token_store(folder / "tokens.zarr")
    split = np.array(["train"] * 8 + ["val"] * 6 + ["test"] * 6)
    tokens = open_embeddings(store)["tokens"].values
    target = tokens[:, 0, 0, 0] + 0.1 * np.random.default_rng(1).normal(size=len(ids))
    labels = folder / "labels.csv"
    pd.DataFrame({"id": ids, "split": split, "y": target}).to_csv(labels, index=False)
    return {"store": store, "labels": labels}


def test_train_sizes_not_below_the_train_split_are_refused(
        small_tokens: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """8 train volumes: sizes 8 and 10 would fit all of them, repeating the ``all`` runs."""
    for size in (8, 10):
        with pytest.raises(InputError, match=rf"labels.csv: train size\(s\) {size} not below "
                           r"the 8 train volumes found in .*tokens.zarr"):
            sweep(small_tokens["store"], small_tokens["labels"], tmp_path / "out",
                  SweepSettings(ks=(2,), seeds=(0, 1), train_sizes=(4, size, None)))
    assert not (tmp_path / "out").exists()  # refused before any fit
    assert main(["sweep", str(small_tokens["store"]), "--labels", str(small_tokens["labels"]),
                 "-o", str(tmp_path / "cli"), "--k", "2", "--seeds", "0,1",
                 "--train-sizes", "10"]) == 2
    assert "train size(s) 10 not below the 8 train volumes" in capsys.readouterr().err


def test_few_shot_summary_counts_each_run_once(small_tokens: dict, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "few"
    assert main(["sweep", str(small_tokens["store"]), "--labels", str(small_tokens["labels"]),
                 "-o", str(out), "--k", "2", "--seeds", "0,1", "--train-sizes", "4,all",
                 "--penalties", "1", "--max-iter", "20"]) == 0
    assert "| 2 | ACS | 4 | pearson_r2 | 2 |" in capsys.readouterr().out
    runs = pd.read_csv(out / "runs.csv", dtype={"planes": str})
    assert len(runs) == 2 * 2
    assert not runs.duplicated(["k", "seed", "planes", "train_size"]).any()
    summary = pd.read_csv(out / "summary.csv", dtype={"planes": str})
    assert list(summary["train_size"]) == [4, 8]
    assert list(summary["seeds"]) == [2, 2]


def test_sweep_plot_leaves_the_backend_and_pyplot_alone(tmp_path: Path) -> None:
    import matplotlib
    import matplotlib.pyplot as plt

    runs = pd.DataFrame({"k": [1, 1, 10, 10], "seed": [0, 1, 0, 1], "planes": "ACS",
                         "train_size": 8, "metric": "auroc", "score": [0.6, 0.7, 0.8, 0.9]})
    before = matplotlib.rcParams["backend"]
    matplotlib.use("pdf")  # a user's backend, not Agg
    try:
        write_sweep(runs, tmp_path)
        assert matplotlib.get_backend() == "pdf"
    finally:
        matplotlib.use(before)
    assert plt.get_fignums() == []
    assert (tmp_path / "score_vs_k.png").read_bytes()[:4] == b"\x89PNG"
