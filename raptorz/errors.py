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


class SettingsError(RaptorzError, ValueError):
    """A setting is out of its range (the command line exits with code 2 on it).

    Raised by the settings objects and the public functions that check their options,
    in the words of the Python API: ``option`` names the keyword argument(s) (``"planes"``,
    ``"start/many"``), and the command line shows the matching flags (``--start/--many``).

    Parameters
    ----------
    problem
        What is wrong, and where it helps, what to do about it.
    option
        The keyword argument the problem is about, if one; several joined by ``/``.
    """

    def __init__(self, problem: str, *, option: str | None = None) -> None:
        self.problem = problem
        self.option = option
        super().__init__(f"{option}: {problem}" if option else problem)

    def flags(self) -> str:
        """``option`` as the command line spells it (``start/many`` -> ``--start/--many``)."""
        assert self.option is not None
        return "/".join("--" + name.replace("_", "-") for name in self.option.split("/"))


class RaptorzWarning(UserWarning):
    """Base class of raptorz's own warnings (turned into errors in the test suite)."""
