"""What each named encoder is, measured on the meta device (no weights, no compute)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from raptorz.embedding.encoders._config import EncoderConfig, registered


@dataclass(frozen=True)
class EncoderInfo:
    """A named encoder as ``raptorz encoders`` lists it.

    Attributes
    ----------
    config
        Its :class:`EncoderConfig`.
    width
        Token width (the projector's ``d``).
    tokens, prefix_tokens
        Tokens per image, and how many of them are CLS / register tokens.
    patch_size
        Pixels per patch side.
    parameters
        Parameter count of the image model.
    """

    config: EncoderConfig
    width: int
    tokens: int
    prefix_tokens: int
    patch_size: int
    parameters: int

    def as_dict(self) -> dict[str, Any]:
        """Plain values, for tables and JSON."""
        c = self.config
        return {"name": c.name, "description": c.description, "architecture": c.architecture,
                "width": self.width, "tokens": self.tokens, "prefix_tokens": self.prefix_tokens,
                "img_size": c.img_size, "patch_size": self.patch_size,
                "output": c.output, "parameters": self.parameters,
                "layouts": list(c.layouts), "weights_from": c.weights_from,
                "paper_auroc": c.paper_auroc, "published": c.published}


def meta_model(config: EncoderConfig, **model_kwargs: Any) -> torch.nn.Module:
    """``config``'s timm model on the meta device: shapes only, nothing allocated."""
    import timm

    kwargs = {**config.model_kwargs, "img_size": config.img_size, "num_classes": 0,
              **model_kwargs}
    with torch.device("meta"):
        return timm.create_model(config.architecture, pretrained=False, **kwargs)


def describe(config: EncoderConfig) -> EncoderInfo:
    """Width, tokens and size of ``config``'s model, from its meta-device definition."""
    from raptorz.embedding.encoders._encoder import Encoder

    model: Any = meta_model(config)
    # the Encoder derives the token layout; the checksum of meta tensors is not computed
    layout = Encoder.token_layout(config, model)
    return EncoderInfo(config, width=layout[0], tokens=layout[1], prefix_tokens=layout[2],
                       patch_size=int(model.patch_embed.patch_size[0]),
                       parameters=sum(p.numel() for p in model.parameters()))


#: The order ``raptorz encoders`` lists the families in: the paper's default first.
_FAMILY_ORDER = ("dinov2", "dinov3", "clip", "open_clip", "sam")


def list_encoders(*, tests: bool = False) -> list[EncoderInfo]:
    """Every named encoder (the tiny test models too with ``tests=True``), described."""
    configs = sorted((c for c in registered() if tests or c.published),
                     key=lambda c: _FAMILY_ORDER.index(c.family))  # stable within a family
    return [describe(c) for c in configs]
