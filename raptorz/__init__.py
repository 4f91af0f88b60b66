"""raptorz: train-free Raptor embeddings of 3D medical volumes at any scale."""

from importlib.metadata import PackageNotFoundError, version

from raptorz.cluster import create_cluster
from raptorz.embed import EmbedSummary, embed
from raptorz.embeddings import add_projections, export_npy, open_embeddings
from raptorz.encoders import DEFAULT_ENCODER, Encoder, create_encoder
from raptorz.errors import InputError, RaptorzError, RaptorzWarning
from raptorz.intensity import Intensity, parse_intensity
from raptorz.kernel import PLANE_NAMES, BlockEmbedding, KernelSettings, embed_block, embed_volume
from raptorz.projection import Projector, create_projector, load_projector, make_projector
from raptorz.volumes import ConvertSummary, convert, open_volumes, store_info

try:
    __version__ = version("raptorz")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0+unknown"

__all__ = [
    "DEFAULT_ENCODER",
    "PLANE_NAMES",
    "BlockEmbedding",
    "Encoder",
    "KernelSettings",
    "Projector",
    "create_encoder",
    "create_projector",
    "embed_block",
    "embed_volume",
    "load_projector",
    "make_projector",
    "ConvertSummary",
    "Intensity",
    "convert",
    "open_volumes",
    "parse_intensity",
    "store_info",
    "EmbedSummary",
    "add_projections",
    "create_cluster",
    "embed",
    "export_npy",
    "open_embeddings",
    "InputError",
    "RaptorzError",
    "RaptorzWarning",
    "__version__",
]
