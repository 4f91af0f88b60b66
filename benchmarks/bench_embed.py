"""End-to-end ``raptorz embed`` throughput against the in-process kernel.

CPU (default): converts ``--volumes`` random volumes of ``--size``^3 (24 of 28^3: one
volumes chunk), then times, for each precision,

* the in-process kernel (:func:`raptorz.embedding.kernel.embed_block` on all volumes,
  model already loaded, every CPU);
* ``raptorz embed`` as a user runs it (a fresh process, its own LocalCluster, model
  loading, store writes): 1 worker with every CPU (against the kernel), and 1 worker x 1
  thread against 2 workers x 1 thread (do 2 workers share one volumes chunk?);
* the machine's own ceiling for that last ratio: the in-process kernel on one thread, and
  two processes each running it on one thread over half the volumes at once;

and prints the start-up and the run after it against the kernel's time.

GPU (``--gpu``): with the default DINOv2 ViT-L/14 architecture in bf16 (random weights:
speed does not depend on them), slices/s of the bare encoder forward and of the kernel
on one 182 x 218 x 182 volume (the UK Biobank grid, 582 slices) for a few batch sizes;
then of ``raptorz embed`` end to end over ``--gpu-volumes`` such volumes, on one GPU and
on every visible GPU, against the bare forward's best slices/s times the GPUs (the
issue's goal: at least 90%). ``--device cpu --gpu-encoder raptorz_tiny_dinov2
--gpu-volumes 2`` runs the same steps on a CPU, to check the script.

    python benchmarks/bench_embed.py [--volumes 8 --size 32 --encoder raptorz_tiny_dinov2]
    python benchmarks/bench_embed.py --gpu
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import timm
import torch
from safetensors.torch import save_file

from raptorz.defaults import DEFAULT_ENCODER, Precision
from raptorz.embedding.encoders import SMALL_ENCODERS, create_encoder
from raptorz.embedding.kernel import embed_block
from raptorz.embedding.projection import create_projector
from raptorz.embedding.settings import KernelSettings
from raptorz.ingest.volumes import convert
from raptorz.layouts import open_volumes


def random_weights(name: str, path: Path) -> Path:
    """Save timm's random initialisation of encoder ``name`` (no download needed)."""
    architecture, kwargs = SMALL_ENCODERS.get(name, (name.split(".")[0], {}))
    model = timm.create_model(architecture, pretrained=False, img_size=224, num_classes=0,
                              **kwargs)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def _embed_cli(volumes: Path, output: Path, folder: Path, weights: Path, args: argparse.Namespace,
               precision: str, workers: int, threads: int) -> tuple[float, float, float]:
    """``raptorz embed`` as a user runs it: (wall s, start-up s, s after start-up)."""
    command = [sys.executable, "-m", "raptorz.cli.main", "embed", str(volumes),
               "-o", str(output), "--projector", str(folder / "p.npy"),
               "--encoder", args.encoder, "--weights", str(weights), "--precision", precision,
               "--cluster", "local", "--workers", str(workers), "--threads", str(threads),
               "--dashboard-address", ":0"]
    return _timed_embed(command)


def _timed_embed(command: list[str]) -> tuple[float, float, float]:
    """(wall s, start-up s, s after start-up) of a ``raptorz embed`` command."""
    start = time.perf_counter()
    done = subprocess.run(command, check=True, capture_output=True, text=True)
    wall = time.perf_counter() - start
    seconds, startup = (float(x) for x in re.search(  # type: ignore[union-attr]
        r"this run, ([\d.]+) s, ([\d.]+) s of it to start", done.stdout).groups())
    outside = wall - seconds  # the interpreter, imports, printing the summary, the exit
    return wall, outside + startup, seconds - startup


def _one_thread_kernel(volumes: Path, part: slice, encoder: str, weights: Path,
                       precision: Precision, ready: multiprocessing.synchronize.Barrier,
                       seconds: multiprocessing.queues.Queue) -> None:
    """In a fresh process: the one-thread kernel on volumes ``part``, timed from ``ready``."""
    torch.set_num_threads(1)
    model = create_encoder(encoder, weights=weights, device="cpu", precision=precision)
    projector = create_projector(0, model.embed_dim, 100)
    block = open_volumes(volumes)["volume"].values[part]
    ready.wait()
    start = time.perf_counter()
    embed_block(block, model, [projector], KernelSettings())
    seconds.put(time.perf_counter() - start)


