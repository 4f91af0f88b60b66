"""Encoders: tiny DINOv2-style ViTs with random weights saved in every supported layout."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file
from timm.layers import resample_abs_pos_embed

from raptorz.defaults import RANDOM_WEIGHTS, Precision
from raptorz.embedding.encoders import (
    SMALL_ENCODERS,
    PackedLinear,
    create_encoder,
    weights_checksum,
)
from raptorz.embedding.encoders._packing import can_pack
from raptorz.errors import InputError, RaptorzError


@pytest.fixture(scope="module")
def architecture(tiny_vit_name: str) -> tuple[str, dict]:
    """The tiny ViT's timm architecture and its keyword arguments (2 blocks of width 64)."""
    return SMALL_ENCODERS[tiny_vit_name]


def to_original_layout(timm_sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A timm DINOv2 state dict as Meta's DINOv2 checkpoints store it (with a mask token)."""
    return {**timm_sd, "mask_token": torch.zeros(1, timm_sd["cls_token"].shape[-1])}


def to_transformers_layout(timm_sd: dict[str, torch.Tensor], depth: int
                           ) -> dict[str, torch.Tensor]:
    """The same weights (``depth`` blocks) as transformers' ``Dinov2Model`` names them (q, k, v
    split)."""
    out = {
        "embeddings.cls_token": timm_sd["cls_token"],
        "embeddings.mask_token": torch.zeros(1, timm_sd["cls_token"].shape[-1]),
        "embeddings.position_embeddings": timm_sd["pos_embed"],
        "embeddings.patch_embeddings.projection.weight": timm_sd["patch_embed.proj.weight"],
        "embeddings.patch_embeddings.projection.bias": timm_sd["patch_embed.proj.bias"],
        "layernorm.weight": timm_sd["norm.weight"],
        "layernorm.bias": timm_sd["norm.bias"],
    }
    for n in range(depth):
        src, dst = f"blocks.{n}.", f"encoder.layer.{n}."
        for kind in ("weight", "bias"):
            q, k, v = timm_sd[f"{src}attn.qkv.{kind}"].chunk(3, dim=0)
            out[f"{dst}attention.attention.query.{kind}"] = q
            out[f"{dst}attention.attention.key.{kind}"] = k
            out[f"{dst}attention.attention.value.{kind}"] = v
            out[f"{dst}attention.output.dense.{kind}"] = timm_sd[f"{src}attn.proj.{kind}"]
            for module in ("norm1", "norm2", "mlp.fc1", "mlp.fc2"):
                out[f"{dst}{module}.{kind}"] = timm_sd[f"{src}{module}.{kind}"]
        out[f"{dst}layer_scale1.lambda1"] = timm_sd[f"{src}ls1.gamma"]
        out[f"{dst}layer_scale2.lambda1"] = timm_sd[f"{src}ls2.gamma"]
    out["pooler.dense.weight"] = torch.zeros(2, 2)  # extra keys of some exports are ignored
    return {key: value.contiguous() for key, value in out.items()}


@pytest.fixture(scope="module")
def layouts(tmp_path_factory: pytest.TempPathFactory, architecture: tuple[str, dict],
            tiny_vit_state_dict: Callable[..., dict]) -> dict[str, Path]:
    """One set of 518-px random weights in the original, transformers and timm layouts
    (the timm one made by timm's own pretrained-file route)."""
    folder = tmp_path_factory.mktemp("layouts")
    at_518 = tiny_vit_state_dict(seed=1, img_size=518)
    original = folder / "dinov2_original.pth"
    torch.save(to_original_layout(at_518), original)
    transformers = folder / "model.safetensors"
    name, kwargs = architecture
    save_file(to_transformers_layout(at_518, kwargs["depth"]), str(transformers))
    reference = timm.create_model(name, pretrained=True, num_classes=0, img_size=518,
                                  pretrained_cfg_overlay={"file": str(original)}, **kwargs)
    timm_file = folder / "timm_518.safetensors"
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(timm_file))
    return {"original": original, "transformers": transformers, "timm": timm_file}


def test_tiny_encoder_from_fixture(tiny_vit_weights: tuple[str, Path]) -> None:
    name, path = tiny_vit_weights
    encoder = create_encoder(name, weights=path, device="cpu")
    assert (encoder.embed_dim, encoder.num_prefix_tokens, encoder.num_tokens) == (64, 1, 257)
    assert encoder.device == torch.device("cpu") and encoder.precision == "fp32"
    assert encoder.checksum == weights_checksum(load_file(str(path)))
    assert not any(p.requires_grad for p in encoder.model.parameters())
    assert not encoder.model.training
    provenance = encoder.provenance()
    assert provenance["weights_checksum"] == encoder.checksum
    assert provenance["weights_source"] == str(path) and provenance["encoder"] == name
    tokens = encoder.encode(torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0)))
    assert tokens.shape == (2, 257, 64) and tokens.dtype == torch.float32
    assert not tokens.requires_grad


