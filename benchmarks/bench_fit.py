"""``raptorz fit`` at scale (#29): passes, GB/s, wall time and peak memory of the linear head
with the features in memory, streamed from the store, streamed through a local uncompressed
copy (``--cache``), and on a 2-worker local Dask cluster (``--cluster``).

For each size a seeded synthetic embeddings store is written unit by unit, as ``raptorz
embed`` lays it out (shards of 100 volumes, K x 257 features a plane), with a binary label
carrying no signal, so that L-BFGS runs its iterations (the issue's case). Each fit runs in
a fresh process; its peak memory is the resident size of that process and its children
(the cluster's workers), sampled every 5 ms, less the size before the fit. *GB/s* is the
gigabytes of features the passes delivered over the fit's wall time. The predictions of
every path are asserted equal to the in-memory fit's (to 1e-6).

    python benchmarks/bench_fit.py                      # 10,000 and 50,000 volumes, K=100
    python benchmarks/bench_fit.py --volumes 300 --k 4  # a quick check
"""

from __future__ import annotations

import argparse
import json
import runpy
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import dask.array as da
import numpy as np
import pandas as pd
import psutil
import xarray as xr

from raptorz import stores
from raptorz.embedding.embeddings import UNIT_VOLUMES, inner_chunk

_WRITERS = runpy.run_path(str(Path(__file__).resolve().parents[1] / "tests" / "downstream"
                              / "conftest.py"))
write_labels = _WRITERS["_write_labels"]
NAME = "proj_bench"
MODES = ("memory", "streamed", "cached", "cluster")


def write_store(path: Path, n: int, shape: tuple[int, int, int], unit: int) -> Path:
    """An embeddings store of ``n`` seeded volumes ``(plane, k, token)``, written unit by unit
    in shards of ``unit`` volumes, as ``raptorz embed`` writes them."""
    planes, k, tokens = shape
    dims = ("id", "plane", f"k_{NAME}", "token")
    array = xr.DataArray(da.zeros((n, *shape), chunks=(unit, *shape), dtype="f4"), dims=dims)
    inner = inner_chunk(unit, 4 * int(np.prod(shape)))
    array.encoding["chunks"] = (inner, *shape)
    if inner < unit:
        array.encoding["shards"] = (unit, *shape)
    ids = [f"v{i}" for i in range(n)]
    template = xr.Dataset(
        {NAME: array, **stores.status_variables(n, unit)},
        coords={"id": stores.as_strings(ids), "plane": stores.as_strings("ACS"[:planes]),
                "token": np.arange(tokens)},
        attrs={"projectors": {NAME: {"seed": 0, "dim": 8, "k": k}}})
    stores.create_store(path, template, "embeddings")
    for region in stores.chunk_slices(n, unit):
        rng = np.random.default_rng(region.start)
        block = rng.normal(2.0, 3.0, (region.stop - region.start, *shape)).astype(np.float32)
        count = region.stop - region.start
        stores.write_units(path, {NAME: xr.DataArray(block, dims=dims)}, region,
                           np.full(count, stores.OK, np.int8), [""] * count)
    return path


