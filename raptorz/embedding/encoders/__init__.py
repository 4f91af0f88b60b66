"""Frozen 2D slice encoders: named encoders of the Raptor paper and of medical imaging, or
any timm model, with weights in the layouts users hold.

Structured like timm's model registry: :mod:`._config` holds the declarative
:class:`EncoderConfig` and the registry; one module per family (:mod:`.dinov2`,
:mod:`.dinov3`, :mod:`.clip`, :mod:`.sam`, :mod:`.biomedclip`) registers its named
encoders and its ``checkpoint_filter_fn`` (layout conversion); :func:`create_encoder` is
the one factory, :class:`Encoder` what it builds, :func:`list_encoders` what
``raptorz encoders`` shows.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

# the family modules register their encoders on import, in the order they are listed
from raptorz.embedding.encoders import biomedclip, clip, dinov2, dinov3, sam  # noqa: F401
from raptorz.embedding.encoders._config import (
    CLIP_MEAN,
    CLIP_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    EncoderConfig,
    InputResize,
    OutputKind,
    get_config,
)
from raptorz.embedding.encoders._encoder import Encoder
from raptorz.embedding.encoders._factory import (
    create_encoder,
    device_precision,
    resolve_config,
    weights_available,
)
from raptorz.embedding.encoders._listing import EncoderInfo, describe, list_encoders, meta_model
from raptorz.embedding.encoders._packing import PackedLinear, pack_linears
from raptorz.embedding.encoders._weights import read_state_dict, weights_checksum
from raptorz.embedding.encoders.dinov2 import from_transformers_layout

#: The tiny test architectures (name -> timm architecture and overrides): no published
#: weights, so they need ``weights=FILE`` or random weights. One per family.
SMALL_ENCODERS: Mapping[str, tuple[str, Mapping[str, Any]]] = MappingProxyType({
    c.name: (c.architecture, c.model_kwargs) for c in map(get_config, (
        "raptorz_tiny_dinov2", "raptorz_tiny_dinov2_reg", "raptorz_tiny_dinov3",
        "raptorz_tiny_clip", "raptorz_tiny_llava", "raptorz_tiny_sam",
        "raptorz_tiny_biomedclip")) if c is not None
})

__all__ = [
    "CLIP_MEAN", "CLIP_STD", "IMAGENET_MEAN", "IMAGENET_STD",
    "SMALL_ENCODERS", "Encoder", "EncoderConfig", "EncoderInfo",
    "InputResize", "OutputKind", "PackedLinear",
    "create_encoder", "describe", "device_precision", "from_transformers_layout",
    "get_config", "list_encoders", "meta_model", "pack_linears", "read_state_dict",
    "resolve_config", "weights_available", "weights_checksum",
]
