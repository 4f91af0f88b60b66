"""Conversion speed into ``volumes.zarr``, and reading one volume back vs the ``.nii.gz``.

Run from the repository root: ``python benchmarks/bench_convert.py [--data DIR]``.
Uses the real scans in ``../shared/data``; prints a Markdown table. MB/s counts the
uncompressed voxels written (float16, 2 bytes a voxel).
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np

from raptorz.ingest.volumes import convert
from raptorz.layouts import open_volumes

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def _timed(function: Callable[[], object], repeat: int = 1) -> float:
    """The best wall time of ``repeat`` calls, in seconds."""
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        function()
        best = min(best, time.perf_counter() - start)
    return best


def bench_conversions(data: Path, work: Path) -> list[str]:
    cases = [
        ("IXI T1 NIfTI, 120x120x90", [data / "ixi/t1"], {}, 1),
        ("IXI T1 NIfTI, 120x120x90", [data / "ixi/t1"], {}, 2),
        ("MNI brain 182x218x182", [data / "brain_1mm"], {"intensity": "range:0,1280"}, 1),
        ("DICOM MPRAGE 176 files", [data / "dicom/trio_mprage"], {}, 1),
        ("AdrenalMNIST3D 28^3 (all)", [data / "medmnist/adrenalmnist3d.npz"], {}, 1),
        ("AdrenalMNIST3D 64^3 (all)", [data / "medmnist/adrenalmnist3d_64.npz"], {}, 1),
        ("AdrenalMNIST3D 64^3 (all)", [data / "medmnist/adrenalmnist3d_64.npz"], {}, 2),
    ]
    rows = ["| conversion | workers | volumes | seconds | volumes/s | MB/s |",
            "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for name, sources, options, workers in cases:
        store = work / "bench.zarr"
        shutil.rmtree(store, ignore_errors=True)
        start = time.perf_counter()
        summary = convert(sources, store, workers=workers, **options)  # type: ignore[arg-type]
        seconds = time.perf_counter() - start
        volume = open_volumes(store).volume
        megabytes = volume.size * volume.dtype.itemsize / 1e6
        rows.append(f"| {name} | {workers} | {summary.converted} | {seconds:.2f} | "
                    f"{summary.converted / seconds:.1f} | {megabytes / seconds:.1f} |")
    return rows


def bench_reads(data: Path, work: Path) -> list[str]:
    rows = ["| one volume | volumes.zarr, open + read (ms) | volumes.zarr, read (ms) | "
            ".nii.gz, nibabel (ms) | speed-up of read |", "| --- | ---: | ---: | ---: | ---: |"]
    for name, path in [("MNI brain 182x218x182", data / "brain_1mm/mni152_t1_1mm.nii.gz"),
                       ("IXI T1 120x120x90", sorted((data / "ixi/t1").glob("*.nii.gz"))[0])]:
        store = work / "read.zarr"
        shutil.rmtree(store, ignore_errors=True)
        convert([path], store, workers=1)
        opened = open_volumes(store).volume
        open_s = _timed(lambda s=store: np.asarray(open_volumes(s).volume[0].values), 5)
        read_s = _timed(lambda v=opened: np.asarray(v[0].values), 5)
        nifti_s = _timed(lambda p=path: nib.load(p).get_fdata(dtype=np.float32), 5)
        rows.append(f"| {name} | {open_s * 1e3:.1f} | {read_s * 1e3:.1f} | "
                    f"{nifti_s * 1e3:.1f} | {nifti_s / read_s:.1f}x |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DATA)
    args = parser.parse_args()
    print(f"CPUs: {os.cpu_count()}")
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        print("\n".join(bench_conversions(args.data, work)))
        print()
        print("\n".join(bench_reads(args.data, work)))


if __name__ == "__main__":
    main()
