"""The encoder registry: named encoders, each a declarative :class:`EncoderConfig`.

As timm registers models by decorator with a default config, each family module
(:mod:`.dinov2`, :mod:`.dinov3`, :mod:`.clip`, :mod:`.sam`, :mod:`.biomedclip`) registers
its named encoders here with :func:`register_encoder`: the timm definition, the input the
model was trained on (size, normalisation, resize policy), the kind of output, the weights
layouts it reads and where users obtain the weights. A name that is not registered is
taken as a timm model name (ImageNet normalisation, square resize).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal

import torch

#: ImageNet's mean and std (DINOv2, DINOv3, RAD-DINO's own are close but not these).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: OpenAI CLIP's mean and std (CLIP, LLaVA-Med, BiomedCLIP).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

#: ``stretch``: the image is resized to the square input. ``longest_side``: SAM's resize,
#: the longest side to the input size (aspect kept), zero padding right and bottom after
#: normalisation.
InputResize = Literal["stretch", "longest_side"]
#: ``tokens``: a ViT's token sequence (prefix tokens first). ``feature_map``: a
#: ``(C, H, W)`` map whose grid positions are the tokens and whose channels their width.
OutputKind = Literal["tokens", "feature_map"]

#: A family's layout filter: a state dict of any layout the family reads and the model
#: -> (the state dict in timm's layout for that model, the name of the layout found).
CheckpointFilter = Callable[[dict[str, torch.Tensor], torch.nn.Module],
                            tuple[dict[str, torch.Tensor], str]]


@dataclass(frozen=True)
class EncoderConfig:
    """What a named encoder is, declaratively (recorded in store provenance).

    Parameters
    ----------
    name
        The short name users type (``dinov2-l``, ``sam-b``...).
    architecture
        The timm model name, with its pretrained tag when timm publishes weights.
    family
        The family module that reads its weights (``dinov2``, ``clip``...).
    description
        One line for ``raptorz encoders``.
    img_size
        Side of the square input image.
    mean, std
        Per-channel normalisation on the ``pixel_scale`` scale, as the model's own
        configuration gives them (SAM: 0-255 values).
    pixel_scale
        1 for images in [0, 1], 255 for models normalised on the 8-bit scale (SAM).
    resize
        :data:`InputResize`.
    output
        :data:`OutputKind`.
    model_kwargs
        Architecture arguments for ``timm.create_model`` beyond the name (tiny test
        variants, LLaVA-Med's truncated tower).
    layouts
        Weights layouts the family filter reads for this encoder.
    weights_from
        Where users obtain the weights (a hub id or a download page).
    hub_repos
        Hugging Face repositories whose cached copy is used when no file is given.
    paper_auroc
        Mean AUROC over the six 3D MedMNIST sets in the Raptor paper (Table A.1, K=100).
    published
        False for the tiny test variants: they need ``weights=FILE`` or random weights.
    """

    name: str
    architecture: str
    family: str
    description: str
    img_size: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    pixel_scale: float = 1.0
    resize: InputResize = "stretch"
    output: OutputKind = "tokens"
    model_kwargs: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    layouts: tuple[str, ...] = ("timm",)
    weights_from: str = ""
    hub_repos: tuple[str, ...] = ()
    paper_auroc: float | None = None
    published: bool = True

    @property
    def normalised_mean(self) -> tuple[float, ...]:
        """``mean`` on the [0, 1] scale the preprocessing works on."""
        return tuple(m / self.pixel_scale for m in self.mean)

    @property
    def normalised_std(self) -> tuple[float, ...]:
        """``std`` on the [0, 1] scale the preprocessing works on."""
        return tuple(s / self.pixel_scale for s in self.std)

    def provenance(self) -> dict[str, Any]:
        """The config as plain JSON-able values."""
        return {"name": self.name, "architecture": self.architecture, "family": self.family,
                "img_size": self.img_size, "mean": list(self.mean), "std": list(self.std),
                "pixel_scale": self.pixel_scale, "resize": self.resize,
                "output": self.output,
                "model_kwargs": {k: v if isinstance(v, (bool, int, float, str, tuple)) else
                                 repr(v) for k, v in self.model_kwargs.items()}}


_CONFIGS: dict[str, EncoderConfig] = {}
_FILTERS: dict[str, CheckpointFilter] = {}


def register_family(family: str, checkpoint_filter: CheckpointFilter) -> None:
    """Register a family's layout filter (one per family module)."""
    _FILTERS[family] = checkpoint_filter


def register_encoder(config: EncoderConfig) -> EncoderConfig:
    """Register a named encoder; names are unique."""
    if config.name in _CONFIGS:
        raise ValueError(f"encoder {config.name!r} is registered twice")
    _CONFIGS[config.name] = config
    return config


def get_config(name: str) -> EncoderConfig | None:
    """The registered config of ``name``, or None for a plain timm name."""
    return _CONFIGS.get(name)


def family_filter(family: str) -> CheckpointFilter:
    """The layout filter of ``family``."""
    return _FILTERS[family]


def registered() -> list[EncoderConfig]:
    """Every registered encoder, in registration order."""
    return list(_CONFIGS.values())
