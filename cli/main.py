"""Entry point of the ``raptorz`` console script."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from typing import TextIO

from raptorz import __version__
from raptorz.errors import RaptorzError, SettingsError

#: Verb modules in ``raptorz.cli``, in the order ``raptorz --help`` lists them.
VERBS: tuple[str, ...] = (
    "demo", "convert", "masks", "info", "encoders", "projector", "embed", "reproject", "export",
    "fit", "predict", "baseline", "score", "sweep",
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


def _one_line(verb: str) -> Callable[..., None]:
    """``warnings.showwarning`` for the command line: each message once, on one line,
    without the source line that raised it."""
    shown: set[str] = set()

    def show(message: Warning | str, category: type[Warning], filename: str, lineno: int,
             file: TextIO | None = None, line: str | None = None) -> None:
        if str(message) not in shown:
            shown.add(str(message))
            print(f"raptorz {verb}: warning: {message}", file=file or sys.stderr)

    return show


def main(argv: Sequence[str] | None = None, *, plain_warnings: bool = False) -> int:
    """Run ``raptorz`` with ``argv`` and return the exit code.

    ``plain_warnings``: show each warning once, as one line (the console script); else
    they go through ``warnings`` as usual (a caller may record them).
    """
    args = build_parser().parse_args(argv)
    with warnings.catch_warnings():
        if plain_warnings:
            warnings.showwarning = _one_line(args.verb)
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    try:
        return int(args.func(args))
    except SettingsError as error:  # the library names keywords, the command its flags
        text = f"{error.flags()}: {error.problem}" if error.option else error
        print(f"raptorz {args.verb}: error: {text}", file=sys.stderr)
        return EXIT_REFUSED
    except RaptorzError as error:
        print(f"raptorz {args.verb}: error: {error}", file=sys.stderr)
        return EXIT_REFUSED
    except (IsADirectoryError, NotADirectoryError, FileExistsError, PermissionError) as error:
        # a path given where the other kind of thing is (an output that is a file...)
        where = error.filename if error.filename is not None else "a path"
        print(f"raptorz {args.verb}: error: {where}: {error.strerror}", file=sys.stderr)
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

    return skip_final_collection(main(plain_warnings=True))


if __name__ == "__main__":
    sys.exit(console())
