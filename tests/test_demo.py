"""``raptorz demo``'s data and options: its test split is large enough to score, its lesions
lie where the labels say, and a named encoder is accepted. The demo itself runs, scores
well above chance and reruns after the README's tour in ``test_readme.py``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from raptorz.cli.main import EXIT_REFUSED, main
from raptorz.demo import DEMO_COUNT, describe_encoder, make_demo_data
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
