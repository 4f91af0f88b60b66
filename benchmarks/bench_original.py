"""``raptorz embed`` against the original tool's ``embed.py``: same CPU, model, weights, volumes.

The original (https://github.com/sriramlab/raptor) is not vendored: pass the path of your
copy of its ``embed.py``. Both tools embed the same MedMNIST-style npz of ``--volumes``
random volumes of ``--size``^3 (or the first train volumes of ``--npz``, a real MedMNIST
file) into K=100 projections, with one DINOv2 architecture and
one set of random weights:

* the original loads ``facebook/dinov2-large`` with transformers. The script writes a
  folder of that name (config, weights, the hub's image-processor settings) into the
  original's working directory, so ``from_pretrained`` reads it with no download. Its
  architecture is ``--hidden/--layers/--heads`` (ViT-S/14 by default: ViT-L is hours
  on a laptop CPU);
* raptorz reads the same ``model.safetensors`` (the transformers layout) through
  ``--weights``, at fp32 and bf16, with a local cluster of 1 worker with every CPU (as
  the original runs: one process, every core), and of one worker per CPU with one
  thread each (what raptorz's workers allow).

The original always runs fp32 (it has no precision option). Each row is the whole command,
wall clock, start-up and model load included; the ratio is the original's time over
raptorz's. ``--rounds N`` runs every command N times, one of each in turn, and reports
medians: a shared machine's speed can drift by 10% over minutes.

    python benchmarks/bench_original.py PATH/TO/embed.py [--volumes 12 --size 28 --rounds 3]
    python benchmarks/bench_original.py PATH/TO/embed.py \
        --npz ../shared/data/medmnist/adrenalmnist3d.npz
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from raptorz.embedding.projection import create_projector

#: the hub's ``preprocessor_config.json`` of ``facebook/dinov2-large``
PROCESSOR = {
    "crop_size": {"height": 224, "width": 224}, "do_center_crop": True,
    "do_convert_rgb": True, "do_normalize": True, "do_rescale": True, "do_resize": True,
    "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225],
    "image_processor_type": "BitImageProcessor", "resample": 3,
    "rescale_factor": 1 / 255, "size": {"shortest_edge": 256},
}


def hub_folder(folder: Path, hidden: int, layers: int, heads: int) -> Path:
    """``folder/facebook/dinov2-large``: a random-weight Dinov2Model as the hub lays it out."""
    from transformers import Dinov2Config, Dinov2Model

    path = folder / "facebook" / "dinov2-large"
    config = Dinov2Config(hidden_size=hidden, num_hidden_layers=layers,
                          num_attention_heads=heads, mlp_ratio=4,
                          patch_size=14, image_size=518, layerscale_value=1.0)
    Dinov2Model(config).save_pretrained(path, safe_serialization=True)
    (path / "preprocessor_config.json").write_text(json.dumps(PROCESSOR))
    return path


def _timed(command: list[str], cwd: Path, env: dict[str, str]) -> float:
    start = time.perf_counter()
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode:
        sys.exit(f"{command[:3]} failed:\n{done.stderr[-3000:]}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("original", type=Path, help="your copy of the original embed.py")
    parser.add_argument("--volumes", type=int, default=12)
    parser.add_argument("--size", type=int, default=28)
    parser.add_argument("--npz", type=Path, help="a MedMNIST npz: its first train volumes, "
                        "not random ones (real scans have constant slices)")
    parser.add_argument("--hidden", type=int, default=384)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--heads", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=1,
                        help="run every command this many times, in turn; medians")
    parser.add_argument("--layouts", type=int, default=2, choices=(1, 2),
                        help="1: raptorz with 1 worker and every core only; 2: also one "
                        "worker per core")
    parser.add_argument("--timm-name", default="vit_small_patch14_dinov2",
                        help="raptorz's encoder: the same architecture as --hidden/--layers")
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        model = hub_folder(folder, args.hidden, args.layers, args.heads)
        if args.npz is None:
            images = np.random.default_rng(0).integers(
                0, 256, (args.volumes, args.size, args.size, args.size), dtype=np.uint8)
        else:
            with np.load(args.npz) as data:
                images = data["train_images"][:args.volumes]
        np.savez(folder / "m.npz", train_images=images,
                 train_labels=np.zeros((len(images), 1)), val_images=images[:0],
                 val_labels=np.zeros((0, 1)), test_images=images[:0],
                 test_labels=np.zeros((0, 1)))
        (folder / "manifest.txt").write_text(
            "".join(f"train_{i}\n" for i in range(len(images))))
        np.save(folder / "p.npy", create_projector(0, args.hidden, 100).matrix)
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(folder / "hf")}
        original = [sys.executable, str(args.original.resolve()), "--npz", "m.npz",
                    "--manifest", "manifest.txt", "--start", "0", "--many",
                    str(len(images)), "--device", "cpu", "--num_torch_threads", str(cores),
                    "--saveto", "original", "--k", "p.npy"]
        subprocess.run([sys.executable, "-m", "raptorz.cli.main", "convert", "m.npz", "-o",
                        "volumes.zarr"], cwd=folder, env=env, check=True, capture_output=True)
        runs: list[tuple[str, str, list[str]]] = [("original embed.py", "fp32", original)]
        layouts = sorted({(1, cores), (cores, 1)})[:args.layouts]
        for precision in ("fp32", "bf16"):
            for workers, threads in layouts:
                runs.append((f"raptorz embed, {workers} worker(s) x {threads} thread(s)",
                             precision, [
                                 sys.executable, "-m", "raptorz.cli.main", "embed",
                                 "volumes.zarr", "-o", "e.zarr", "--projector", "p.npy",
                                 "--encoder", args.timm_name,
                                 "--weights", str(model / "model.safetensors"),
                                 "--precision", precision, "--cluster", "local",
                                 "--workers", str(workers), "--threads", str(threads),
                                 "--dashboard-address", ":0"]))
        seconds: list[list[float]] = [[] for _ in runs]
        for _ in range(args.rounds):  # one of each per round: a slow spell hits all alike
            for n, (_, _, command) in enumerate(runs):
                shutil.rmtree(folder / "original", ignore_errors=True)
                shutil.rmtree(folder / "e.zarr", ignore_errors=True)
                seconds[n].append(_timed(command, folder, env))
                if n == 0:
                    written = sorted((folder / "original" / "p").glob("*.npy"))
                    assert len(written) == len(images), f"the original wrote {len(written)}"
        rows = [(name, precision, float(np.median(times)), min(times), max(times))
                for (name, precision, _), times in zip(runs, seconds, strict=True)]
    source = "random" if args.npz is None else f"{args.npz.name}'s first train"
    print(f"\n{len(images)} {source} volumes of {'x'.join(map(str, images.shape[1:]))}, "
          f"DINOv2 ({args.hidden} wide, {args.layers} blocks), random weights, K=100, "
          f"{cores} CPU cores ({platform.processor() or platform.machine()})\n")
    print(f"| run | precision | wall s (median of {args.rounds}) | range | original / this |")
    print("| --- | --- | ---: | ---: | ---: |")
    for name, precision, median, low, high in rows:
        print(f"| {name} | {precision} | {median:.2f} | {low:.1f}-{high:.1f} | "
              f"{rows[0][2] / median:.2f} |")
    cpu = Path("/proc/cpuinfo")
    if cpu.exists() and not re.search(r"\b(avx512_bf16|amx_bf16)\b", cpu.read_text()):
        print("\nthis CPU has no native bf16: the bf16 row is not the issue's target")


if __name__ == "__main__":
    main()
