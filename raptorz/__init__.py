"""raptorz: train-free Raptor embeddings of 3D medical volumes at any scale."""

from importlib.metadata import PackageNotFoundError, version

from raptorz.errors import InputError, RaptorzError, RaptorzWarning

try:
    __version__ = version("raptorz")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0+unknown"

__all__ = [
    "InputError",
    "RaptorzError",
    "RaptorzWarning",
    "__version__",
]
