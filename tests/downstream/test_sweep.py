"""Sweeps from one ``--keep-tokens`` embed of AdrenalMNIST3D with a tiny random-weight ViT."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from raptorz.cli.main import main
from raptorz.downstream.fitting import FitSettings, fit
from raptorz.downstream.settings import HeadSettings
from raptorz.downstream.sweeps import SweepSettings, sweep
from raptorz.embedding.embeddings import (
    add_projections,
    project_stored_tokens,
    seeded_matrix,
)
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


def test_sweep_needs_stored_tokens(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from fit_fixtures import synthetic, write_embeddings, write_labels

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
])
def test_sweep_settings_refuse_bad_axes(kwargs: dict, message: str) -> None:
    from raptorz.errors import SettingsError

    with pytest.raises(SettingsError, match=message):
        SweepSettings(**kwargs)
