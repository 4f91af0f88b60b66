"""Speed and peak memory of the Raptor kernel against the bare encoder forward.

ViT-S/14 (timm ``vit_small_patch14_dinov2`` at 224 px, random weights saved to a file
and loaded through ``weights=FILE``), on AdrenalMNIST3D 64^3 volumes and on the
skull-stripped 182 x 218 x 182 MNI brain (105 of its 582 slices constant). Every
configuration runs in its own process so that its peak RSS (``ru_maxrss``) is its own.

Usage::

    python benchmarks/bench_kernel.py            # the full table (a few minutes, 2 cores)
    python benchmarks/bench_kernel.py --quick    # fewer slices, for a smoke run

Targets (issue 3): kernel overhead <= 10 % over the bare forward; peak memory flat in
the slice count; bf16 >= 1.6x fp32 on this CPU. The bare forward also runs with the
linear layers unpacked (``create_encoder(..., pack=False)``), for the gain of packing.
Batches are the CPU default (:data:`~raptorz.embedding.settings.CPU_BATCH_SIZE`).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from raptorz.embedding.settings import CPU_BATCH_SIZE

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
ARCH = "vit_small_patch14_dinov2"
BATCH = CPU_BATCH_SIZE


def load_volumes(source: str, count: int) -> np.ndarray:
    """A ``(B, X, Y, Z)`` float32 block in [0, 1] scaled as the original scales it."""
    if source == "adrenal64":
        with np.load(DATA / "medmnist" / "adrenalmnist3d_64.npz") as npz:
            return npz["test_images"][:count].astype(np.float32) / 256.0
    import nibabel as nib

    voxels = np.asarray(nib.load(DATA / "brain_1mm" / "mni152_t1_brain_1mm.nii.gz").dataobj,
                        dtype=np.float32)
    return np.repeat((voxels / voxels.max())[None], count, axis=0)


def rss_mib() -> float:
    """Peak resident set size of this process so far, MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_one(config: dict[str, Any], weights: str) -> list[dict[str, Any]]:
    """Run one configuration in this process and measure it (one row, two for ``bare``)."""
    import torch

    from raptorz.embedding.encoders import create_encoder
    from raptorz.embedding.kernel import embed_block
    from raptorz.embedding.projection import create_projector
    from raptorz.embedding.settings import KernelSettings

    batch = config["batch_size"]
    if config["kind"] == "bare":
        return bare_forward(config, weights)
    encoder = create_encoder(ARCH, weights=weights, device="cpu", precision=config["precision"])
    volumes = load_volumes(config["source"], config["volumes"])
    projectors = [create_projector(0, encoder.embed_dim, 100),
                  create_projector(1, encoder.embed_dim, 10)]
    settings = KernelSettings(batch_size=batch, dedup=config["dedup"],
                              subsample=config["subsample"])
    # warm-up on one full batch of slices, so that neither the time nor the memory
    # counted below includes first-call costs (the bare forward has the same warm-up)
    embed_block(volumes[:1, :batch], encoder, projectors,
                KernelSettings(planes=(0,), batch_size=batch, dedup=False))
    encode, in_encoder = encoder.encode, [0.0]

    def timed_encode(images: torch.Tensor) -> torch.Tensor:
        """The encoder's own share of the kernel's time (robust to a busy machine)."""
        begin = time.perf_counter()
        tokens = encode(images)
        in_encoder[0] += time.perf_counter() - begin
        return tokens

    encoder.encode = timed_encode  # type: ignore[method-assign]
    before = rss_mib()
    start = time.perf_counter()
    result = embed_block(volumes, encoder, projectors, settings)
    seconds = time.perf_counter() - start
    return [{**config, "seconds": seconds, "slices": result.slices,
             "encoded": result.slices - result.constant_slices, "in_encoder": in_encoder[0],
             "rss_before_mib": before, "rss_peak_mib": rss_mib()}]


def bare_forward(config: dict[str, Any], weights: str) -> list[dict[str, Any]]:
    """The encoder alone at fp32 and bf16, packed (the default on a CPU) and not, batches
    of each in turn; the mean batch of each.

    Taking turns in one process makes the ratios fair; the mean (after a warm-up batch)
    is what the kernel's rows measure too, so "vs bare" compares like with like.
    """
    import torch

    from raptorz.embedding.encoders import create_encoder

    batch = config["batch_size"]
    images = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    # "bare": the default (packed where the CPU allows); "unpacked": plain nn.Linear
    encoders = {(kind, p): create_encoder(ARCH, weights=weights, device="cpu", precision=p,
                                          pack=None if kind == "bare" else False)
                for kind in ("bare", "unpacked") for p in ("fp32", "bf16")}
    total = dict.fromkeys(encoders, 0.0)
    for encoder in encoders.values():
        encoder.encode(images)  # warm-up: first-call allocations and kernel selection
    for _ in range(config["batches"]):
        for key, encoder in encoders.items():
            start = time.perf_counter()
            encoder.encode(images)
            total[key] += time.perf_counter() - start
    mean = {key: total[key] / config["batches"] for key in encoders}
    return [{**config, "kind": kind, "precision": p, "seconds": mean[kind, p], "slices": batch,
             "encoded": batch, "in_encoder": mean[kind, p], "rss_before_mib": rss_mib(),
             "rss_peak_mib": rss_mib()}
            for kind, p in encoders]


