"""Frozen 2D slice encoders: timm ViTs with weights from the hub, a file or an offline cache.

The one factory is :func:`create_encoder`. Weights come, in this order, from

1. ``weights=FILE``: a safetensors file or a PyTorch state dict (loaded with
   ``weights_only=True``) in timm's layout, in the original DINOv2 layout, or in the
   Hugging Face transformers layout of ``facebook/dinov2-*``;
2. the Hugging Face cache: timm's own copy (``timm/<name>``) or, for DINOv2, the
   transformers copy (``facebook/dinov2-*``) that users of the original tool already have;
3. the hub through timm, unless ``HF_HUB_OFFLINE`` is set.

Checkpoints whose position embedding was trained at another size (DINOv2: 518 px) are
resampled to ``img_size`` by timm's own checkpoint filter (bicubic, antialiased).

Nothing here touches CUDA or any global setting at import: Dask workers import this
module, and the client process must not initialise CUDA.
"""

from __future__ import annotations

import hashlib
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any, cast

import torch

from raptorz.defaults import DEFAULT_ENCODER as DEFAULT_ENCODER  # re-exported
from raptorz.defaults import RANDOM_WEIGHTS as RANDOM_WEIGHTS  # re-exported
from raptorz.defaults import Precision as Precision  # re-exported
from raptorz.errors import InputError, RaptorzError, RaptorzWarning

#: Small DINOv2-style architectures (name -> timm architecture and overrides) for tests,
#: examples and benchmarks; they have no published weights, so they need ``weights=FILE``.
SMALL_ENCODERS: Mapping[str, tuple[str, Mapping[str, Any]]] = MappingProxyType({
    "raptorz_tiny_dinov2": (
        "vit_small_patch14_dinov2", MappingProxyType({"depth": 2, "embed_dim": 64,
                                                      "num_heads": 2}),
    ),
})

#: Hugging Face transformers copies of the DINOv2 weights, by timm architecture.
TRANSFORMERS_REPOS: Mapping[str, str] = MappingProxyType({
    "vit_small_patch14_dinov2": "facebook/dinov2-small",
    "vit_base_patch14_dinov2": "facebook/dinov2-base",
    "vit_large_patch14_dinov2": "facebook/dinov2-large",
    "vit_giant_patch14_dinov2": "facebook/dinov2-giant",
})

_PRECISION_DTYPES: Mapping[str, torch.dtype] = MappingProxyType({
    "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16,
})

# transformers' Dinov2Model key -> original DINOv2 key (the per-layer ones after "blocks.N.")
_TRANSFORMERS_GLOBAL = {
    "embeddings.cls_token": "cls_token",
    "embeddings.mask_token": "mask_token",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
}
_TRANSFORMERS_LAYER = {
    "norm1": "norm1", "norm2": "norm2",
    "attention.output.dense": "attn.proj",
    "layer_scale1.lambda1": "ls1.gamma", "layer_scale2.lambda1": "ls2.gamma",
    "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2",
    "mlp.weights_in": "mlp.w12", "mlp.weights_out": "mlp.w3",  # SwiGLU of dinov2-giant
}
_TRANSFORMERS_LAYER_KEY = re.compile(r"encoder\.layer\.(\d+)\.(.+)")


