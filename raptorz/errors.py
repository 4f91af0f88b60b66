"""Exceptions and warnings raised by raptorz.

Every error about a user's input names the offending file (or store) and the problem,
so that a message in a log of ten thousand volumes is enough to act on.
"""

from __future__ import annotations


class RaptorzError(Exception):
    """Base class of raptorz's own errors."""


class InputError(RaptorzError):
    """An input (a volume, a manifest, a store, a weights file) is unusable.

    Parameters
    ----------
    source
        The file, folder or store the problem is about.
    problem
        What is wrong with it, and where it helps, what to do about it.
    """

    def __init__(self, source: object, problem: str) -> None:
        self.source = str(source)
        self.problem = problem
        super().__init__(f"{self.source}: {problem}")


class RaptorzWarning(UserWarning):
    """Base class of raptorz's own warnings (turned into errors in the test suite)."""
