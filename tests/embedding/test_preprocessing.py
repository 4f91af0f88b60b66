"""Preprocessing: each mode against an independent numpy (and PIL) re-derivation."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from raptorz.embedding.preprocessing import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    canvas_size,
    iter_slices,
    prepare_images,
)
from raptorz.embedding.settings import slice_indices


def bicubic_matrix(n_in: int, n_out: int, a: float = -0.75) -> np.ndarray:
    """``(n_out, n_in)`` float64 weights of torch's bicubic resize (align_corners=False,
    no antialias, Keys kernel with a = -0.75, border samples repeated)."""
    def keys(x: np.ndarray) -> np.ndarray:
        x = np.abs(x)
        return np.where(x <= 1, (a + 2) * x**3 - (a + 3) * x**2 + 1,
                        np.where(x < 2, a * x**3 - 5 * a * x**2 + 8 * a * x - 4 * a, 0.0))

    matrix = np.zeros((n_out, n_in))
    for out in range(n_out):
        centre = (out + 0.5) * n_in / n_out - 0.5
        base = int(np.floor(centre))
        for tap in range(base - 1, base + 3):
            matrix[out, min(max(tap, 0), n_in - 1)] += keys(np.array(centre - tap))
    return matrix


def normalize(gray: np.ndarray) -> np.ndarray:
    """``(h, w)`` gray in [0, 1] -> ``(3, h, w)`` ImageNet-normalized."""
    mean = np.array(IMAGENET_MEAN)[:, None, None]
    std = np.array(IMAGENET_STD)[:, None, None]
    return (gray[None] - mean) / std


def reference_by_pil(gray: np.ndarray) -> np.ndarray:
    """The original's steps as raptor-method.md lists them, with numpy and PIL only."""
    resized = bicubic_matrix(gray.shape[0], 224) @ gray @ bicubic_matrix(gray.shape[1], 224).T
    eight_bit = (resized * 256).astype(np.uint8)  # the original's cast: 1.0 wraps to 0
    rgb = Image.fromarray(eight_bit, mode="L").convert("RGB")
    big = np.asarray(rgb.resize((256, 256), Image.Resampling.BICUBIC), dtype=np.float64)
    crop = big[16:240, 16:240, 0]
    return normalize(crop / 255.0)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


def test_slice_indices_are_centered_and_equidistant() -> None:
    assert slice_indices(5).tolist() == [0, 1, 2, 3, 4]
    assert slice_indices(10, 3).tolist() == [0, 3, 6, 9]
    assert slice_indices(12, 3).tolist() == [1, 4, 7, 10]
    assert slice_indices(10, 4).tolist() == [0, 4, 8]
    assert slice_indices(2, 5).tolist() == [0]
    with pytest.raises(ValueError, match="subsample"):
        slice_indices(4, 0)


def test_iter_slices_follows_the_axes_without_copies(rng: np.random.Generator) -> None:
    volume = rng.random((4, 5, 6))
    assert np.array_equal(next(iter_slices(volume, 0, np.array([2]))), volume[2])
    assert np.array_equal(next(iter_slices(volume, 1, np.array([3]))), volume[:, 3, :])
    slices = list(iter_slices(volume, 2, np.array([1, 5])))
    assert np.array_equal(slices[1], volume[:, :, 5])
    assert all(np.shares_memory(s, volume) for s in slices)
    assert canvas_size((4, 5, 6), "pad_shared") == 6 and canvas_size((4, 5, 6), "pad") is None


def test_default_mode_is_bicubic_stretch_and_imagenet_norm(rng: np.random.Generator) -> None:
    slices = rng.random((2, 28, 31))
    images = prepare_images(slices).numpy()
    assert images.shape == (2, 3, 224, 224) and images.dtype == np.float32
    for image, gray in zip(images, slices, strict=True):
        expected = bicubic_matrix(28, 224) @ gray @ bicubic_matrix(31, 224).T
        # float32 interpolation of values in [0, 1], then divided by std ~0.22
        np.testing.assert_allclose(image, normalize(expected), atol=2e-5, rtol=0)


def test_image_size_slices_are_only_normalized(rng: np.random.Generator) -> None:
    slices = rng.random((1, 224, 224))
    np.testing.assert_allclose(prepare_images(slices).numpy()[0], normalize(slices[0]),
                               atol=1e-6)


@pytest.mark.parametrize(("resize", "canvas", "side"), [("pad", None, 30),
                                                        ("pad_shared", 40, 40)])
def test_pad_modes_center_the_slice(rng: np.random.Generator, resize: str, canvas: int | None,
                                    side: int) -> None:
    gray = rng.random((30, 11))
    padded = np.zeros((side, side))
    top, left = (side - 30) // 2, (side - 11) // 2
    padded[top:top + 30, left:left + 11] = gray
    expected = bicubic_matrix(side, 224) @ padded @ bicubic_matrix(side, 224).T
    image = prepare_images(gray[None], resize=resize, canvas=canvas).numpy()[0]  # type: ignore[arg-type]
    np.testing.assert_allclose(image, normalize(expected), atol=2e-5, rtol=0)


def assert_matches(image: np.ndarray, expected: np.ndarray) -> None:
    """torchvision's antialiased uint8 bicubic follows PIL's integer arithmetic, so every
    uint8 value agrees (one step would be 0.018 after /255 and /std): only fp32 rounding
    of the normalization remains."""
    np.testing.assert_allclose(image, expected, atol=1e-5, rtol=0)


def test_reference_mode_matches_pil_rederivation(rng: np.random.Generator) -> None:
    gray = rng.random((28, 31)) * 0.98
    gray[4:8] = 0.99
    gray[8, 5:20] = 0.0  # a sharp edge under bright rows: bicubic overshoots above 1.0
    resized = bicubic_matrix(28, 224) @ gray @ bicubic_matrix(31, 224).T
    assert resized.max() > 1.0 + 1e-3  # so the wrap of the 8-bit cast is exercised
    image = prepare_images(gray[None], preprocess="reference").numpy()[0]
    assert_matches(image, reference_by_pil(gray))


def test_reference_mode_wraps_one_to_zero(rng: np.random.Generator) -> None:
    # at 224 px the bicubic step is the identity, so exact 1.0 reaches the 8-bit cast
    gray = rng.random((224, 224)) * 0.9
    gray[:40] = 1.0
    image = prepare_images(gray[None], preprocess="reference").numpy()[0]
    assert_matches(image, reference_by_pil(gray))
    black = (0 - IMAGENET_MEAN[0]) / IMAGENET_STD[0]
    np.testing.assert_allclose(image[0, :20, 100:120], black, atol=1e-6)
