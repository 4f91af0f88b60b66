"""``raptorz info``: what a raptorz store (volumes or embeddings) holds."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def register(subparsers: Any) -> None:
    """Add the ``info`` verb."""
    parser = subparsers.add_parser(
        "info", help="describe a raptorz store",
        description="Print a store's kind, counts by status, dimensions, variables "
        "(dtype, chunking, compression), provenance and failures.")
    parser.add_argument("store", type=Path, metavar="STORE")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Print the description; refusal (exit 2) where STORE is no raptorz store."""
    from raptorz import store_info

    print(store_info(args.store))
    return 0