def one(store: str, labels: str, output: str, mode: str, max_iter: int, cache: str) -> None:
    """Fit once in this process; print seconds, peak and baseline memory and passes as JSON."""
    import matplotlib.pyplot  # noqa: F401  (imported by the fit's plot: before the baseline)
    from distributed import Client

    from raptorz.cluster import create_cluster
    from raptorz.downstream.fitting import FitSettings, fit
    from raptorz.downstream.settings import HeadSettings

    settings = FitSettings(head=HeadSettings(max_iter=max_iter), bootstrap=0,
                           memory_budget=None if mode == "memory" else "1MB",
                           cache=cache if mode == "cached" else None)
    cluster = create_cluster("local", workers=2, dashboard_address=None) \
        if mode == "cluster" else None
    client = Client(cluster) if cluster is not None else None
    process, samples, running = psutil.Process(), [], threading.Event()
    running.set()

    def resident() -> int:
        tree = [process, *process.children(recursive=True)]
        return sum(p.memory_info().rss for p in tree if p.is_running())

    def sample() -> None:
        while running.is_set():
            samples.append(resident())
            time.sleep(0.005)

    baseline = resident()
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    result = fit(store, labels, output, settings, cluster=client)
    seconds = time.perf_counter() - start
    running.clear()
    sampler.join()
    print(json.dumps({"seconds": seconds, "peak": max(samples), "baseline": baseline,
                      "passes": result.metrics["passes"],
                      "gigabytes": result.model.summary["read_gigabytes"]}))
    if client is not None and cluster is not None:
        client.close()
        cluster.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--volumes", default="10000,50000", help="volumes per store")
    parser.add_argument("--k", type=int, default=100, help="projections per token")
    parser.add_argument("--planes", type=int, default=1, help="planes (1-3)")
    parser.add_argument("--tokens", type=int, default=257, help="tokens per plane")
    parser.add_argument("--max-iter", type=int, default=10, help="L-BFGS iterations per C")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--folder", type=Path, help="where the stores go (default: a "
                        "temporary folder; it needs the features' size twice for --cache)")
    parser.add_argument("--one", nargs=6, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        store, labels, output, mode, max_iter, cache = args.one
        one(store, labels, output, mode, int(max_iter), cache)
        return
    shape = (args.planes, args.k, args.tokens)
    rows = []
    with tempfile.TemporaryDirectory(dir=args.folder) as folder:
        for n in map(int, args.volumes.split(",")):
            store = write_store(Path(folder) / f"e{n}.zarr", n, shape,
                                max(1, min(UNIT_VOLUMES, n // 16)))
            rng = np.random.default_rng(n)
            split = rng.permutation(np.repeat(["train", "val", "test"],
                                              [n - 2 * (n // 5), n // 5, n // 5]))
            labels = write_labels(Path(folder) / f"l{n}.csv", [f"v{i}" for i in range(n)],
                                  split, {"label": rng.integers(0, 2, n)})
            gigabytes = n * int(np.prod(shape)) * 4 / 1e9
            predictions = {}
            for mode in args.modes.split(","):
                output = Path(folder) / f"out{n}{mode}"
                done = subprocess.run(
                    [sys.executable, __file__, "--one", str(store), str(labels), str(output),
                     mode, str(args.max_iter), str(Path(folder) / "cache")],
                    check=True, capture_output=True, text=True)
                result = json.loads(done.stdout.strip().splitlines()[-1])
                predictions[mode] = pd.read_csv(output / "predictions.csv")
                extra = (result["peak"] - result["baseline"]) / 1e9
                rows.append((n, int(np.prod(shape)), gigabytes, mode, result["passes"],
                             result["gigabytes"] / result["seconds"], result["seconds"],
                             result["peak"] / 1e9, extra, extra / gigabytes))
            first = next(iter(predictions.values()))
            for mode, frame in predictions.items():
                np.testing.assert_allclose(frame.iloc[:, 1:], first.iloc[:, 1:], atol=1e-6,
                                           err_msg=f"{mode} predictions differ")
    print(f"{'volumes':>7} {'features':>8} {'GB':>6} {'path':>8} {'passes':>6} "
          f"{'GB/s':>6} {'fit s':>7} {'peak GB':>7} {'fit GB':>6} {'x feat':>6}")
    for n, f, gb, mode, passes, rate, seconds, peak, extra, ratio in rows:
        print(f"{n:>7} {f:>8} {gb:>6.2f} {mode:>8} {passes:>6} {rate:>6.2f} {seconds:>7.1f} "
              f"{peak:>7.2f} {extra:>6.2f} {ratio:>6.2f}")


if __name__ == "__main__":
    main()
