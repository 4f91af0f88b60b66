"""The kernel's settings and slice positions, with no torch: what a run checks and records.

:class:`KernelSettings` is recorded verbatim in every embeddings store's provenance; the
run reads it (and :func:`slice_indices`, to size its tasks) without loading torch, so
that checking a store or finding nothing to do stays fast.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Literal

import numpy as np

from raptorz.errors import SettingsError

PreprocessMode = Literal["default", "reference"]
#: Which tokens are kept: prefix and patch tokens, patch tokens only, or the CLS token.
TokenSelection = Literal["all", "patch", "cls"]
ResizeMode = Literal["stretch", "pad", "pad_shared"]

#: The original's names of planes 0, 1, 2 (slices along array axes 0, 1, 2).
PLANE_NAMES = ("A", "C", "S")
#: Slices per forward where the settings leave it to the device (``batch_size=None``).
#: A GPU wants large batches. On a CPU, a small batch keeps a ViT's activations in the
#: caches (benchmarks/README.md measures batch sizes).
CPU_BATCH_SIZE: Final = 16
DEVICE_BATCH_SIZE: Final = 64


@dataclass(frozen=True)
class KernelSettings:
    """How slices become pooled tokens (recorded verbatim in store provenance).

    Parameters
    ----------
    planes
        Array axes whose slices are encoded, in output order.
    preprocess
        ``default`` or ``reference`` (see :mod:`raptorz.embedding.preprocessing`).
    resize
        ``stretch``, ``pad`` or ``pad_shared``.
    tokens
        ``all`` (prefix + patch tokens, the original layout), ``patch`` (patch only) or
        ``cls`` (the CLS token only; refused for feature-map encoders such as SAM).
    subsample
        Keep every n-th slice along each axis (centered); 1 keeps all.
    batch_size
        Images per encoder forward; ``None`` (default): :data:`DEVICE_BATCH_SIZE` on a GPU,
        :data:`CPU_BATCH_SIZE` on a CPU (:meth:`batch_for`). The results do not depend
        on it (the tokens' sums are float64), and a store resumes with any.
    dedup
        Encode each distinct constant slice once (exact up to fp32 rounding).
    keep_tokens
        Also return the pooled tokens, so later projections need no encoder run.
    """

    planes: tuple[int, ...] = (0, 1, 2)
    preprocess: PreprocessMode = "default"
    resize: ResizeMode = "stretch"
    tokens: TokenSelection = "all"
    subsample: int = 1
    batch_size: int | None = None
    dedup: bool = True
    keep_tokens: bool = False

    def __post_init__(self) -> None:
        planes = tuple(int(p) for p in self.planes)
        if not planes or len(set(planes)) != len(planes) or not set(planes) <= {0, 1, 2}:
            raise SettingsError(f"must be distinct axes among 0, 1, 2, not {self.planes}",
                                option="planes")
        object.__setattr__(self, "planes", planes)
        for name, number in (("subsample", self.subsample), ("batch_size", self.batch_size)):
            if number is not None and number < 1:
                raise SettingsError(f"must be at least 1, not {number}", option=name)
        for name, value, allowed in (
            ("preprocess", self.preprocess, ("default", "reference")),
            ("resize", self.resize, ("stretch", "pad", "pad_shared")),
            ("tokens", self.tokens, ("all", "patch", "cls")),
        ):
            if value not in allowed:
                raise SettingsError(f"must be one of {', '.join(allowed)}, not {value!r}",
                                    option=name)

    def batch_for(self, device_type: str) -> int:
        """Slices per forward on a device of ``device_type`` (``"cpu"``, ``"cuda"``, ...)."""
        if self.batch_size is not None:
            return self.batch_size
        return CPU_BATCH_SIZE if device_type == "cpu" else DEVICE_BATCH_SIZE


RegionMode = Literal["onepass", "crop"]


@dataclass(frozen=True)
class RegionSettings:
    """How regions of a masks store are embedded (recorded in the store's provenance).

    Parameters
    ----------
    mode
        ``onepass``: every slice encoded once, as without regions; each region pools the
        patch tokens whose patch the region covers (``coverage``), over the slices that
        cut it, and the prefix tokens (CLS, registers) over the same slices. ``crop``:
        each region's bounding box plus ``margin_mm`` is cut out and embedded as a volume
        of its own (only the slices through the box are encoded).
    coverage
        ``onepass``: the least fraction of a patch's area the region must cover (in
        (0, 1]) for the patch's token to be pooled.
    margin_mm
        ``crop``: millimetres added around the bounding box on every side (clipped to the
        volume).
    """

    mode: RegionMode = "onepass"
    coverage: float = 0.5
    margin_mm: float = 10.0

    def __post_init__(self) -> None:
        if self.mode not in ("onepass", "crop"):
            raise SettingsError(f"must be onepass or crop, not {self.mode!r}",
                                option="region_mode")
        if not 0 < self.coverage <= 1:
            raise SettingsError(f"must be in (0, 1], not {self.coverage}", option="coverage")
        if not self.margin_mm >= 0:
            raise SettingsError(f"must be at least 0, not {self.margin_mm}",
                                option="margin_mm")


@dataclass(frozen=True)
class RegionRequest:
    """The regions a run embeds: the masks store, each region's name and label value, and
    the :class:`RegionSettings`."""

    masks: str
    names: tuple[str, ...]
    values: tuple[int, ...]
    settings: RegionSettings


def slice_indices(length: int, subsample: int = 1) -> np.ndarray:
    """Equidistant slice positions along an axis of ``length`` slices.

    Every ``subsample``-th slice, the unused remainder split evenly between both ends so
    that the kept slices are centered (``subsample=1`` keeps all).

    Examples
    --------
    >>> slice_indices(12, 3).tolist()
    [1, 4, 7, 10]
    """
    if subsample < 1:
        raise SettingsError(f"must be at least 1, not {subsample}", option="subsample")
    start = ((length - 1) % subsample) // 2
    return np.arange(start, length, subsample)


def token_kinds(num_tokens: int, num_prefix_tokens: int) -> tuple[str, ...]:
    """``cls`` / ``register`` / ``patch`` per token of an encoder (prefix tokens first;
    an encoder without prefix tokens, such as SAM's feature map, has patches only)."""
    registers = max(num_prefix_tokens - 1, 0)
    return (("cls",) * min(num_prefix_tokens, 1) + ("register",) * registers
            + ("patch",) * (num_tokens - num_prefix_tokens))


def token_slice(num_prefix_tokens: int, tokens: TokenSelection) -> slice:
    """The tokens kept by ``tokens`` (``all``, ``patch`` or ``cls``), as a slice.

    Raises
    ------
    SettingsError
        ``tokens="cls"`` for an encoder without prefix tokens.
    """
    if tokens == "cls":
        if num_prefix_tokens == 0:
            raise SettingsError("'cls': this encoder has no CLS token (its tokens are "
                                "feature-map positions); use 'all' or 'patch'", option="tokens")
        return slice(0, 1)
    return slice(num_prefix_tokens if tokens == "patch" else 0, None)
