"""Intensity presets: parsing, text form, and scaling against float64 formulas."""

from __future__ import annotations

import numpy as np
import pytest

from raptorz.errors import RaptorzError
from raptorz.ingest.intensity import CT_WINDOWS, Intensity, parse_intensity, scale_intensity

RNG = np.random.default_rng(0)
VALUES = RNG.normal(300, 400, (9, 8, 7))


@pytest.mark.parametrize("text", ["minmax", "percentile:0.5,99.5", "percentile:2,98",
                                  "range:0,1280", "divide:256", "ct:brain", "ct:lung"])
def test_text_form_round_trips(text: str) -> None:
    assert str(parse_intensity(text)) == text


def test_defaults_and_windows() -> None:
    assert parse_intensity("percentile") == Intensity("percentile", 0.5, 99.5)
    assert parse_intensity("ct:bone") == Intensity("ct", 400 - 900, 400 + 900, "bone")
    assert set(CT_WINDOWS) >= {"brain", "subdural", "soft_tissue", "lung", "bone"}


@pytest.mark.parametrize("text", ["", "minmax:1", "percentile:5", "percentile:50,10",
                                  "range:5,1", "divide:0", "divide:x", "ct:heart", "gamma"])
def test_bad_presets_are_refused_with_the_choices(text: str) -> None:
    with pytest.raises(RaptorzError, match="ct:PRESET"):
        parse_intensity(text)


def _reference(values: np.ndarray, low: float, high: float) -> np.ndarray:
    return np.clip((values - low) / (high - low), 0, 1)


@pytest.mark.parametrize(("text", "low", "high"), [
    ("minmax", VALUES.min(), VALUES.max()),
    ("percentile:1,99", *np.percentile(VALUES, [1, 99])),
    ("range:0,1280", 0, 1280),
    ("divide:256", 0, 256),
    ("ct:soft_tissue", 50 - 200, 50 + 200),
])
def test_scaling_matches_float64(text: str, low: float, high: float) -> None:
    scaled = scale_intensity(VALUES.astype(np.float32), parse_intensity(text))
    assert scaled.dtype == np.float32
    # float32 arithmetic on values of order 1e3: relative error a few 1e-7
    np.testing.assert_allclose(scaled, _reference(VALUES, low, high), atol=2e-6)
    assert scaled.min() >= 0 and scaled.max() <= 1


def test_constant_volume_scales_to_zeros_under_stretching_modes() -> None:
    flat = np.full((3, 3, 3), 7.0, np.float32)
    for text in ("minmax", "percentile"):
        np.testing.assert_array_equal(scale_intensity(flat, parse_intensity(text)), 0)
    np.testing.assert_allclose(scale_intensity(flat, parse_intensity("divide:14")), 0.5)
