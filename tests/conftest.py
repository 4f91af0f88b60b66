"""Shared fixtures: small, seeded test data written by the tests themselves."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from distributed import Client

    from raptorz.embedding.encoders import Encoder

pytest_plugins = ("pytester",)  # tests/test_data_marker.py runs this file's hooks

#: Real scans shared with the project (see its README); absent in a user's clone.
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _in_ci() -> bool:
    """Whether this is a CI run (``CI=true``, as GitHub Actions, GitLab and others set)."""
    return os.environ.get("CI", "").lower() in ("true", "1", "yes")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Refuse a test that uses the real data without saying so (``requires_data``)."""
    unmarked = [item.nodeid for item in items
                if "shared_data" in getattr(item, "fixturenames", ())
                and item.get_closest_marker("requires_data") is None]
    if unmarked:
        raise pytest.UsageError("these tests use the shared_data fixture without "
                                f"@pytest.mark.requires_data: {', '.join(unmarked)}")


def pytest_runtest_setup(item: pytest.Item) -> None:
    """``requires_data`` tests skip where the real data is absent, and fail in CI."""
    if item.get_closest_marker("requires_data") is None or SHARED_DATA.is_dir():
        return
    if _in_ci():
        pytest.fail(f"real data not found at {SHARED_DATA}, and CI=true: CI must have it",
                    pytrace=False)
    pytest.skip(f"real data not found at {SHARED_DATA} (present in CI, absent in a clone)")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The folder of real scans (tests that use it are marked ``requires_data``)."""
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


@pytest.fixture(scope="module")
def encoder(tiny_vit_weights: tuple[str, Path]) -> Encoder:
    """The tiny ViT of :func:`tiny_vit_weights`, loaded on the CPU (one per test module)."""
    from raptorz.embedding.encoders import create_encoder

    name, path = tiny_vit_weights
    return create_encoder(name, weights=path, device="cpu")


# --- A real Dask cluster -----------------------------------------------------------------


@pytest.fixture(scope="module")
def client() -> Iterator[Client]:
    """A real LocalCluster of 2 worker processes with 2 threads each (one per test module:
    the workers keep their loaded encoders between the module's tests, as in a run).

    Not the default client: a test that wants the active-client path makes its own.
    """
    from distributed import Client

    from raptorz.cluster import create_cluster

    with create_cluster("local", workers=2, threads_per_worker=2, dashboard_address=":0") \
            as cluster, Client(cluster, set_as_default=False) as client:
        yield client
