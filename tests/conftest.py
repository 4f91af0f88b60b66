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
