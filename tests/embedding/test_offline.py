"""Offline without cached weights, the encoder says so in seconds, not after the hub's retries.

The machine is made offline locally: ``HF_ENDPOINT`` points at a closed port of this
machine (huggingface_hub retries such a hub for about 50 s), ``HF_HUB_OFFLINE`` is unset,
and the Hugging Face cache is a fresh folder.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
from safetensors.torch import save_file

from raptorz.embedding.encoders import SMALL_ENCODERS, resolve_config

#: Seconds the failing encoder may take (the hub's retries alone sleep 23 s a file).
QUICK = 10.0


def _closed_port() -> int:
    """A port of this machine that nothing listens on (the kernel's pick, released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def _cache_timm_copy(cache: Path, architecture: str, tiny_vit_state_dict: Callable[..., dict]
                     ) -> None:
    """A timm copy of ``architecture`` in the Hugging Face cache layout (tiny random weights)."""
    entry = cache / f"models--timm--{architecture}"
    snapshot = entry / "snapshots" / "0123abc"
    snapshot.mkdir(parents=True)
    (entry / "refs").mkdir()
    (entry / "refs" / "main").write_text("0123abc")
    weights = tiny_vit_state_dict(seed=3, img_size=518)  # DINOv2's own size
    save_file({k: v.contiguous() for k, v in weights.items()}, str(snapshot / "model.safetensors"))


@pytest.mark.slow
def test_an_unreachable_hub_is_reported_at_once(
        tmp_path: Path, tiny_vit_name: str,
        tiny_vit_state_dict: Callable[..., dict]) -> None:
    architecture = resolve_config("dinov2-s").architecture  # timm's, with a pretrained tag
    tiny = SMALL_ENCODERS[tiny_vit_name][1]  # the same model, 2 blocks of width 64
    cache = tmp_path / "hub"
    _cache_timm_copy(cache, architecture, tiny_vit_state_dict)
    # the imports are timed apart: they take long on a busy machine, and reach no network
    script = textwrap.dedent(f"""
        import time
        import timm
        from raptorz.embedding.encoders import create_encoder
        from raptorz.errors import RaptorzError

        start = time.perf_counter()
        try:
            create_encoder("dinov2-b", device="cpu")
        except RaptorzError as error:
            print("ERROR", error)
        print("SECONDS", time.perf_counter() - start)
        encoder = create_encoder("dinov2-s", device="cpu", **{dict(tiny)!r})
        print("SOURCE", encoder.weights_source)
    """)
    endpoint = f"http://127.0.0.1:{_closed_port()}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env |= {"HF_ENDPOINT": endpoint, "HF_HOME": str(tmp_path / "home"),
            "HF_HUB_CACHE": str(cache)}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            env=env, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    seconds = float(result.stdout.split("SECONDS", 1)[1].split()[0])
    assert seconds < QUICK, f"{seconds:.1f} s before the error"
    error = result.stdout.split("ERROR", 1)[1].split("SECONDS")[0]
    assert "no weights for encoder 'dinov2-b'" in error
    assert f"the hub at {endpoint}, which is out of reach" in error
    assert str(cache) in error and "facebook/dinov2-base" in error and "--weights FILE" in error
    # timm's cached copy needs no hub: the question is not even asked
    assert f"SOURCE hf-hub:timm/{architecture}" in result.stdout
