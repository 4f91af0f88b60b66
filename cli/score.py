"""``raptorz score``: several models' predictions, grouped, on shared bootstrap resamples."""

from __future__ import annotations

import argparse
from pathlib import Path

from raptorz.errors import SettingsError


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``score`` verb."""
    parser = subparsers.add_parser(
        "score", help="score several predictions.csv side by side, grouped, on shared "
        "bootstrap resamples",
        # argparse does not %-format a description (it does a help): write a plain "%"
        description="Score each target by squared Pearson r on the labels' test split; a "
        "group scores the mean over its targets with a 95% bootstrap interval. The "
        "resamples are shared by all targets and models and saved (--resamples), so a model "
        "scored later is scored on the same rows. Writes scores.csv, scores.md and "
        "scores.tex (one row per model) and, with --compare, paired differences.")
    parser.add_argument("predictions", nargs="+", metavar="NAME=PREDICTIONS.CSV",
                        type=_named, help="a model's name and its predictions.csv (raptorz "
                        "fit's layout); repeatable")
    parser.add_argument("--labels", type=Path, required=True,
                        help="the labels CSV the models were fitted with")
    parser.add_argument("-o", "--output", type=Path, required=True, help="results folder")
    parser.add_argument("--groups", type=Path,
                        help='a JSON file {"group": ["column", ...] or "word"}; a word '
                        "takes the targets whose description contains it (needs "
                        "--metadata). Default: one group of all targets")
    parser.add_argument("--metadata", type=Path,
                        help="a CSV with field_id and description columns, describing the "
                        "targets (a column matches field_id or field_id-instance)")
    parser.add_argument("--resamples", type=Path,
                        help="the shared resamples (.npz): read if it exists, else drawn and "
                        "written there (default OUTPUT/resamples.npz)")
    parser.add_argument("--bootstrap", type=int, default=1000,
                        help="resamples to draw when none are saved yet (default 1000)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the resamples (default 0)")
    parser.add_argument("--metric", choices=("r2", "auroc"), default="r2",
                        help="r2: squared Pearson r (default); auroc: binary 0/1 targets "
                        "(a classification fit's <target>_1 column is its score)")
    parser.add_argument("--compare", nargs=2, metavar=("A", "B"),
                        help="paired bootstrap differences A - B per group")
    parser.add_argument("--interval", choices=("percentile", "original"), default="percentile",
                        help="percentile: the value on the whole test split with the 2.5 and "
                        "97.5 percentiles of the bootstrap values (default); original: as the "
                        "original tool's score_ukbb20252.py reports, the mean of the "
                        "bootstrap values +/- 1.95 standard deviations")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Score, write the tables and print the markdown one."""
    from raptorz import score_predictions, write_scores

    names = [name for name, _ in args.predictions]
    if repeated := sorted({name for name in names if names.count(name) > 1}):
        raise SettingsError(f"NAME=PREDICTIONS.CSV: each model needs a name of its own; "
                            f"given more than once: {', '.join(repeated)}")
    result = score_predictions(
        args.labels, dict(args.predictions), groups=args.groups, metadata=args.metadata,
        resamples=args.resamples or args.output / "resamples.npz", bootstrap=args.bootstrap,
        seed=args.seed, compare=tuple(args.compare) if args.compare else None,
        metric=args.metric, interval=args.interval)
    written = write_scores(result, args.output)
    print("AUROC of each binary target" if args.metric == "auroc" else
          "squared Pearson r of each target (a classifier's predictions: --metric auroc)",
          f"on the test split, {args.interval} interval:")
    print((args.output / "scores.md").read_text(), end="")
    if result.differences is not None:
        print((args.output / "differences.md").read_text(), end="")
    print(f"wrote {', '.join(p.name for p in written)} to {args.output}")
    return 0


def _named(text: str) -> tuple[str, Path]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=PREDICTIONS.CSV, not {text!r}")
    return name, Path(path)
