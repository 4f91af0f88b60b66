"""Cost of region embeddings (issue #25): one pass with 1, 10 and 100 regions against the
unmasked embedding of the same volume, and crop mode on a region of a tenth of the volume.

The volume is the real head CT (``../shared/data/ct/ct_head.nii.gz``) resampled to
``--side`` voxels a side; its regions are a Voronoi partition of the head (HU > -500)
around seeded points, so that every region is a compact blob and together they cover the
head. The encoder is ViT-S/14 with random weights on the CPU (``--encoder`` for another;
the tiny test ViT with ``--quick``); no Dask: the kernel, as a worker runs it.

Each row is the median of ``--repeats`` runs after a warm-up. ``onepass`` is split into
the host's weights (:class:`~raptorz.embedding.regions.RegionPooling`'s construction,
which a worker does on its reader thread while the previous block is encoded) and the
pooled encoding itself; ``ratio`` is the latter over the unmasked embedding (the issue's
target: at most 1.10).

Usage::

    python benchmarks/bench_regions.py              # the table (minutes on 2 cores)
    python benchmarks/bench_regions.py --quick      # tiny ViT, small volume: a smoke run
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def head_ct(side: int) -> tuple[np.ndarray, np.ndarray]:
    """The head CT resampled to ``side``^3, scaled to [0, 1], and its head mask."""
    import nibabel as nib
    from scipy import ndimage

    hu = np.asarray(nib.load(DATA / "ct" / "ct_head.nii.gz").dataobj, np.float32)
    hu = ndimage.zoom(hu, [side / n for n in hu.shape], order=1, grid_mode=True,
                      mode="nearest")
    return np.clip((hu + 1024) / 3000, 0, 1).astype(np.float32), hu > -500


def voronoi(head: np.ndarray, regions: int, seed: int = 0) -> np.ndarray:
    """Labels 1..``regions``: each head voxel's nearest of ``regions`` seeded head voxels."""
    inside = np.argwhere(head)
    centres = inside[np.random.default_rng(seed).choice(len(inside), regions, replace=False)]
    labels = np.zeros(head.shape, np.uint16)
    distance = ((inside[:, None, :] - centres[None]) ** 2).sum(axis=2)
    labels[tuple(inside.T)] = distance.argmin(axis=1) + 1
    return labels


def timed(function: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    """Median seconds of ``repeats`` calls after one warm-up, and the last result."""
    print(f"timing {getattr(function, '__name__', 'a call')}...", file=sys.stderr, flush=True)
    result = function()
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = function()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds), result


def onepass_row(volume: np.ndarray, labels: np.ndarray, count: int, encoder: Any,
                projector: Any, settings: Any, repeats: int) -> dict[str, Any]:
    """One pass over ``count`` regions against the same plan encoded without regions."""
    from raptorz.embedding.kernel import pool_block, prepare_block
    from raptorz.embedding.regions import RegionPooling, finish_regions

    values = list(range(1, count + 1))
    plan = prepare_block(volume[None], encoder, settings)
    weights, _ = timed(lambda: RegionPooling(plan, labels[None], values, encoder, 0.5),
                       repeats)

    def encode() -> Any:
        pooling = RegionPooling(plan, labels[None], values, encoder, 0.5)
        pooled = pool_block(plan, encoder, sink=pooling)
        return finish_regions(*pooling.means(encoder.embed_dim), encoder, [projector],
                              settings, pooled.slices)

    base, _ = timed(lambda: pool_block(plan, encoder), repeats)
    total, result = timed(encode, repeats)
    return {"mode": "onepass", "regions": count, "seconds": total, "host_weights": weights,
            "encode_and_pool": total - weights, "slices": result.slices,
            "unmasked_pool_block": base, "ratio": (total - weights) / base,
            "ratio_with_weights": total / base,
            "regions_ok": int((result.region_status == 1).sum())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny ViT, 24^3: a smoke run")
    parser.add_argument("--encoder", default="vit_small_patch14_dinov2")
    parser.add_argument("--side", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--regions", default="1,10,100")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if args.quick:
        args.encoder, args.side, args.repeats = "raptorz_tiny_dinov2", 24, 1

    import torch

    from raptorz.embedding.encoders import create_encoder
    from raptorz.embedding.kernel import embed_block
    from raptorz.embedding.projection import create_projector
    from raptorz.embedding.regions import crop_box, embed_regions
    from raptorz.embedding.settings import KernelSettings, RegionSettings

    torch.manual_seed(0)
    encoder = create_encoder(args.encoder, weights="random", device=args.device)
    projector = create_projector(0, encoder.embed_dim, 100)
    settings = KernelSettings()
    volume, head = head_ct(args.side)
    rows: list[dict[str, Any]] = []
    full, plain = timed(lambda: embed_block(volume[None], encoder, [projector], settings),
                        args.repeats)
    rows.append({"mode": "unmasked", "regions": 0, "seconds": full, "slices": plain.slices,
                 "ratio": 1.0})
    rows.extend(onepass_row(volume, voronoi(head, count), count, encoder, projector, settings,
                            args.repeats) for count in map(int, args.regions.split(",")))
    # crop mode: a box of a tenth of the volume (each side 0.1 ** (1/3) of the volume's)
    side = max(1, round(args.side * 0.1 ** (1 / 3)))
    start = (args.side - side) // 2
    box_labels = np.zeros(volume.shape, np.uint16)
    box_labels[start:start + side, start:start + side, start:start + side] = 1
    box = crop_box(box_labels, 1, (1.0, 1.0, 1.0), 0.0)
    seconds, result = timed(lambda: embed_regions(
        volume, box_labels, [1], encoder, [projector], settings,
        RegionSettings(mode="crop", margin_mm=0.0)), args.repeats)
    rows.append({"mode": "crop", "regions": 1, "seconds": seconds, "slices": result.slices,
                 "box": [[b.start, b.stop] for b in box or ()],
                 "box_fraction": side**3 / args.side**3, "ratio": seconds / full,
                 "slice_ratio": result.slices / plain.slices})
    print(json.dumps({"encoder": args.encoder, "side": args.side, "device": args.device,
                      "torch_threads": torch.get_num_threads(), "rows": rows}, indent=1))
    print("\n| mode | regions | slices encoded | seconds | vs unmasked |")
    print("| --- | --- | --- | --- | --- |")
    for row in rows:
        print(f"| {row['mode']} | {row['regions']} | {row['slices']} | {row['seconds']:.3f} "
              f"| {row['ratio']:.3f} |")


if __name__ == "__main__":
    main()
