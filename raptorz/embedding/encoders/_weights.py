"""Reading weights files of any layout, and saying briefly why one does not fit.

Users hold weights as a single file (safetensors, a PyTorch state dict or a training
checkpoint that wraps one) or as a Hugging Face model folder (``model.safetensors``,
``pytorch_model.bin``, ``open_clip_pytorch_model.bin``...). Pickled code is refused
(``weights_only=True``). A file that does not fit is described in a few lines, never by
a dump of hundreds of key names.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from raptorz.errors import InputError

#: Weights files of a Hugging Face model folder, in the order they are looked for.
FOLDER_FILES = ("model.safetensors", "pytorch_model.bin", "open_clip_model.safetensors",
                "open_clip_pytorch_model.bin")
#: Keys that wrap a state dict in training checkpoints.
_WRAPPERS = ("model", "state_dict", "teacher")
#: How many key names an error shows.
SHOWN_KEYS = 3
_BLOCK = re.compile(r"(?:^|\.)(?:blocks|layers?|resblocks)\.(\d+)\.")


def weights_file(path: Path) -> Path:
    """The weights file of ``path``: the file itself, or the one in a model folder."""
    if path.is_dir():
        for name in FOLDER_FILES:
            if (path / name).is_file():
                return path / name
        raise InputError(path, "model folder holds no weights file (looked for "
                         f"{', '.join(FOLDER_FILES)})")
    if not path.is_file():
        raise InputError(path, "weights file not found")
    return path


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file, a PyTorch checkpoint or a model folder.

    Training checkpoints are unwrapped (``model``, ``state_dict``, ``teacher``) and the
    ``module.`` prefix of data-parallel training is removed.
    """
    path = weights_file(Path(path))
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            loaded: Any = load_file(str(path))
        else:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # any unreadable file: corrupt, pickled code, wrong format
        raise InputError(path, f"cannot read weights ({_reason(error)}); "
                         "expected safetensors or a torch state dict") from error
    for key in _WRAPPERS:
        if isinstance(loaded, dict) and isinstance(loaded.get(key), dict):
            loaded = loaded[key]
    if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor)
                                               for v in loaded.values()):
        raise InputError(path, "is not a state dict of tensors")
    return {str(k).removeprefix("module."): v for k, v in loaded.items()}


def _reason(error: Exception) -> str:
    """Why a weights file could not be read, in one line: torch's own text for a pickle it
    refuses suggests ``weights_only=False``, which would run the file's code."""
    if "WeightsUnpickler error" in str(error):
        return ("it holds Python objects besides tensors, which raptorz never unpickles: "
                "save the state dict alone")
    first = next(iter(str(error).strip().splitlines()), "")[:200]
    return f"{type(error).__name__}: {first}" if first else type(error).__name__


def weights_checksum(state_dict: Mapping[str, torch.Tensor]) -> str:
    """sha256 over the names, dtypes, shapes and bytes of a state dict, in key order."""
    digest = hashlib.sha256()
    for key in sorted(state_dict):
        tensor = state_dict[key].detach().cpu().contiguous()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def block_count(keys: Sequence[str] | Mapping[str, Any]) -> int:
    """Transformer blocks named in ``keys`` (highest block index + 1; 0 when none)."""
    found = [int(m[1]) for k in keys if (m := _BLOCK.search(k)) is not None]
    return max(found) + 1 if found else 0


def _listing(keys: Sequence[str]) -> str:
    shown = ", ".join(keys[:SHOWN_KEYS])
    return shown + (f", ... ({len(keys) - SHOWN_KEYS} more)" if len(keys) > SHOWN_KEYS else "")


def describe_mismatch(state_dict: Mapping[str, torch.Tensor],
                      expected: Mapping[str, torch.Tensor]) -> str | None:
    """A short account of how ``state_dict`` differs from ``expected``, or None if it fits.

    Counts of missing, unexpected and mis-shaped keys with the first few of each, and
    the number of blocks found against the number expected.
    """
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    shapes = [f"{k} {tuple(state_dict[k].shape)} instead of {tuple(v.shape)}"
              for k, v in expected.items()
              if k in state_dict and state_dict[k].shape != v.shape]
    if not (missing or unexpected or shapes):
        return None
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing keys ({_listing(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys ({_listing(unexpected)})")
    if shapes:
        parts.append(f"{len(shapes)} keys of another shape ({_listing(shapes)})")
    found, wanted = block_count(state_dict), block_count(expected)
    if found != wanted:
        parts.append(f"{found} blocks found, {wanted} expected")
    return "; ".join(parts)


def load_strict(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], *,
                path: Path, encoder: str, layout: str, layouts: Sequence[str]) -> None:
    """Load ``state_dict`` into ``model``, refusing any difference with a short summary."""
    problem = describe_mismatch(state_dict, model.state_dict())
    if problem is not None:
        raise InputError(path, f"weights do not fit encoder {encoder!r}: read as the "
                         f"{layout} layout (accepted: {', '.join(layouts)}); {problem}")
    model.load_state_dict(dict(state_dict), strict=True)


def timm_filter(state_dict: dict[str, torch.Tensor],
                model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """timm's own ``checkpoint_filter_fn`` of the model's module, where it has one.

    It converts the layouts timm knows (original DINOv2 and DINOv3, OpenAI CLIP, open_clip
    with a timm trunk, ``segment_anything``) and resamples position embeddings.
    """
    import sys

    checkpoint_filter = getattr(sys.modules[type(model).__module__], "checkpoint_filter_fn",
                                None)
    if checkpoint_filter is None:
        return state_dict
    filtered: dict[str, torch.Tensor] = checkpoint_filter(state_dict, model)
    return filtered
