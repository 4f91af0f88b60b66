"""Slices to encoder images: planes, subsampling, resize modes, the two preprocessing modes.

``default``
    Each slice is resized to ``img_size`` x ``img_size`` by bicubic interpolation on the
    device (float32, ``align_corners=False``, no antialias: the original's first step),
    the gray value copied to 3 channels and normalized with the encoder's mean and std
    (ImageNet's by default). SAM's encoders resize the longest side instead and are
    zero-padded right and bottom after normalisation (``fit="longest_side"``).
    No 8-bit quantization, no crop: the encoder sees the whole slice at full precision.
``reference``
    Reproduces the original tool step by step (see ``raptor-method.md``): bicubic to 224
    on float64, ``(v * 256).astype(uint8)`` (so 1.0 wraps to 0), torchvision's antialiased
    bicubic resize of the shortest edge to 256 on the uint8 image (rounded to uint8),
    center crop to 224, ``/ 255``, ImageNet normalization.

Resize modes: ``stretch`` (the slice fills the square), ``pad`` (zero-padded to a
centered square first, aspect ratio kept) and ``pad_shared`` (every slice of a volume
padded to one square, the volume's largest side, so all planes share one scale).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from raptorz.embedding.encoders import IMAGENET_MEAN, IMAGENET_STD, InputResize

PreprocessMode = Literal["default", "reference"]
ResizeMode = Literal["stretch", "pad", "pad_shared"]



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


def iter_slices(volume: np.ndarray, axis: int,
                indices: np.ndarray) -> Iterator[np.ndarray]:
    """Views ``volume[i, :, :]`` (axis 0), ``[:, i, :]`` (1) or ``[:, :, i]`` (2), no copies."""
    moved = np.moveaxis(volume, axis, 0)
    for index in indices:
        yield moved[index]


def canvas_size(shape: tuple[int, ...], resize: ResizeMode) -> int | None:
    """Square side every slice of a volume of ``shape`` is padded to (``pad_shared`` only)."""
    return max(shape) if resize == "pad_shared" else None


def pad_to_square(slices: torch.Tensor, size: int) -> torch.Tensor:
    """Zero-pad ``(..., h, w)`` centered to ``(..., size, size)``."""
    height, width = slices.shape[-2:]
    top, left = (size - height) // 2, (size - width) // 2
    return F.pad(slices, (left, size - width - left, top, size - height - top))


def prepare_images(slices: np.ndarray, *, img_size: int = 224,
                   preprocess: PreprocessMode = "default", resize: ResizeMode = "stretch",
                   canvas: int | None = None, device: torch.device | str = "cpu",
                   mean: tuple[float, ...] = IMAGENET_MEAN,
                   std: tuple[float, ...] = IMAGENET_STD,
                   fit: InputResize = "stretch") -> torch.Tensor:
    """Encoder input of a stack of same-shaped slices.

    Parameters
    ----------
    slices
        ``(n, h, w)`` intensities in [0, 1].
    img_size
        Side of the square images.
    preprocess
        ``default`` or ``reference`` (module docstring).
    resize
        ``stretch``, ``pad`` or ``pad_shared``.
    canvas
        Square side for ``pad_shared`` (:func:`canvas_size`); ignored otherwise.
    device
        Where the images are made and returned.
    mean, std
        The encoder's normalisation on the [0, 1] scale (``Encoder.mean``, ``.std``).
    fit
        The encoder's resize: ``stretch`` to the square, or SAM's ``longest_side`` (aspect
        kept, zero padding right and bottom after normalisation).

    Returns
    -------
    torch.Tensor
        ``(n, 3, img_size, img_size)`` float32, normalized.
    """
    device = torch.device(device)
    # the reference interpolates on float64 as the original did; default works in float32
    dtype = torch.float64 if preprocess == "reference" else torch.float32
    where = torch.device("cpu") if preprocess == "reference" else device
    images = torch.as_tensor(np.ascontiguousarray(slices), dtype=dtype).to(where)[:, None]
    if resize != "stretch":
        side = canvas if resize == "pad_shared" and canvas else max(images.shape[-2:])
        images = pad_to_square(images, side)
    size = fitted_size(images.shape[-2:], img_size, fit)
    if images.shape[-2:] != size:
        images = F.interpolate(images, size=size, mode="bicubic", align_corners=False)
    if preprocess == "reference":
        images = _reference_quantize_crop(images, img_size).to(device)
    mean_ = torch.tensor(mean, dtype=torch.float32, device=device)[:, None, None]
    std_ = torch.tensor(std, dtype=torch.float32, device=device)[:, None, None]
    normalised = (images.float().expand(-1, 3, -1, -1) - mean_) / std_
    height, width = normalised.shape[-2:]
    if (height, width) == (img_size, img_size):
        return normalised
    # SAM pads after normalisation, so the padding is 0 in normalised units
    return F.pad(normalised, (0, img_size - width, 0, img_size - height))


def fitted_size(shape: tuple[int, ...] | torch.Size, img_size: int,
                fit: InputResize) -> tuple[int, int]:
    """Size a ``(h, w)`` slice is resized to: the square, or SAM's longest side rule.

    Examples
    --------
    >>> fitted_size((30, 60), 1024, "longest_side")
    (512, 1024)
    """
    if fit == "stretch":
        return img_size, img_size
    height, width = int(shape[-2]), int(shape[-1])
    scale = img_size / max(height, width)
    # segment_anything's ResizeLongestSide.get_preprocess_shape: round half up
    return int(height * scale + 0.5), int(width * scale + 0.5)


def _reference_quantize_crop(images: torch.Tensor, img_size: int) -> torch.Tensor:
    """The original's 8-bit step, shortest-edge resize and center crop, as values in [0, 1]."""
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2 import functional as TF

    # NumPy's float -> uint8 cast is what wraps 1.0 (256) to 0; reproduce it with NumPy
    quantized = torch.from_numpy((images.numpy() * 256).astype(np.uint8))
    resized = TF.resize(quantized, [img_size * 8 // 7], interpolation=InterpolationMode.BICUBIC,
                        antialias=True)
    cropped = TF.center_crop(resized, [img_size, img_size])
    return cropped.to(torch.float32) / 255.0
