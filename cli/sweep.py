"""``raptorz sweep``: the paper's ablations (K x seeds, planes, few-shot) from stored tokens."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from raptorz.defaults import PENALTIES


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``sweep`` verb."""
    parser = subparsers.add_parser(
        "sweep", help="fit every K x seed x plane subset x train size from stored tokens",
        description="From embeddings.zarr written with `raptorz embed --keep-tokens`, project "
        "the stored tokens with each seeded projector (as `raptorz projector --seed S --k K` "
        "makes it; no encoder runs), keep each plane subset, subsample train to each size, "
        "fit the head and score it on test; every combination of the axes is fitted (run "
        "several sweeps for one-axis tables). Writes runs.csv, summary.csv and summary.md "
        "(mean ± std across seeds) and score_vs_k.png.")
    parser.add_argument("store", type=Path, help="embeddings.zarr made with --keep-tokens")
    parser.add_argument("--labels", type=Path, required=True, help="the labels CSV")
    parser.add_argument("-o", "--output", type=Path, required=True, help="results folder")
    parser.add_argument("--k", type=_ints, default=(1, 5, 10, 100, 150), metavar="K,K,...",
                        help="projector widths (default the paper's 1,5,10,100,150)")
    parser.add_argument("--seeds", type=_ints, default=(0, 1, 2), metavar="S,S,...",
                        help="projector seeds (default 0,1,2)")
    parser.add_argument("--planes", default="ACS", metavar="P,P,...|all",
                        help="plane subsets, e.g. A,CS,ACS; all: A,C,S,AC,CS,AS,ACS "
                        "(default ACS)")
    parser.add_argument("--train-sizes", default="all", metavar="N,N,...|all",
                        help="few-shot train sizes, e.g. 10,100,all (default all); each "
                        "below the train split's volumes, none repeated")
    parser.add_argument("--region", metavar="NAMES",
                        help="a region store (embed --masks --keep-tokens): the region(s) "
                        "swept, comma-separated (concatenated in that order)")
    parser.add_argument("--targets", help="comma-separated target columns (default: all)")
    parser.add_argument("--task", default="auto",
                        choices=("auto", "classification", "multilabel", "regression"),
                        help="what the labels are (default auto: from the columns, as "
                        "raptorz fit decides)")
    parser.add_argument("--penalties", type=_floats, default=PENALTIES, metavar="C,C,...",
                        help="linear head: inverse penalties tried on val (default the "
                        f"paper's {','.join(f'{c:g}' for c in PENALTIES)})")
    parser.add_argument("--max-iter", type=int, default=100,
                        help="linear head: L-BFGS iterations per penalty (default 100)")
    parser.add_argument("--device", default="auto", metavar="auto|cpu|cuda|cuda:N",
                        help="where the linear head's float64 sums run (torch on a GPU, "
                        "numpy on the CPU); auto: the GPU where one is present (default auto)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run the sweep and print the summary."""
    from raptorz import FitSettings, HeadSettings, SweepSettings, sweep

    planes = (("A", "C", "S", "AC", "CS", "AS", "ACS") if args.planes == "all"
              else tuple(p.strip() for p in args.planes.split(",")))
    sizes = tuple(None if s.strip() == "all" else int(s) for s in args.train_sizes.split(","))
    targets = tuple(t.strip() for t in args.targets.split(",")) if args.targets else ()
    fit = FitSettings(task=args.task, targets=targets, bootstrap=0,
                      projector=f"@{args.region}" if args.region else None,
                      head=HeadSettings(max_iter=args.max_iter, penalties=args.penalties,
                                        device=args.device))
    settings = SweepSettings(ks=args.k, seeds=args.seeds, planes=planes, train_sizes=sizes,
                             fit=fit)
    sweep(args.store, args.labels, args.output, settings,
          log=lambda line: print(line, file=sys.stderr))
    print((args.output / "summary.md").read_text(), end="")
    print(f"wrote runs.csv, summary.csv, summary.md, score_vs_k.png to {args.output}")
    return 0


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, not {text!r}"
                                         ) from None


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, not {text!r}"
                                         ) from None