def test_all_layouts_load_to_identical_weights(layouts: dict[str, Path],
                                               tiny_vit_name: str) -> None:
    encoders = {layout: create_encoder(tiny_vit_name, weights=path, device="cpu")
                for layout, path in layouts.items()}
    checksums = {enc.checksum for enc in encoders.values()}
    assert len(checksums) == 1
    images = torch.randn(3, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    outputs = [enc.encode(images) for enc in encoders.values()]
    for output in outputs[1:]:
        assert torch.equal(output, outputs[0])
    # the 37 x 37 grid was resampled to 16 x 16 as DINOv2 and transformers do it at each
    # forward (not antialiased, unlike timm's own filter)
    original = torch.load(layouts["original"], weights_only=True)["pos_embed"]
    expected = resample_abs_pos_embed(original, new_size=[16, 16], num_prefix_tokens=1,
                                      interpolation="bicubic", antialias=False)
    assert torch.equal(encoders["transformers"].model.pos_embed.data, expected)


def test_wrapped_torch_checkpoint_is_unwrapped(tmp_path: Path,
                                               tiny_vit_weights: tuple[str, Path]) -> None:
    name, path = tiny_vit_weights
    wrapped = tmp_path / "ckpt.pth"
    torch.save({"model": {f"module.{k}": v for k, v in load_file(str(path)).items()}}, wrapped)
    assert create_encoder(name, weights=wrapped, device="cpu").checksum == create_encoder(
        name, weights=path, device="cpu").checksum


class NotATensor:
    """A pickled object that ``weights_only=True`` must refuse to unpickle."""


def test_bad_weights_files_are_refused_with_their_path(tmp_path: Path, tiny_vit_name: str) -> None:
    pickled = tmp_path / "evil.pth"
    torch.save({"x": NotATensor()}, pickled)
    with pytest.raises(InputError, match="cannot read weights") as error:
        create_encoder(tiny_vit_name, weights=pickled, device="cpu")
    assert str(pickled) in str(error.value)
    # in one line, without torch's advice to load it with weights_only=False
    assert "never unpickles" in str(error.value) and "\n" not in str(error.value)
    assert "weights_only" not in str(error.value)
    with pytest.raises(InputError, match="not found"):
        create_encoder(tiny_vit_name, weights=tmp_path / "missing.safetensors", device="cpu")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file")
    with pytest.raises(InputError, match="cannot read weights"):
        create_encoder(tiny_vit_name, weights=garbage, device="cpu")


def test_weights_of_another_architecture_are_refused(tmp_path: Path,
                                                     tiny_vit_weights: tuple[str, Path],
                                                     tiny_vit_name: str) -> None:
    _, path = tiny_vit_weights
    with pytest.raises(InputError, match="do not fit"):
        create_encoder(tiny_vit_name, weights=path, embed_dim=32, device="cpu")


def test_bf16_is_close_to_fp32(tiny_vit_weights: tuple[str, Path]) -> None:
    name, path = tiny_vit_weights
    images = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(3))
    fp32 = create_encoder(name, weights=path, device="cpu").encode(images)
    bf16 = create_encoder(name, weights=path, precision="bf16", device="cpu").encode(images)
    assert bf16.dtype == torch.float32
    # bf16 keeps 8 mantissa bits: a few percent relative error after two blocks
    assert (bf16 - fp32).norm() / fp32.norm() < 0.05
    with pytest.raises(RaptorzError, match="precision"):
        create_encoder(name, weights=path, precision="fp8", device="cpu")  # type: ignore[arg-type]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_cpu_encoders_pack_their_linear_layers_with_the_same_results(
        tiny_vit_weights: tuple[str, Path], precision: Precision) -> None:
    name, path = tiny_vit_weights
    plain = create_encoder(name, weights=path, precision=precision, pack=False, device="cpu")
    packed = create_encoder(name, weights=path, precision=precision, device="cpu")
    linears = [m for m in plain.model.modules() if type(m) is torch.nn.Linear]
    assert linears  # four per block
    if not can_pack(torch.device("cpu"), precision):
        # not x86, or bf16 that oneDNN would emulate: nothing is packed, asking is refused
        assert not any(isinstance(m, PackedLinear) for m in packed.model.modules())
        with pytest.raises(RaptorzError, match="cannot pack"):
            create_encoder(name, weights=path, precision=precision, pack=True, device="cpu")
        return
    assert sum(isinstance(m, PackedLinear) for m in packed.model.modules()) == len(linears)
    assert not any(type(m) is torch.nn.Linear for m in packed.model.modules())
    # the weights' identity is the file's, whatever the layout in memory
    assert packed.checksum == plain.checksum == weights_checksum(load_file(str(path)))
    # any batch size, not only the one the layout was chosen for (16 images)
    for batch in (1, 5, 16):
        images = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(batch))
        want, got = plain.encode(images), packed.encode(images)
        assert got.shape == want.shape and got.dtype == torch.float32
        # fp32: the same sums in another order. bf16: the same bf16 products as autocast's
        # matmul, summed in float32, so a bf16 rounding of the outputs at most
        scale = want.abs().max()
        assert (got - want).abs().max() <= (1e-5 if precision == "fp32" else 1e-2) * scale


