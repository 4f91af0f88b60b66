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
        "bit-identical to the original Raptor tool's projector, and its seed beside it "
        "(OUTPUT with .json), so that stores record the seed they were projected with.",
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
    from raptorz import create_projector, save_projector

    output: Path = args.output
    save_projector(create_projector(args.seed, args.dim, args.k, name=output.stem), output)
    print(f"wrote {output}: ({args.dim}, {args.k}) float64, seed {args.seed} (recorded in "
          f"{output.with_suffix('.json').name})")
    return 0
