"""raptorz: train-free Raptor embeddings of 3D medical volumes at any scale.

The public API is re-exported here and imported on first use (PEP 562), so that
``import raptorz`` and the command line start without loading torch, timm or Dask.

>>> import raptorz
>>> summary = raptorz.convert(["scans/"], "volumes.zarr")  # doctest: +SKIP
>>> raptorz.embed("volumes.zarr", "embeddings.zarr", ["proj.npy"])  # doctest: +SKIP
>>> raptorz.fit("embeddings.zarr", "labels.csv", "results")  # doctest: +SKIP
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

from raptorz.errors import InputError, RaptorzError, RaptorzWarning

if TYPE_CHECKING:
    from raptorz._forkserver import start_worker_server
    from raptorz.cluster import create_cluster
    from raptorz.defaults import HeadSettings
    from raptorz.demo import make_demo_data, run_demo
    from raptorz.downstream.baselines import VoxelSettings, voxel_baseline
    from raptorz.downstream.fitting import FitResult, FitSettings, fit
    from raptorz.downstream.model import FittedModel, load_model, predict
    from raptorz.downstream.pca import embedding_pca
    from raptorz.downstream.scoring import ScoreResult, score_predictions, write_scores
    from raptorz.downstream.sweeps import SweepSettings, sweep
    from raptorz.embedding.embeddings import add_projections, export_npy, open_embeddings
    from raptorz.embedding.encoders import (
        DEFAULT_ENCODER,
        RANDOM_WEIGHTS,
        Encoder,
        create_encoder,
        list_encoders,
    )
    from raptorz.embedding.kernel import (
        PLANE_NAMES,
        BlockEmbedding,
        KernelSettings,
        embed_block,
        embed_volume,
        project_tokens,
    )
    from raptorz.embedding.montage import plane_montage
    from raptorz.embedding.projection import (
        Projector,
        create_projector,
        load_projector,
        make_projector,
    )
    from raptorz.embedding.runner import EmbedSummary, embed
    from raptorz.info import repair_store, store_info
    from raptorz.ingest.intensity import Intensity, parse_intensity
    from raptorz.ingest.volumes import ConvertSummary, convert, open_volumes

try:
    __version__ = version("raptorz")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0+unknown"

#: Public name -> the module that defines it.
_EXPORTS: dict[str, str] = {
    "create_cluster": "cluster", "start_worker_server": "_forkserver",
    **dict.fromkeys(["HeadSettings"], "defaults"),
    **dict.fromkeys(["make_demo_data", "run_demo"], "demo"),
    **dict.fromkeys(["add_projections", "export_npy", "open_embeddings"], "embedding.embeddings"),
    **dict.fromkeys(["DEFAULT_ENCODER", "RANDOM_WEIGHTS"], "defaults"),
    **dict.fromkeys(["Encoder", "create_encoder", "list_encoders"], "embedding.encoders"),
    **dict.fromkeys(["FitResult", "FitSettings", "fit"], "downstream.fitting"),
    **dict.fromkeys(["VoxelSettings", "voxel_baseline"], "downstream.baselines"),
    **dict.fromkeys(["Intensity", "parse_intensity"], "ingest.intensity"),
    **dict.fromkeys(["PLANE_NAMES", "KernelSettings"], "embedding.settings"),
    **dict.fromkeys(["BlockEmbedding", "embed_block", "embed_volume", "project_tokens"],
                    "embedding.kernel"),
    **dict.fromkeys(["FittedModel", "load_model", "predict"], "downstream.model"),
    **dict.fromkeys(["Projector", "create_projector", "load_projector", "make_projector"],
                    "embedding.projection"),
    **dict.fromkeys(["embedding_pca"], "downstream.pca"),
    **dict.fromkeys(["ScoreResult", "score_predictions", "write_scores"], "downstream.scoring"),
    **dict.fromkeys(["SweepSettings", "sweep"], "downstream.sweeps"),
    **dict.fromkeys(["plane_montage"], "embedding.montage"),
    **dict.fromkeys(["EmbedSummary", "embed"], "embedding.runner"),
    **dict.fromkeys(["repair_store", "store_info"], "info"),
    **dict.fromkeys(["ConvertSummary", "convert", "open_volumes"], "ingest.volumes"),
}

__all__ = sorted([*_EXPORTS, "InputError", "RaptorzError", "RaptorzWarning", "__version__"])


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f"raptorz.{_EXPORTS[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'raptorz' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