def test_packing_needs_a_cpu_and_fp32_or_bf16(tiny_vit_weights: tuple[str, Path]) -> None:
    name, path = tiny_vit_weights
    with pytest.raises(RaptorzError, match="cannot pack"):
        create_encoder(name, weights=path, precision="fp16", pack=True, device="cpu")
    # default: left as it is
    fp16 = create_encoder(name, weights=path, precision="fp16", device="cpu")
    assert any(type(m) is torch.nn.Linear for m in fp16.model.modules())


def test_weights_from_a_file_draw_no_random_initial_weights(
        tiny_vit_weights: tuple[str, Path]) -> None:
    """The model a file fills is built empty: quick (seconds for DINOv2-L), and the
    caller's random stream is left as it was."""
    name, path = tiny_vit_weights
    torch.manual_seed(123)
    state = torch.get_rng_state()
    encoder = create_encoder(name, weights=path, device="cpu")
    assert torch.equal(torch.get_rng_state(), state)
    assert all(t.device.type == "cpu" for t in encoder.model.state_dict().values())
    assert encoder.checksum == weights_checksum(load_file(str(path)))


def test_small_encoder_without_weights_is_refused(tiny_vit_name: str) -> None:
    with pytest.raises(RaptorzError, match="no published weights"):
        create_encoder(tiny_vit_name, device="cpu")


def test_unknown_encoder_names_are_refused(tiny_vit_weights: tuple[str, Path]) -> None:
    with pytest.raises(RaptorzError, match="neither a named encoder .* nor a timm model name"):
        create_encoder("no_such_vit", device="cpu")
    with pytest.raises(RaptorzError, match="no_such_vit"):
        create_encoder("no_such_vit", weights=tiny_vit_weights[1], device="cpu")


@pytest.mark.slow
def test_offline_cache_and_missing_weights(tmp_path: Path, architecture: tuple[str, dict],
                                           tiny_vit_state_dict: Callable[..., dict]) -> None:
    """Offline: a transformers copy in the HF cache is found (and reported available);
    without it, a helpful error."""
    cache = tmp_path / "hub"
    snapshot = cache / "models--facebook--dinov2-small" / "snapshots" / "0123abc"
    snapshot.mkdir(parents=True)
    (cache / "models--facebook--dinov2-small" / "refs").mkdir()
    (cache / "models--facebook--dinov2-small" / "refs" / "main").write_text("0123abc")
    at_518 = tiny_vit_state_dict(seed=4, img_size=518)
    save_file(to_transformers_layout(at_518, architecture[1]["depth"]),
              str(snapshot / "model.safetensors"))
    script = textwrap.dedent("""
        from raptorz.embedding.encoders import create_encoder, weights_available
        from raptorz.errors import RaptorzError
        print("AVAILABLE", weights_available("vit_small_patch14_dinov2.lvd142m"),
              weights_available(), weights_available("raptorz_tiny_dinov2"))
        enc = create_encoder("vit_small_patch14_dinov2.lvd142m", depth=2, embed_dim=64,
                             num_heads=2)
        print("SOURCE", enc.weights_source)
        try:
            create_encoder("vit_base_patch14_dinov2.lvd142m")
        except RaptorzError as error:
            print("ERROR", error)
    """)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache),
           "HF_HOME": str(tmp_path / "home")}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            env=env, check=True)
    assert "AVAILABLE True False False" in result.stdout  # small cached, large absent
    assert f"SOURCE {snapshot / 'model.safetensors'}" in result.stdout
    error = result.stdout.split("ERROR", 1)[1]
    assert str(cache) in error and "HF_HUB_OFFLINE=1" in error
    assert "--weights FILE" in error and "facebook/dinov2-base" in error


def test_random_weights_are_seeded_and_leave_the_global_rng_alone(tiny_vit_name: str) -> None:
    torch.manual_seed(11)
    expected = torch.rand(3)
    torch.manual_seed(11)
    first = create_encoder(tiny_vit_name, weights=RANDOM_WEIGHTS, device="cpu")
    assert torch.equal(torch.rand(3), expected)
    second = create_encoder(tiny_vit_name, weights=RANDOM_WEIGHTS, device="cpu")
    assert first.checksum == second.checksum
    assert first.provenance()["weights_source"] == "random"
