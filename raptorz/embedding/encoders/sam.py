"""SAM and MedSAM image encoders: timm's ``VisionTransformerSAM``.

Their output is a feature map: the neck gives 256 channels on a 64 x 64 grid at 1024 px.
The tokens are the grid positions (row-major) and the width is the channels, as the
original Raptor tool uses them (256 x 4,096).

Layouts read: timm's, and the ``segment_anything`` checkpoint (``sam_vit_b_01ec64.pth``,
MedSAM's ``medsam_vit_b.pth``: ``image_encoder.*`` beside the prompt encoder and mask
decoder, which are dropped), converted by timm's own filter.

Inputs: SAM normalises on the 0-255 scale with its pixel mean and std, resizes the
longest side to 1024 and pads right and bottom with zeros after normalisation. MedSAM
resizes the image to 1024 x 1024 and feeds it in [0, 1] without normalisation.
"""

from __future__ import annotations

from functools import partial
from types import MappingProxyType

import torch

from raptorz.embedding.encoders._config import EncoderConfig, register_encoder, register_family
from raptorz.embedding.encoders._weights import timm_filter

FAMILY = "sam"
LAYOUTS = ("timm", "segment_anything")
SAM_MEAN = (123.675, 116.28, 103.53)
SAM_STD = (58.395, 57.12, 57.375)
#: segment_anything's blocks normalise with eps 1e-6; timm's SAM definition defaults to 1e-5,
#: a 6e-6 relative difference in the tokens.
_SAM_NORM = MappingProxyType({"norm_layer": partial(torch.nn.LayerNorm, eps=1e-6)})


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor],
                         model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], str]:
    """Any SAM layout -> timm's, and the name of the layout found."""
    layout = "segment_anything" if any(k.startswith("image_encoder.") for k in state_dict) \
        else "timm"
    return timm_filter(state_dict, model), layout


register_family(FAMILY, checkpoint_filter_fn)


def _register_sizes() -> None:
    """sam-{b,l,h}: Meta's three image encoders."""
    sizes = {"b": ("base", "sam_vit_b_01ec64.pth", 0.850),
             "l": ("large", "sam_vit_l_0b3195.pth", None),
             "h": ("huge", "sam_vit_h_4b8939.pth", None)}
    for short, (size, file, auroc) in sizes.items():
        register_encoder(EncoderConfig(
            name=f"sam-{short}", architecture=f"samvit_{size}_patch16.sa1b", family=FAMILY,
            description=f"Segment Anything ViT-{short.upper()} image encoder (Meta)",
            img_size=1024, mean=SAM_MEAN, std=SAM_STD, pixel_scale=255.0,
            resize="longest_side", output="feature_map", layouts=LAYOUTS,
            model_kwargs=_SAM_NORM,
            weights_from=f"{file} from github.com/facebookresearch/segment-anything, or "
            f"timm/samvit_{size}_patch16.sa1b",
            paper_auroc=auroc,
        ))


_register_sizes()

register_encoder(EncoderConfig(
    name="medsam", architecture="samvit_base_patch16", family=FAMILY,
    description="MedSAM: SAM ViT-B fine-tuned on medical images (Ma et al. 2024)",
    img_size=1024, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), output="feature_map",
    layouts=LAYOUTS, model_kwargs=_SAM_NORM,
    weights_from="medsam_vit_b.pth from github.com/bowang-lab/MedSAM (segment_anything layout)",
    paper_auroc=0.872,
))

_TINY = MappingProxyType({**_SAM_NORM, "depth": 2, "embed_dim": 32, "num_heads": 2,
                          "window_size": 2, "global_attn_indexes": (1,), "neck_chans": 16})
register_encoder(EncoderConfig(
    name="raptorz_tiny_sam", architecture="samvit_base_patch16", family=FAMILY,
    description="test model: SAM-style, 2 blocks, width 32, neck 16 on 4 x 4 at 64 px",
    img_size=64, mean=SAM_MEAN, std=SAM_STD, pixel_scale=255.0, resize="longest_side",
    output="feature_map", model_kwargs=_TINY, layouts=LAYOUTS, published=False,
))
