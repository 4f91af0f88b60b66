"""Random projection matrices: made exactly as the original tool makes them, or loaded.

The original draws ``R = np.random.randn(d, k)`` after ``np.random.seed(seed)`` (NumPy's
legacy Mersenne Twister) and saves it as a ``(d, k)`` float64 ``.npy``. raptorz draws
the same numbers without touching NumPy's global generator, so a projector made here is
bit-identical to one made by the original, and either can be loaded by both.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from raptorz.defaults import DEFAULT_K
from raptorz.errors import InputError


def make_projector(seed: int, dim: int, k: int) -> np.ndarray:
    """The original's projection matrix: ``np.random.seed(seed); np.random.randn(dim, k)``.

    A private ``RandomState`` seeded alike draws the same stream, leaving the global
    generator alone.

    Parameters
    ----------
    seed
        Seed of the legacy generator (0 <= seed < 2**32).
    dim
        Rows: the encoder's token width (1024 for ViT-L).
    k
        Columns: the number of projections per token.

    Returns
    -------
    numpy.ndarray
        ``(dim, k)`` float64 of standard normal entries.

    Examples
    --------
    >>> make_projector(0, 1024, 100).shape
    (1024, 100)

    Raises
    ------
    InputError
        For ``dim`` or ``k`` below 1, or a seed outside [0, 2**32).
    """
    if dim < 1 or k < 1:
        raise InputError(f"projector seed={seed}, dim={dim}, k={k}",
                         "dim and k must be at least 1")
    if not 0 <= seed < 2**32:
        raise InputError(f"projector seed={seed}", "the seed must be in [0, 2**32)")
    return np.random.RandomState(seed).randn(dim, k)


@dataclass(frozen=True, eq=False)
class Projector:
    """A named ``(dim, k)`` float64 projection matrix.

    Parameters
    ----------
    name
        How stores and folders call it (a loaded file's stem).
    matrix
        ``(dim, k)`` float64; kept as a read-only copy.
    seed
        The legacy-generator seed it was made from, when known.
    """

    name: str
    matrix: np.ndarray
    seed: int | None = None
    checksum: str = field(init=False)

    def __post_init__(self) -> None:
        matrix = np.array(self.matrix, dtype=np.float64, order="C", copy=True)
        matrix.setflags(write=False)
        object.__setattr__(self, "matrix", matrix)
        # sha256 of the float64 bytes: the same projector gives the same hex anywhere
        object.__setattr__(self, "checksum", hashlib.sha256(matrix.tobytes()).hexdigest())

    @property
    def dim(self) -> int:
        """Token width the projector expects (rows)."""
        return int(self.matrix.shape[0])

    @property
    def k(self) -> int:
        """Number of projections (columns)."""
        return int(self.matrix.shape[1])

    def provenance(self) -> dict[str, object]:
        """Name, seed, shape and checksum, for store attributes."""
        return {"name": self.name, "seed": self.seed, "dim": self.dim, "k": self.k,
                "checksum": self.checksum}

    def __repr__(self) -> str:
        return f"Projector({self.name!r}, dim={self.dim}, k={self.k}, seed={self.seed})"


def create_projector(seed: int, dim: int, k: int = DEFAULT_K,
                     name: str | None = None) -> Projector:
    """A :class:`Projector` of :func:`make_projector`; named ``seed{S}_d{D}_k{K}`` by default.

    Raises
    ------
    InputError
        For ``dim`` or ``k`` below 1, or a seed outside [0, 2**32) (:func:`make_projector`).
    """
    return Projector(name or f"seed{seed}_d{dim}_k{k}", make_projector(seed, dim, k), seed)


#: Most bytes read of a projector's JSON sidecar (it holds four numbers and a text).
SIDECAR_BYTES = 4096


def save_projector(projector: Projector, path: str | Path) -> Path:
    """Write ``projector`` as a float64 ``.npy`` at ``path`` (what the original reads), with
    its seed in a JSON sidecar beside it (``<stem>.json``) where it has one.

    :func:`load_projector` takes the seed from the sidecar only where the matrix is the one
    that seed makes, so a store's provenance records the seed of ``raptorz projector
    --seed S``, and never a wrong one.

    Raises
    ------
    InputError
        Where ``path`` does not end in ``.npy`` (``np.save`` would append it).
    """
    path = Path(path)
    if path.suffix != ".npy":
        raise InputError(path, "the projector is written as .npy; name it *.npy")
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, projector.matrix)
    sidecar = path.with_suffix(".json")
    if projector.seed is not None:
        sidecar.write_text(json.dumps({
            "seed": projector.seed, "dim": projector.dim, "k": projector.k,
            "checksum": projector.checksum,
            "made_by": "np.random.seed(seed); np.random.randn(dim, k)"}, indent=2) + "\n")
    else:
        sidecar.unlink(missing_ok=True)  # a sidecar of an earlier matrix would be stale
    return path


def _sidecar_seed(path: Path, matrix: np.ndarray) -> int | None:
    """The seed the sidecar of ``path`` names, if that seed makes ``matrix``; else None."""
    sidecar = path.with_suffix(".json")
    try:
        with sidecar.open("rb") as file:
            seed = json.loads(file.read(SIDECAR_BYTES)).get("seed")
    except (OSError, ValueError, AttributeError):
        return None  # no sidecar, or not ours: the seed is unknown
    if not isinstance(seed, int) or not 0 <= seed < 2**32:
        return None
    made = make_projector(seed, *matrix.shape)
    return seed if np.array_equal(made, matrix) else None


def load_projector(path: str | Path) -> Projector:
    """Load a ``(d, k)`` ``.npy`` projector (one saved by the original tool included).

    Its seed is known where a sidecar written by :func:`save_projector` names it and the
    matrix is the one that seed makes; else it is recorded as unknown (``None``).

    Parameters
    ----------
    path
        The ``.npy`` file; its stem becomes the projector's name.

    Raises
    ------
    InputError
        When the file is missing, pickled, not 2-D, not floating point or not finite.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "projector file not found")
    try:
        matrix = np.load(path, allow_pickle=False)
    except ValueError as error:  # pickled objects are refused: they can run code
        raise InputError(path, f"not a plain numeric .npy array ({error})") from error
    except OSError as error:
        raise InputError(path, f"cannot read projector ({error})") from error
    if not isinstance(matrix, np.ndarray):
        raise InputError(path, "holds several arrays (.npz); a projector is one (d, k) .npy")
    if matrix.ndim != 2:
        raise InputError(path, f"projector must be 2-D (d, k), got shape {matrix.shape}")
    if matrix.dtype.kind != "f":
        raise InputError(path, f"projector must be floating point, got {matrix.dtype}")
    if not np.isfinite(matrix).all():
        raise InputError(path, "projector holds NaN or infinite values")
    return Projector(path.stem, matrix, _sidecar_seed(path, matrix))


