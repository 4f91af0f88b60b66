"""``raptorz info``: what a raptorz store (volumes or embeddings) holds."""

from __future__ import annotations

import argparse
from typing import Any

from raptorz import location


def register(subparsers: Any) -> None:
    """Add the ``info`` verb."""
    parser = subparsers.add_parser(
        "info", help="describe a raptorz store",
        description="Print a store's kind, counts by status, dimensions, variables "
        "(dtype, chunking, compression), provenance, failures and whether its metadata is "
        "consolidated; --repair consolidates it.")
    parser.add_argument("store", type=location, metavar="STORE",
                        help="a raptorz store (volumes, embeddings or a baseline's)")
    parser.add_argument("--repair", action="store_true",
                        help="first consolidate the store's metadata where it is missing or "
                        "stale (stores of older raptorz versions), so that xr.open_zarr(STORE) "
                        "opens it without a warning")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Print the description; refusal (exit 2) where STORE is no raptorz store."""
    from raptorz import repair_store, store_info

    if args.repair:
        done = repair_store(args.store)
        print(f"{args.store}: " + ("metadata consolidated" if done else
                                   "metadata already consolidated; nothing to repair"))
    print(store_info(args.store))
    return 0
