"""``raptorz reproject``: new projections of stored pooled tokens, without the encoder."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def register(subparsers: Any) -> None:
    """Add the ``reproject`` verb."""
    parser = subparsers.add_parser(
        "reproject", help="add projections to embeddings.zarr from its stored tokens",
        description="Project the pooled tokens kept by `raptorz embed --keep-tokens` with "
        "new projectors, adding one variable per projector; no encoder runs.")
    parser.add_argument("embeddings", type=Path, help="the embeddings.zarr store")
    parser.add_argument("--projector", action="append", required=True, type=Path,
                        help="a (dim, k) .npy projector; repeatable")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Add the projections that are not in the store yet."""
    from raptorz import add_projections, load_projector

    added = add_projections(args.embeddings, [load_projector(p) for p in args.projector])
    print(f"{args.embeddings}: " + (f"added {', '.join(added)}" if added else "nothing to do"))
    return 0
