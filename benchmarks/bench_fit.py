"""Fit time and peak memory of ``raptorz fit``: features in memory vs streamed from the store.

For each size, a seeded synthetic embeddings store is written (``3 x K x 257`` features per
volume, a binary target that depends on them), then each head is fitted twice, each in a
fresh process so that its peak resident memory is its own: once with the default memory
budget (features held in memory) and once with a 1 MB budget (streamed in batches).
Memory is the resident size sampled every 5 ms during the fit, less the size before it.
Prints a table; the predictions of the two paths are checked to be identical.

    python benchmarks/bench_fit.py --sizes 256,1024 --k 10 --heads linear,mlp
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

import numpy as np
import psutil

# The store and labels writers of the fitting tests (one implementation for both): their
# conftest.py, loaded by its path since a conftest is no importable module.
_WRITERS = runpy.run_path(str(Path(__file__).resolve().parents[1] / "tests" / "downstream"
                              / "conftest.py"))
synthetic, write_embeddings, write_labels = (
    _WRITERS[f"_{name}"] for name in ("synthetic", "write_embeddings", "write_labels"))


def one(store: str, labels: str, output: str, head: str, budget: str | None) -> None:
    """Fit once in this process; print seconds and peak RSS (MiB) as JSON."""
    # Everything fit imports, imported before the baseline so that it does not count.
    import matplotlib.pyplot  # noqa: F401
    import sklearn.metrics  # noqa: F401

    from raptorz.downstream.fitting import FitSettings, fit
    from raptorz.downstream.settings import HeadSettings

    # ru_maxrss would keep the imports' high-water mark: sample the resident size instead.
    process, samples, running = psutil.Process(), [], threading.Event()
    running.set()

    def sample() -> None:
        while running.is_set():
            samples.append(process.memory_info().rss)
            time.sleep(0.005)

    baseline = process.memory_info().rss
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    settings = FitSettings(head=HeadSettings(head=head, epochs=10),  # type: ignore[arg-type]
                           memory_budget=budget, bootstrap=100)
    fit(store, labels, output, settings)
    seconds = time.perf_counter() - start
    running.clear()
    sampler.join()
    print(json.dumps({"seconds": seconds, "peak": max(samples) / 2**20,
                      "baseline": baseline / 2**20}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="256,1024", help="volumes per store")
    parser.add_argument("--k", type=int, default=10, help="projections per token")
    parser.add_argument("--chunk", type=int, default=16, help="volumes per id-chunk")
    parser.add_argument("--heads", default="linear,mlp")
    parser.add_argument("--one", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        store, labels, output, head, budget = args.one
        one(store, labels, output, head, None if budget == "default" else budget)
        return
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for n in map(int, args.sizes.split(",")):
            features, ids, split = synthetic(n, (3, args.k, 257))
            w = np.random.default_rng(1).normal(size=features[0].size)
            target = (features.reshape(n, -1) @ w > 0).astype(int)
            store = write_embeddings(Path(folder) / f"e{n}.zarr", features, ids,
                                     chunk=args.chunk)
            labels = write_labels(Path(folder) / f"l{n}.csv", ids, split, {"label": target})
            for head in args.heads.split(","):
                predictions = []
                for path, budget in (("memory", "default"), ("streaming", "1MB")):
                    output = Path(folder) / f"out{n}{head}{path}"
                    done = subprocess.run(
                        [sys.executable, __file__, "--one", str(store), str(labels),
                         str(output), head, budget],
                        check=True, capture_output=True, text=True)
                    result = json.loads(done.stdout.strip().splitlines()[-1])
                    predictions.append((output / "predictions.csv").read_text())
                    rows.append((n, features[0].size, features.nbytes / 2**20, head, path,
                                 result["seconds"], result["peak"],
                                 result["peak"] - result["baseline"]))
                assert predictions[0] == predictions[1], "streaming and in-memory differ"
    print(f"{'volumes':>7} {'features':>8} {'MiB':>6} {'head':>6} {'path':>9} "
          f"{'fit s':>7} {'peak RSS MiB':>12} {'fit MiB':>8}")
    for n, f, mib, head, path, seconds, peak, extra in rows:
        print(f"{n:>7} {f:>8} {mib:>6.1f} {head:>6} {path:>9} {seconds:>7.1f} {peak:>12.0f} "
              f"{extra:>8.0f}")


if __name__ == "__main__":
    main()
