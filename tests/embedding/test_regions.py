"""Region embeddings against today's embedding and a float64 re-derivation (issue #25).

Tolerances: the kernel runs the encoder in float32 and pools in float64; the references
here encode in float64. As in test_kernel.py, results agree to 1e-5 of the result's
largest magnitude (RTOL). Where both sides run the same float32 encoder on the same
slices (a whole-volume mask against today's embedding, a crop against the hand-cropped
volume), only the float64 summation order differs: 1e-9 of the largest magnitude.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from raptorz.embedding.encoders import Encoder, create_encoder
from raptorz.embedding.kernel import embed_volume
from raptorz.embedding.preprocessing import IMAGENET_MEAN, IMAGENET_STD
from raptorz.embedding.projection import Projector, create_projector
from raptorz.embedding.regions import (
    crop_box,
    embed_regions,
    patch_fractions,
    patch_spans,
    pool_regions,
)
from raptorz.embedding.settings import KernelSettings, RegionSettings
from raptorz.errors import SettingsError
from raptorz.layouts import REGION_ABSENT

RTOL = 1e-5
SAME_ENCODER = 1e-9
MEAN = torch.tensor(IMAGENET_MEAN, dtype=torch.float64)[:, None, None]
STD = torch.tensor(IMAGENET_STD, dtype=torch.float64)[:, None, None]
SETTINGS = KernelSettings(batch_size=16, keep_tokens=True)


def assert_close(actual: np.ndarray, expected: np.ndarray, rtol: float) -> None:
    np.testing.assert_allclose(actual, expected, rtol=0, atol=rtol * np.abs(expected).max())


@pytest.fixture(scope="module")
def projector() -> Projector:
    return create_projector(0, 64, 6)


@pytest.fixture(scope="module")
def scan() -> tuple[np.ndarray, np.ndarray]:
    """A 15 x 18 x 9 volume and labels: 2 in a box, 5 in a ball, 9 nowhere."""
    rng = np.random.default_rng(7)
    volume = rng.random((15, 18, 9))
    mask = np.zeros(volume.shape, np.uint16)
    mask[2:7, 3:12, 1:5] = 2
    x, y, z = np.ogrid[:15, :18, :9]
    mask[(x - 10) ** 2 + (y - 9) ** 2 + (z - 5) ** 2 <= 9] = 5
    return volume, mask


@pytest.fixture(scope="module")
def model64(tiny_vit_weights: tuple[str, Path]) -> torch.nn.Module:
    name, path = tiny_vit_weights
    return create_encoder(name, weights=path, pack=False, device="cpu").model.double()


def encode64(model64: torch.nn.Module, gray: np.ndarray) -> np.ndarray:
    """Tokens ``(257, 64)`` of one slice in float64: bicubic to 224, gray to RGB, norm."""
    image = torch.from_numpy(np.asarray(gray, np.float64))[None, None]
    image = F.interpolate(image, size=(224, 224), mode="bicubic", align_corners=False)
    with torch.no_grad():
        return model64.forward_features(((image[0].expand(3, -1, -1) - MEAN) / STD)[None])[0] \
            .numpy()


@pytest.fixture(scope="module")
def tokens64(model64: torch.nn.Module, scan: tuple[np.ndarray, np.ndarray]
             ) -> list[list[np.ndarray]]:
    """Per plane, per slice of the scan's volume: its float64 tokens (encoded once)."""
    volume, _ = scan
    return [[encode64(model64, np.take(volume, s, axis=plane))
             for s in range(volume.shape[plane])] for plane in range(3)]


def hand_fractions(region: np.ndarray, grid: int = 16) -> np.ndarray:
    """Area fractions by upsampling: each voxel becomes grid x grid sub-voxels, and each
    patch of a stretched slice is then exactly an h x w block of them."""
    h, w = region.shape
    fine = np.kron(region.astype(np.float64), np.ones((grid, grid)))
    return fine.reshape(grid, h, grid, w).mean(axis=(1, 3)).reshape(-1)


def test_whole_volume_mask_equals_todays_embedding(encoder: Encoder, projector: Projector,
                                                   scan: tuple[np.ndarray, np.ndarray]) -> None:
    volume, _ = scan
    today = embed_volume(volume, encoder, [projector], SETTINGS)
    regions = embed_regions(volume, np.ones(volume.shape, np.uint8), [1], encoder,
                            [projector], SETTINGS)
    assert regions.projections[projector.name].shape == (1, 1, 3, 6, 257)
    assert_close(regions.projections[projector.name][:, 0], today.projections[projector.name],
                 SAME_ENCODER)
    assert regions.tokens is not None and today.tokens is not None
    assert_close(regions.tokens[:, 0], today.tokens, SAME_ENCODER)
    assert_close(regions.avgpool[:, 0], today.avgpool, SAME_ENCODER)
    assert regions.slices == today.slices == sum(volume.shape)


