"""``raptorz baseline``: the raw-voxel baseline as a store that ``raptorz fit`` reads."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``baseline`` verb."""
    parser = subparsers.add_parser(
        "baseline", help="raw-voxel baseline: volumes downsampled, PCA fitted on train",
        description="Read volumes.zarr in batches, block-average each volume to GRID^3 "
        "voxels, fit a PCA on the labels' train split and write the components as the "
        "'voxels' variable of a store that `raptorz fit STORE --projector voxels` fits like "
        "Raptor embeddings. (The avgpool baseline is in every embeddings store: "
        "`raptorz fit --projector avgpool`.)")
    parser.add_argument("volumes", type=Path, help="the volumes.zarr store (raptorz convert)")
    parser.add_argument("--labels", type=Path, required=True,
                        help="the labels CSV; the PCA is fitted on its train split")
    parser.add_argument("-o", "--output", type=Path, required=True,
                        help="the baseline store to write (must not exist)")
    parser.add_argument("--grid", type=int, default=16,
                        help="voxels per side after downsampling (default 16)")
    parser.add_argument("--components", type=int, default=64,
                        help="PCA components (default 64; at most the train volumes)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Write the baseline store."""
    from raptorz import VoxelSettings, voxel_baseline

    output = voxel_baseline(args.volumes, args.labels, args.output,
                            VoxelSettings(grid=args.grid, components=args.components),
                            log=lambda line: print(line, file=sys.stderr))
    print(f"wrote {output}: fit it with `raptorz fit {output} --projector voxels`")
    return 0
