"""Tiny DINOv2-style ViTs with seeded random weights, saved to files by the tests.

No pretrained weights can be downloaded in CI, so every test that needs an encoder uses
:data:`TINY_ENCODER` (2 blocks, width 64, patch 14: 1 + 16 x 16 tokens at 224 px) with
weights drawn here and loaded through the real ``weights=FILE`` path.
"""

from __future__ import annotations

from pathlib import Path

import timm
import torch
from safetensors.torch import save_file

from raptorz.embedding.encoders import SMALL_ENCODERS

#: The tiny test encoder's name (understood by ``raptorz.create_encoder``).
TINY_ENCODER = "raptorz_tiny_dinov2"


def tiny_vit_state_dict(seed: int = 0, img_size: int = 224) -> dict[str, torch.Tensor]:
    """Random weights of :data:`TINY_ENCODER` in timm's layout, seeded.

    timm's own init leaves DINOv2's layer scales at 1e-5 (blocks almost the identity);
    these weights make every block matter, so tests can tell inputs apart.
    """
    architecture, kwargs = SMALL_ENCODERS[TINY_ENCODER]
    model = timm.create_model(architecture, pretrained=False, img_size=img_size,
                              num_classes=0, **kwargs)
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for key, value in model.state_dict().items():
        noise = torch.randn(value.shape, generator=generator)
        if key.endswith(".gamma"):
            out[key] = 0.5 + 0.1 * noise
        elif "norm" in key and key.endswith(".weight"):
            out[key] = 1.0 + 0.1 * noise
        elif value.ndim <= 1:
            out[key] = 0.1 * noise
        else:
            fan_in = value[0].numel() if value.ndim > 1 else 1
            out[key] = noise / fan_in**0.5 if key.endswith(".weight") else 0.5 * noise
    return out


def write_tiny_vit(path: Path, seed: int = 0) -> Path:
    """Save :func:`tiny_vit_state_dict` as safetensors at ``path`` and return it."""
    save_file({k: v.contiguous() for k, v in tiny_vit_state_dict(seed).items()}, str(path))
    return path


def randomize_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Give every parameter of ``module`` seeded random values in place, and return it.

    Weights ~ N(0, 1 / fan_in), norm scales near 1, layer scales near 0.5, biases and
    tokens of a few tenths: every block matters and outputs stay O(1). Works on any
    implementation (timm, transformers, segment_anything, open_clip), so a test can
    draw an independent model's weights and load them into raptorz's.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, value in module.named_parameters():
            noise = torch.randn(value.shape, generator=generator, dtype=torch.float64)
            last = key.rsplit(".", 1)[-1]
            if last in ("gamma", "lambda1", "gamma_1", "gamma_2") or "layer_scale" in key \
                    or key.endswith((".ls1.gamma", ".ls2.gamma")):
                new = 0.5 + 0.1 * noise
            elif ("norm" in key or "ln" in key) and last == "weight":
                new = 1.0 + 0.1 * noise
            elif value.ndim <= 1 or last == "bias":
                new = 0.1 * noise
            elif last == "weight" or value.ndim == 2 and "rel_pos" not in key:
                new = noise / value[0].numel() ** 0.5
            else:  # tokens, position embeddings, relative positions
                new = 0.5 * noise
            value.copy_(new.to(value.dtype))
    return module
