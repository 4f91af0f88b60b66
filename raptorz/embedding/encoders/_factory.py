"""The one factory, :func:`create_encoder`: a named encoder or timm model, with its weights.

Weights come, in this order, from

1. ``weights=PATH``: a file (safetensors, a PyTorch state dict or training checkpoint,
   read with ``weights_only=True``) or a Hugging Face model folder, in any layout the
   encoder's family reads (``raptorz encoders`` lists them);
2. the Hugging Face cache: timm's own copy, else a copy of one of the encoder's
   ``hub_repos`` (the transformers or open_clip copy users already have);
3. the hub through timm, unless ``HF_HUB_OFFLINE`` is set or the hub does not answer
   at once (huggingface_hub would retry it for about 50 s).

Nothing here touches CUDA or any global setting at import: Dask workers import this
module, and the client process must not initialise CUDA.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from raptorz.defaults import DEFAULT_ENCODER, RANDOM_WEIGHTS, Precision
from raptorz.embedding.encoders._config import (
    EncoderConfig,
    family_filter,
    get_config,
    registered,
)
from raptorz.embedding.encoders._encoder import PRECISION_DTYPES, Encoder
from raptorz.embedding.encoders._packing import can_pack, pack_linears
from raptorz.embedding.encoders._weights import FOLDER_FILES, load_strict, read_state_dict
from raptorz.embedding.settings import CPU_BATCH_SIZE
from raptorz.errors import InputError, RaptorzError, RaptorzWarning

#: Seconds :func:`_hub_problem` waits for the hub's answer (a refused connection or an unknown
#: host fails at once; this bounds a firewall that drops packets).
HUB_TIMEOUT = 5.0


def device_precision(device: torch.device, precision: Precision | None = None) -> Precision:
    """The autocast precision to use on ``device``: ``precision``, or the device's default.

    bf16 by default on CUDA, fp32 on the CPU. A GPU without bf16 (before Ampere) gets fp16
    instead, with a warning where bf16 was asked for; the store's provenance records the
    precision used.
    """
    chosen: Precision = precision or ("bf16" if device.type == "cuda" else "fp32")
    if chosen not in PRECISION_DTYPES:
        raise RaptorzError(f"precision {chosen!r} is not one of fp32, bf16, fp16")
    # the device asked for, not the current one: a worker may hold an old and a new GPU
    if chosen == "bf16" and device.type == "cuda" and \
            torch.cuda.get_device_capability(device)[0] < 8:  # bf16 tensor cores: Ampere
        if precision is not None:
            warnings.warn(f"{device} has no native bf16: using fp16 instead", RaptorzWarning,
                          stacklevel=3)
        chosen = "fp16"
    return chosen


def resolve_config(name: str) -> EncoderConfig:
    """The config of a named encoder, or one for a plain timm model name.

    A timm name gets its family's filter where raptorz knows the family (so a DINOv2
    timm name reads the transformers layout too), timm's own filter otherwise, and the
    mean and std of timm's pretrained config (ImageNet's when there is none).
    """
    config = get_config(name)
    if config is not None:
        return config
    for known in registered():  # a timm name of a registered encoder: same family
        # only timm-published definitions: an untagged one (BiomedCLIP's ViT-B/16) is generic
        if "." in known.architecture and \
                known.architecture.split(".")[0] == name.split(".")[0]:
            return EncoderConfig(name=name, architecture=name, family=known.family,
                                 description=f"timm model {name}", layouts=known.layouts,
                                 mean=known.mean, std=known.std, pixel_scale=known.pixel_scale,
                                 resize=known.resize, output=known.output,
                                 hub_repos=known.hub_repos if name == known.architecture
                                 else ())
    import timm

    try:
        cfg = timm.models.get_pretrained_cfg(name)
    except RuntimeError:
        cfg = None
    extra: dict[str, Any] = {}
    if cfg is not None and getattr(cfg, "mean", None) is not None:
        extra = {"mean": tuple(cfg.mean), "std": tuple(cfg.std)}
    return EncoderConfig(name=name, architecture=name, family="timm",
                         description=f"timm model {name}", **extra)


def create_encoder(name: str = DEFAULT_ENCODER, *, weights: str | Path | None = None,
                   device: str | None = None, precision: Precision | None = None,
                   img_size: int | None = None, pack: bool | None = None,
                   **model_kwargs: Any) -> Encoder:
    """Build a frozen encoder with its weights, on a device, in eval mode.

    Parameters
    ----------
    name
        A named encoder (``dinov2-l``, ``clip-l14``, ``sam-b``, ``medsam``...: see
        ``raptorz encoders``) or any timm model name.
    weights
        A weights file or model folder in a layout the encoder reads, or
        :data:`RANDOM_WEIGHTS`. Without it, the Hugging Face cache and then the hub.
    device
        ``"cpu"``, ``"cuda"``, ``"cuda:1"``...; default CUDA when available, else CPU.
    precision
        Autocast precision of the forward pass. Default ``bf16`` on CUDA (tensor cores,
        fp32 range, no overflow risk) and ``fp32`` on CPU.
    img_size
        Square input size the model is built for (position embedding resampled to it);
        default the encoder's own (224 for a timm name).
    pack
        Prepack the linear layers' weights for oneDNN (:func:`pack_linears`): default on
        an x86 CPU where torch can, at fp32 and (with native bf16) bf16. The same results up to
        summation order, in less time; the model's linear layers are then
        :class:`PackedLinear` and its ``state_dict`` lacks their weights. ``False`` keeps
        the plain timm model.
    **model_kwargs
        Extra architecture arguments for ``timm.create_model`` (e.g. ``depth=2``).

    Returns
    -------
    Encoder

    Examples
    --------
    >>> enc = create_encoder("dinov2-s", weights="dinov2_vits14_pretrain.pth")  # doctest: +SKIP
    """
    config = resolve_config(name)
    size = img_size or config.img_size
    kwargs: dict[str, Any] = {**config.model_kwargs, "img_size": size, "num_classes": 0,
                              **model_kwargs}
    torch_device = torch.device(device if device is not None else
                                "cuda" if torch.cuda.is_available() else "cpu")
    chosen = device_precision(torch_device, precision)
    layout = "timm"
    if isinstance(weights, str) and weights == RANDOM_WEIGHTS:
        # a private RNG state: seeded, and the caller's global generator is left alone
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = _build(config, kwargs)
        source = RANDOM_WEIGHTS
    else:
        path = Path(weights) if weights is not None else find_cached(config)
        if path is not None:
            model = _build_empty(config, kwargs)
            layout = load_weights(model, path, config)
            source = str(path)
        else:
            model, source = _load_from_hub(config, kwargs)
    # the checksum on the host copy, before packing and before the move: after it, each
    # worker would copy a ViT-L (1.2 GB) back from its GPU to hash it
    encoder = Encoder(config, model.eval().requires_grad_(False), device=torch_device,
                      precision=chosen, img_size=size, weights_source=source, layout=layout)
    model.to(torch_device)
    if pack is None:
        pack = can_pack(torch_device, chosen)
    elif pack and not can_pack(torch_device, chosen):
        raise RaptorzError(f"cannot pack {name!r} for {torch_device} at {chosen}: packing "
                           "needs an x86 CPU, oneDNN and fp32 (or bf16 on a CPU that has it)")
    if pack:
        pack_linears(model, chosen, rows=CPU_BATCH_SIZE * encoder.num_tokens)
    return encoder


def load_weights(model: torch.nn.Module, path: Path, config: EncoderConfig) -> str:
    """Load a weights file or folder of any layout of ``config``'s family; the layout read."""
    state_dict = read_state_dict(path)
    checkpoint_filter = family_filter("dinov2" if config.family == "timm" else config.family)
    try:
        state_dict, layout = checkpoint_filter(state_dict, model)
    except (RuntimeError, KeyError, ValueError, IndexError) as error:
        raise InputError(path, f"weights do not fit encoder {config.name!r} (accepted "
                         f"layouts: {', '.join(config.layouts)}): {error}") from error
    load_strict(model, state_dict, path=path, encoder=config.name, layout=layout,
                layouts=config.layouts)
    return layout


