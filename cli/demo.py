"""``raptorz demo``: the whole pipeline on a small labelled set of volumes."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def register(subparsers: Any) -> None:
    """Add the ``demo`` verb."""
    parser = subparsers.add_parser(
        "demo", help="convert, embed and fit a small labelled set of volumes, end to end",
        description="Run the whole pipeline on a local Dask cluster: make a small labelled "
        "set of NIfTI volumes (a lesion on the left in label 1, on the right in label 0; "
        "or use --data/--labels), convert, embed, fit the linear head on the demo's "
        "projector, score the test split beside the same fit on shuffled training labels "
        "(chance), and print every output path and the dashboard address. On a CPU it "
        "uses dinov2-s (DINOv2 ViT-S/14), on a GPU dinov2-l (ViT-L/14); without obtainable "
        "weights it says so and uses seeded random weights. Rerun to resume.")
    parser.add_argument("--workdir", type=Path, default=Path("raptorz-demo"),
                        help="folder for every output (default ./raptorz-demo)")
    parser.add_argument("--data", help="your own volumes: a folder, file or glob "
                        "(NIfTI, DICOM folder, UK Biobank zip, MedMNIST npz)")
    parser.add_argument("--labels", type=Path, help="labels CSV for --data (id, split, "
                        "targets); without it the demo stops after embedding")
    parser.add_argument("--encoder", metavar="NAME", help="a named encoder (`raptorz "
                        "encoders` lists them) or any timm model name (default: dinov2-s on "
                        "a CPU, dinov2-l on a GPU)")
    parser.add_argument("--weights", help="weights file, or 'random'")
    parser.add_argument("--workers", type=int, help="Dask workers (default 2 on CPU, "
                        "one per GPU)")
    parser.add_argument("--count", type=int, help="volumes the demo makes (default: "
                        "enough for 16 in the test split)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run the demo; refusal (exit 2) for --labels without --data or an unknown --encoder."""
    from raptorz import run_demo

    run_demo(args.workdir, data=args.data, labels=args.labels, encoder=args.encoder,
             weights=args.weights, workers=args.workers,
             **({} if args.count is None else {"count": args.count}))
    return 0