class Encoder:
    """A frozen ViT that maps normalized images to tokens, ready for inference.

    Build it with :func:`create_encoder`. Attributes: ``name``, ``model``, ``device``,
    ``precision``, ``img_size``, ``embed_dim`` (token width), ``num_prefix_tokens`` (CLS
    and register tokens), ``num_tokens`` (prefix + patch tokens), ``checksum`` (sha256 of
    the loaded weights, identical whatever layout the file had) and ``weights_source``.
    """

    def __init__(self, name: str, model: torch.nn.Module, *, device: torch.device,
                 precision: Precision, img_size: int, weights_source: str) -> None:
        self.name = name
        # a timm VisionTransformer; typed loosely as torch types its submodules as unions
        self.model: Any = cast(Any, model)
        self.device = device
        self.precision: Precision = precision
        self.img_size = img_size
        self.weights_source = weights_source
        self.embed_dim = int(self.model.embed_dim)
        self.num_prefix_tokens = int(self.model.num_prefix_tokens)
        grid = self.model.patch_embed.grid_size
        self.num_tokens = self.num_prefix_tokens + int(grid[0]) * int(grid[1])
        self.checksum = weights_checksum(model.state_dict())

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Tokens after the final norm of normalized images.

        Parameters
        ----------
        images
            ``(N, 3, img_size, img_size)`` float32 on ``self.device``.

        Returns
        -------
        torch.Tensor
            ``(N, num_tokens, embed_dim)`` float32 (prefix tokens first).
        """
        with torch.inference_mode(), torch.autocast(
            device_type=self.device.type, dtype=_PRECISION_DTYPES[self.precision],
            enabled=self.precision != "fp32",
        ):
            return self.model.forward_features(images).float()

    def provenance(self) -> dict[str, Any]:
        """What identifies these embeddings' encoder, for store attributes."""
        return {
            "encoder": self.name, "weights_checksum": self.checksum,
            "weights_source": self.weights_source, "img_size": self.img_size,
            "precision": self.precision, "device": str(self.device),
            "embed_dim": self.embed_dim, "num_tokens": self.num_tokens,
            "num_prefix_tokens": self.num_prefix_tokens,
        }

    def __repr__(self) -> str:
        return (f"Encoder({self.name!r}, device={str(self.device)!r}, "
                f"precision={self.precision!r}, tokens={self.num_tokens}x{self.embed_dim})")


def create_encoder(name: str = DEFAULT_ENCODER, *, weights: str | Path | None = None,
                   device: str | None = None, precision: Precision | None = None,
                   img_size: int = 224, **model_kwargs: Any) -> Encoder:
    """Build a frozen timm ViT with its weights, on a device, in eval mode.

    Parameters
    ----------
    name
        A timm model name (``vit_large_patch14_dinov2.lvd142m``) or one of
        :data:`SMALL_ENCODERS`.
    weights
        A local weights file (safetensors or PyTorch state dict) in timm's, the original
        DINOv2 or the transformers layout, or :data:`RANDOM_WEIGHTS`. Without it, the
        Hugging Face cache and then the hub are used.
    device
        ``"cpu"``, ``"cuda"``, ``"cuda:1"``...; default CUDA when available, else CPU.
    precision
        Autocast precision of the forward pass. Default ``bf16`` on CUDA (tensor cores,
        fp32 range, no overflow risk) and ``fp32`` on CPU (bf16 there is only faster where
        the CPU has native bf16 instructions; choose it explicitly after benchmarking).
    img_size
        Square input size the model is built for (position embedding resampled to it).
    **model_kwargs
        Extra architecture arguments for ``timm.create_model`` (e.g. ``depth=2``).

    Returns
    -------
    Encoder

    Examples
    --------
    >>> enc = create_encoder("vit_small_patch14_dinov2",
    ...                      weights="dinov2_vits14.pth")  # doctest: +SKIP
    """

    architecture, small_kwargs = _resolve_name(name)
    kwargs: dict[str, Any] = {**small_kwargs, "img_size": img_size, "num_classes": 0,
                              **model_kwargs}
    torch_device = torch.device(device if device is not None else
                                "cuda" if torch.cuda.is_available() else "cpu")
    chosen = device_precision(torch_device, precision)
    if isinstance(weights, str) and weights == RANDOM_WEIGHTS:
        # a private RNG state: seeded, and the caller's global generator is left alone
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = _build(name, architecture, kwargs)
        source = RANDOM_WEIGHTS
    else:
        path = Path(weights) if weights is not None else _find_cached(name, architecture)
        if path is not None:
            model = _build(name, architecture, kwargs)
            _load_file(model, path)
            source = str(path)
        else:
            model, source = _load_from_hub(name, architecture, kwargs)
    model.eval().requires_grad_(False).to(torch_device)
    return Encoder(name, model, device=torch_device, precision=chosen, img_size=img_size,
                   weights_source=source)