def weights_available(name: str = DEFAULT_ENCODER) -> bool:
    """Whether :func:`create_encoder` finds weights for ``name`` without a file or network.

    True when timm's copy or a copy of one of the encoder's ``hub_repos`` is in the
    Hugging Face cache. Weights the hub could still deliver online are not counted:
    checking would need the network.
    """
    config = resolve_config(name)
    if not config.published:
        return False
    return _timm_cached(config.architecture) or find_cached(config) is not None


def find_cached(config: EncoderConfig) -> Path | None:
    """A copy of one of ``config.hub_repos`` in the Hugging Face cache, unless timm's is."""
    from huggingface_hub import try_to_load_from_cache

    if not config.published or _timm_cached(config.architecture):
        return None  # timm's own copy wins; timm loads it offline by itself
    for repo in config.hub_repos:
        for filename in FOLDER_FILES:
            found = try_to_load_from_cache(repo, filename)
            if isinstance(found, str):
                return Path(found)
    return None


def _build(config: EncoderConfig, kwargs: Mapping[str, Any]) -> torch.nn.Module:
    """The architecture with timm's initial weights."""
    import timm

    try:
        return timm.create_model(config.architecture, pretrained=False, **kwargs)
    except RuntimeError as error:  # timm: unknown model
        raise RaptorzError(f"encoder {config.name!r}: {error}; `raptorz encoders` lists "
                           "the named encoders") from error


