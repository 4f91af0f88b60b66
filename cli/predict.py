"""``raptorz predict``: apply a model saved by ``raptorz fit`` to an embeddings store."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``predict`` verb."""
    parser = subparsers.add_parser(
        "predict",
        help="predict from embeddings.zarr with a model saved by raptorz fit",
        description="Apply a fitted model (the model/ folder that raptorz fit writes) to "
        "the ok volumes of an embeddings store, or to the ids listed in --ids, and write "
        "the predictions as CSV (id, then one column per target or class).",
    )
    parser.add_argument("store", type=Path, help="embeddings.zarr")
    parser.add_argument("--model", type=Path, required=True, help="a model/ folder")
    parser.add_argument("-o", "--output", type=Path, required=True, help="the CSV to write")
    parser.add_argument("--ids", type=Path,
                        help="a text file of volume ids, one a line (default: all ok volumes)")
    parser.add_argument("--memory-budget", metavar="SIZE",
                        help="memory the features may take, e.g. 8GB or 512MiB: they are read "
                        "a unit at a time where they do not fit in it. Default: half of the "
                        "memory available when predict starts.")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Predict and write the CSV."""
    from raptorz import predict
    from raptorz.errors import InputError

    ids = None
    if args.ids is not None:
        if not args.ids.is_file():
            raise InputError(args.ids, "ids file not found")
        ids = [line.strip() for line in args.ids.read_text().splitlines() if line.strip()]
    frame = predict(args.store, args.model, ids=ids, memory_budget_size=args.memory_budget)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(args.output, index=False)
    print(f"wrote {args.output}: {len(frame)} volumes")
    return 0
