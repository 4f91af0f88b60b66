"""DINOv3 ViTs: timm's ``Eva`` with DINOv3's rotary embeddings and 4 register tokens.

Layouts read: timm's; Meta's original release (``dinov3_vitl16_pretrain_lvd1689m-*.pth``:
``storage_tokens``, fused ``qkv``), which timm's own filter converts; and the Hugging Face
transformers layout (``DINOv3ViTModel``: ``facebook/dinov3-vitl16-pretrain-lvd1689m``),
converted here to the original layout first.

The distilled S, S+, B, L and H+ releases carry query and value biases that are all zero;
timm's definitions have none, so zero biases are dropped and non-zero ones are refused
(use the ``*_qkvb`` timm model for those). A key bias never changes the output: it adds
the same number to every attention logit of a query.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from types import MappingProxyType

import torch

from raptorz.embedding.encoders._config import EncoderConfig, register_encoder, register_family
from raptorz.embedding.encoders._weights import timm_filter

FAMILY = "dinov3"
LAYOUTS = ("timm", "dinov3", "transformers")

_GLOBAL = {
    "embeddings.cls_token": "cls_token",
    "embeddings.mask_token": "mask_token",
    "embeddings.register_tokens": "storage_tokens",
    "embeddings.patch_embeddings.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.bias": "patch_embed.proj.bias",
    "norm.weight": "norm.weight", "norm.bias": "norm.bias",
}
_LAYER = {"norm1": "norm1", "norm2": "norm2", "attention.o_proj": "attn.proj",
          "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
_LAYER_KEY = re.compile(r"(?:model\.)?layer\.(\d+)\.(.+)")
_QKV = re.compile(r"attention\.(q|k|v)_proj\.(weight|bias)")


def from_transformers_layout(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A transformers ``DINOv3ViTModel`` state dict in Meta's original DINOv3 layout."""
    out: dict[str, torch.Tensor] = {}
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    gated = any(".mlp.gate_proj." in k for k in state_dict)
    # transformers' gated MLP is down(act(gate(x)) * up(x)): DINOv3's w3(silu(w1 x) * w2 x)
    mlp = {"gate_proj": "w1", "up_proj": "w2", "down_proj": "w3"} if gated else \
        {"up_proj": "fc1", "down_proj": "fc2"}
    for key, value in state_dict.items():
        if key in _GLOBAL:
            out[_GLOBAL[key]] = value
            continue
        match = _LAYER_KEY.fullmatch(key)
        if match is None:
            continue
        layer, rest = match.groups()
        if (part := _QKV.fullmatch(rest)) is not None:
            qkv.setdefault(f"{layer}.{part[2]}", {})[part[1]] = value
        elif rest.startswith("layer_scale"):
            out[f"blocks.{layer}.ls{rest[len('layer_scale')]}.gamma"] = value
        elif rest.startswith("mlp.") and rest.split(".")[1] in mlp:
            _, name, param = rest.split(".")
            out[f"blocks.{layer}.mlp.{mlp[name]}.{param}"] = value
        elif (module := rest.rpartition(".")[0]) in _LAYER:
            out[f"blocks.{layer}.{_LAYER[module]}.{rest.rpartition('.')[2]}"] = value
    for key, parts in qkv.items():
        layer, param = key.split(".")
        if param == "weight":
            fused = [parts["q"], parts["k"], parts["v"]]
        else:  # absent biases are zero (transformers' key_bias=False)
            zeros = torch.zeros_like(next(iter(parts.values())))
            fused = [parts.get(n, zeros) for n in ("q", "k", "v")]
        out[f"blocks.{layer}.attn.qkv.{param}"] = torch.cat(fused, dim=0)
    return out


def _drop_zero_qkv_bias(state_dict: dict[str, torch.Tensor],
                        model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Remove fused qkv biases a model without them cannot hold, if they change nothing."""
    if any(k.endswith("attn.q_bias") for k in model.state_dict()):
        return state_dict
    out = {}
    for key, value in state_dict.items():
        if key.endswith("attn.qkv.bias"):
            q, _, v = value.chunk(3)
            if q.any() or v.any():
                raise ValueError(f"{key} holds non-zero query / value biases that this "
                                   "model has not: use the timm model with '_qkvb' in its name")
            continue
        out[key] = value
    return out


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor],
                         model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], str]:
    """Any DINOv3 layout -> timm's, and the name of the layout found."""
    layout = "timm"
    if any(k.startswith("embeddings.") for k in state_dict):
        state_dict, layout = from_transformers_layout(state_dict), "transformers"
    elif "storage_tokens" in state_dict:
        layout = "dinov3"
    if layout != "timm":
        state_dict = _drop_zero_qkv_bias(state_dict, model)
    return timm_filter(state_dict, model), layout


register_family(FAMILY, checkpoint_filter_fn)


def _register_sizes() -> None:
    """dinov3-{s,s+,b,l,h+}: the distilled ViT/16 releases (7B is left out)."""
    sizes = {"s": ("small", "vits16"), "s+": ("small_plus", "vits16plus"),
             "b": ("base", "vitb16"), "l": ("large", "vitl16"), "h+": ("huge_plus", "vith16plus")}
    for short, (size, meta) in sizes.items():
        register_encoder(EncoderConfig(
            name=f"dinov3-{short}", architecture=f"vit_{size}_patch16_dinov3.lvd1689m",
            family=FAMILY, description=f"DINOv3 ViT-{short.upper()}/16, 4 registers (Meta)",
            layouts=LAYOUTS, hub_repos=(f"facebook/dinov3-{meta}-pretrain-lvd1689m",),
            weights_from=f"hf: facebook/dinov3-{meta}-pretrain-lvd1689m (gated) or "
            f"timm/vit_{size}_patch16_dinov3.lvd1689m; dinov3_{meta}_pretrain_lvd1689m-*.pth "
            "from github.com/facebookresearch/dinov3",
        ))


_register_sizes()

register_encoder(EncoderConfig(
    name="raptorz_tiny_dinov3", architecture="vit_small_patch16_dinov3", family=FAMILY,
    description="test model: DINOv3-style, 2 blocks, width 64",
    model_kwargs=MappingProxyType({"depth": 2, "embed_dim": 64, "num_heads": 2}),
    layouts=LAYOUTS, published=False,
))
