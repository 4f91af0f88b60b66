"""The full-size named encoders, checked without running them (torch's meta device).

Parameter counts are compared with the independent implementations' own definitions of
the same models (transformers, segment_anything), also built on the meta device, and
output shapes come from a meta forward pass: shapes only, no weights, no compute.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

from raptorz.embedding.encoders import Encoder, get_config, list_encoders, meta_model

pytest.importorskip("transformers", reason="the test extra installs transformers")


def _count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _meta(build: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    with torch.device("meta"):
        return build()


def _dinov2(hidden: int, layers: int, heads: int, swiglu: bool = False) -> Callable[[], Any]:
    from transformers import Dinov2Config, Dinov2Model

    return lambda: Dinov2Model(Dinov2Config(
        hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        intermediate_size=4 * hidden, use_swiglu_ffn=swiglu, image_size=518, patch_size=14))


def _dinov3(hidden: int, layers: int, heads: int, gated: bool = False) -> Callable[[], Any]:
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    return lambda: DINOv3ViTModel(DINOv3ViTConfig(
        hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        intermediate_size=4 * hidden, num_register_tokens=4, patch_size=16,
        use_gated_mlp=gated))


def _clip(image: int) -> Callable[[], Any]:
    from transformers import CLIPVisionConfig, CLIPVisionModel

    return lambda: CLIPVisionModel(CLIPVisionConfig(
        hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
        patch_size=14, image_size=image, hidden_act="quick_gelu"))


def _sam(size: str) -> Callable[[], Any]:
    from segment_anything import sam_model_registry

    return lambda: sam_model_registry[size]().image_encoder


#: name -> (reference definition, its parameters minus ours: what only one side has)
REFERENCES: dict[str, tuple[Callable[[], Any], Callable[[Any], int]]] = {
    # transformers keeps DINOv2's mask token (width) and the 518-px position embedding
    **{f"dinov2-{s}": (_dinov2(*dims), lambda ref: ref.config.hidden_size * (
        1 + 37 * 37 - 16 * 16)) for s, dims in {
        "s": (384, 12, 6), "b": (768, 12, 12), "l": (1024, 24, 16),
        "g": (1536, 40, 24, True)}.items()},
    "rad-dino": (_dinov2(768, 12, 12), lambda ref: ref.config.hidden_size),
    # and DINOv3's mask token and zero query / value biases, which timm leaves out
    **{f"dinov3-{s}": (_dinov3(*dims), lambda ref: ref.config.hidden_size * (
        1 + 2 * ref.config.num_hidden_layers)) for s, dims in {
        "s": (384, 12, 6), "b": (768, 12, 12), "l": (1024, 24, 16),
        "h+": (1280, 32, 20, True)}.items()},
    "clip-l14": (_clip(224), lambda ref: 0),
    "clip-l14-336": (_clip(336), lambda ref: 0),
    # LLaVA's tower stops one block early and has no final norm
    "llava-med": (_clip(336), lambda ref: _count(ref.vision_model.encoder.layers[-1])
                  + _count(ref.vision_model.post_layernorm) if hasattr(ref, "vision_model")
                  else _count(ref.encoder.layers[-1]) + _count(ref.post_layernorm)),
    "sam-b": (_sam("vit_b"), lambda ref: 0),
    "sam-l": (_sam("vit_l"), lambda ref: 0),
    "sam-h": (_sam("vit_h"), lambda ref: 0),
    "medsam": (_sam("vit_b"), lambda ref: 0),
}


@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_parameter_count_equals_the_reference_definition(name: str) -> None:
    config = get_config(name)
    assert config is not None
    build, only_theirs = REFERENCES[name]
    reference = _meta(build)
    assert _count(meta_model(config)) == _count(reference) - only_theirs(reference)


@pytest.mark.slow
def test_every_named_encoder_has_its_output_shape_on_meta() -> None:
    """A meta forward pass of each full-size model gives the tokens the listing states."""
    infos = list_encoders()  # each described once: a meta model of each (costly)
    for info in infos:
        config = info.config
        model: Any = meta_model(config)
        images = torch.empty(2, 3, config.img_size, config.img_size, device="meta")
        features = model.forward_features(images)
        if config.output == "feature_map":
            features = features.flatten(2).transpose(1, 2)
        assert tuple(features.shape) == (2, info.tokens, info.width), config.name
        assert Encoder.token_layout(config, model) == (info.width, info.tokens,
                                                       info.prefix_tokens)
    expected = {"dinov2-l": (1024, 257), "dinov2-l-reg": (1024, 261), "dinov3-l": (1024, 201),
                "clip-l14": (1024, 257), "clip-l14-336": (1024, 577), "llava-med": (1024, 577),
                "sam-b": (256, 4096), "medsam": (256, 4096), "rad-dino": (768, 1370),
                "biomedclip": (768, 197)}
    listed = {i.config.name: (i.width, i.tokens) for i in infos}
    assert {n: listed[n] for n in expected} == expected
