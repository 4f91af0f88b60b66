"""DINOv2, DINOv2 with registers and RAD-DINO: timm's ``VisionTransformer``.

Layouts read: timm's; Meta's original release (``dinov2_vitl14_pretrain.pth``, with
``mask_token`` and, with registers, ``register_tokens``), which timm's own filter
converts; and the Hugging Face transformers layout (``Dinov2Model`` /
``Dinov2WithRegistersModel``: ``facebook/dinov2-*``, ``microsoft/rad-dino``), converted
here to the original layout first. A position embedding trained at another size (518 px)
is resampled to the model's patch grid as DINOv2 and transformers do it at every forward
(bicubic, not antialiased, in float32), so that the tokens equal those of the original
tool, which runs ``facebook/dinov2-large`` through transformers at 224 px.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from types import MappingProxyType

import torch

from raptorz.embedding.encoders._config import EncoderConfig, register_encoder, register_family
from raptorz.embedding.encoders._weights import timm_filter

FAMILY = "dinov2"
LAYOUTS = ("timm", "dinov2", "transformers")

# transformers' Dinov2Model key -> original DINOv2 key (the per-layer ones after "blocks.N.")
_GLOBAL = {
    "embeddings.cls_token": "cls_token",
    "embeddings.mask_token": "mask_token",
    "embeddings.register_tokens": "register_tokens",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
}
_LAYER = {
    "norm1": "norm1", "norm2": "norm2",
    "attention.output.dense": "attn.proj", "attention.o_proj": "attn.proj",
    "layer_scale1.lambda1": "ls1.gamma", "layer_scale2.lambda1": "ls2.gamma",
    "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2",
    "mlp.weights_in": "mlp.w12", "mlp.weights_out": "mlp.w3",  # SwiGLU of dinov2-giant
}
_LAYER_KEY = re.compile(r"encoder\.layer\.(\d+)\.(.+)")
# the hub files' names, and transformers 5's names in memory (``q_proj``...)
_QKV = re.compile(r"attention\.(?:attention\.(query|key|value)|([qkv])_proj)\.(weight|bias)")
_QKV_NAMES = {"q": "query", "k": "key", "v": "value"}


def from_transformers_layout(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Convert a transformers ``Dinov2Model`` state dict to the original DINOv2 layout.

    Query, key and value are fused into ``qkv`` in that order, as DINOv2 stores them.
    Keys without a counterpart (pooler, classifier head) are dropped.
    """
    fused: dict[str, dict[str, torch.Tensor]] = {}
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        key = key.removeprefix("dinov2.").removeprefix("dinov2_with_registers.")
        if key in _GLOBAL:
            out[_GLOBAL[key]] = value
            continue
        match = _LAYER_KEY.fullmatch(key)
        if match is None:
            continue
        layer, rest = match.groups()
        part = _QKV.fullmatch(rest)
        if part is not None:
            which = part[1] or _QKV_NAMES[part[2]]
            fused.setdefault(f"blocks.{layer}.attn.qkv.{part[3]}", {})[which] = value
            continue
        module, _, param = rest.rpartition(".")
        if rest in _LAYER:  # layer_scale lambdas have no ".weight"
            out[f"blocks.{layer}.{_LAYER[rest]}"] = value
        elif module in _LAYER:
            out[f"blocks.{layer}.{_LAYER[module]}.{param}"] = value
    for key, parts in fused.items():
        out[key] = torch.cat([parts["query"], parts["key"], parts["value"]], dim=0)
    if "cls_token" in out and "mask_token" not in out:
        # timm recognises the DINOv2 layout by its mask token
        out["mask_token"] = torch.zeros_like(out["cls_token"][0])
    return out


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor],
                         model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], str]:
    """Any DINOv2 layout -> timm's, and the name of the layout found."""
    layout = "timm"
    if any(k.removeprefix("dinov2.").startswith("embeddings.") or
           k.startswith("dinov2_with_registers.") for k in state_dict):
        state_dict, layout = from_transformers_layout(state_dict), "transformers"
    elif "mask_token" in state_dict:
        layout = "dinov2"
    state_dict = {k.removeprefix("backbone."): v for k, v in state_dict.items()}
    return timm_filter(_resample_position_embedding(state_dict, model), model), layout


