"""Each encoder's own input (size, normalisation, SAM's resize and padding) and tokens."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from raptorz.defaults import RANDOM_WEIGHTS
from raptorz.embedding.encoders import (
    CLIP_MEAN,
    CLIP_STD,
    IMAGENET_MEAN,
    create_encoder,
    get_config,
)
from raptorz.embedding.kernel import embed_volume
from raptorz.embedding.preprocessing import fitted_size, prepare_images
from raptorz.embedding.projection import create_projector
from raptorz.embedding.settings import KernelSettings
from raptorz.errors import RaptorzError

segment_anything = pytest.importorskip("segment_anything", reason="in the test extra")


@pytest.mark.parametrize("shape", [(30, 60), (60, 30), (17, 23), (64, 64), (101, 7)])
def test_longest_side_size_is_segment_anythings(shape: tuple[int, int]) -> None:
    from segment_anything.utils.transforms import ResizeLongestSide

    assert fitted_size(shape, 1024, "longest_side") == ResizeLongestSide.get_preprocess_shape(
        *shape, 1024)
    assert fitted_size(shape, 1024, "stretch") == (1024, 1024)


def test_sam_normalises_on_255_and_pads_like_segment_anything() -> None:
    """Our SAM input equals ``Sam.preprocess`` of the same resized slice (0-255 scale)."""
    from segment_anything import sam_model_registry

    config = get_config("sam-b")
    assert config is not None
    sam = sam_model_registry["vit_b"]()  # its preprocessing only: mean, std, 1024 padding
    slices = np.random.default_rng(0).random((2, 30, 60)).astype(np.float32)
    ours = prepare_images(slices, img_size=1024, mean=config.normalised_mean,
                          std=config.normalised_std, fit="longest_side")
    resized = F.interpolate(torch.from_numpy(slices)[:, None], size=(512, 1024),
                            mode="bicubic", align_corners=False).expand(-1, 3, -1, -1)
    with torch.no_grad():
        theirs = sam.preprocess(resized * 255.0)
    assert ours.shape == theirs.shape == (2, 3, 1024, 1024)
    assert float((ours - theirs).abs().max()) < 1e-5 * float(theirs.abs().max())
    assert (ours[:, :, 512:] == 0).all()  # padded below, after normalisation


def test_medsam_sees_the_stretched_slice_in_0_1() -> None:
    config = get_config("medsam")
    assert config is not None and config.resize == "stretch"
    slices = np.random.default_rng(1).random((1, 30, 60)).astype(np.float32)
    images = prepare_images(slices, img_size=64, mean=config.normalised_mean,
                            std=config.normalised_std, fit=config.resize)
    expected = F.interpolate(torch.from_numpy(slices)[:, None], size=(64, 64), mode="bicubic",
                             align_corners=False)
    torch.testing.assert_close(images[:, :1], expected)


def test_provenance_records_each_models_input() -> None:
    clip = create_encoder("raptorz_tiny_clip", weights=RANDOM_WEIGHTS, device="cpu").provenance()
    assert (clip["mean"], clip["std"]) == (list(CLIP_MEAN), list(CLIP_STD))
    assert (clip["img_size"], clip["patch_size"], clip["resize"]) == (224, 14, "stretch")
    sam = create_encoder("raptorz_tiny_sam", weights=RANDOM_WEIGHTS, device="cpu").provenance()
    assert (sam["img_size"], sam["patch_size"], sam["resize"]) == (64, 16, "longest_side")
    assert sam["config"]["pixel_scale"] == 255.0 and sam["config"]["mean"][0] == 123.675
    assert sam["mean"][0] == pytest.approx(IMAGENET_MEAN[0])  # 123.675 / 255
    assert (sam["embed_dim"], sam["num_tokens"], sam["num_prefix_tokens"]) == (16, 16, 0)


def test_timm_names_take_timm_normalisation_and_family() -> None:
    from raptorz.embedding.encoders import resolve_config

    assert resolve_config("vit_large_patch14_clip_quickgelu_336.openai").mean == CLIP_MEAN
    assert resolve_config("vit_large_patch14_dinov2.lvd142m").hub_repos == (
        "facebook/dinov2-large",)
    assert resolve_config("samvit_base_patch16").output == "feature_map"


def test_cls_tokens_and_feature_map_tokens_in_the_kernel() -> None:
    volume = np.random.default_rng(2).random((6, 7, 5)).astype(np.float32)
    vit = create_encoder("raptorz_tiny_dinov2_reg", weights=RANDOM_WEIGHTS, device="cpu")
    projector = [create_projector(0, vit.embed_dim, 3, "p")]
    every = embed_volume(volume, vit, projector, KernelSettings(planes=(0,)))
    cls = embed_volume(volume, vit, projector, KernelSettings(planes=(0,), tokens="cls"))
    assert vit.token_kinds[:6] == ("cls", "register", "register", "register", "register",
                                   "patch")
    np.testing.assert_array_equal(cls.projections["p"], every.projections["p"][..., :1])
    sam = create_encoder("raptorz_tiny_sam", weights=RANDOM_WEIGHTS, device="cpu")
    grid = embed_volume(volume, sam, [create_projector(0, 16, 3, "p")],
                        KernelSettings(planes=(0,)))
    assert grid.projections["p"].shape == (1, 1, 3, 16)  # 16 grid positions of width 16
    with pytest.raises(RaptorzError, match="no CLS token"):
        embed_volume(volume, sam, [create_projector(0, 16, 3, "p")],
                     KernelSettings(planes=(0,), tokens="cls"))
