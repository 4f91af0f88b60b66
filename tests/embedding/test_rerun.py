"""A rerun on a finished store that asks for another encoder, weights or precision is
refused: it asks for embeddings the store does not hold (docs/embed.md)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from raptorz.cli.main import EXIT_REFUSED, main
from raptorz.embedding.projection import save_projector
from raptorz.errors import SettingsError


def test_a_finished_store_refuses_other_weights_and_precision(
        tmp_path: Path, converted: Callable[..., Path], thread_client: Callable,
        embed_tiny: Callable, tiny_vit_weights: tuple[str, Path], run_projectors: list,
        write_tiny_vit: Callable[..., Path], capsys: pytest.CaptureFixture[str]) -> None:
    volumes, output = converted(tmp_path, 2, 2), tmp_path / "e.zarr"
    name, weights = tiny_vit_weights
    with thread_client() as client:
        assert embed_tiny(volumes, output, client, tiny_vit_weights).ok == 2
        again = embed_tiny(volumes, output, client, tiny_vit_weights)
        assert again.nothing_to_do  # the same request: nothing to do, nothing refused
        with pytest.raises(SettingsError, match="encoder/weights: .* write them to a new"):
            other = write_tiny_vit(tmp_path / "b.safetensors", 1)
            embed_tiny(volumes, output, client, (name, other))
        with pytest.raises(SettingsError, match="precision: .* at fp32, not bf16"):
            embed_tiny(volumes, output, client, tiny_vit_weights, precision="bf16")
    save_projector(run_projectors[0], tmp_path / "p4.npy")
    argv = ["embed", str(volumes), "-o", str(output), "--projector", str(tmp_path / "p4.npy"),
            "--encoder", name, "--weights", str(weights), "--keep-tokens", "--batch-size",
            "32", "--precision", "fp16"]
    assert main(argv) == EXIT_REFUSED
    assert "raptorz embed: error: --precision: " in capsys.readouterr().err
