"""CLIP ViT-L/14 (224 and 336 px) and LLaVA-Med's vision tower: timm's CLIP ``VisionTransformer``.

OpenAI's CLIP uses QuickGELU, so the timm definitions are the ``quickgelu`` ones.
Layouts read: timm's; OpenAI / open_clip state dicts (``visual.*``), which timm's own
filter converts; the Hugging Face transformers layout (``CLIPVisionModel`` or
``CLIPModel``: ``openai/clip-vit-large-patch14``, ``openai/clip-vit-large-patch14-336``),
converted here; and a LLaVA checkpoint's tower (``model.vision_tower.vision_tower.*``).

Tokens: ``clip-l14`` gives the last block's tokens after the final norm (``ln_post``
applied to every token, as timm and DINOv2 do). ``llava-med`` gives what LLaVA-Med feeds
its language model: the penultimate block's output (``mm_vision_select_layer = -2``),
without the final norm; its model has 23 of the tower's 24 blocks and the last block of
the weights is dropped on loading.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from types import MappingProxyType

import torch

from raptorz.embedding.encoders._config import (
    CLIP_MEAN,
    CLIP_STD,
    EncoderConfig,
    register_encoder,
    register_family,
)
from raptorz.embedding.encoders._weights import block_count, timm_filter

FAMILY = "clip"
LAYOUTS = ("timm", "openai", "transformers", "llava")

_GLOBAL = {
    "embeddings.patch_embedding.weight": "patch_embed.proj.weight",
    "pre_layrnorm.weight": "norm_pre.weight", "pre_layrnorm.bias": "norm_pre.bias",
    "post_layernorm.weight": "norm.weight", "post_layernorm.bias": "norm.bias",
}
_LAYER = {"layer_norm1": "norm1", "layer_norm2": "norm2", "self_attn.out_proj": "attn.proj",
          "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
_LAYER_KEY = re.compile(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)")
_QKV = re.compile(r"self_attn\.(q|k|v)_proj")
_LLAVA_PREFIX = "model.vision_tower.vision_tower."


def from_transformers_layout(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A transformers ``CLIPVisionModel`` / ``CLIPModel`` state dict in timm's layout.

    ``CLIPModel`` files name the tower ``vision_model.*`` beside the text tower; a
    ``CLIPVisionModel`` saved by transformers 5 has no prefix.
    """
    out: dict[str, torch.Tensor] = {}
    fused: dict[str, dict[str, torch.Tensor]] = {}
    prefixed = any(k.startswith("vision_model.") for k in state_dict)
    for key, value in state_dict.items():
        if prefixed and not key.startswith("vision_model."):
            continue  # the text tower and the projections
        key = key.removeprefix("vision_model.")
        if key == "embeddings.class_embedding":
            out["cls_token"] = value[None, None]
        elif key == "embeddings.position_embedding.weight":
            out["pos_embed"] = value[None]
        elif key in _GLOBAL:
            out[_GLOBAL[key]] = value
        elif (match := _LAYER_KEY.fullmatch(key)) is not None:
            layer, module, param = match.groups()
            if (qkv := _QKV.fullmatch(module)) is not None:
                fused.setdefault(f"blocks.{layer}.attn.qkv.{param}", {})[qkv[1]] = value
            elif module in _LAYER:
                out[f"blocks.{layer}.{_LAYER[module]}.{param}"] = value
    for key, parts in fused.items():
        out[key] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor],
                         model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], str]:
    """Any CLIP layout -> timm's, and the name of the layout found."""
    layout = "timm"
    if any(k.startswith(_LLAVA_PREFIX) for k in state_dict):
        state_dict = {k.removeprefix(_LLAVA_PREFIX): v for k, v in state_dict.items()
                      if k.startswith(_LLAVA_PREFIX)}
        layout = "llava"
    if any(k.startswith("vision_model.") or k == "embeddings.class_embedding"
           for k in state_dict):
        state_dict = from_transformers_layout(state_dict)
        layout = "transformers" if layout == "timm" else layout
    elif any(k.startswith(("visual.", "module.visual.")) for k in state_dict):
        layout = "openai"
    state_dict = timm_filter(state_dict, model)
    expected = model.state_dict()
    # the projection to the text space is not part of the image tokens
    state_dict = {k: v for k, v in state_dict.items()
                  if not (k.startswith("head.") and k not in expected)}
    return _penultimate(state_dict, expected), layout


def _penultimate(state_dict: dict[str, torch.Tensor],
                 expected: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the last block and the final norm of a full tower loaded into LLaVA's cut one.

    Only when the model has no final norm and exactly one block fewer than the weights:
    any other difference stays and is reported.
    """
    depth = block_count(expected)
    if "norm.weight" in expected or block_count(state_dict) != depth + 1:
        return state_dict
    last = f"blocks.{depth}."
    return {k: v for k, v in state_dict.items()
            if not k.startswith(last) and not k.startswith("norm.")}


register_family(FAMILY, checkpoint_filter_fn)

register_encoder(EncoderConfig(
    name="clip-l14", architecture="vit_large_patch14_clip_quickgelu_224.openai", family=FAMILY,
    description="CLIP ViT-L/14 at 224 px (OpenAI)", mean=CLIP_MEAN, std=CLIP_STD,
    layouts=LAYOUTS, hub_repos=("openai/clip-vit-large-patch14",),
    weights_from="hf: openai/clip-vit-large-patch14 or "
    "timm/vit_large_patch14_clip_quickgelu_224.openai",
    paper_auroc=0.870,
))
register_encoder(EncoderConfig(
    name="clip-l14-336", architecture="vit_large_patch14_clip_quickgelu_336.openai",
    family=FAMILY, description="CLIP ViT-L/14 at 336 px (OpenAI)", img_size=336,
    mean=CLIP_MEAN, std=CLIP_STD, layouts=LAYOUTS,
    hub_repos=("openai/clip-vit-large-patch14-336",),
    weights_from="hf: openai/clip-vit-large-patch14-336 or "
    "timm/vit_large_patch14_clip_quickgelu_336.openai",
))
register_encoder(EncoderConfig(
    name="llava-med", architecture="vit_large_patch14_clip_quickgelu_336", family=FAMILY,
    description="LLaVA-Med v1.5's vision tower: CLIP ViT-L/14-336, penultimate layer",
    img_size=336, mean=CLIP_MEAN, std=CLIP_STD, layouts=LAYOUTS,
    model_kwargs=MappingProxyType({"depth": 23, "final_norm": False}),
    hub_repos=("openai/clip-vit-large-patch14-336",),
    weights_from="hf: openai/clip-vit-large-patch14-336 (the tower of "
    "microsoft/llava-med-v1.5-mistral-7b)",
    paper_auroc=0.869,
))

_TINY = MappingProxyType({"depth": 2, "embed_dim": 64, "num_heads": 2})
register_encoder(EncoderConfig(
    name="raptorz_tiny_clip", architecture="vit_large_patch14_clip_quickgelu_224", family=FAMILY,
    description="test model: CLIP-style, 2 blocks, width 64", mean=CLIP_MEAN, std=CLIP_STD,
    model_kwargs=_TINY, layouts=LAYOUTS, published=False,
))
register_encoder(EncoderConfig(
    name="raptorz_tiny_llava", architecture="vit_large_patch14_clip_quickgelu_336",
    family=FAMILY, description="test model: LLaVA-style cut CLIP tower, 2 of 3 blocks",
    img_size=336, mean=CLIP_MEAN, std=CLIP_STD,
    model_kwargs=MappingProxyType({**_TINY, "final_norm": False}), layouts=LAYOUTS,
    published=False,
))
