"""``raptorz masks``: label maps (multi-label files or folders of binary masks) onto the
grids of a volumes.zarr's volumes (docs/regions.md)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any


def register(subparsers: Any) -> None:
    """Add the ``masks`` verb."""
    parser = subparsers.add_parser(
        "masks", help="convert segmentation masks into masks.zarr, beside volumes.zarr",
        description="Match each volume of a volumes.zarr with its mask by id: FOLDER/<id>.nii.gz "
        "(one multi-label map, any format convert reads) or FOLDER/<id>/ (one binary mask "
        "per structure, named by its file: TotalSegmentator's default output). Each mask "
        "must lie on its volume's source grid; it is reoriented and resampled (nearest "
        "neighbour) or padded as the volume was. Rerun the same command to resume; a mask "
        "changed since is named in a warning and kept, unless --reconvert-changed.")
    parser.add_argument("masks", type=Path, help="the folder of masks")
    parser.add_argument("volumes", type=Path, help="the volumes.zarr store (raptorz convert)")
    parser.add_argument("-o", "--output", required=True, type=Path,
                        help="the masks.zarr store to write or resume")
    parser.add_argument("--labels", type=Path, metavar="TABLE",
                        help="region names: a JSON ({\"1\": \"spleen\"} as TotalSegmentator's "
                        "class map, or {\"spleen\": 1}) or a TSV/CSV of value and name; without "
                        "it, binary masks are numbered by name and label maps' values are "
                        "their names")
    parser.add_argument("--reconvert-changed", action="store_true",
                        help="on a rerun, convert again the masks whose file (or folder) "
                        "changed since (without it they are kept and named in a warning); "
                        "region embeddings of those masks become stale: `raptorz embed` "
                        "recomputes them")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Convert the masks; 1 when a volume's mask failed."""
    from raptorz import build_masks

    def progress(done: int, total: int) -> None:
        if total and done:
            print(f"  {done} masks done", file=sys.stderr)

    summary = build_masks(args.masks, args.volumes, args.output, labels=args.labels,
                          reconvert_changed=args.reconvert_changed, progress=progress)
    for name, problem in summary.failures.items():
        print(f"failed: {name}: {problem}", file=sys.stderr)
    regions = ", ".join(f"{name}={value}" for name, value in summary.labels.items())
    print(f"{summary.store}: {summary.converted} masks converted, {summary.failed} failed, "
          f"{summary.skipped} already done; regions: {regions or 'none'}")
    return 0 if summary.failed == 0 else 1
