"""The kernel against a plain float64 computation: encode each slice, mean, project."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from raptorz.embedding.encoders import Encoder, create_encoder
from raptorz.embedding.kernel import embed_block, embed_volume
from raptorz.embedding.preprocessing import IMAGENET_MEAN, IMAGENET_STD
from raptorz.embedding.projection import Projector, create_projector, project_tokens
from raptorz.embedding.settings import PLANE_NAMES, KernelSettings
from raptorz.errors import InputError

MEAN = torch.tensor(IMAGENET_MEAN, dtype=torch.float64)[:, None, None]
STD = torch.tensor(IMAGENET_STD, dtype=torch.float64)[:, None, None]
#: fp32 kernel vs float64 reference: relative to the largest magnitude of the result
RTOL = 1e-5


@pytest.fixture(scope="module")
def model64(tiny_vit_weights: tuple[str, Path]) -> torch.nn.Module:
    """The encoder's timm model in float64 (unpacked: packed layers hold fp32 weights)."""
    name, path = tiny_vit_weights
    return create_encoder(name, weights=path, pack=False, device="cpu").model.double()


@pytest.fixture(scope="module")
def projectors() -> list[Projector]:
    return [create_projector(0, 64, 10), create_projector(5, 64, 3, name="small")]


@pytest.fixture(scope="module")
def odd_volume() -> np.ndarray:
    """28 x 31 x 17, seeded, with constant zero borders and one constant 0.5 slice."""
    volume = np.random.default_rng(42).random((28, 31, 17))
    volume[:3] = 0.0
    volume[:, :, -2:] = 0.0
    volume[:, 20, :] = 0.5
    return volume


def encode64(model64: torch.nn.Module, gray: np.ndarray) -> np.ndarray:
    """Tokens of one slice, in float64: bicubic to 224, gray to RGB, ImageNet norm."""
    image = torch.from_numpy(np.asarray(gray, dtype=np.float64))[None, None]
    if image.shape[-2:] != (224, 224):
        image = F.interpolate(image, size=(224, 224), mode="bicubic", align_corners=False)
    image = (image[0].expand(3, -1, -1) - MEAN) / STD
    with torch.no_grad():
        return model64.forward_features(image[None])[0].numpy()


def plain_embedding(model64: torch.nn.Module, volume: np.ndarray, planes: tuple[int, ...],
                    matrix: np.ndarray, encode=encode64) -> tuple[np.ndarray, np.ndarray]:
    """The method written out: per plane, mean tokens of every slice, then R^T @ mean^T."""
    pooled = []
    for axis in planes:
        tokens = [encode(model64, np.take(volume, i, axis=axis))
                  for i in range(volume.shape[axis])]
        pooled.append(np.mean(tokens, axis=0))
    pooled_array = np.stack(pooled)  # (planes, T, D)
    return np.stack([matrix.T @ plane.T for plane in pooled_array]), pooled_array


@pytest.fixture(scope="module")
def reference(model64: torch.nn.Module, odd_volume: np.ndarray,
              projectors: list[Projector]) -> tuple[np.ndarray, np.ndarray]:
    """Float64 embedding (3, K, T) and pooled tokens (3, T, D) of the odd volume."""
    return plain_embedding(model64, odd_volume, (0, 1, 2), projectors[0].matrix)


def assert_close(actual: np.ndarray, expected: np.ndarray, rtol: float = RTOL) -> None:
    np.testing.assert_allclose(actual, expected, rtol=0, atol=rtol * np.abs(expected).max())


@pytest.mark.parametrize("planes", [(0,), (1,), (2,), (0, 1), (2, 0), (1, 2), (0, 1, 2)])
def test_kernel_equals_plain_float64(encoder: Encoder, odd_volume: np.ndarray,
                                     projectors: list[Projector],
                                     reference: tuple[np.ndarray, np.ndarray],
                                     planes: tuple[int, ...]) -> None:
    result = embed_volume(odd_volume, encoder, projectors,
                          KernelSettings(planes=planes, batch_size=16, keep_tokens=True))
    expected, pooled = reference
    projection = result.projections[projectors[0].name]
    assert projection.shape == (1, len(planes), 10, 257) and projection.dtype == np.float32
    assert_close(projection[0], expected[list(planes)])
    assert result.tokens is not None and result.tokens.shape == (1, len(planes), 257, 64)
    assert_close(result.tokens[0], pooled[list(planes)])
    assert_close(result.avgpool[0], pooled[list(planes)].mean(axis=(0, 1)))
    assert result.slices == sum(odd_volume.shape[p] for p in planes)


