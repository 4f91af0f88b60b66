"""Shared fixtures: small, seeded test data written by the tests themselves."""

from __future__ import annotations

from pathlib import Path

import pytest

#: Real scans shared with the project (see its README); absent in a user's clone.
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The folder of real scans, or a skip where this clone has none beside it."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA} (present in CI, absent in a clone)")
    return SHARED_DATA


# --- Tiny random-weight ViT (encoders, kernel; used by every stage that embeds) ---------


@pytest.fixture(scope="session")
def tiny_vit_weights(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    """``(encoder name, weights file)`` of a tiny DINOv2-style ViT with random weights.

    Use as ``raptorz.embedding.encoders.create_encoder(name, weights=path)`` or on the command line
    as ``--encoder NAME --weights PATH``: 2 blocks, width 64, 257 tokens at 224 px.
    """
    from vit_fixtures import TINY_ENCODER, write_tiny_vit

    path = write_tiny_vit(tmp_path_factory.mktemp("vit") / "tiny_vit.safetensors")
    return TINY_ENCODER, path
