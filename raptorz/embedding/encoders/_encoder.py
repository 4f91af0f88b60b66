"""The :class:`Encoder`: a frozen model with everything the kernel needs to feed it."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, cast

import torch

from raptorz.defaults import Precision
from raptorz.embedding.encoders._config import EncoderConfig
from raptorz.embedding.encoders._weights import weights_checksum
from raptorz.embedding.settings import TokenSelection, token_kinds, token_slice

PRECISION_DTYPES: Mapping[str, torch.dtype] = MappingProxyType({
    "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16,
})


class Encoder:
    """A frozen 2D encoder that maps normalised images to tokens, ready for inference.

    Build it with :func:`~raptorz.embedding.encoders.create_encoder`. Everything that
    depends on the model lives here, so that the kernel needs no per-model code.

    Attributes
    ----------
    name, config
        The encoder's name and its :class:`EncoderConfig`.
    model
        The timm model (eval mode, no gradients). On a CPU its ``nn.Linear`` layers are
        usually :class:`~raptorz.embedding.encoders.PackedLinear` (see ``create_encoder``'s
        ``pack``).
    img_size, mean, std, resize
        The model's input: square side, per-channel normalisation on the [0, 1] scale,
        and the resize policy (``stretch`` or SAM's ``longest_side``).
    embed_dim, num_prefix_tokens, num_tokens, token_kinds
        Token width, CLS + register tokens, all tokens, and ``cls`` / ``register`` /
        ``patch`` per token (prefix first; a feature map's grid positions are patches).
    checksum, weights_source, layout
        sha256 of the loaded weights (the same whatever layout the file had), where they
        came from and the layout they were read in.
    """

    def __init__(self, config: EncoderConfig, model: torch.nn.Module, *, device: torch.device,
                 precision: Precision, img_size: int, weights_source: str,
                 layout: str) -> None:
        self.config = config
        self.name = config.name
        # a timm model; typed loosely as torch types its submodules as unions
        self.model: Any = cast(Any, model)
        self.device = device
        self.precision: Precision = precision
        self.img_size = img_size
        self.mean = config.normalised_mean
        self.std = config.normalised_std
        self.resize = config.resize
        self.weights_source = weights_source
        self.layout = layout
        self.embed_dim, self.num_tokens, self.num_prefix_tokens = self.token_layout(config,
                                                                                   model)
        self.token_kinds = token_kinds(self.num_tokens, self.num_prefix_tokens)
        self.checksum = weights_checksum(model.state_dict())

    @staticmethod
    def token_layout(config: EncoderConfig, model: torch.nn.Module) -> tuple[int, int, int]:
        """Token width, tokens per image and prefix tokens of ``config``'s ``model``."""
        timm_model: Any = model
        grid = timm_model.patch_embed.grid_size
        positions = int(grid[0]) * int(grid[1])
        if config.output == "feature_map":  # the neck's channels on the patch grid
            return int(timm_model.neck[0].out_channels), positions, 0
        prefix = int(timm_model.num_prefix_tokens)
        return int(timm_model.embed_dim), prefix + positions, prefix

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Tokens of normalised images.

        Parameters
        ----------
        images
            ``(N, 3, img_size, img_size)`` float32 on ``self.device``.

        Returns
        -------
        torch.Tensor
            ``(N, num_tokens, embed_dim)`` float32: prefix tokens first, then patch tokens
            (or feature-map positions) in row-major order.
        """
        with torch.inference_mode(), torch.autocast(
            device_type=self.device.type, dtype=PRECISION_DTYPES[self.precision],
            enabled=self.precision != "fp32",
        ):
            features = self.model.forward_features(images)
            if self.config.output == "feature_map":  # (N, C, H, W) -> (N, H * W, C)
                features = features.flatten(2).transpose(1, 2)
            return features.float()

    encode = forward

    def token_slice(self, tokens: TokenSelection) -> slice:
        """The tokens kept by ``tokens`` (``all``, ``patch`` or ``cls``), as a slice."""
        return token_slice(self.num_prefix_tokens, tokens)

    def provenance(self) -> dict[str, Any]:
        """What identifies these embeddings' encoder and its input, for store attributes."""
        return {
            "encoder": self.name, "weights_checksum": self.checksum,
            "weights_source": self.weights_source, "weights_layout": self.layout,
            "img_size": self.img_size, "patch_size": int(self.model.patch_embed.patch_size[0]),
            "mean": list(self.mean), "std": list(self.std), "resize": self.resize,
            "precision": self.precision, "device": str(self.device), "tf32": self.tf32,
            "embed_dim": self.embed_dim, "num_tokens": self.num_tokens,
            "num_prefix_tokens": self.num_prefix_tokens, "config": self.config.provenance(),
        }

    @property
    def tf32(self) -> bool:
        """Whether torch may run this encoder's fp32 matmuls or convolutions in TF32 now
        (CUDA only; the run turns it off at fp32, docs/kernel.md)."""
        return self.device.type == "cuda" and (torch.backends.cuda.matmul.allow_tf32 or
                                               torch.backends.cudnn.allow_tf32)

    def __repr__(self) -> str:
        return (f"Encoder({self.name!r}, device={str(self.device)!r}, "
                f"precision={self.precision!r}, tokens={self.num_tokens}x{self.embed_dim})")
