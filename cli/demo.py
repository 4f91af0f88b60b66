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
        "set of NIfTI volumes (or use --data/--labels), convert, embed, fit, and print every "
        "output path and the dashboard address. On a CPU it uses DINOv2 ViT-S/14, on a GPU "
        "the default DINOv2 ViT-L/14; without obtainable weights it says so and uses seeded "
        "random weights. Rerun to resume.")
    parser.add_argument("--workdir", type=Path, default=Path("raptorz-demo"),
                        help="folder for every output (default ./raptorz-demo)")
    parser.add_argument("--data", help="your own volumes: a folder, file or glob "
                        "(NIfTI, DICOM folder, UK Biobank zip, MedMNIST npz)")
    parser.add_argument("--labels", type=Path, help="labels CSV for --data (id, split, "
                        "targets); without it the demo stops after embedding")
    parser.add_argument("--encoder", help="timm model name (default: ViT-S/14 DINOv2 on CPU, "
                        "ViT-L/14 on GPU)")
    parser.add_argument("--weights", help="weights file, or 'random'")
    parser.add_argument("--workers", type=int, help="Dask workers (default 2 on CPU, "
                        "one per GPU)")
    parser.add_argument("--count", type=int, default=16,
                        help="volumes the demo makes (default 16)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run the demo; refusal (exit 2) for --labels without --data."""
    from raptorz import run_demo

    run_demo(args.workdir, data=args.data, labels=args.labels, encoder=args.encoder,
             weights=args.weights, workers=args.workers, count=args.count)
    return 0
