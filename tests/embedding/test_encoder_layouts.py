"""Every weights layout a user holds loads to the same weights, and misfits are told briefly."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from raptorz.embedding.encoders import create_encoder
from raptorz.errors import InputError, RaptorzError

pytest.importorskip("transformers", reason="the test extra installs transformers")


def to_dinov3_original(hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A transformers DINOv3 state dict as Meta's release stores it (written out by hand)."""
    out = {"cls_token": hf["embeddings.cls_token"], "mask_token": hf["embeddings.mask_token"][0],
           "storage_tokens": hf["embeddings.register_tokens"],
           "patch_embed.proj.weight": hf["embeddings.patch_embeddings.weight"],
           "patch_embed.proj.bias": hf["embeddings.patch_embeddings.bias"],
           "norm.weight": hf["norm.weight"], "norm.bias": hf["norm.bias"],
           "rope_embed.periods": torch.ones(8)}
    for n in range(2):
        src, dst = f"layer.{n}.", f"blocks.{n}."
        if src + "norm1.weight" not in hf:
            src = "model." + src
        q, k, v = (hf[f"{src}attention.{x}_proj.weight"] for x in "qkv")
        out[dst + "attn.qkv.weight"] = torch.cat([q, k, v])
        out[dst + "attn.qkv.bias"] = torch.zeros(3 * q.shape[0])
        out[dst + "attn.qkv.bias_mask"] = torch.ones(3 * q.shape[0])
        out[dst + "ls1.gamma"] = hf[src + "layer_scale1.lambda1"]
        out[dst + "ls2.gamma"] = hf[src + "layer_scale2.lambda1"]
        for a, b in (("attention.o_proj", "attn.proj"), ("norm1", "norm1"), ("norm2", "norm2"),
                     ("mlp.up_proj", "mlp.fc1"), ("mlp.down_proj", "mlp.fc2")):
            for p in ("weight", "bias"):
                out[f"{dst}{b}.{p}"] = hf[f"{src}{a}.{p}"]
    return {k: v.contiguous() for k, v in out.items()}


def timm_roundtrip(name: str, path: Path, tmp_path: Path, **overrides: object) -> str:
    """Load ``path``, save the model in timm's layout, load that: both checksums must agree."""
    first = create_encoder(name, weights=path, pack=False,  # a plain timm state dict
                           **overrides)  # type: ignore[arg-type]
    timm_file = tmp_path / "timm.safetensors"
    save_file({k: v.contiguous() for k, v in first.model.state_dict().items()}, str(timm_file))
    again = create_encoder(name, weights=timm_file, **overrides)  # type: ignore[arg-type]
    assert again.layout == "timm" and again.checksum == first.checksum
    return first.checksum


def test_dinov3_original_transformers_and_timm_layouts_agree(
        tmp_path: Path, dinov3_transformers: Callable[..., Any]) -> None:
    ref = dinov3_transformers(tmp_path / "hf")
    checksum = timm_roundtrip(ref.name, ref.path, tmp_path)
    original = tmp_path / "dinov3_vits16_pretrain_lvd1689m.pth"
    torch.save(to_dinov3_original(load_file(str(ref.path / "model.safetensors"))), original)
    encoder = create_encoder(ref.name, weights=original, device="cpu")
    assert encoder.layout == "dinov3" and encoder.checksum == checksum


def test_dinov3_nonzero_qv_biases_are_refused(tmp_path: Path,
                                              dinov3_transformers: Callable[..., Any]) -> None:
    ref = dinov3_transformers(tmp_path / "hf")
    state = load_file(str(ref.path / "model.safetensors"))
    key = next(k for k in state if k.endswith("q_proj.bias"))
    state[key] = torch.ones_like(state[key])
    save_file(state, str(tmp_path / "biased.safetensors"))
    with pytest.raises(InputError, match="non-zero query / value biases.*_qkvb"):
        create_encoder(ref.name, weights=tmp_path / "biased.safetensors", device="cpu")


def test_clip_transformers_llava_and_timm_layouts_agree(
        tmp_path: Path, clip_transformers: Callable[..., Any]) -> None:
    ref = clip_transformers(tmp_path / "hf")
    checksum = timm_roundtrip(ref.name, ref.path, tmp_path)
    state = load_file(str(ref.path / "model.safetensors"))
    llava = tmp_path / "llava.safetensors"  # a LLaVA checkpoint's tower, beside its LM
    save_file({"model.embed_tokens.weight": torch.zeros(4, 4),
               **{f"model.vision_tower.vision_tower.vision_model.{k}": v
                  for k, v in state.items()}}, str(llava))
    encoder = create_encoder(ref.name, weights=llava, device="cpu")
    assert encoder.layout == "llava" and encoder.checksum == checksum


