"""Default values shared by the library and the command line, with no heavy imports.

The library modules that use these values import them from here (and re-export them
where they were first defined), and so does :mod:`raptorz.cli` to show them in its
help texts, so that ``raptorz --help`` needs neither torch nor Dask, xarray or Zarr
while every default keeps a single source of truth.
"""

from __future__ import annotations

from typing import Final, Literal

SourceKind = Literal["nifti", "zip", "npz", "dicom", "nrrd", "metaimage", "mgh", "analyze",
                     "minc", "afni", "parrec"]
HeadKind = Literal["linear", "mlp"]
#: ``auto``: ``cuda`` where GPUs are visible, else ``local``.
ClusterKind = Literal["auto", "local", "cuda", "slurm", "pbs", "sge", "lsf"]
#: The worker resource a GPU task asks for; every GPU worker advertises one.
GPU_RESOURCE: Final = "GPU"
#: The environment variable that tells a worker how many workers share its host's CPUs.
WORKERS_PER_HOST: Final = "RAPTORZ_WORKERS_PER_HOST"

Precision = Literal["fp32", "bf16", "fp16"]

#: What the worker processes of an embedding run import before their first task (the
#: runner, which brings xarray, Zarr and Dask; then torch and timm), where they can be
#: forked from a server that imported them once (:func:`raptorz.cluster.start_worker_server`).
EMBED_WORKER_IMPORTS: Final = ("raptorz.embedding.worker", "raptorz.embedding.encoders",
                               "torch", "timm")
#: The encoder of the Raptor paper.
DEFAULT_ENCODER: Final = "vit_large_patch14_dinov2.lvd142m"
#: ``weights=RANDOM_WEIGHTS``: timm's initial weights drawn with seed 0, for demos and
#: benchmarks where no real weights can be had. The pipeline runs; the embeddings mean
#: nothing. The provenance says so (``weights_source == "random"``).
RANDOM_WEIGHTS: Final = "random"
#: The UK Biobank zip member the original tool reads.
DEFAULT_MEMBER: Final = "T1/T1_brain.nii.gz"
#: The scaling used for each reader where the run chooses none.
DEFAULT_INTENSITY: Final[dict[SourceKind, str]] = {
    "nifti": "percentile:0.5,99.5", "dicom": "percentile:0.5,99.5",
    "zip": "range:0,1280", "npz": "divide:256",
    **dict.fromkeys(("nrrd", "metaimage", "mgh", "analyze", "minc", "afni", "parrec"),
                    "percentile:0.5,99.5"),
}
#: Train, validation and test shares of the subjects of a BIDS dataset's labels.
SPLIT_FRACTIONS: Final = (0.7, 0.15, 0.15)
#: In a DICOM folder of several series, series of fewer slices are skipped (localizers).
DEFAULT_MIN_SLICES: Final = 10
#: Projection width of the Raptor paper.
DEFAULT_K: Final = 100
#: Rows per batch: the unit of every streaming pass and the MLP's minibatch (as the original).
BATCH: Final = 128
#: Inverse L2 penalties tried on the validation split (the Raptor paper's grid).
PENALTIES: Final = (0.01, 0.1, 1.0, 10.0, 100.0)
#: MLP depths the paper chooses among on the validation split.
PAPER_DEPTHS: Final = (1, 2, 3)