def check_projectors(projectors: list[Projector] | tuple[Projector, ...], dim: int,
                     encoder: str) -> None:
    """Refuse projectors whose row count is not the encoder's token width, or duplicate names.

    Raises
    ------
    InputError
        Naming the projector and giving both numbers.
    """
    names = [p.name for p in projectors]
    if not projectors:
        raise InputError("projectors", "at least one projector is needed")
    if len(set(names)) != len(names):
        raise InputError("projectors", f"names must be distinct, got {names}")
    for projector in projectors:
        if projector.dim != dim:
            raise InputError(projector.name, f"projector has d = {projector.dim} rows but "
                             f"encoder {encoder} gives tokens of width {dim}")


def project(tokens: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """Pooled tokens ``(B, planes, T, dim)`` times a ``(dim, K)`` matrix: ``(B, planes, K, T)``
    float32, as stored (``R^T @ tokens^T`` per plane, as in the method).

    One matrix product in float64 (BLAS), rounded to float32 once at the end: the
    kernel, :func:`raptorz.embedding.embeddings.add_projections` and the sweeps' projections
    of stored tokens all come through here, so they agree bit for bit.
    """
    tokens = np.asarray(tokens, dtype=np.float64)
    product = np.matmul(tokens, np.asarray(matrix, dtype=np.float64))
    return product.swapaxes(-1, -2).astype(np.float32)


def project_tokens(tokens: np.ndarray, projectors: Sequence[Projector]) -> dict[str, np.ndarray]:
    """Project pooled tokens ``(B, planes, T, dim)`` with each projector (:func:`project`):
    name -> ``(B, planes, K, T)`` float32."""
    check_projectors(tuple(projectors), np.shape(tokens)[-1], "of these tokens")
    return {p.name: project(tokens, p.matrix) for p in projectors}


def project_ok(tokens: np.ndarray, ok: np.ndarray,
               projectors: Sequence[Projector]) -> dict[str, np.ndarray]:
    """:func:`project_tokens` of the volumes ``ok`` (along the first axis) of ``tokens``;
    NaN for the others, whatever their rows hold (volumes not embedded, or failed)."""
    kept = np.where(np.reshape(ok, (-1, *[1] * (np.ndim(tokens) - 1))), tokens, 0.0)
    projected = project_tokens(kept, projectors)
    for value in projected.values():
        value[~np.asarray(ok)] = np.nan
    return projected
