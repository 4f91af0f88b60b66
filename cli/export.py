"""``raptorz export``: write embeddings.zarr in the original tool's per-volume .npy layout."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def register(subparsers: Any) -> None:
    """Add the ``export`` verb."""
    parser = subparsers.add_parser(
        "export", help="write DIR/<projector>/<id>.npy as the original tool does",
        description="Write each embedded volume's flat float32 vector to "
        "DIR/<projector>/<id>.npy, the layout the original Raptor scripts read.")
    parser.add_argument("embeddings", type=Path, help="the embeddings.zarr store")
    parser.add_argument("--npy", required=True, type=Path, metavar="DIR",
                        help="folder to write into")
    parser.add_argument("--projector", action="append", metavar="NAME",
                        help="only this projector; repeatable (default all)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Export the volumes embedded so far."""
    from raptorz import export_npy

    written = export_npy(args.embeddings, args.npy, args.projector)
    print(f"{args.npy}: wrote {written} .npy files")
    return 0
