# The public API: one line per name, from the module that defines it. Type checkers read
# this file; at run time raptorz/__init__.py reads it too (lazy_loader.attach_stub), and
# imports each module on the first use of one of its names.
# (``name as name``: the form that marks a stub's import as a re-export.)
from .cluster import create_cluster as create_cluster
from .defaults import DEFAULT_ENCODER as DEFAULT_ENCODER
from .defaults import RANDOM_WEIGHTS as RANDOM_WEIGHTS
from .demo import make_demo_data as make_demo_data
from .demo import run_demo as run_demo
from .downstream.baselines import VoxelSettings as VoxelSettings
from .downstream.baselines import voxel_baseline as voxel_baseline
from .downstream.fitting import FitResult as FitResult
from .downstream.fitting import FitSettings as FitSettings
from .downstream.fitting import fit as fit
from .downstream.model import (
    FittedModel as FittedModel,
)
from .downstream.model import (
    load_model as load_model,
)
from .downstream.model import (
    predict as predict,
)
from .downstream.pca import embedding_pca as embedding_pca
from .downstream.scoring import (
    ScoreResult as ScoreResult,
)
from .downstream.scoring import (
    score_predictions as score_predictions,
)
from .downstream.scoring import (
    write_scores as write_scores,
)
from .downstream.settings import HeadSettings as HeadSettings
from .downstream.sweeps import SweepSettings as SweepSettings
from .downstream.sweeps import sweep as sweep
from .embedding.embeddings import add_projections as add_projections
from .embedding.embeddings import export_npy as export_npy
from .embedding.encoders import (
    Encoder as Encoder,
)
from .embedding.encoders import (
    create_encoder as create_encoder,
)
from .embedding.encoders import (
    list_encoders as list_encoders,
)
from .embedding.kernel import (
    BlockEmbedding as BlockEmbedding,
)
from .embedding.kernel import (
    embed_block as embed_block,
)
from .embedding.kernel import (
    embed_volume as embed_volume,
)
from .embedding.montage import plane_montage as plane_montage
from .embedding.projection import (
    Projector as Projector,
)
from .embedding.projection import (
    create_projector as create_projector,
)
from .embedding.projection import (
    load_projector as load_projector,
)
from .embedding.projection import (
    make_projector as make_projector,
)
from .embedding.projection import (
    project_tokens as project_tokens,
)
from .embedding.projection import (
    save_projector as save_projector,
)
from .embedding.regions import RegionEmbedding as RegionEmbedding
from .embedding.regions import embed_regions as embed_regions
from .embedding.runner import EmbedSummary as EmbedSummary
from .embedding.runner import embed as embed
from .embedding.settings import PLANE_NAMES as PLANE_NAMES
from .embedding.settings import KernelSettings as KernelSettings
from .embedding.settings import RegionSettings as RegionSettings
from .errors import (
    InputError as InputError,
)
from .errors import (
    RaptorzError as RaptorzError,
)
from .errors import (
    RaptorzWarning as RaptorzWarning,
)
from .errors import (
    SettingsError as SettingsError,
)
from .info import repair_store as repair_store
from .info import store_info as store_info
from .ingest.intensity import Intensity as Intensity
from .ingest.intensity import parse_intensity as parse_intensity
from .ingest.masks import MasksSummary as MasksSummary
from .ingest.masks import build_masks as build_masks
from .ingest.masks import read_label_table as read_label_table
from .ingest.volumes import ConvertSummary as ConvertSummary
from .ingest.volumes import convert as convert
from .layouts import open_embeddings as open_embeddings
from .layouts import open_masks as open_masks
from .layouts import open_volumes as open_volumes
from .locations import location as location
from .processes import start_worker_server as start_worker_server

__version__: str
