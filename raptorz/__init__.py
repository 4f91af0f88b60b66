"""raptorz: train-free Raptor embeddings of 3D medical volumes at any scale.

The public API is listed once, in ``__init__.pyi`` (each name from the module that
defines it), and imported on first use (``lazy_loader.attach_stub``, as scikit-image
does), so that ``import raptorz`` and the command line start without loading torch, timm
or Dask.

>>> import raptorz
>>> summary = raptorz.convert(["scans/"], "volumes.zarr")  # doctest: +SKIP
>>> raptorz.embed("volumes.zarr", "embeddings.zarr", ["proj.npy"])  # doctest: +SKIP
>>> raptorz.fit("embeddings.zarr", "labels.csv", "results")  # doctest: +SKIP
"""

from importlib.metadata import PackageNotFoundError, version

import lazy_loader

try:
    __version__ = version("raptorz")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0+unknown"

__getattr__, __dir__, __all__ = lazy_loader.attach_stub(__name__, __file__)
__all__ = sorted([*__all__, "__version__"])