def test_pool_then_project_equals_project_then_pool(
        encoder: Encoder, model64: torch.nn.Module, odd_volume: np.ndarray,
        projectors: list[Projector], reference: tuple[np.ndarray, np.ndarray]) -> None:
    matrix = projectors[0].matrix
    per_slice = [encode64(model64, odd_volume[:, :, i]) @ matrix for i in range(17)]
    project_then_pool = np.mean(per_slice, axis=0).T  # (K, T)
    np.testing.assert_allclose(reference[0][2], project_then_pool, rtol=1e-10, atol=1e-10)
    result = embed_volume(odd_volume, encoder, projectors, KernelSettings(keep_tokens=True))
    assert result.tokens is not None
    again = project_tokens(result.tokens, projectors)
    for projector in projectors:
        assert_close(again[projector.name], result.projections[projector.name], 1e-6)


def test_several_projectors_in_one_pass(encoder: Encoder, odd_volume: np.ndarray,
                                        projectors: list[Projector]) -> None:
    together = embed_volume(odd_volume, encoder, projectors)
    for projector in projectors:
        alone = embed_volume(odd_volume, encoder, [projector])
        assert np.array_equal(alone.projections[projector.name],
                              together.projections[projector.name])
    assert together.projections["small"].shape == (1, 3, 3, 257)


def test_dedup_equals_no_dedup(encoder: Encoder, odd_volume: np.ndarray,
                               projectors: list[Projector]) -> None:
    block = np.stack([odd_volume, odd_volume[::-1] * 0.7, np.zeros_like(odd_volume)])
    constant = sum(int(np.ptp(np.take(v, i, axis=a)) == 0)
                   for v in block for a in range(3) for i in range(v.shape[a]))
    on = embed_block(block, encoder, projectors, KernelSettings(batch_size=13))
    off = embed_block(block, encoder, projectors, KernelSettings(batch_size=13, dedup=False))
    assert (on.constant_slices, off.constant_slices) == (constant, 0)
    assert on.slices == off.slices == 3 * 76
    for projector in projectors:
        assert_close(on.projections[projector.name], off.projections[projector.name])
    assert_close(on.avgpool, off.avgpool)


def test_the_default_batch_size_follows_the_device(encoder: Encoder, odd_volume: np.ndarray,
                                                   projectors: list[Projector]) -> None:
    """A CPU runs batches of 16 (its caches), a GPU of 64; a set size wins; same result."""
    assert (KernelSettings().batch_for("cpu"), KernelSettings().batch_for("cuda")) == (16, 64)
    assert KernelSettings(batch_size=5).batch_for("cuda") == 5
    default = embed_volume(odd_volume, encoder, projectors, KernelSettings(dedup=False))
    large = embed_volume(odd_volume, encoder, projectors,
                         KernelSettings(batch_size=64, dedup=False))
    assert (default.batch_size, large.batch_size) == (16, 64)
    for name in default.projections:
        assert_close(default.projections[name], large.projections[name])


def test_block_equals_volumes_one_by_one(encoder: Encoder, odd_volume: np.ndarray,
                                         projectors: list[Projector]) -> None:
    second = np.random.default_rng(7).random(odd_volume.shape)
    block = embed_block(np.stack([odd_volume, second]), encoder, projectors,
                        KernelSettings(batch_size=50))
    for b, volume in enumerate((odd_volume, second)):
        alone = embed_volume(volume, encoder, projectors, KernelSettings(batch_size=50))
        assert_close(block.projections["small"][b], alone.projections["small"][0])
        assert_close(block.avgpool[b], alone.avgpool[0])


