"""Every encoder family against an independent implementation on the same weights.

Random weights are drawn in the reference library, saved the way users hold them
(a transformers folder, a segment_anything checkpoint, an open_clip checkpoint), loaded
by :func:`create_encoder` through the same path as real weights, and both models encode
the same preprocessed images: the tokens agree to 1e-5 relative error at fp32.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from encoder_references import (
    Reference,
    biomedclip_open_clip,
    clip_openai,
    clip_transformers,
    dinov2_transformers,
    dinov3_transformers,
    sam_segment_anything,
)

from raptorz.embedding.encoders import create_encoder
from raptorz.embedding.preprocessing import prepare_images

pytest.importorskip("transformers", reason="the test extra installs transformers")

TOLERANCE = 1e-5

BUILDERS: dict[str, Callable[[Path], Reference]] = {
    "dinov2": lambda p: dinov2_transformers(p),
    "dinov2-reg": lambda p: dinov2_transformers(p, registers=True),
    # as facebook/dinov2-* ship: trained at 518 px, run at 224 (the position embedding
    # resampled as transformers and DINOv2 do it, bicubic without antialiasing)
    "dinov2-518": lambda p: dinov2_transformers(p, img_size=518),
    "dinov2-reg-518": lambda p: dinov2_transformers(p, registers=True, img_size=518),
    "rad-dino": lambda p: dinov2_transformers(p, name="rad-dino", img_size=518),
    "dinov3": dinov3_transformers,
    "dinov3-h+": lambda p: dinov3_transformers(p, gated=True),
    "clip": lambda p: clip_transformers(p),
    "clip-openai": clip_openai,
    "llava-med": lambda p: clip_transformers(p, llava=True),
    "sam": lambda p: sam_segment_anything(p / "sam_vit_tiny.pth"),
    "medsam": lambda p: sam_segment_anything(p / "medsam_vit_b.pth", name="medsam"),
    "biomedclip": biomedclip_open_clip,
}
#: Architecture overrides for named full-size encoders tested at tiny size.
_TINY_VIT = {"depth": 2, "embed_dim": 64, "num_heads": 2}


def relative_error(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    """Largest absolute difference over the largest magnitude."""
    return float((ours - theirs).abs().max() / theirs.abs().max())


@pytest.mark.parametrize("family", list(BUILDERS))
def test_tokens_equal_the_reference_implementation(family: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    reference = BUILDERS[family](tmp_path)
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
    if family == "clip-openai":
        ours = ours[:, encoder.num_prefix_tokens:]
    assert ours.shape == theirs.shape
    assert ours.shape[1:] == (theirs.shape[1], encoder.embed_dim)
    assert relative_error(ours, theirs) < TOLERANCE