def device_precision(device: torch.device, precision: Precision | None = None) -> Precision:
    """The autocast precision to use on ``device``: ``precision``, or the device's default.

    bf16 by default on CUDA, fp32 on the CPU. A GPU without bf16 (before Ampere) gets fp16
    instead, with a warning where bf16 was asked for; the store's provenance records the
    precision used.
    """
    chosen: Precision = precision or ("bf16" if device.type == "cuda" else "fp32")
    if chosen not in _PRECISION_DTYPES:
        raise RaptorzError(f"precision {chosen!r} is not one of fp32, bf16, fp16")
    if chosen == "bf16" and device.type == "cuda" and \
            not torch.cuda.is_bf16_supported(including_emulation=False):
        if precision is not None:
            warnings.warn(f"{device} has no native bf16: using fp16 instead", RaptorzWarning,
                          stacklevel=3)
        chosen = "fp16"
    return chosen


def weights_available(name: str = DEFAULT_ENCODER) -> bool:
    """Whether :func:`create_encoder` finds weights for ``name`` without a file or network.

    True when timm's copy or (for DINOv2) the transformers copy is in the Hugging Face
    cache. Weights the hub could still deliver online are not counted: checking would
    need the network.
    """
    architecture, _ = _resolve_name(name)
    if name in SMALL_ENCODERS:
        return False
    return _timm_cached(architecture) or _find_cached(name, architecture) is not None


def weights_checksum(state_dict: Mapping[str, torch.Tensor]) -> str:
    """sha256 over the names, dtypes, shapes and bytes of a state dict, in key order."""
    digest = hashlib.sha256()
    for key in sorted(state_dict):
        tensor = state_dict[key].detach().cpu().contiguous()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file or a PyTorch checkpoint, refusing pickled objects."""
    if not path.is_file():
        raise InputError(path, "weights file not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            loaded: Any = load_file(str(path))
        else:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # any unreadable file: corrupt, pickled code, wrong format
        raise InputError(path, f"cannot read weights ({type(error).__name__}: {error}); "
                         "expected safetensors or a torch state dict") from error
    for key in ("model", "state_dict", "teacher"):  # training checkpoints wrap the weights
        if isinstance(loaded, dict) and isinstance(loaded.get(key), dict):
            loaded = loaded[key]
    if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor)
                                               for v in loaded.values()):
        raise InputError(path, "is not a state dict of tensors")
    return {str(k).removeprefix("module.").removeprefix("backbone."): v
            for k, v in loaded.items()}


def from_transformers_layout(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Convert a transformers ``Dinov2Model`` state dict to the original DINOv2 layout.

    Query, key and value are fused into ``qkv`` in that order, as DINOv2 stores them.
    Keys without a counterpart (pooler, classifier head) are dropped.
    """
    fused: dict[str, dict[str, torch.Tensor]] = {}
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        key = key.removeprefix("dinov2.")
        if key in _TRANSFORMERS_GLOBAL:
            out[_TRANSFORMERS_GLOBAL[key]] = value
            continue
        match = _TRANSFORMERS_LAYER_KEY.fullmatch(key)
        if match is None:
            continue
        layer, rest = match.groups()
        part = re.fullmatch(r"attention\.attention\.(query|key|value)\.(weight|bias)", rest)
        if part is not None:
            fused.setdefault(f"blocks.{layer}.attn.qkv.{part[2]}", {})[part[1]] = value
            continue
        module, _, param = rest.rpartition(".")
        if rest in _TRANSFORMERS_LAYER:  # layer_scale lambdas have no ".weight"
            out[f"blocks.{layer}.{_TRANSFORMERS_LAYER[rest]}"] = value
        elif module in _TRANSFORMERS_LAYER:
            out[f"blocks.{layer}.{_TRANSFORMERS_LAYER[module]}.{param}"] = value
    for key, parts in fused.items():
        out[key] = torch.cat([parts["query"], parts["key"], parts["value"]], dim=0)
    if "cls_token" in out and "mask_token" not in out:
        # timm recognises the DINOv2 layout by its mask token
        out["mask_token"] = torch.zeros_like(out["cls_token"][0])
    return out


