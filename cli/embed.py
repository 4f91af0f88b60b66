"""``raptorz embed``: map the Raptor kernel over volumes.zarr on a Dask cluster."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from raptorz import location
from raptorz.cli._cluster import LOCAL_KINDS, add_cluster_options, cluster_from
from raptorz.defaults import EMBED_WORKER_IMPORTS, RANDOM_WEIGHTS


def _planes(text: str) -> tuple[int, ...]:
    names = {"A": 0, "C": 1, "S": 2}
    try:
        return tuple(names[p] if p in names else int(p) for p in text.upper().split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected axes like 0,1,2 or A,C,S, got {text!r}")\
            from None


def _weights(text: str) -> str | Path:
    """``random`` is the sentinel for random weights (a file of that name: ``./random``)."""
    return RANDOM_WEIGHTS if text == RANDOM_WEIGHTS else Path(text)


def register(subparsers: Any) -> None:
    """Add the ``embed`` verb."""
    parser = subparsers.add_parser(
        "embed", help="embed a volumes.zarr store into embeddings.zarr (Dask)",
        description="Encode every slice of every volume with a frozen 2D ViT, pool and "
        "randomly project the tokens (Raptor), on local CPUs, local GPUs, an HPC batch "
        "system or a running Dask scheduler. Rerun the same command to resume.")
    parser.add_argument("volumes", type=location,
                        help="the volumes.zarr store (raptorz convert; a path or a URL)")
    parser.add_argument("-o", "--output", required=True, type=location,
                        help="the embeddings.zarr store to write or resume (a path or a URL)")
    parser.add_argument("--projector", action="append", required=True, type=Path,
                        help="a (dim, k) .npy projector (raptorz projector); repeatable")
    model = parser.add_argument_group("encoder and kernel")
    model.add_argument("--encoder", metavar="NAME",
                       help="a named encoder (dinov2-l, dinov2-l-reg, dinov3-l, clip-l14, "
                       "clip-l14-336, llava-med, sam-b, medsam, rad-dino, biomedclip...: "
                       "`raptorz encoders` lists them) or any timm model name (default "
                       "DINOv2 ViT-L/14, the paper's)")
    model.add_argument("--weights", type=_weights, metavar="FILE|random",
                       help="the encoder's weights: a file (safetensors, PyTorch state dict "
                       "or checkpoint) or a Hugging Face model folder, in any layout the "
                       "encoder accepts (`raptorz encoders`: timm, transformers, original "
                       "DINOv2/DINOv3, OpenAI/open_clip, segment_anything, LLaVA), or "
                       "'random' for seeded random weights (checks the pipeline; embeddings "
                       "mean nothing; a file named random: ./random)")
    model.add_argument("--preprocess", choices=("default", "reference"), default="default",
                       help="reference reproduces the original tool's 8-bit quirks")
    model.add_argument("--resize", choices=("stretch", "pad", "pad_shared"), default="stretch",
                       help="stretch: each slice fills the square (default, the original's); "
                       "pad: zero-padded to a centered square first, aspect kept; "
                       "pad_shared: every slice of a volume padded to its largest side")
    model.add_argument("--tokens", choices=("all", "patch", "cls"), default="all",
                       help="all: CLS + register + patch tokens (the original's layout); "
                       "patch: patch tokens only (for SAM/MedSAM, every grid position); "
                       "cls: the CLS token only (ViTs); the store labels each token's kind")
    model.add_argument("--planes", type=_planes, default=(0, 1, 2),
                       help="axes to slice along, e.g. 0,1,2 or A,C,S (default all)")
    model.add_argument("--subsample", type=int, default=1, help="keep every n-th slice")
    model.add_argument("--precision", choices=("fp32", "bf16", "fp16"),
                       help="default bf16 on GPU, fp32 on CPU")
    model.add_argument("--keep-tokens", action="store_true",
                       help="also store the pooled tokens (new projections need no encoder)")
    model.add_argument("--batch-size", type=int,
                       help="slices per forward pass (default 64 on a GPU, 16 on a CPU)")
    model.add_argument("--start", type=int, default=0,
                       help="index (from 0) of the first volume to embed, in the store's order")
    model.add_argument("--many", type=int, help="how many volumes to embed (default all)")
    regions = parser.add_argument_group("regions (docs/regions.md)")
    regions.add_argument("--masks", type=Path,
                         help="embed per region of this masks.zarr (raptorz masks)")
    regions.add_argument("--regions", default="all", metavar="NAMES|all",
                         help="regions to embed: names or label values, comma-separated, "
                         "or all (default)")
    regions.add_argument("--region-mode", choices=("onepass", "crop"), default="onepass",
                         help="onepass: every slice encoded once, each region pools the "
                         "patches it covers (default); crop: each region's box plus a "
                         "margin embedded as a volume of its own")
    regions.add_argument("--coverage", type=float, default=0.5,
                         help="onepass: least fraction of a patch the region must cover")
    regions.add_argument("--margin-mm", type=float, default=10.0,
                         help="crop: millimetres around each region's bounding box")
    dask = add_cluster_options(parser, default="cuda where GPUs are visible, else local")
    dask.add_argument("--threads", type=int,
                      help="torch threads per worker (default: each worker's share of the "
                      "CPUs of its machine or batch job)")
    dask.add_argument("--device", help="torch device of the workers, e.g. cpu or cuda:1 "
                      "(default: each worker's own GPU, else the CPU); for one worker")
    dask.add_argument("--gpus-per-job", type=int, default=0,
                      help="batch: GPUs per job (one pinned worker per GPU)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Embed, with a progress bar and a summary; 1 when any volume failed."""
    if _local(args) and (isinstance(args.output, str) or not args.output.exists()):
        # a first run has work: the workers' imports (torch, timm: seconds) start now, in
        # a process of their own, while this one imports and checks the inputs
        from raptorz import start_worker_server

        start_worker_server()
    from raptorz import DEFAULT_ENCODER, KernelSettings, RegionSettings, embed

    settings = KernelSettings(
        planes=args.planes, preprocess=args.preprocess, resize=args.resize,
        tokens=args.tokens, subsample=args.subsample, batch_size=args.batch_size,
        keep_tokens=args.keep_tokens)
    summary = embed(
        args.volumes, args.output, args.projector, encoder=args.encoder or DEFAULT_ENCODER,
        weights=args.weights, settings=settings, precision=args.precision,
        device=args.device, cluster=_cluster(args), start=args.start, many=args.many,
        torch_threads=args.threads, masks=args.masks, regions=args.regions,
        region_settings=RegionSettings(args.region_mode, args.coverage, args.margin_mm),
    )
    for name, problem in summary.errors.items():
        print(f"failed: {name}: {problem}", file=sys.stderr)
    if summary.nothing_to_do:
        print(f"{summary.output}: nothing to do ({summary.ok} embedded, "
              f"{summary.failed} failed)")
    else:
        print(f"{summary.output}: {summary.ok} embedded, {summary.failed} failed, of "
              f"{summary.total} ({summary.computed} this run, {summary.seconds:.1f} s, "
              f"{summary.startup:.1f} s of it to start)")
    if summary.pending:
        print(f"{summary.pending} volumes still pending: rerun to retry them", file=sys.stderr)
    return 0 if summary.failed == 0 and summary.pending == 0 else 1


def _cluster(args: argparse.Namespace) -> str | Callable[[], Any]:
    """The scheduler address, or a function that starts the cluster the options ask for.

    ``raptorz.embed`` calls it only once it has checked its inputs and found work to do.
    """
    return cluster_from(args, args.cluster or "auto", gpus_per_job=args.gpus_per_job,
                        worker_imports=EMBED_WORKER_IMPORTS)


def _local(args: argparse.Namespace) -> bool:
    """Whether the options start worker processes on this machine."""
    return (args.cluster or "auto") in LOCAL_KINDS
