"""Projectors: bit-identical to the original's, loaded safely, checked against the encoder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from raptorz.cli.main import main
from raptorz.embedding.projection import (
    Projector,
    check_projectors,
    create_projector,
    load_projector,
    make_projector,
    save_projector,
)
from raptorz.errors import InputError


def original_projector(seed: int, dim: int, k: int) -> np.ndarray:
    """What the original tool runs, verbatim (global legacy generator)."""
    state = np.random.get_state()
    try:
        np.random.seed(seed)
        return np.random.randn(dim, k)
    finally:
        np.random.set_state(state)


@pytest.mark.parametrize(("seed", "dim", "k"), [(0, 1024, 100), (7, 64, 3), (2**32 - 1, 5, 1)])
def test_make_projector_is_bit_identical_to_the_original(seed: int, dim: int, k: int) -> None:
    matrix = make_projector(seed, dim, k)
    assert matrix.dtype == np.float64 and matrix.shape == (dim, k)
    assert matrix.tobytes() == original_projector(seed, dim, k).tobytes()


def test_make_projector_leaves_the_global_generator_alone() -> None:
    np.random.seed(123)
    expected = np.random.rand(3)
    np.random.seed(123)
    make_projector(0, 16, 4)
    assert np.array_equal(np.random.rand(3), expected)


def test_cli_writes_the_original_file(tmp_path: Path) -> None:
    out = tmp_path / "sub" / "proj.npy"
    assert main(["projector", "--seed", "0", "--dim", "1024", "--k", "100", "-o", str(out)]) == 0
    expected = tmp_path / "expected.npy"
    np.save(expected, original_projector(0, 1024, 100))
    assert out.read_bytes() == expected.read_bytes()


@pytest.mark.parametrize("argv", [["--dim", "0"], ["--k", "-1"], ["--seed", "-3"],
                                  ["-o", "proj.txt"]])
def test_cli_refuses_bad_options(tmp_path: Path, argv: list[str],
                                 capsys: pytest.CaptureFixture[str]) -> None:
    args = ["projector", "-o", str(tmp_path / "p.npy"), *argv]
    assert main(args) == 2
    assert "error" in capsys.readouterr().err
    assert not (tmp_path / "p.npy").exists()


def test_load_projector_round_trip_and_provenance(tmp_path: Path) -> None:
    path = tmp_path / "seed3.npy"
    np.save(path, original_projector(3, 32, 5))
    projector = load_projector(path)
    assert projector.name == "seed3" and (projector.dim, projector.k) == (32, 5)
    assert projector.seed is None
    assert np.array_equal(projector.matrix, original_projector(3, 32, 5))
    assert projector.checksum == create_projector(3, 32, 5).checksum
    assert projector.provenance()["checksum"] == projector.checksum
    with pytest.raises(ValueError, match="read-only"):
        projector.matrix[0, 0] = 1.0


def test_the_seed_of_raptorz_projector_is_recorded_and_never_a_wrong_one(
        tmp_path: Path) -> None:
    path = tmp_path / "p3.npy"
    assert main(["projector", "--seed", "3", "--dim", "32", "--k", "5", "-o", str(path)]) == 0
    assert np.array_equal(np.load(path), original_projector(3, 32, 5))  # the original's file
    assert load_projector(path).seed == 3
    assert load_projector(path).provenance()["seed"] == 3
    np.save(path, original_projector(4, 32, 5))  # the matrix replaced, the sidecar stale
    assert load_projector(path).seed is None
    (tmp_path / "p3.json").write_text("{not json")
    assert load_projector(path).seed is None
    save_projector(Projector("plain", np.ones((4, 2))), tmp_path / "p3.npy")
    assert not (tmp_path / "p3.json").exists()  # no seed: no sidecar left to mislead


def test_float32_projector_is_widened(tmp_path: Path) -> None:
    path = tmp_path / "f32.npy"
    np.save(path, original_projector(1, 8, 2).astype(np.float32))
    assert load_projector(path).matrix.dtype == np.float64


@pytest.mark.parametrize(("content", "problem"), [
    (np.zeros((4, 3, 2)), "2-D"),
    (np.zeros(5), "2-D"),
    (np.zeros((4, 3), dtype=np.int64), "floating point"),
    (np.array([[1.0, np.nan]]), "NaN"),
    (np.array([[{"a": 1}]], dtype=object), "plain numeric"),
])
def test_load_projector_refuses_bad_files(tmp_path: Path, content: np.ndarray,
                                          problem: str) -> None:
    path = tmp_path / "bad.npy"
    np.save(path, content, allow_pickle=True)
    with pytest.raises(InputError, match=problem) as error:
        load_projector(path)
    assert str(path) in str(error.value)


def test_load_projector_refuses_missing_and_npz(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="not found"):
        load_projector(tmp_path / "missing.npy")
    path = tmp_path / "two.npy"
    with path.open("wb") as handle:
        np.savez(handle, a=np.zeros((2, 2)))
    with pytest.raises(InputError, match="npz"):
        load_projector(path)


def test_check_projectors_gives_both_widths() -> None:
    with pytest.raises(InputError, match=r"d = 1024 .* width 64"):
        check_projectors([create_projector(0, 1024, 10)], 64, "tiny")
    twins = [Projector("p", np.ones((4, 2))), Projector("p", np.ones((4, 3)))]
    with pytest.raises(InputError, match="distinct"):
        check_projectors(twins, 4, "tiny")
