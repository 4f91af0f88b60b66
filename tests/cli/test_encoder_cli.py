"""``raptorz encoders``, and a 4-volume store embedded and fitted with every encoder family.

Each family's tiny model gets seeded random weights saved in the layout users hold
(a transformers folder, a segment_anything checkpoint, an open_clip checkpoint) and runs
through the CLI on a real LocalCluster (shared by address), then ``raptorz fit``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from distributed import Client

from raptorz.cli.main import main
from raptorz.cluster import create_cluster
from raptorz.ingest.volumes import convert
from raptorz.layouts import open_embeddings

pytest.importorskip("transformers", reason="the test extra installs transformers")

#: The families run end to end (keys of the ``reference_builders`` fixture).
FAMILIES = ["dinov2", "dinov2-reg", "dinov3", "clip", "llava-med", "sam", "biomedclip"]


@pytest.fixture(scope="module")
def volumes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 random 12 x 16 x 10 volumes (uint8, MedMNIST-style), converted.

    Four, not three: ``fit`` needs two train rows with different targets, a val and a
    test row.
    """
    folder = tmp_path_factory.mktemp("volumes")
    images = np.random.default_rng(0).integers(0, 256, (4, 12, 16, 10), dtype=np.uint8)
    np.savez(folder / "m.npz", train_images=images, train_labels=np.zeros((4, 1), np.uint8))
    store = folder / "volumes.zarr"
    convert([folder / "m.npz"], store, workers=1)
    return store


@pytest.fixture(scope="module")
def address() -> Iterator[str]:
    """One real LocalCluster (1 worker process) that every CLI run connects to."""
    with create_cluster("local", workers=1, dashboard_address=":0") as cluster, \
            Client(cluster) as client:
        yield client.scheduler.address


def labels_for(store: Path, path: Path) -> Path:
    """A regression labels CSV over the store's 4 ids: 2 train, 1 val, 1 test."""
    ids = [f"train_{i}" for i in range(4)]
    pd.DataFrame({"id": ids, "split": ["train", "train", "val", "test"],
                  "target": [0.5, 1.5, 1.0, 2.0]}).to_csv(path, index=False)
    return path


def test_encoders_verb_lists_every_named_encoder(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["encoders", "--json"]) == 0
    rows = {row["name"]: row for row in json.loads(capsys.readouterr().out)}
    for name in ("dinov2-l", "dinov2-l-reg", "dinov3-l", "clip-l14", "clip-l14-336",
                 "llava-med", "sam-b", "medsam", "rad-dino", "biomedclip"):
        assert rows[name]["weights_from"] and rows[name]["layouts"]
    assert (rows["dinov2-l"]["width"], rows["dinov2-l"]["tokens"]) == (1024, 257)
    assert (rows["sam-b"]["width"], rows["sam-b"]["tokens"], rows["sam-b"]["img_size"]) == (
        256, 4096, 1024)
    assert rows["llava-med"]["img_size"] == 336 and rows["dinov3-l"]["prefix_tokens"] == 5
    assert {n: rows[n]["paper_auroc"] for n in ("sam-b", "clip-l14", "llava-med", "medsam",
                                                 "dinov2-l")} == {
        "sam-b": 0.850, "clip-l14": 0.870, "llava-med": 0.869, "medsam": 0.872,
        "dinov2-l": 0.907}
    assert "raptorz_tiny_sam" not in rows
    assert main(["encoders"]) == 0
    table = capsys.readouterr().out
    assert "4096 grid" in table and "261 (cls+4reg)" in table and "medsam_vit_b.pth" in table


@pytest.mark.slow
def test_weights_error_is_printed_once(volumes: Path, tmp_path: Path,
                                       write_tiny_vit: Callable[..., Path]) -> None:
    """A fresh process with its own cluster, so the workers' logs are captured too."""
    tiny = write_tiny_vit(tmp_path / "tiny.safetensors")  # 2 blocks for a 12-block model
    projector = tmp_path / "p.npy"
    assert main(["projector", "--seed", "0", "--dim", "384", "--k", "2", "-o",
                 str(projector)]) == 0
    result = subprocess.run(
        [sys.executable, "-m", "raptorz.cli.main", "embed", str(volumes), "-o",
         str(tmp_path / "e.zarr"), "--projector", str(projector), "--encoder", "dinov2-s",
         "--weights", str(tiny), "--workers", "1", "--dashboard-address", ":0"],
        capture_output=True, text=True, check=False)
    assert result.returncode == 2
    assert result.stderr.count("weights do not fit encoder 'dinov2-s'") == 1, result.stderr
    assert "2 blocks found, 12 expected" in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr) < 2000


def test_projector_of_another_width_is_refused_before_any_volume(
        volumes: Path, tmp_path: Path, address: str, capsys: pytest.CaptureFixture[str],
        sam_segment_anything: Callable[..., Any]) -> None:
    reference = sam_segment_anything(tmp_path / "sam.pth")  # width 16
    projector = tmp_path / "p.npy"
    assert main(["projector", "--seed", "0", "--dim", "64", "--k", "2", "-o",
                 str(projector)]) == 0
    output = tmp_path / "e.zarr"
    assert main(["embed", str(volumes), "-o", str(output), "--projector", str(projector),
                 "--encoder", reference.name, "--weights", str(reference.path),
                 "--cluster", address]) == 2
    assert "projector has d = 64 rows but encoder raptorz_tiny_sam gives tokens of width 16" \
        in capsys.readouterr().err
    assert not output.exists()


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_embeds_and_fits_through_the_cli(
        family: str, volumes: Path, tmp_path: Path, address: str,
        reference_builders: dict[str, Callable[[Path], Any]]) -> None:
    reference = reference_builders[family](tmp_path / "weights")
    projector = tmp_path / "p.npy"
    width = 16 if family == "sam" else 64
    assert main(["projector", "--seed", "0", "--dim", str(width), "--k", "3", "-o",
                 str(projector)]) == 0
    output = tmp_path / "e.zarr"
    assert main(["embed", str(volumes), "-o", str(output), "--projector", str(projector),
                 "--encoder", reference.name, "--weights", str(reference.path),
                 "--planes", "0,2", "--subsample", "3", "--batch-size", "8",
                 "--cluster", address]) == 0
    ds = open_embeddings(output)
    kinds = list(ds["token_kind"].values)
    assert ds.sizes["dim"] == width and len(kinds) == ds.sizes["token"]
    assert kinds[0] == ("patch" if family == "sam" else "cls")
    assert kinds.count("register") == (4 if family in ("dinov2-reg", "dinov3") else 0)
    encoder = ds.attrs["encoder"]
    assert encoder["encoder"] == reference.name and encoder["weights_layout"] == reference.layout
    assert np.isfinite(ds["p"].values).all()
    results = tmp_path / "results"
    assert main(["fit", str(output), "--labels", str(labels_for(volumes, tmp_path / "l.csv")),
                 "-o", str(results), "--bootstrap", "10"]) == 0
    assert (results / "metrics.json").is_file()
