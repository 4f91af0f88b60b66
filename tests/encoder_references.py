"""Independent implementations of each encoder family, tiny and with seeded random weights.

Each builder makes the reference model with the library users run it with
(``transformers``, ``segment_anything``, ``open_clip``), saves its weights the way users
hold them, and returns the file or folder, the raptorz encoder name and overrides that
describe the same architecture, and the reference's tokens as a function of the images.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from vit_fixtures import randomize_

TINY = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
        "intermediate_size": 256}


@dataclass
class Reference:
    """A saved reference model: where its weights are and what it computes."""

    name: str
    path: Path
    layout: str
    tokens: Callable[[torch.Tensor], torch.Tensor]
    overrides: dict[str, Any] = field(default_factory=dict)


def _eval(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    return randomize_(model, seed).eval().requires_grad_(False)


def dinov2_transformers(folder: Path, *, registers: bool = False, name: str = "",
                        img_size: int = 224) -> Reference:
    """transformers ``Dinov2Model`` (or with registers), saved with ``save_pretrained``."""
    from transformers import (
        Dinov2Config,
        Dinov2Model,
        Dinov2WithRegistersConfig,
        Dinov2WithRegistersModel,
    )

    if registers:
        model: Any = Dinov2WithRegistersModel(Dinov2WithRegistersConfig(
            **TINY, patch_size=14, image_size=img_size, num_register_tokens=4))
    else:
        model = Dinov2Model(Dinov2Config(**TINY, patch_size=14, image_size=img_size))
    _eval(model, 10).save_pretrained(folder)
    default = "raptorz_tiny_dinov2_reg" if registers else "raptorz_tiny_dinov2"
    return Reference(name or default, folder, "transformers",
                     lambda x: model(pixel_values=x).last_hidden_state)


def dinov3_transformers(folder: Path, *, gated: bool = False) -> Reference:
    """transformers ``DINOv3ViTModel`` with zero query / value biases, as Meta's releases.

    ``gated``: the SwiGLU MLP of DINOv3 ViT-H+, tested as ``dinov3-h+`` cut to tiny size.
    """
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    mlp = {"use_gated_mlp": True, "hidden_act": "silu"} if gated else {}
    model: Any = _eval(DINOv3ViTModel(DINOv3ViTConfig(
        **TINY, patch_size=16, image_size=224, num_register_tokens=4, **mlp)), 11)
    with torch.no_grad():
        for key, value in model.named_parameters():
            if key.endswith(("q_proj.bias", "v_proj.bias")):
                value.zero_()
    model.save_pretrained(folder)
    return Reference("dinov3-h+" if gated else "raptorz_tiny_dinov3", folder, "transformers",
                     lambda x: model(pixel_values=x).last_hidden_state,
                     {"depth": 2, "embed_dim": 64, "num_heads": 2} if gated else {})


def clip_transformers(folder: Path, *, llava: bool = False) -> Reference:
    """transformers ``CLIPVisionModel`` (QuickGELU, as OpenAI's); LLaVA's penultimate layer."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    layers = 3 if llava else 2
    model: Any = _eval(CLIPVisionModel(CLIPVisionConfig(
        **{**TINY, "num_hidden_layers": layers}, patch_size=14, image_size=336 if llava else 224,
        hidden_act="quick_gelu", layer_norm_eps=1e-5)), 12)
    model.save_pretrained(folder)
    if llava:
        return Reference("raptorz_tiny_llava", folder, "transformers",
                         lambda x: model(pixel_values=x, output_hidden_states=True)
                         .hidden_states[-2])
    # transformers' last_hidden_state stops before post_layernorm, timm's tokens after it
    post_layernorm = getattr(model, "vision_model", model).post_layernorm
    return Reference("raptorz_tiny_clip", folder, "transformers",
                     lambda x: post_layernorm(model(pixel_values=x).last_hidden_state))


def clip_openai(folder: Path) -> Reference:
    """An open_clip CLIP (OpenAI's layout, ``visual.*``); its patch tokens after ``ln_post``."""
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    model: Any = _eval(CLIP(
        embed_dim=32, quick_gelu=True,
        vision_cfg=CLIPVisionCfg(layers=2, width=64, head_width=32, patch_size=14,
                                 image_size=224),
        text_cfg=CLIPTextCfg(context_length=8, vocab_size=50, width=32, heads=2, layers=1)), 13)
    path = folder / "open_clip_pytorch_model.bin"
    torch.save(model.state_dict(), path)
    model.visual.output_tokens = True
    # open_clip returns the pooled (CLS) token projected, so compare the patch tokens
    return Reference("raptorz_tiny_clip", path, "openai", lambda x: model.visual(x)[1])


def sam_segment_anything(path: Path, *, name: str = "raptorz_tiny_sam") -> Reference:
    """A whole ``segment_anything`` Sam (prompt encoder, mask decoder), as its checkpoints."""
    from segment_anything.modeling import (
        ImageEncoderViT,
        MaskDecoder,
        PromptEncoder,
        Sam,
        TwoWayTransformer,
    )

    encoder = ImageEncoderViT(
        img_size=64, patch_size=16, embed_dim=32, depth=2, num_heads=2, mlp_ratio=4,
        out_chans=16, qkv_bias=True, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
        use_rel_pos=True, window_size=2, global_attn_indexes=(1,))
    sam: Any = _eval(Sam(
        image_encoder=encoder,
        prompt_encoder=PromptEncoder(embed_dim=16, image_embedding_size=(4, 4),
                                     input_image_size=(64, 64), mask_in_chans=4),
        mask_decoder=MaskDecoder(transformer_dim=16, transformer=TwoWayTransformer(
            depth=1, embedding_dim=16, mlp_dim=32, num_heads=2), num_multimask_outputs=3,
            iou_head_depth=1, iou_head_hidden_dim=16)), 14)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(sam.state_dict(), path)
    overrides = {} if name == "raptorz_tiny_sam" else {
        "img_size": 64, "depth": 2, "embed_dim": 32, "num_heads": 2, "window_size": 2,
        "global_attn_indexes": (1,), "neck_chans": 16}
    return Reference(name, path, "segment_anything",
                     lambda x: sam.image_encoder(x).flatten(2).transpose(1, 2), overrides)


def biomedclip_open_clip(folder: Path) -> Reference:
    """An open_clip CLIP with a timm ViT/16 trunk, as BiomedCLIP is, saved like the hub's."""
    import timm
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    trunk_name = "raptorz_test_vit_tiny_patch16"
    if trunk_name not in timm.list_models():
        _register_tiny_trunk(trunk_name)
    model: Any = _eval(CLIP(
        embed_dim=32,
        vision_cfg=CLIPVisionCfg(timm_model_name=trunk_name, timm_pool="", timm_proj="linear",
                                 image_size=224),
        text_cfg=CLIPTextCfg(context_length=8, vocab_size=50, width=32, heads=2, layers=1)), 15)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "open_clip_pytorch_model.bin"
    torch.save(model.state_dict(), path)
    return Reference("raptorz_tiny_biomedclip", folder, "open_clip",
                     lambda x: model.visual.trunk.forward_features(x))


def _register_tiny_trunk(name: str) -> None:
    """A timm model ``name``: BiomedCLIP's ``vit_base_patch16_224`` cut to 2 blocks of 64."""
    from timm.models import register_model
    from timm.models.vision_transformer import _create_vision_transformer

    def tiny(pretrained: bool = False, **kwargs: Any) -> Any:
        return _create_vision_transformer("vit_base_patch16_224", pretrained=pretrained,
                                          **{"patch_size": 16, "embed_dim": 64, "depth": 2,
                                             "num_heads": 2, **kwargs})

    tiny.__name__ = name
    register_model(tiny)