def test_same_inputs_give_identical_outputs(encoder: Encoder, odd_volume: np.ndarray,
                                            projectors: list[Projector]) -> None:
    settings = KernelSettings(batch_size=20, keep_tokens=True)
    first = embed_volume(odd_volume, encoder, projectors, settings)
    second = embed_volume(odd_volume.copy(), encoder, projectors, settings)
    for name in first.projections:
        assert np.array_equal(first.projections[name], second.projections[name])
    assert first.tokens is not None and second.tokens is not None
    assert np.array_equal(first.tokens, second.tokens)


def test_layout_matches_the_original_flattening(encoder: Encoder, odd_volume: np.ndarray,
                                                projectors: list[Projector]) -> None:
    result = embed_volume(odd_volume, encoder, projectors[:1], KernelSettings(keep_tokens=True))
    assert result.tokens is not None
    tokens, matrix = result.tokens[0].astype(np.float64), projectors[0].matrix
    # the original: per plane R^T @ mean^T (K, T), planes stacked, flattened row-major
    original = np.concatenate([(matrix.T @ tokens[p].T).ravel() for p in range(3)])
    flat = result.projections[projectors[0].name][0].reshape(-1)
    assert flat.shape == (3 * 10 * 257,)
    assert_close(flat, original)
    k_count, t_count = 10, 257
    for plane, k, t in [(0, 0, 0), (1, 3, 0), (2, 9, 256), (1, 7, 131)]:
        index = ((plane * k_count) + k) * t_count + t
        assert flat[index] == pytest.approx(matrix[:, k] @ tokens[plane, t], rel=1e-5)
    assert PLANE_NAMES == ("A", "C", "S")


def test_patch_tokens_drop_the_prefix(encoder: Encoder, odd_volume: np.ndarray,
                                      projectors: list[Projector]) -> None:
    full = embed_volume(odd_volume, encoder, projectors, KernelSettings(keep_tokens=True))
    patch = embed_volume(odd_volume, encoder, projectors,
                         KernelSettings(tokens="patch", keep_tokens=True))
    assert patch.projections["small"].shape == (1, 3, 3, 256)
    assert np.array_equal(patch.projections["small"], full.projections["small"][..., 1:])
    assert full.tokens is not None and patch.tokens is not None
    assert_close(patch.avgpool[0], full.tokens[0, :, 1:].mean(axis=(0, 1)))


def test_subsample_keeps_centered_equidistant_slices(encoder: Encoder, odd_volume: np.ndarray,
                                                     projectors: list[Projector]) -> None:
    sub = embed_volume(odd_volume, encoder, projectors,
                       KernelSettings(planes=(1,), subsample=4))
    # 31 slices, every 4th: (30 % 4) // 2 = 1 -> 1, 5, ..., 29
    kept = embed_volume(odd_volume[:, 1::4], encoder, projectors, KernelSettings(planes=(1,)))
    assert sub.slices == kept.slices == 8
    assert_close(sub.projections["small"], kept.projections["small"])


@pytest.mark.parametrize("resize", ["pad", "pad_shared"])
def test_pad_modes_run_and_differ_from_stretch(encoder: Encoder, odd_volume: np.ndarray,
                                               projectors: list[Projector], resize: str) -> None:
    stretch = embed_volume(odd_volume, encoder, projectors)
    padded = embed_volume(odd_volume, encoder, projectors,
                          KernelSettings(resize=resize))  # type: ignore[arg-type]
    off = embed_volume(odd_volume, encoder, projectors,
                       KernelSettings(resize=resize, dedup=False))  # type: ignore[arg-type]
    assert_close(padded.projections["small"], off.projections["small"])
    assert not np.allclose(padded.projections["small"], stretch.projections["small"])