def configurations(quick: bool) -> list[dict[str, Any]]:
    """The table's rows."""
    batches = 4 if quick else 12
    brain_sub = 4 if quick else 1
    rows: list[dict[str, Any]] = [
        {"kind": "bare", "precision": "both", "batch_size": BATCH, "batches": batches,
         "source": "random", "dedup": False, "subsample": 1}
    ]
    rows.extend(
        {"kind": "kernel", "precision": precision, "batch_size": BATCH, "source": source,
         "volumes": 1, "dedup": dedup, "subsample": sub}
        for source, sub in (("adrenal64", 1), ("brain", brain_sub))
        for precision in ("fp32", "bf16")
        for dedup in (True, False)
    )
    # memory flat in the slice count: the same brain with 4x fewer slices
    rows.append({"kind": "kernel", "precision": "fp32", "batch_size": BATCH, "source": "brain",
                 "volumes": 1, "dedup": True, "subsample": brain_sub * 4})
    return rows


def print_table(results: list[dict[str, Any]]) -> None:
    """Slices/s, overhead against the bare forward of the same precision, peak memory.

    ``vs bare``: 1 - (encoded slices/s of the kernel) / (bare forward slices/s), which a
    busy machine disturbs; ``not enc``: the share of the kernel's own wall time spent
    outside the encoder forward (slicing, resizing, pooling, projecting), measured in the
    same run and so robust to load from other processes.
    """
    def rates(kind: str) -> dict[str, float]:
        return {r["precision"]: r["encoded"] / r["seconds"] for r in results
                if r["kind"] == kind}

    bare, unpacked = rates("bare"), rates("unpacked")
    header = (f"{'what':<9}{'data':<11}{'prec':<6}{'dedup':<7}{'slices':>7}{'encoded':>9}"
              f"{'s':>8}{'slices/s':>10}{'enc/s':>8}{'vs bare':>9}{'not enc':>9}"
              f"{'RSS MiB':>9}{'+kernel':>9}")
    print(header)
    print("-" * len(header))
    for r in results:
        encoded_rate = r["encoded"] / r["seconds"]
        overhead = (f"{100 * (1 - encoded_rate / bare[r['precision']]):.1f}%"
                    if r["kind"] == "kernel" else "")
        data = r["source"] + (f"/{r['subsample']}" if r["subsample"] > 1 else "")
        print(f"{r['kind']:<9}{data:<11}{r['precision']:<6}"
              f"{('on' if r['dedup'] else 'off'):<7}{r['slices']:>7}{r['encoded']:>9}"
              f"{r['seconds']:>8.1f}{r['slices'] / r['seconds']:>10.1f}{encoded_rate:>8.1f}"
              f"{overhead:>9}{100 * (1 - r['in_encoder'] / r['seconds']):>8.1f}%"
              f"{r['rss_peak_mib']:>9.0f}"
              f"{r['rss_peak_mib'] - r['rss_before_mib']:>9.0f}")
    if "fp32" in bare and "bf16" in bare:
        print(f"\nbare forward bf16 / fp32: {bare['bf16'] / bare['fp32']:.2f}x")
    for precision in unpacked:
        print(f"bare forward {precision} packed / unpacked: "
              f"{bare[precision] / unpacked[precision]:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer slices (smoke run)")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one config
    parser.add_argument("--weights", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(json.loads(args.one), args.weights)))
        return
    import timm
    import torch
    from safetensors.torch import save_file

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"ViT-S/14 random weights, 224 px, batch {BATCH}")
    with tempfile.TemporaryDirectory() as folder:
        weights = Path(folder) / "vits14.safetensors"
        model = timm.create_model(ARCH, pretrained=False, img_size=224, num_classes=0)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
        results = []
        for config in configurations(args.quick):
            done = subprocess.run([sys.executable, __file__, "--one", json.dumps(config),
                                   "--weights", str(weights)],
                                  capture_output=True, text=True, check=True)
            results.extend(json.loads(done.stdout.strip().splitlines()[-1]))
            print(f"  done: {config['kind']} {config['source']} {config['precision']} "
                  f"dedup={config['dedup']} in {results[-1]['seconds']:.1f} s", flush=True)
    print()
    print_table(results)


if __name__ == "__main__":
    main()