def _load_file(model: torch.nn.Module, path: Path) -> None:
    """Load a weights file of any supported layout into ``model`` (strictly)."""
    from timm.models.vision_transformer import checkpoint_filter_fn

    state_dict = read_state_dict(path)
    if any(k.removeprefix("dinov2.").startswith("embeddings.") for k in state_dict):
        state_dict = from_transformers_layout(state_dict)
    try:
        # timm's filter converts the DINOv2 layout and resamples the position embedding
        state_dict = checkpoint_filter_fn(state_dict, model)  # type: ignore[arg-type]
        model.load_state_dict(state_dict, strict=True)
    except (RuntimeError, KeyError, ValueError) as error:
        raise InputError(path, f"weights do not fit this architecture: {error}") from error


def _build(name: str, architecture: str, kwargs: Mapping[str, Any]) -> torch.nn.Module:
    """The architecture with timm's initial weights."""
    import timm

    try:
        return timm.create_model(architecture, pretrained=False, **kwargs)
    except RuntimeError as error:  # timm: unknown model
        raise RaptorzError(f"encoder {name!r}: {error}") from error


def _resolve_name(name: str) -> tuple[str, Mapping[str, Any]]:
    """timm architecture (with its pretrained tag) and overrides for an encoder name."""
    if name in SMALL_ENCODERS:
        return SMALL_ENCODERS[name]
    return name, {}


def _find_cached(name: str, architecture: str) -> Path | None:
    """A transformers copy of DINOv2 already in the Hugging Face cache, if any."""
    from huggingface_hub import try_to_load_from_cache

    repo = TRANSFORMERS_REPOS.get(architecture.split(".")[0])
    # only the plain DINOv2 weights (tag lvd142m) have a transformers copy
    if repo is None or name in SMALL_ENCODERS or ("." in name and not name.endswith(".lvd142m")):
        return None
    if _timm_cached(architecture):
        return None  # timm's own copy wins; timm loads it offline by itself
    for filename in ("model.safetensors", "pytorch_model.bin"):
        found = try_to_load_from_cache(repo, filename)
        if isinstance(found, str):
            return Path(found)
    return None


def _timm_cached(architecture: str) -> bool:
    """Whether timm's hub copy of ``architecture`` is in the Hugging Face cache."""
    import timm
    from huggingface_hub import try_to_load_from_cache

    try:
        cfg = timm.models.get_pretrained_cfg(architecture)
    except RuntimeError:
        return False
    hub_id = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    if not hub_id:
        return False
    return any(isinstance(try_to_load_from_cache(hub_id, f), str)
               for f in ("model.safetensors", "pytorch_model.bin"))


def _load_from_hub(name: str, architecture: str,
                   kwargs: Mapping[str, Any]) -> tuple[torch.nn.Module, str]:
    """A model with pretrained weights through timm (hub or its cache), and their source."""
    import timm
    from huggingface_hub import constants

    if name in SMALL_ENCODERS:
        raise RaptorzError(f"encoder {name!r} has no published weights: pass weights=FILE "
                           "(--weights FILE)")
    if architecture not in timm.list_models(pretrained=True) and architecture.split(".")[0] \
            not in timm.list_models():
        raise RaptorzError(f"encoder {name!r} is not a timm model name")
    try:
        model = timm.create_model(architecture, pretrained=True, **kwargs)
    except Exception as error:  # offline, not cached, no network, no such weights
        repo = TRANSFORMERS_REPOS.get(architecture.split(".")[0])
        also = f" or transformers' {repo}" if repo else ""
        cfg = timm.models.get_pretrained_cfg(architecture)
        hub_id = getattr(cfg, "hf_hub_id", None) or f"timm/{architecture}"
        raise RaptorzError(
            f"no weights for encoder {name!r}: looked in the Hugging Face cache "
            f"({constants.HF_HUB_CACHE}) for timm's copy{also}, then the hub "
            f"(HF_HUB_OFFLINE={'1' if constants.HF_HUB_OFFLINE else '0'}), "
            f"which failed with {type(error).__name__}: {str(error).rstrip('.')}. Provide a "
            "weights file with --weights FILE (weights=FILE), or download the weights on a "
            f"machine online (`hf download {hub_id}`) and point HF_HOME at that cache."
        ) from error
    hub_id = getattr(model, "pretrained_cfg", None) or {}
    return model, f"hf-hub:{hub_id.get('hf_hub_id', architecture)}"
