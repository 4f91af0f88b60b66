"""The kernel's settings and slice positions, with no torch: what a run checks and records.

:class:`KernelSettings` is recorded verbatim in every embeddings store's provenance; the
run reads it (and :func:`slice_indices`, to size its tasks) without loading torch, so
that checking a store or finding nothing to do stays fast.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Literal

import numpy as np

PreprocessMode = Literal["default", "reference"]
ResizeMode = Literal["stretch", "pad", "pad_shared"]

#: The original's names of planes 0, 1, 2 (slices along array axes 0, 1, 2).
PLANE_NAMES = ("A", "C", "S")
#: Slices per forward where the settings leave it to the device (``batch_size=None``).
#: A GPU wants large batches. On a CPU, a small batch keeps a ViT's activations in the
#: caches: DINOv2 ViT-S/14 took 12-15% less time per slice at 16 than at 64 on one
#: thread, 7-15% on two (2-core AMD EPYC, fp32 and bf16; benchmarks/README.md).
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
    tokens: Literal["all", "patch", "cls"] = "all"
    subsample: int = 1
    batch_size: int | None = None
    dedup: bool = True
    keep_tokens: bool = False

    def __post_init__(self) -> None:
        planes = tuple(int(p) for p in self.planes)
        if not planes or len(set(planes)) != len(planes) or not set(planes) <= {0, 1, 2}:
            raise ValueError(f"planes must be distinct axes among 0, 1, 2, got {self.planes}")
        object.__setattr__(self, "planes", planes)
        if self.subsample < 1 or (self.batch_size is not None and self.batch_size < 1):
            raise ValueError("subsample and batch_size must be >= 1")
        for name, value, allowed in (
            ("preprocess", self.preprocess, ("default", "reference")),
            ("resize", self.resize, ("stretch", "pad", "pad_shared")),
            ("tokens", self.tokens, ("all", "patch", "cls")),
        ):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")

    def batch_for(self, device_type: str) -> int:
        """Slices per forward on a device of ``device_type`` (``"cpu"``, ``"cuda"``, ...)."""
        if self.batch_size is not None:
            return self.batch_size
        return CPU_BATCH_SIZE if device_type == "cpu" else DEVICE_BATCH_SIZE


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
        raise ValueError(f"subsample must be >= 1, got {subsample}")
    start = ((length - 1) % subsample) // 2
    return np.arange(start, length, subsample)