@pytest.mark.parametrize("coverage", [0.5, 0.2])
def test_masked_pooling_equals_float64_rederivation(
        encoder: Encoder, tokens64: list[list[np.ndarray]], projector: Projector,
        scan: tuple[np.ndarray, np.ndarray], coverage: float) -> None:
    volume, mask = scan
    result = embed_regions(volume, mask, [2, 5, 9], encoder, [projector], SETTINGS,
                           RegionSettings(coverage=coverage))
    assert result.region_status.tolist() == [[1, 1, REGION_ABSENT]]
    assert np.isnan(result.projections[projector.name][0, 2]).all()
    for r, value in enumerate((2, 5)):
        for plane in range(3):
            sums, counts = np.zeros((257, 64)), np.zeros(257)
            for s in range(volume.shape[plane]):
                region = np.take(mask, s, axis=plane) == value
                if not region.any():
                    continue
                weight = np.concatenate([[1.0], hand_fractions(region) >= coverage])
                sums += weight[:, None] * tokens64[plane][s]
                counts += weight
            means = sums / np.maximum(counts, 1)[:, None]
            assert result.tokens is not None
            assert_close(result.tokens[0, r, plane], means, RTOL)
            assert_close(result.projections[projector.name][0, r, plane],
                         projector.matrix.T @ means.T, RTOL)
            assert 0 < counts[1:].sum() < 256 * counts[0]  # some patches, not all


def test_crop_equals_embedding_the_hand_cropped_volume(
        encoder: Encoder, projector: Projector, scan: tuple[np.ndarray, np.ndarray]) -> None:
    volume, mask = scan
    spacing = (1.0, 2.0, 3.0)
    result = embed_regions(volume, mask, [5, 2], encoder, [projector], SETTINGS,
                           RegionSettings(mode="crop", margin_mm=2.5), spacing=spacing)
    # ball of label 5: x 7..13, y 6..12, z 2..8; a 2.5 mm margin is 3, 2 and 1 voxels
    assert crop_box(mask, 5, spacing, 2.5) == (slice(4, 15), slice(4, 15), slice(1, 9))
    for r, value in enumerate((5, 2)):
        box = crop_box(mask, value, spacing, 2.5)
        assert box is not None
        expected = embed_volume(volume[box], encoder, [projector], SETTINGS)
        assert_close(result.projections[projector.name][:, r],
                     expected.projections[projector.name], SAME_ENCODER)
        assert_close(result.avgpool[:, r], expected.avgpool, SAME_ENCODER)
    assert result.slices == sum(sum(b.stop - b.start for b in crop_box(mask, v, spacing, 2.5)
                                    or ()) for v in (5, 2))


@pytest.mark.parametrize(("resize", "preprocess"), [("pad", "default"), ("pad_shared", "default"),
                                                    ("stretch", "reference")])
def test_patch_fractions_follow_the_preprocessing_geometry(
        encoder: Encoder, resize: str, preprocess: str) -> None:
    """A full 10 x 20 slice: padded, its patches cover exactly the rows of the centered
    band; the reference mode's center crop shows the central 7/8 of it."""
    settings = KernelSettings(resize=resize, preprocess=preprocess)  # type: ignore[arg-type]
    spans = patch_spans(10, 20, encoder, settings, canvas=30 if resize == "pad_shared" else None)
    fractions = patch_fractions(np.ones((1, 10, 20), bool), spans, 16, (10, 20)).reshape(16, 16)
    if preprocess == "reference":
        np.testing.assert_allclose(fractions, 1.0)
        assert spans[0] == pytest.approx((10 / 256 * 16, 10 / 256 * 14))
        return
    side = 30 if resize == "pad_shared" else 20
    rows = np.clip(np.minimum((np.arange(16) + 1) * side / 16, (side - 10) // 2 + 10)
                   - np.maximum(np.arange(16) * side / 16, (side - 10) // 2), 0, None) * 16 / side
    np.testing.assert_allclose(fractions[:, 8], rows)  # a middle column: fully inside
    np.testing.assert_allclose(fractions.sum(), 10 * 20 / side**2 * 256)


def test_region_settings_are_checked() -> None:
    with pytest.raises(SettingsError, match="coverage"):
        RegionSettings(coverage=0)
    with pytest.raises(SettingsError, match="region_mode"):
        RegionSettings(mode="bbox")  # type: ignore[arg-type]


def test_a_block_pools_each_volume_as_alone_constant_slices_included(
        encoder: Encoder, scan: tuple[np.ndarray, np.ndarray]) -> None:
    """Two volumes in one block, batches of 5 slices that straddle volumes and planes, and
    constant slices (served by one encoding, dedup) that the regions cut: each volume's
    region means equal those of the volume alone without dedup."""
    volume, mask = scan
    other = volume[::-1].copy()
    other[:, :, 6:] = 0.25  # constant slices of plane 2, cut by the ball of label 5
    masks = np.stack([mask, mask[::-1]])
    batched = KernelSettings(batch_size=5)
    means, counts, present, slices = pool_regions(np.stack([volume, other]), masks, [2, 5],
                                                  encoder, batched, 0.5)
    assert slices == 2 * sum(volume.shape) and present.all()
    for b, alone in enumerate((volume, other)):
        expected = pool_regions(alone[None], masks[b:b + 1], [2, 5], encoder,
                                KernelSettings(batch_size=7, dedup=False), 0.5)
        assert_close(means[b], expected[0][0], RTOL)
        np.testing.assert_array_equal(counts[b], expected[1][0])
