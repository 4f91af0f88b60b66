"""Every encoder family against an independent implementation on the same weights.

Random weights are drawn in the reference library, saved the way users hold them
(a transformers folder, a segment_anything checkpoint, an open_clip checkpoint), loaded
by :func:`create_encoder` through the same path as real weights, and both models encode
the same preprocessed images: the tokens agree to 1e-5 relative error at fp32.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from raptorz.embedding.encoders import create_encoder
from raptorz.embedding.preprocessing import prepare_images

pytest.importorskip("transformers", reason="the test extra installs transformers")

TOLERANCE = 1e-5

#: Architecture overrides for named full-size encoders tested at tiny size.
_TINY_VIT = {"depth": 2, "embed_dim": 64, "num_heads": 2}


def relative_error(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    """Largest absolute difference over the largest magnitude."""
    return float((ours - theirs).abs().max() / theirs.abs().max())


def test_tokens_equal_the_reference_implementation(
        reference_family: str, tmp_path: Path,
        reference_builders: dict[str, Callable[[Path], Any]]) -> None:
    """Once per family of the ``reference_family`` fixture (every family with a reference)."""
    torch.manual_seed(0)
    reference = reference_builders[reference_family](tmp_path)
    overrides = reference.overrides or (_TINY_VIT if reference.name == "rad-dino" else {})
    encoder = create_encoder(reference.name, weights=reference.path, device="cpu",
                             precision="fp32", **overrides)
    assert encoder.layout == reference.layout
    slices = np.random.default_rng(1).random((2, 40, 52)).astype(np.float32)
    images = prepare_images(slices, img_size=encoder.img_size, mean=encoder.mean,
                            std=encoder.std, fit=encoder.resize)
    ours = encoder.forward(images)
    with torch.no_grad():
        theirs = reference.tokens(images).float()
    if reference_family == "clip-openai":
        ours = ours[:, encoder.num_prefix_tokens:]
    assert ours.shape == theirs.shape
    assert ours.shape[1:] == (theirs.shape[1], encoder.embed_dim)
    assert relative_error(ours, theirs) < TOLERANCE