def _ceiling(volumes: Path, count: int, encoder: str, weights: Path, precision: Precision,
             processes: int) -> float:
    """Wall seconds of ``processes`` one-thread kernels over equal parts of the volumes."""
    spawn = multiprocessing.get_context("spawn")
    ready, seconds = spawn.Barrier(processes + 1), spawn.Queue()
    bounds = np.linspace(0, count, processes + 1).astype(int)
    started = [spawn.Process(target=_one_thread_kernel,
                             args=(volumes, slice(a, b), encoder, weights, precision, ready,
                                   seconds)) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    for process in started:
        process.start()
    ready.wait()
    start = time.perf_counter()
    for _ in started:
        seconds.get()
    wall = time.perf_counter() - start
    for process in started:
        process.join()
    return wall


def cpu(args: argparse.Namespace) -> None:
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        images = np.random.default_rng(0).integers(
            0, 256, (args.volumes, args.size, args.size, args.size), dtype=np.uint8)
        np.savez(folder / "m.npz", train_images=images,
                 train_labels=np.zeros((args.volumes, 1)), val_images=images[:0],
                 val_labels=np.zeros((0, 1)), test_images=images[:0],
                 test_labels=np.zeros((0, 1)))
        volumes = folder / "volumes.zarr"
        convert([folder / "m.npz"], volumes, workers=1)  # the default chunking
        weights = random_weights(args.encoder, folder / "weights.safetensors")
        projector = create_projector(0, create_encoder(args.encoder, weights=weights,
                                                       device="cpu").embed_dim, 100)
        np.save(folder / "p.npy", projector.matrix)
        block = open_volumes(volumes)["volume"].values
        rows = []
        for precision in args.precisions:
            torch.set_num_threads(cores)
            encoder = create_encoder(args.encoder, weights=weights, device="cpu",
                                     precision=precision)
            start = time.perf_counter()
            embed_block(block, encoder, [projector], KernelSettings())
            kernel = time.perf_counter() - start
            rows.append((f"in-process kernel, {cores} threads", precision, kernel, 0.0, kernel,
                         1.0))
            for processes in (1, 2):
                wall = _ceiling(volumes, args.volumes, args.encoder, weights, precision,
                                processes)
                rows.append((f"in-process kernel, {processes} process(es) x 1 thread",
                             precision, wall, 0.0, wall, wall / kernel))
            runs = [(1, cores), (1, 1), (2, max(1, cores // 2))]
            for n, (workers, threads) in enumerate(runs):
                wall, startup, run = _embed_cli(volumes, folder / f"e{precision}{n}.zarr",
                                                folder, weights, args, precision, workers,
                                                threads)
                rows.append((f"raptorz embed, {workers} worker(s) x {threads} thread(s)",
                             precision, wall, startup, run, run / kernel))
    print(f"\n{args.volumes} volumes of {args.size}^3 ({3 * args.size} slices each), "
          f"encoder {args.encoder}, K=100, {cores} CPU cores ({platform.processor()})\n")
    print("| run | precision | wall s | start-up s | run after start-up s | x kernel time |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for name, precision, wall, startup, run, ratio in rows:
        print(f"| {name} | {precision} | {wall:.2f} | {startup:.2f} | {run:.2f} | "
              f"{ratio:.2f} |")
    print("\nwall: the whole command; start-up: interpreter, imports, cluster start, model "
          "load, store creation;\nrun after start-up: the tasks (reads, kernel, writes).")
    after = {(name, precision): run for name, precision, _, _, run, _ in rows}
    for precision in args.precisions:
        scaling = (after["raptorz embed, 1 worker(s) x 1 thread(s)", precision]
                   / after[f"raptorz embed, 2 worker(s) x {max(1, cores // 2)} thread(s)",
                           precision])
        ceiling = (after["in-process kernel, 1 process(es) x 1 thread", precision]
                   / after["in-process kernel, 2 process(es) x 1 thread", precision])
        print(f"\n{precision}: 2 workers over 1 worker, 1 thread each: {scaling:.2f}x; "
              f"the machine's ceiling, 2 one-thread kernels at once over 1: {ceiling:.2f}x")


def gpu(args: argparse.Namespace) -> None:
    device = torch.device(args.device)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    with tempfile.TemporaryDirectory() as tmp:
        weights = random_weights(args.gpu_encoder, Path(tmp) / "weights.safetensors")
        encoder = create_encoder(args.gpu_encoder, weights=weights, device=args.device,
                                 precision=args.precision)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(f"{name}; {encoder}")
    projector = create_projector(0, encoder.embed_dim, 100)
    volume = np.random.default_rng(0).random((1, 182, 218, 182), dtype=np.float32)
    print("| batch | encoder forward slices/s | kernel slices/s (582-slice volume) |")
    print("|-------|--------------------------|------------------------------------|")
    best = 0.0
    for batch in args.batches:
        images = torch.randn(batch, 3, 224, 224, device=device)
        for _ in range(3):
            encoder.encode(images)
        sync()
        start = time.perf_counter()
        for _ in range(10):
            encoder.encode(images)
        sync()
        forward = 10 * batch / (time.perf_counter() - start)
        settings = KernelSettings(batch_size=batch, dedup=False)
        embed_block(volume, encoder, [projector], settings)  # warm-up
        sync()
        start = time.perf_counter()
        result = embed_block(volume, encoder, [projector], settings)
        sync()
        kernel = result.slices / (time.perf_counter() - start)
        print(f"| {batch:>5} | {forward:>24.0f} | {kernel:>34.0f} |")
        best = max(best, forward)
    del encoder
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the workers need the memory
    _gpu_end_to_end(args, best)


def _gpu_end_to_end(args: argparse.Namespace, forward: float) -> None:
    """``raptorz embed`` over ``--gpu-volumes`` UK Biobank-sized volumes: 1 GPU, then all."""
    from raptorz.cluster import visible_gpus

    gpus = len(visible_gpus()) if args.device.startswith("cuda") else 0
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        images = np.random.default_rng(0).integers(
            0, 256, (args.gpu_volumes, 182, 218, 182), dtype=np.uint8)
        np.savez(folder / "m.npz", train_images=images,
                 train_labels=np.zeros((len(images), 1)))
        del images
        volumes = folder / "volumes.zarr"
        convert([folder / "m.npz"], volumes, workers=1)
        weights = random_weights(args.gpu_encoder, folder / "weights.safetensors")
        dim = create_encoder(args.gpu_encoder, weights=weights, device="cpu").embed_dim
        np.save(folder / "p.npy", create_projector(0, dim, 100).matrix)
        slices = args.gpu_volumes * (182 + 218 + 182)
        layouts = sorted({1, gpus}) if gpus else [1]
        print(f"\n`raptorz embed`, {args.gpu_volumes} volumes of 182 x 218 x 182 "
              f"({slices} slices), {args.precision}, default batch size\n")
        print("| GPUs | wall s | start-up s | run after start-up s | slices/s | "
              "x bare forward (its best x GPUs) |")
        print("| ---: | ---: | ---: | ---: | ---: | ---: |")
        for count in layouts:
            command = [sys.executable, "-m", "raptorz.cli.main", "embed", str(volumes),
                       "-o", str(folder / f"e{count}.zarr"), "--projector",
                       str(folder / "p.npy"), "--encoder", args.gpu_encoder,
                       "--weights", str(weights), "--precision", args.precision,
                       "--cluster", "cuda" if gpus else "local", "--workers", str(count),
                       "--dashboard-address", ":0"]
            wall, startup, run = _timed_embed(command)
            rate = slices / run
            print(f"| {count if gpus else 0} | {wall:.2f} | {startup:.2f} | {run:.2f} | "
                  f"{rate:.0f} | {rate / (forward * max(count, 1) if gpus else forward):.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--volumes", type=int, default=24)
    parser.add_argument("--size", type=int, default=28)
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    parser.add_argument("--encoder", default="raptorz_tiny_dinov2")
    parser.add_argument("--gpu", action="store_true", help="DINOv2-L bf16 slices/s on CUDA")
    parser.add_argument("--gpu-encoder", default=DEFAULT_ENCODER, help="--gpu: architecture")
    parser.add_argument("--device", default="cuda", help="--gpu: torch device")
    parser.add_argument("--precision", default="bf16", choices=("fp32", "bf16", "fp16"))
    parser.add_argument("--batches", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--gpu-volumes", type=int, default=64,
                        help="--gpu: volumes of 182 x 218 x 182 for raptorz embed")
    args = parser.parse_args()
    if args.gpu:
        gpu(args)
    else:
        cpu(args)


if __name__ == "__main__":
    main()
