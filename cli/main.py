"""Entry point of the ``raptorz`` console script."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

from raptorz import __version__
from raptorz.errors import RaptorzError, SettingsError

#: Verb modules in ``raptorz.cli``, in the order ``raptorz --help`` lists them.
VERBS: tuple[str, ...] = (
    "demo", "convert", "info", "encoders", "projector", "embed", "reproject", "export", "fit",
    "predict", "baseline", "score", "sweep",
)

#: Exit codes: 0 all good, 1 some volumes failed, 2 the input or the options were refused.
EXIT_OK, EXIT_FAILURES, EXIT_REFUSED = 0, 1, 2


def build_parser() -> argparse.ArgumentParser:
    """Build the full ``raptorz`` parser (also used by the tests to check README commands)."""
    parser = argparse.ArgumentParser(
        prog="raptorz",
        description="Train-free Raptor embeddings of 3D medical volumes: "
        "convert -> embed -> fit.",
    )
    parser.add_argument("--version", action="version", version=f"raptorz {__version__}")
    subparsers = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    for name in VERBS:
        importlib.import_module(f"raptorz.cli.{name}").register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``raptorz`` with ``argv`` and return the exit code."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except SettingsError as error:  # the library names keywords, the command its flags
        text = f"{error.flags()}: {error.problem}" if error.option else error
        print(f"raptorz {args.verb}: error: {text}", file=sys.stderr)
        return EXIT_REFUSED
    except RaptorzError as error:
        print(f"raptorz {args.verb}: error: {error}", file=sys.stderr)
        return EXIT_REFUSED
    except KeyboardInterrupt:
        print(f"raptorz {args.verb}: interrupted; rerun the same command to resume.",
              file=sys.stderr)
        return 130
    except BrokenPipeError:  # `raptorz encoders | head`: the reader left, nothing is wrong
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def console() -> int:
    """The ``raptorz`` console script: :func:`main`, then an exit that skips the final
    garbage collection (:func:`raptorz.processes.skip_final_collection`)."""
    from raptorz.processes import skip_final_collection

    return skip_final_collection(main())


if __name__ == "__main__":
    sys.exit(console())
