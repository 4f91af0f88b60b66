"""BiomedCLIP's image tower: a ViT-B/16 (timm ``vit_base_patch16_224``) in an open_clip model.

Layouts read: timm's, and the open_clip checkpoint (``open_clip_pytorch_model.bin`` of
``microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224``: the tower under
``visual.trunk.*`` beside the text tower), converted by timm's own filter. Tokens are the
trunk's tokens after its final norm; the projection to the text space is not used.
"""

from __future__ import annotations

from types import MappingProxyType

import torch

from raptorz.embedding.encoders._config import (
    CLIP_MEAN,
    CLIP_STD,
    EncoderConfig,
    register_encoder,
    register_family,
)
from raptorz.embedding.encoders._weights import timm_filter

FAMILY = "open_clip"
LAYOUTS = ("timm", "open_clip")


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor],
                         model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], str]:
    """An open_clip checkpoint with a timm trunk -> timm's layout, and the layout found."""
    layout = "open_clip" if any(k.startswith("visual.trunk.") for k in state_dict) else "timm"
    expected = model.state_dict()
    filtered = timm_filter(state_dict, model)
    return {k: v for k, v in filtered.items()
            if not (k.startswith("head.") and k not in expected)}, layout


register_family(FAMILY, checkpoint_filter_fn)

register_encoder(EncoderConfig(
    name="biomedclip", architecture="vit_base_patch16_224", family=FAMILY,
    description="BiomedCLIP ViT-B/16 image tower (Microsoft, PMC-15M)",
    mean=CLIP_MEAN, std=CLIP_STD, layouts=LAYOUTS,
    hub_repos=("microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224",),
    weights_from="hf: microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224 "
    "(open_clip_pytorch_model.bin)",
))
register_encoder(EncoderConfig(
    name="raptorz_tiny_biomedclip", architecture="vit_base_patch16_224", family=FAMILY,
    description="test model: BiomedCLIP-style ViT/16, 2 blocks, width 64",
    mean=CLIP_MEAN, std=CLIP_STD,
    model_kwargs=MappingProxyType({"depth": 2, "embed_dim": 64, "num_heads": 2}),
    layouts=LAYOUTS, published=False,
))
