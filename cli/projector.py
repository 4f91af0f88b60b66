"""``raptorz projector``: write a random projection matrix exactly as the original does."""

from __future__ import annotations

import argparse
from pathlib import Path

from raptorz.defaults import DEFAULT_K


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``projector`` verb."""
    parser = subparsers.add_parser(
        "projector",
        help="write a (dim, k) random projection matrix (.npy)",
        description="Write np.random.seed(SEED); np.random.randn(DIM, K) as a float64 .npy, "
        "bit-identical to the original Raptor tool's projector.",
    )
    parser.add_argument("--seed", type=int, default=0, help="legacy NumPy seed (default 0)")
    parser.add_argument("--dim", type=int, default=1024,
                        help="token width of the encoder (default 1024, ViT-L)")
    parser.add_argument("--k", type=int, default=DEFAULT_K,
                        help=f"projections per token (default {DEFAULT_K})")
    parser.add_argument("-o", "--output", type=Path, required=True, help="the .npy to write")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Write the projector; the library refuses nonsensical sizes or seeds (exit 2)."""
    import numpy as np

    from raptorz import make_projector
    from raptorz.errors import RaptorzError

    output: Path = args.output
    if output.suffix != ".npy":  # np.save would append .npy: the file would not be OUTPUT
        raise RaptorzError(f"{output}: the projector is written as .npy; name it *.npy")
    matrix = make_projector(args.seed, args.dim, args.k)
    output.parent.mkdir(parents=True, exist_ok=True)
    np.save(output, matrix)
    print(f"wrote {output}: ({args.dim}, {args.k}) float64, seed {args.seed}")
    return 0