def test_reference_mode_equals_pil_rederivation(encoder: Encoder, model64: torch.nn.Module,
                                                projectors: list[Projector]) -> None:
    volume = np.random.default_rng(3).random((20, 24, 18)) * 0.95
    volume[:, :, :2] = 1.0  # exactly 1.0 wraps to 0 in the original's 8-bit cast

    def encode_like_the_original(model: torch.nn.Module, gray: np.ndarray) -> np.ndarray:
        resized = F.interpolate(torch.from_numpy(gray)[None, None], size=(224, 224),
                                mode="bicubic", align_corners=False)[0, 0].numpy()
        pil = Image.fromarray((resized * 256).astype(np.uint8), mode="L").convert("RGB")
        crop = np.asarray(pil.resize((256, 256), Image.Resampling.BICUBIC))[16:240, 16:240]
        image = (torch.from_numpy(crop / 255.0).permute(2, 0, 1) - MEAN) / STD
        with torch.no_grad():
            return model.forward_features(image[None])[0].numpy()

    expected, _ = plain_embedding(model64, volume, (0, 1, 2), projectors[0].matrix,
                                  encode_like_the_original)
    result = embed_volume(volume, encoder, projectors, KernelSettings(preprocess="reference"))
    assert_close(result.projections[projectors[0].name][0], expected)


def test_bf16_kernel_is_close_to_fp32(tiny_vit_weights: tuple[str, Path], encoder: Encoder,
                                      odd_volume: np.ndarray,
                                      projectors: list[Projector]) -> None:
    name, path = tiny_vit_weights
    bf16 = create_encoder(name, weights=path, precision="bf16", device="cpu")
    fast = embed_volume(odd_volume, bf16, projectors).projections["small"]
    exact = embed_volume(odd_volume, encoder, projectors).projections["small"]
    assert np.linalg.norm(fast - exact) / np.linalg.norm(exact) < 0.05


@pytest.mark.parametrize(("block", "problem"), [
    (np.zeros((4, 5, 6)), "block"),
    (np.zeros((1, 4, 5, 6), dtype=np.uint8), "float"),
    (np.full((1, 4, 5, 6), np.nan), "NaN"),
    (np.zeros((0, 4, 5, 6)), "empty"),
])
def test_bad_blocks_are_refused(encoder: Encoder, projectors: list[Projector],
                                block: np.ndarray, problem: str) -> None:
    with pytest.raises(InputError, match=problem):
        embed_block(block, encoder, projectors)


def test_projector_of_another_width_is_refused(encoder: Encoder, odd_volume: np.ndarray) -> None:
    with pytest.raises(InputError, match="d = 1024.*width 64"):
        embed_volume(odd_volume, encoder, [create_projector(0, 1024, 100)])


@pytest.mark.parametrize("kwargs", [{"planes": (0, 3)}, {"planes": (1, 1)}, {"planes": ()},
                                    {"subsample": 0}, {"batch_size": 0},
                                    {"tokens": "first"}, {"resize": "crop"}])
def test_settings_are_validated(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        KernelSettings(**kwargs)  # type: ignore[arg-type]


@pytest.mark.requires_data
def test_skull_stripped_brain_has_105_constant_slices(shared_data: Path, encoder: Encoder,
                                                      projectors: list[Projector]) -> None:
    import nibabel as nib

    image = nib.load(shared_data / "brain_1mm" / "mni152_t1_brain_1mm.nii.gz")
    voxels = np.asarray(image.dataobj, dtype=np.float32)
    volume = voxels / voxels.max()
    on = embed_volume(volume, encoder, projectors, KernelSettings(batch_size=64))
    off = embed_volume(volume, encoder, projectors, KernelSettings(batch_size=64, dedup=False))
    assert (on.slices, on.constant_slices) == (582, 105)
    assert_close(on.projections["small"], off.projections["small"])


@pytest.mark.requires_cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_kernel_matches_cpu(tiny_vit_weights: tuple[str, Path], encoder: Encoder,
                                 odd_volume: np.ndarray, projectors: list[Projector]) -> None:
    name, path = tiny_vit_weights
    for precision, tolerance in (("fp32", 1e-3), ("bf16", 0.05)):
        cuda = create_encoder(name, weights=path, device="cuda", precision=precision)
        on_gpu = embed_volume(odd_volume, cuda, projectors).projections["small"]
        on_cpu = embed_volume(odd_volume, encoder, projectors).projections["small"]
        assert np.linalg.norm(on_gpu - on_cpu) / np.linalg.norm(on_cpu) < tolerance
