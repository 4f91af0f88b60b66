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

import functools
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from raptorz.embedding.encoders import IMAGENET_MEAN, IMAGENET_STD, InputResize
from raptorz.embedding.settings import PreprocessMode, ResizeMode


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
    images = torch.as_tensor(np.ascontiguousarray(slices)).to(torch.device(device))
    return prepare_slices(images, img_size=img_size, preprocess=preprocess, resize=resize,
                          canvas=canvas, mean=mean, std=std, fit=fit)


def prepare_slices(slices: torch.Tensor, *, img_size: int = 224,
                   preprocess: PreprocessMode = "default", resize: ResizeMode = "stretch",
                   canvas: int | None = None, mean: tuple[float, ...] = IMAGENET_MEAN,
                   std: tuple[float, ...] = IMAGENET_STD,
                   fit: InputResize = "stretch") -> torch.Tensor:
    """:func:`prepare_images` of slices already on their device (any float dtype).

    The ``default`` mode runs where ``slices`` are, with no host-device synchronisation,
    so that a CUDA stream prepares the next batch while the host moves on; ``reference``
    reproduces the original's 8-bit NumPy step on the host and returns to the device.
    """
    device = slices.device
    # the reference interpolates on float64 as the original did; default works in float32
    if preprocess == "reference":
        images = slices.to("cpu", torch.float64)[:, None]
    else:
        images = slices.float()[:, None]
    if resize != "stretch":
        side = canvas if resize == "pad_shared" and canvas else max(images.shape[-2:])
        images = pad_to_square(images, side)
    size = fitted_size(images.shape[-2:], img_size, fit)
    if images.shape[-2:] != size:
        images = F.interpolate(images, size=size, mode="bicubic", align_corners=False)
    if preprocess == "reference":
        images = _reference_quantize_crop(images, img_size).to(device, non_blocking=True)
    mean_, std_ = _normalisation(device, tuple(mean), tuple(std))
    normalised = (images.float().expand(-1, 3, -1, -1) - mean_) / std_
    height, width = normalised.shape[-2:]
    if (height, width) == (img_size, img_size):
        return normalised
    # SAM pads after normalisation, so the padding is 0 in normalised units
    return F.pad(normalised, (0, img_size - width, 0, img_size - height))


@functools.lru_cache(maxsize=16)
def _normalisation(device: torch.device, mean: tuple[float, ...],
                   std: tuple[float, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(3, 1, 1)`` mean and std on ``device``, uploaded once rather than per batch."""
    return (torch.tensor(mean, dtype=torch.float32, device=device)[:, None, None],
            torch.tensor(std, dtype=torch.float32, device=device)[:, None, None])


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
