"""A first GPU session in one table (about 5 minutes on one GPU; benchmarks/README.md).

Checks, in this order (the cluster first, so that only its workers may hold a CUDA
context when the contexts are counted):

* workers: each worker's memory limit and RSS after loading the encoder and after a run,
  and the processes that hold a CUDA context (nvidia-smi): only workers may;
* end to end: ``raptorz.embed`` slices/s on one worker and on one per GPU;
* bare forward: the encoder's slices/s on random images;
* accuracy: the device at fp32, bf16 and fp16 against the CPU at fp32, per preprocessing
  mode: finite, and the largest error relative to the projections' scale within tolerance;
* out of memory: batch sizes per block under a capped memory fraction (the learned limit
  kept across blocks, as a worker keeps it);
* encoder time against the whole block's time (CUDA events on a GPU).

Runs as a stand-in on a CPU: ``python benchmarks/gpu_check.py --device cpu --encoder
raptorz_tiny_dinov2``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

TOLERANCE = {"fp32": 1e-4, "bf16": 0.1, "fp16": 0.02}
ROWS: list[tuple[str, str, str, str]] = []


def row(check: str, setting: str, value: str, ok: bool | None = None) -> None:
    ROWS.append((check, setting, value, "" if ok is None else ("ok" if ok else "FAIL")))
    print(f"  {check}: {setting}: {value}", file=sys.stderr, flush=True)


def volumes_store(folder: Path, count: int, size: int) -> Path:
    from raptorz.ingest.volumes import convert

    images = np.random.default_rng(0).integers(0, 256, (count, size, size, size), np.uint8)
    empty = images[:0]
    np.savez(folder / "v.npz", train_images=images, train_labels=np.zeros((count, 1)),
             val_images=empty, val_labels=np.zeros((0, 1)), test_images=empty,
             test_labels=np.zeros((0, 1)))
    convert([folder / "v.npz"], folder / "volumes.zarr", workers=1)
    return folder / "volumes.zarr"


def _worker_memory(dask_worker: Any = None) -> tuple[float, float]:
    import psutil

    limit = getattr(dask_worker.memory_manager, "memory_limit", None) or 0
    return limit / 2**30, psutil.Process().memory_info().rss / 2**30


def cuda_processes() -> set[int] | None:
    if shutil.which("nvidia-smi") is None:
        return None
    out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid", "--format=csv,noheader"],
                         capture_output=True, text=True, timeout=30).stdout
    return {int(line) for line in out.split() if line.strip().isdigit()}


def check_cluster(args: argparse.Namespace, store: Path, folder: Path,
                  weights: str | None) -> None:
    from distributed import Client

    from raptorz import embed
    from raptorz.cluster import create_cluster, visible_gpus
    from raptorz.embedding.projection import create_projector
    from raptorz.embedding.settings import KernelSettings
    from raptorz.embedding.worker import EncoderOptions, encoder_provenance

    gpus = visible_gpus() if args.device == "cuda" else []
    sizes = sorted({1, len(gpus)}) if gpus else [1]
    device = None if gpus else "cpu"
    options = EncoderOptions(args.encoder, weights, device=device)
    for count in sizes:
        kind = "cuda" if gpus else "local"
        with create_cluster(kind, workers=count, dashboard_address=":0") as cluster, \
                Client(cluster, set_as_default=False) as client:
            client.wait_for_workers(count)
            client.gather(client.map(encoder_provenance, [options] * count, pure=False))
            loaded = client.run(_worker_memory)
            began = time.perf_counter()
            summary = embed(store, folder / f"e{count}.zarr",
                            [create_projector(0, args.dim, 16)], encoder=args.encoder,
                            weights=weights, settings=KernelSettings(), device=device,
                            cluster=client, progress=False)
            seconds = time.perf_counter() - began - summary.startup
            after = client.run(_worker_memory)
            for worker, (limit, rss) in loaded.items():
                row("worker memory", f"{worker} ({count} workers)", f"limit {limit:.1f} GiB, "
                    f"RSS {rss:.2f} GiB loaded, {after[worker][1]:.2f} GiB after a run",
                    after[worker][1] < limit or not limit)
            slices = summary.computed * 3 * args.size
            row("end to end", f"{count} worker(s), {args.encoder}",
                f"{slices / seconds:.1f} slices/s ({summary.ok} ok)", summary.ok == args.volumes)
            held = cuda_processes()
            workers = set(client.run(os.getpid).values())
            row("CUDA contexts", f"{count} workers", "no nvidia-smi" if held is None else
                f"{sorted(held)}, workers {sorted(workers)}",
                None if held is None else held <= workers)


def check_device(args: argparse.Namespace, weights: str | None) -> None:
    import torch

    from raptorz.embedding.encoders import create_encoder
    from raptorz.embedding.kernel import embed_block, finish_block, pool_block, prepare_block
    from raptorz.embedding.projection import create_projector
    from raptorz.embedding.settings import KernelSettings
    from raptorz.embedding.worker import _exact_fp32

    device = args.device
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    encoder = create_encoder(args.encoder, weights=weights, device=device)
    images = torch.randn(64, 3, encoder.img_size, encoder.img_size, device=device)
    encoder.encode(images[:2])
    sync()
    began = time.perf_counter()
    for _ in range(args.repeats):
        encoder.encode(images)
    sync()
    row("bare forward", f"{encoder.precision}, batch 64",
        f"{64 * args.repeats / (time.perf_counter() - began):.1f} slices/s")

    block = np.random.default_rng(1).random((1, 32, 32, 32)).astype(np.float32)
    projectors = [create_projector(0, encoder.embed_dim, 16)]
    for preprocess in ("default", "reference"):
        settings = KernelSettings(preprocess=preprocess, subsample=4)  # type: ignore[arg-type]
        cpu = create_encoder(args.encoder, weights=weights, device="cpu")
        want = embed_block(block, cpu, projectors, settings).projections[projectors[0].name]
        for precision, tolerance in TOLERANCE.items():
            tested = create_encoder(args.encoder, weights=weights, device=device,
                                    precision=precision)  # type: ignore[arg-type]
            _exact_fp32(tested)
            try:
                got = embed_block(block, tested, projectors, settings).projections
                error = float(np.abs(got[projectors[0].name] - want).max() / np.abs(want).max())
                row("accuracy", f"{device} {precision} vs cpu fp32, {preprocess}",
                    f"relative error {error:.2e} (tolerance {tolerance:g})", error < tolerance)
            except Exception as failure:  # a precision the device lacks: say so, go on
                row("accuracy", f"{device} {precision}, {preprocess}",
                    f"{type(failure).__name__}: {failure}", False)

    volumes = np.random.default_rng(2).random((3, 4, 48, 48, 48)).astype(np.float32)
    settings = KernelSettings(batch_size=args.batch)
    if device == "cuda":
        torch.cuda.set_per_process_memory_fraction(args.fraction)
    limit, used = None, []
    for n, one in enumerate(volumes):
        plan = prepare_block(one, encoder, settings)
        pooled = pool_block(plan, encoder, limit=limit)
        limit = pooled.batch_size
        used.append(limit)
        finish_block(pooled, encoder, projectors, settings)
        row("out of memory", f"block {n}, fraction {args.fraction if device == 'cuda' else '-'}",
            f"batch {args.batch} -> {limit}", n == 0 or used[n] == used[n - 1])
    if device == "cuda":
        torch.cuda.set_per_process_memory_fraction(1.0)

    class Timed:
        def __init__(self) -> None:
            self.seconds = 0.0

        def __getattr__(self, name: str) -> Any:
            return getattr(encoder, name)

        def encode(self, batch: torch.Tensor) -> torch.Tensor:
            if device != "cuda":
                began = time.perf_counter()
                out = encoder.encode(batch)
                self.seconds += time.perf_counter() - began
                return out
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = encoder.encode(batch)
            stop.record()
            stop.synchronize()  # only here: a measurement, not the kernel's loop
            self.seconds += start.elapsed_time(stop) / 1000
            return out

    timed = Timed()
    sync()
    began = time.perf_counter()
    embed_block(volumes[0], timed, projectors, KernelSettings())  # type: ignore[arg-type]
    sync()
    whole = time.perf_counter() - began
    row("encoder share", f"{len(volumes[0])} volumes of 48^3",
        f"encoder {timed.seconds:.2f} s of the block's {whole:.2f} s "
        f"({100 * timed.seconds / whole:.0f}%)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--encoder", default="dinov2-l")
    parser.add_argument("--volumes", type=int, default=8)
    parser.add_argument("--size", type=int, default=64, help="volume side, voxels")
    parser.add_argument("--batch", type=int, default=256, help="first batch, out-of-memory check")
    parser.add_argument("--fraction", type=float, default=0.25,
                        help="GPU memory fraction of the out-of-memory check")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)

    from raptorz.defaults import RANDOM_WEIGHTS
    from raptorz.embedding.encoders import meta_model, resolve_config, weights_available

    weights = None if weights_available(args.encoder) else RANDOM_WEIGHTS
    model: Any = meta_model(resolve_config(args.encoder))
    args.dim = int(getattr(model, "embed_dim", 0) or model.neck[0].out_channels)
    with tempfile.TemporaryDirectory() as folder:
        store = volumes_store(Path(folder), args.volumes, args.size)
        check_cluster(args, store, Path(folder), weights)
        check_device(args, weights)
    width = [max(len(r[i]) for r in ROWS) for i in range(4)]
    print(" | ".join(h.ljust(w) for h, w in zip(("check", "setting", "value", ""), width,
                                                  strict=True)))
    for r in ROWS:
        print(" | ".join(c.ljust(w) for c, w in zip(r, width, strict=True)))
    return 1 if any(r[3] == "FAIL" for r in ROWS) else 0


if __name__ == "__main__":
    sys.exit(main())