def test_llava_tower_keeps_penultimate_block_only(tmp_path: Path,
                                                  clip_transformers: Callable[..., Any]) -> None:
    ref = clip_transformers(tmp_path / "hf", llava=True)  # 3 blocks in the file
    encoder = create_encoder(ref.name, weights=ref.path, device="cpu")
    assert len(encoder.model.blocks) == 2 and "norm.weight" not in encoder.model.state_dict()
    with pytest.raises(InputError, match="3 blocks found, 2 expected"):
        # full tower: 2 of 3 is wrong
        create_encoder("raptorz_tiny_clip", weights=ref.path, device="cpu")


def test_sam_and_medsam_read_segment_anything_and_timm(
        tmp_path: Path, sam_segment_anything: Callable[..., Any]) -> None:
    ref = sam_segment_anything(tmp_path / "medsam_vit_b.pth")
    checksum = timm_roundtrip(ref.name, ref.path, tmp_path)
    wrapped = tmp_path / "training_checkpoint.pth"  # MedSAM training saves {"model": ...}
    torch.save({"model": torch.load(ref.path, weights_only=True), "epoch": torch.tensor(3)},
               wrapped)
    assert create_encoder(ref.name, weights=wrapped, device="cpu").checksum == checksum


def test_biomedclip_open_clip_folder_and_timm(tmp_path: Path,
                                              biomedclip_open_clip: Callable[..., Any]) -> None:
    ref = biomedclip_open_clip(tmp_path / "BiomedCLIP")
    timm_roundtrip(ref.name, ref.path, tmp_path)
    assert create_encoder(ref.name, weights=ref.path, device="cpu").layout == "open_clip"


def test_misfit_weights_are_summarised_once_not_dumped(tmp_path: Path,
                                                       write_tiny_vit: Callable[..., Path]) -> None:
    tiny = write_tiny_vit(tmp_path / "tiny.safetensors")  # 2 blocks of width 64
    with pytest.raises(InputError) as caught:
        create_encoder("dinov2-s", weights=tiny, device="cpu")  # 12 blocks of width 384
    message = str(caught.value)
    assert str(tiny) in message and "dinov2-s" in message
    assert "read as the timm layout (accepted: timm, dinov2, transformers)" in message
    assert "missing keys" in message and "2 blocks found, 12 expected" in message
    assert "keys of another shape" in message
    assert message.count("blocks.") <= 8 and len(message) < 900  # a summary, not a dump


def test_empty_model_folder_is_refused(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="holds no weights file"):
        create_encoder("raptorz_tiny_dinov2", weights=tmp_path, device="cpu")


@pytest.mark.slow
def test_named_encoders_find_the_copies_users_have_in_the_hub_cache(
        tmp_path: Path, biomedclip_open_clip: Callable[..., Any]) -> None:
    """Offline, BiomedCLIP's open_clip file in the Hugging Face cache is found and used."""
    repo = "microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224"
    entry = tmp_path / "hub" / f"models--{repo.replace('/', '--')}"
    (entry / "refs").mkdir(parents=True)
    (entry / "refs" / "main").write_text("0123abc")
    ref = biomedclip_open_clip(entry / "snapshots" / "0123abc")
    script = textwrap.dedent("""
        from raptorz.embedding.encoders import create_encoder, weights_available
        print("AVAILABLE", weights_available("biomedclip"), weights_available("rad-dino"))
        encoder = create_encoder("biomedclip", depth=2, embed_dim=64, num_heads=2)
        print("SOURCE", encoder.weights_source, encoder.layout)
    """)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub"),
           "HF_HOME": str(tmp_path / "home")}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            env=env, check=True)
    assert "AVAILABLE True False" in result.stdout
    assert f"SOURCE {ref.path / 'open_clip_pytorch_model.bin'} open_clip" in result.stdout


def test_named_encoders_without_timm_weights_say_where_to_get_them() -> None:
    with pytest.raises(RaptorzError, match="medsam_vit_b.pth"):
        create_encoder("medsam", device="cpu")
