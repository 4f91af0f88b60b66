"""``raptorz fit``: fit a head on embeddings and a labels CSV; score, plot and save it."""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from raptorz import HeadSettings, location
from raptorz.cli._cluster import add_cluster_options, cluster_from
from raptorz.defaults import PAPER_DEPTHS, PENALTIES

MEMORY_HELP = (
    "memory the features may take, e.g. 8GB or 512MiB. When the float32 features of all "
    "labelled volumes fit in it they are read once and held in memory; otherwise they are "
    "streamed from the store a unit at a time, one read of the store per pass (one for "
    "every penalty's L-BFGS evaluation at once, or an MLP epoch). Default: half of the "
    "memory available when fit starts. Both paths give the same predictions."
)
DEVICE_HELP = (
    "where the head computes: the MLP trains and predicts there, the linear head's "
    "float64 sums run there (torch on a GPU, numpy on the CPU); auto: the GPU where one "
    "is present, else the CPU (default auto; metrics.json names the device used)"
)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``fit`` verb."""
    parser = subparsers.add_parser(
        "fit",
        help="fit and score a predictor on embeddings.zarr and a labels CSV",
        description="Fit a head on embeddings.zarr and a labels CSV (volume id first, a "
        "'split' column train/val/test, then targets), score it on the test split with "
        "bootstrap intervals and write predictions.csv, metrics.json, a plot and model/ "
        "to the output folder.",
    )
    parser.add_argument("store", type=location, help="embeddings.zarr (a path or a URL)")
    parser.add_argument("--labels", type=location, required=True,
                        help="the labels CSV (a path or a URL)")
    parser.add_argument("-o", "--output", type=Path, required=True, help="results folder")
    parser.add_argument("--projector", help="features: a projector's name, avgpool or tokens "
                        "(default: the store's only projector)")
    parser.add_argument("--region", metavar="NAMES",
                        help="a region store (embed --masks): the region(s) whose features "
                        "are fitted, comma-separated (concatenated in that order); volumes "
                        "where one is absent are left out")
    parser.add_argument("--task", default="auto",
                        choices=("auto", "classification", "multilabel", "regression"),
                        help="default auto: inferred from the targets and reported")
    parser.add_argument("--targets", help="comma-separated target columns (default: all)")
    parser.add_argument("--head", default="linear", choices=("linear", "mlp"),
                        help="linear: L2 logistic / ridge regression, penalty C chosen on val "
                        f"among {', '.join(f'{c:g}' for c in PENALTIES)} (the paper's "
                        "protocol); mlp: the original tool's MLP (default linear)")
    defaults = HeadSettings()
    parser.add_argument("--max-iter", type=int, default=defaults.max_iter,
                        help="linear: L-BFGS iterations per penalty at most (default "
                        f"{defaults.max_iter}, scikit-learn's)")
    parser.add_argument("--layers", type=_depths, default=(defaults.layers,),
                        metavar="N|N,N,...|auto",
                        help="MLP layers; several (comma-separated) or auto "
                        f"({','.join(map(str, PAPER_DEPTHS))}, the paper's) to choose the depth "
                        "on the validation split, reported in metrics.json (default "
                        f"{defaults.layers})")
    parser.add_argument("--dropout", type=float, default=defaults.dropout,
                        help=f"MLP dropout (default {defaults.dropout})")
    parser.add_argument("--epochs", type=int, default=defaults.epochs,
                        help=f"MLP epochs at most (default {defaults.epochs})")
    parser.add_argument("--patience", type=int, default=defaults.patience,
                        help="MLP: stop after this many epochs without a better validation "
                        f"loss (default {defaults.patience})")
    parser.add_argument("--lr", type=float, default=defaults.lr,
                        help=f"MLP AdamW learning rate (default {defaults.lr:g})")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the MLP and of the bootstrap (default 0)")
    parser.add_argument("--device", default=defaults.device, metavar="auto|cpu|cuda|cuda:N",
                        help=DEVICE_HELP)
    parser.add_argument("--memory-budget", metavar="SIZE", help=MEMORY_HELP)
    parser.add_argument("--cache", type=Path, metavar="DIR",
                        help="streamed features: keep an uncompressed copy in a file under "
                        "DIR (filled by the first pass, read by the others, removed at the "
                        "end; needs the features' float32 size free)")
    parser.add_argument("--bootstrap", type=int, default=1000,
                        help="bootstrap resamples of the test split for 95%% intervals "
                        "(default 1000; 0 for none)")
    parser.add_argument("--strict", action="store_true",
                        help="refuse labelled volumes without an ok embedding instead of "
                        "leaving them out with a warning")
    add_cluster_options(parser, default="none: this process", description=(
        "the train rows read once and held on a Dask cluster's workers: the linear head's "
        "passes run there; the MLP fits on this machine, its epochs' rows gathered from the "
        "workers"))
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Fit; exit 1 where labelled volumes were left out, 0 otherwise."""
    from raptorz import FitSettings, fit
    from raptorz.errors import RaptorzWarning

    # The library checks every value (SettingsError: exit code 2 through main).
    depths = args.layers
    head = HeadSettings(head=args.head, max_iter=args.max_iter, layers=depths[0],
                        depths=depths if len(depths) > 1 else (), dropout=args.dropout,
                        epochs=args.epochs, patience=args.patience, lr=args.lr, seed=args.seed,
                        device=args.device)
    targets = tuple(t.strip() for t in args.targets.split(",")) if args.targets else ()
    projector = args.projector if not args.region else f"{args.projector or ''}@{args.region}"
    settings = FitSettings(projector=projector, task=args.task, targets=targets,
                           head=head, memory_budget=args.memory_budget, cache=args.cache,
                           bootstrap=args.bootstrap, strict=args.strict)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RaptorzWarning)
        result = fit(args.store, args.labels, args.output, settings, cluster=_cluster(args),
                     log=lambda line: print(line, file=sys.stderr))
    for warning in caught:
        print(f"raptorz fit: warning: {warning.message}", file=sys.stderr)
    print(f"wrote {result.output}: predictions.csv, metrics.json, plot, model/")
    return 1 if result.metrics["left_out"] else 0


def _cluster(args: argparse.Namespace) -> str | Callable[[], Any] | None:
    """The scheduler address, a function that starts the cluster the options ask for
    (``fit`` calls it once its inputs are checked), or ``None``: no cluster."""
    return None if args.cluster is None else cluster_from(args, args.cluster)


def _depths(text: str) -> tuple[int, ...]:
    """``--layers``: one depth, several comma-separated, or ``auto`` (the paper's 1-3)."""
    if text.strip() == "auto":
        return PAPER_DEPTHS
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N, N,N,... or auto, not {text!r}") from None
