"""``raptorz demo``: its task is solved well above chance, its test split is large enough
to score, a rerun after the README's tour works, and a named encoder is accepted."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from raptorz import add_projections, load_projector, make_projector
from raptorz.cli.main import EXIT_REFUSED, main
from raptorz.demo import DEMO_COUNT, describe_encoder, make_demo_data, run_demo
from raptorz.errors import InputError


def test_the_default_demo_data_tests_at_least_16_volumes(tmp_path: Path) -> None:
    labels = pd.read_csv(make_demo_data(tmp_path / "data"))
    assert len(labels) == DEMO_COUNT
    counts = labels.groupby("split")["label"].value_counts().unstack()
    assert counts.loc["test"].sum() >= 16
    assert (counts > 0).all().all()  # both labels in every split


def test_demo_data_is_seeded_and_its_lesions_are_left_in_label_1(tmp_path: Path) -> None:
    import nibabel as nib

    first = make_demo_data(tmp_path / "a", count=20)
    again = make_demo_data(tmp_path / "b", count=20)
    assert first.read_text() == again.read_text()
    labels = pd.read_csv(first)
    for name, label in zip(labels["id"], labels["label"], strict=True):
        image = nib.load(first.parent / f"{name}.nii.gz")
        assert nib.aff2axcodes(image.affine) == ("R", "A", "S")
        lesion = np.argwhere(np.asarray(image.dataobj) > 520)  # the organ is 400 +- noise
        middle = (image.shape[0] - 1) / 2
        assert len(lesion) > 20
        # the centres overlap near the midline by up to 0.05 of the half-width
        if label:
            assert lesion[:, 0].mean() < middle + 0.5
        else:
            assert lesion[:, 0].mean() > middle - 0.5


def test_a_named_encoder_is_described_and_an_unknown_one_refused(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]
                                                                ) -> None:
    info = describe_encoder("dinov2-s")
    assert (info.width, info.tokens) == (384, 257)
    assert info.config.description.startswith("DINOv2 ViT-S/14")
    with pytest.raises(InputError, match="'no-such-encoder' is neither a named encoder"):
        describe_encoder("no-such-encoder")
    workdir = tmp_path / "demo"
    assert main(["demo", "--workdir", str(workdir), "--encoder", "no-such-encoder"]) == \
        EXIT_REFUSED
    assert "raptorz demo: error: --encoder: 'no-such-encoder' is neither" in \
        capsys.readouterr().err
    assert not (workdir / "data").exists()  # refused before anything was made


@pytest.mark.slow
def test_demo_scores_well_above_chance_and_reruns_after_a_new_projector(
        tmp_path: Path, tiny_vit_weights: tuple[str, Path]) -> None:
    encoder, weights = tiny_vit_weights
    workdir = tmp_path / "raptorz-demo"
    lines: list[str] = []
    first = run_demo(workdir, encoder=encoder, weights=weights, workers=1, log=lines.append)
    auroc = first.metrics["mean"]["auroc"]
    chance = first.chance["mean"]["auroc"]["value"]
    assert first.metrics["n"] == {"train": 48, "val": 16, "test": 16}
    assert auroc["value"] >= 0.85 and auroc["low"] > 0.6
    assert auroc["value"] - chance >= 0.25
    assert any(line.startswith(f"score:       test AUROC {auroc['value']:.2f} [") and
               line.endswith(f"; on shuffled labels {chance:.2f}") for line in lines)
    assert any(line.startswith(f"encoder:     {encoder}: test model") for line in lines)

    # the README's tour adds a projector to the store; the demo still fits its own
    add_projections(first.embeddings, [load_projector(_projector(tmp_path, 64))])
    again = run_demo(workdir, encoder=encoder, weights=weights, workers=1, log=lines.append)
    assert again.metrics["feature"] == first.metrics["feature"] == first.projector.stem
    assert again.metrics["mean"] == first.metrics["mean"]
    assert again.chance["mean"] == first.chance["mean"]


def _projector(folder: Path, dim: int) -> Path:
    path = folder / "proj_k10.npy"
    np.save(path, make_projector(1, dim, 10))
    return path
