"""Cost per volume at scale: N tiny volumes through convert, embed, rerun, info and fit.

Each volume is 8^3 and gives one slice (``--planes 0 --subsample 8``) to the tiny random
ViT, so that the encoder's own work is small and raptorz's cost per volume outside it
shows. Prints one table row per N: seconds of each step, the cost per volume outside the
encoder (embed wall time less the in-process kernel's time on the same volumes, over N;
and the same less the run's fixed start-up: checks, the encoder's load on the worker,
the store's creation), the peak resident memory of the embed step's own process (client
and scheduler) and of its worker, the files of ``embeddings.zarr`` and the time of a
rerun that finds nothing to do. The embed step runs in a process of its own, on a local
cluster whose worker is already up.

    python benchmarks/bench_scale.py 1000 10000 100000
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from distributed import Client

import raptorz
from raptorz.embedding.settings import KernelSettings

# torch is imported only where the encoder runs in this process (weights, the kernel):
# the embed step's process is a client and scheduler, as `raptorz embed`'s is

ENCODER = "raptorz_tiny_dinov2"
SETTINGS = KernelSettings(planes=(0,), subsample=8, batch_size=256)
#: Volumes per in-process kernel call: about what a task of the run embeds at once.
BLOCK = 1024


def _peak_mib() -> float:
    """This process's peak resident memory since it started its program.

    Linux's ``ru_maxrss`` also counts the parent's pages at the fork before ``exec`` (a
    worker spawned by a big process would inherit its size), so VmHWM comes first.
    """
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _timed(step: str, times: dict[str, float], function, *args, **kwargs):  # type: ignore[no-untyped-def]
    began = time.perf_counter()
    result = function(*args, **kwargs)
    times[step] = time.perf_counter() - began
    return result


def embed_step(volumes: Path, output: Path, projector: Path, weights: Path) -> None:
    """The embed step alone, in its own process: prints its times and peak memory (JSON)."""
    with raptorz.create_cluster("local", workers=1, dashboard_address=":0") as cluster, \
            Client(cluster) as client:
        client.run(lambda: None)  # the worker is up: the cluster's start is not timed
        began = time.perf_counter()
        summary = raptorz.embed(volumes, output, [projector], encoder=ENCODER, weights=weights,
                                settings=SETTINGS, cluster=client, progress=False)
        seconds = time.perf_counter() - began
        assert summary.failed == 0 and summary.pending == 0, summary
        print(json.dumps({"embed": seconds, "startup": summary.startup,
                          "client_scheduler_mib": _peak_mib(),
                          "worker_mib": max(client.run(_peak_mib).values())}))


def one(n: int, folder: Path, weights: Path) -> dict[str, float | int]:
    images = np.random.default_rng(n).integers(0, 256, (n, 8, 8, 8), np.uint8)
    labels = np.random.default_rng(1).integers(0, 2, (n, 1))
    np.savez(folder / "m.npz", train_images=images[: n // 2], train_labels=labels[: n // 2],
             val_images=images[n // 2: 3 * n // 4], val_labels=labels[n // 2: 3 * n // 4],
             test_images=images[3 * n // 4:], test_labels=labels[3 * n // 4:])
    del images
    times: dict[str, float] = {}
    volumes, output = folder / "volumes.zarr", folder / "embeddings.zarr"
    _timed("convert", times, raptorz.convert, [folder / "m.npz"], volumes, workers=1)
    projector = raptorz.create_projector(0, 64, 10, "p10")
    np.save(folder / "p10.npy", projector.matrix)
    step = subprocess.run([sys.executable, __file__, "--embed-step", str(volumes), str(output),
                           str(folder / "p10.npy"), str(weights)],
                          capture_output=True, text=True, check=True)
    measured = json.loads(step.stdout.strip().splitlines()[-1])
    times["embed"], times["startup"] = measured["embed"], measured["startup"]
    from raptorz.embedding.encoders import create_encoder
    from raptorz.embedding.kernel import embed_block

    encoder = create_encoder(ENCODER, weights=weights, device="cpu")
    block = raptorz.open_volumes(volumes)["volume"].values
    began = time.perf_counter()
    for start in range(0, n, BLOCK):  # the encoder's own work, in task-sized blocks
        embed_block(block[start:start + BLOCK], encoder, [projector], SETTINGS)
    times["kernel"] = time.perf_counter() - began
    del block
    files = sum(1 for p in output.rglob("*") if p.is_file())
    command = [sys.executable, "-m", "raptorz.cli.main", "embed", str(volumes), "-o",
               str(output), "--projector", str(folder / "p10.npy"), "--encoder", ENCODER,
               "--weights", str(weights), "--planes", "0", "--subsample", "8",
               "--batch-size", "256"]
    rerun = _timed("rerun", times, subprocess.run, command, capture_output=True, text=True,
                   check=True)
    assert "nothing to do" in rerun.stdout, rerun.stdout
    _timed("info", times, subprocess.run,
           [sys.executable, "-m", "raptorz.cli.main", "info", str(output)],
           capture_output=True, check=True)
    _timed("fit", times, raptorz.fit, output, folder / "volumes.labels.csv",
           folder / "results")
    outside = times["embed"] - times["kernel"]
    return {"n": n, **times, "outside_ms": 1000 * outside / n,
            "outside_after_startup_ms": 1000 * (outside - times["startup"]) / n,
            "client_scheduler_mib": measured["client_scheduler_mib"],
            "worker_mib": measured["worker_mib"], "files": files,
            "files_per_100": 100 * files / n}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sizes", type=int, nargs="*")
    parser.add_argument("--embed-step", nargs=4, type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.embed_step:
        embed_step(*args.embed_step)
        return
    import timm
    import torch
    from safetensors.torch import save_file

    from raptorz.embedding.encoders import SMALL_ENCODERS

    rows = []
    for n in args.sizes:
        with tempfile.TemporaryDirectory() as tmp:
            architecture, kwargs = SMALL_ENCODERS[ENCODER]
            model = timm.create_model(architecture, pretrained=False, img_size=224,
                                      num_classes=0, **kwargs)
            weights = Path(tmp) / "tiny.safetensors"
            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
            rows.append(one(n, Path(tmp), weights))
            print(rows[-1], file=sys.stderr)
    print(f"\n{platform.processor() or platform.machine()}, torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads; each volume 8^3, one "
          f"slice, tiny ViT; peak memory is each process's maximum resident set (VmHWM)\n")
    columns = list(rows[0])
    print("| " + " | ".join(columns) + " |")
    print("|" + "|".join(" ---: " for _ in columns) + "|")
    for row in rows:
        print("| " + " | ".join(f"{v:.2f}" if isinstance(v, float) else str(v)
                                for v in row.values()) + " |")


if __name__ == "__main__":
    main()