def _build_empty(config: EncoderConfig, kwargs: Mapping[str, Any]) -> torch.nn.Module:
    """The architecture with uninitialised weights, for a weights file to fill.

    Built on the meta device, so no memory is written and no random weights are drawn
    (timm's initialisation of DINOv2-L takes seconds), then given empty CPU memory. That is
    only safe where the file fills every tensor: :func:`load_weights` refuses a file that
    lacks any key of the state dict, and a buffer outside it (rotary frequencies a model
    computes as it is built, say) would stay empty, so such models, and any the meta
    device cannot build, are built as usual.
    """
    import timm

    try:
        with torch.device("meta"):
            model = timm.create_model(config.architecture, pretrained=False, **kwargs)
    except Exception:  # any failure here: the usual build, with its own errors
        return _build(config, kwargs)
    saved = model.state_dict().keys()
    if any(name not in saved for name, _ in model.named_buffers()):
        return _build(config, kwargs)
    return model.to_empty(device="cpu")


def _timm_cached(architecture: str) -> bool:
    """Whether timm's hub copy of ``architecture`` is in the Hugging Face cache."""
    import timm
    from huggingface_hub import try_to_load_from_cache

    if "." not in architecture:
        return False  # no pretrained tag: timm publishes no weights for it
    try:
        cfg = timm.models.get_pretrained_cfg(architecture)
    except RuntimeError:
        return False
    hub_id = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    if not hub_id:
        return False
    return any(isinstance(try_to_load_from_cache(hub_id, f), str)
               for f in ("model.safetensors", "pytorch_model.bin"))


def _load_from_hub(config: EncoderConfig,
                   kwargs: Mapping[str, Any]) -> tuple[torch.nn.Module, str]:
    """A model with pretrained weights through timm (hub or its cache), and their source.

    Where timm's copy is not cached, the hub is asked once whether it answers at all
    (:func:`_hub_problem`): huggingface_hub itself retries an unreachable hub for about 50 s
    before it gives up, so an offline machine learns that it has no weights in seconds.
    """
    import timm
    from huggingface_hub import constants

    name, architecture = config.name, config.architecture
    if not config.published:
        raise RaptorzError(f"encoder {name!r} has no published weights: pass weights=FILE "
                           "(--weights FILE)")
    if architecture not in timm.list_models(pretrained=True) and architecture.split(".")[0] \
            not in timm.list_models():
        raise RaptorzError(f"encoder {name!r} is neither a named encoder (`raptorz encoders` "
                           "lists them) nor a timm model name")
    if "." not in architecture and get_config(name) is not None:
        raise RaptorzError(f"encoder {name!r}: timm publishes no weights for it; get them "
                           f"from {config.weights_from} and pass --weights PATH")
    if not constants.HF_HUB_OFFLINE and not _timm_cached(architecture):
        problem = _hub_problem()
        if problem is not None:
            raise _no_weights(config, f"the hub at {constants.ENDPOINT}, which is out of "
                              f"reach ({problem})")
    try:
        model = timm.create_model(architecture, pretrained=True, **kwargs)
    except Exception as error:  # offline, not cached, no network, no such weights
        raise _no_weights(config, f"the hub (HF_HUB_OFFLINE="
                          f"{'1' if constants.HF_HUB_OFFLINE else '0'}), which failed with "
                          f"{type(error).__name__}: {str(error).rstrip('.')}") from error
    hub_cfg = getattr(model, "pretrained_cfg", None) or {}
    return model, f"hf-hub:{hub_cfg.get('hf_hub_id', architecture)}"


def _hub_problem(timeout: float = HUB_TIMEOUT) -> str | None:
    """Why the Hugging Face hub (``HF_ENDPOINT``) does not answer, or None where it does.

    One request through huggingface_hub's own HTTP session, so that its proxy settings
    hold, and without its retries. Any answer, an error status included, counts: the hub
    is there, and downloading says what is wrong.
    """
    from huggingface_hub import constants, get_session

    try:
        get_session().head(constants.ENDPOINT, timeout=timeout)
    except Exception as error:  # requests' errors (huggingface_hub < 1) or httpx's (>= 1)
        return f"{type(error).__name__}: {error}"
    return None


def _no_weights(config: EncoderConfig, hub: str) -> RaptorzError:
    """The error of an encoder whose weights are neither cached nor downloadable."""
    import timm
    from huggingface_hub import constants

    also = "".join(f" or {repo}" for repo in config.hub_repos)
    cfg = timm.models.get_pretrained_cfg(config.architecture)
    hub_id = getattr(cfg, "hf_hub_id", None) or f"timm/{config.architecture}"
    return RaptorzError(
        f"no weights for encoder {config.name!r}: looked in the Hugging Face cache "
        f"({constants.HF_HUB_CACHE}) for timm's copy{also}, then {hub}. Provide a weights "
        "file with --weights FILE (weights=FILE), or download the weights on a machine "
        f"online (`hf download {hub_id}`) and point HF_HOME at that cache."
    )