def _resample_position_embedding(state_dict: dict[str, torch.Tensor],
                                 model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The position embedding on the model's patch grid, bicubic, not antialiased.

    timm's filter would antialias, which moves every token (a relative error of 0.5 with
    tiny random weights, against transformers' ``Dinov2Model`` at 224 px).
    """
    from timm.layers import resample_abs_pos_embed

    position, target = state_dict.get("pos_embed"), getattr(model, "pos_embed", None)
    grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)
    if position is None or target is None or grid is None or position.shape == target.shape \
            or target.shape[1] != 1 + grid[0] * grid[1]:
        return state_dict  # registers' models hold no class position: timm's filter, as tested
    return {**state_dict, "pos_embed": resample_abs_pos_embed(
        position, new_size=list(grid), num_prefix_tokens=1, interpolation="bicubic",
        antialias=False)}


register_family(FAMILY, checkpoint_filter_fn)


def _register_sizes() -> None:
    """dinov2-{s,b,l,g} and their 4-register variants."""
    for short, size in {"s": "small", "b": "base", "l": "large", "g": "giant"}.items():
        letter = short.upper()
        register_encoder(EncoderConfig(
            name=f"dinov2-{short}", architecture=f"vit_{size}_patch14_dinov2.lvd142m",
            family=FAMILY, description=f"DINOv2 ViT-{letter}/14 (Meta, LVD-142M)",
            layouts=LAYOUTS, hub_repos=(f"facebook/dinov2-{size}",),
            weights_from=f"hf: facebook/dinov2-{size} or timm/vit_{size}_patch14_dinov2."
            f"lvd142m; dinov2_vit{short}14_pretrain.pth from github.com/facebookresearch/dinov2",
            paper_auroc=0.907 if short == "l" else None,
        ))
        register_encoder(EncoderConfig(
            name=f"dinov2-{short}-reg",
            architecture=f"vit_{size}_patch14_reg4_dinov2.lvd142m", family=FAMILY,
            description=f"DINOv2 ViT-{letter}/14 with 4 registers (Meta)", layouts=LAYOUTS,
            hub_repos=(f"facebook/dinov2-with-registers-{size}",),
            weights_from=f"hf: facebook/dinov2-with-registers-{size} or "
            f"timm/vit_{size}_patch14_reg4_dinov2.lvd142m; dinov2_vit{short}14_reg4_pretrain.pth"
            " from github.com/facebookresearch/dinov2",
        ))


_register_sizes()
register_encoder(EncoderConfig(
    name="rad-dino", architecture="vit_base_patch14_dinov2", family=FAMILY,
    description="RAD-DINO: DINOv2 ViT-B/14 trained on chest X-rays (Microsoft)",
    img_size=518, mean=(0.5307, 0.5307, 0.5307), std=(0.2583, 0.2583, 0.2583),
    layouts=LAYOUTS, hub_repos=("microsoft/rad-dino",),
    weights_from="hf: microsoft/rad-dino (transformers folder)",
))

_TINY = MappingProxyType({"depth": 2, "embed_dim": 64, "num_heads": 2})
register_encoder(EncoderConfig(
    name="raptorz_tiny_dinov2", architecture="vit_small_patch14_dinov2", family=FAMILY,
    description="test model: DINOv2-style, 2 blocks, width 64", model_kwargs=_TINY,
    layouts=LAYOUTS, published=False,
))
register_encoder(EncoderConfig(
    name="raptorz_tiny_dinov2_reg", architecture="vit_small_patch14_reg4_dinov2", family=FAMILY,
    description="test model: DINOv2 with registers, 2 blocks, width 64", model_kwargs=_TINY,
    layouts=LAYOUTS, published=False,
))
