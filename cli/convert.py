"""``raptorz convert``: volumes (NIfTI, NRRD, MetaImage, MGH, Analyze, MINC, AFNI, PAR/REC,
UK Biobank zip, MedMNIST npz, DICOM, a BIDS dataset's images) to a store."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from raptorz import location
from raptorz.defaults import (
    DEFAULT_INTENSITY,
    DEFAULT_MEMBER,
    DEFAULT_MIN_SLICES,
    SPLIT_FRACTIONS,
)
from raptorz.errors import RaptorzError


def _shape(text: str) -> tuple[int, int, int]:
    try:
        x, y, z = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected X,Y,Z (three integers), got {text!r}") from None
    if min(x, y, z) < 1:
        raise argparse.ArgumentTypeError(f"sizes must be positive, got {text!r}")
    return x, y, z


def _fill(text: str) -> float | str:
    if text == "min":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or min, got {text!r}") from None


def _fractions(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected TRAIN,VAL,TEST, got {text!r}") from None


def register(subparsers: Any) -> None:
    """Add the ``convert`` verb."""
    defaults = ", ".join(f"{k} {v}" for k, v in DEFAULT_INTENSITY.items())
    parser = subparsers.add_parser(
        "convert", help="convert volumes into a volumes.zarr store",
        description="Read NIfTI (.nii, .nii.gz), NRRD (.nrrd, .nhdr), MetaImage (.mha, "
        ".mhd), MGH/MGZ, Analyze (.hdr/.img), MINC (.mnc), AFNI (+orig.HEAD/.BRIK), Philips "
        "PAR/REC, UK Biobank zips, MedMNIST npz files, DICOM series or the images of a BIDS "
        "dataset (--bids), orient and scale them and write one chunked, compressed "
        "volumes.zarr. Rerun the same command to resume an interrupted or partly failed "
        "conversion.")
    parser.add_argument("sources", nargs="*", metavar="SOURCE",
                        help="files, folders (of volumes, or of DICOM files: one volume per "
                        "series) or globs; or URLs of them (s3://, gs://, https://)")
    parser.add_argument("-o", "--output", required=True, type=location,
                        help="the store to write (a path, or a URL such as s3://bucket/v.zarr)")
    parser.add_argument("--anon", action="store_true",
                        help="read URL sources anonymously (a public bucket, e.g. OpenNeuro's "
                        "s3://openneuro.org); stores use the environment's credentials")
    parser.add_argument("--folder", type=Path,
                        help="folder of the manifest's names (or an .npz whose ids they are)")
    parser.add_argument("--manifest", type=Path, help="text file, one volume name a line")
    parser.add_argument("--start", type=int, default=0, help="first volume to convert")
    parser.add_argument("--many", type=int, help="how many volumes to convert (default all)")
    parser.add_argument("--member", default=DEFAULT_MEMBER,
                        help=f"the volume inside UK Biobank zips (default {DEFAULT_MEMBER})")
    parser.add_argument("--max-member-mb", type=int, default=2048,
                        help="cap on a zip member's decompressed size (default 2048)")
    parser.add_argument("--max-volume-bytes", type=int, metavar="BYTES",
                        help="cap on one volume as float32, checked on every header before "
                        "reading (default 4 GiB: 1024^3 voxels); raise it for a genuine "
                        "giant volume")
    parser.add_argument("--intensity", help="minmax | percentile[:LO,HI] | range:LO,HI | "
                        f"divide:N | ct:PRESET (default per reader: {defaults})")
    parser.add_argument("--orientation", choices=("ras", "native"), default="ras",
                        help="reorient to RAS (default) or keep the stored array order")
    parser.add_argument("--shape", type=_shape, help="target shape X,Y,Z for all volumes")
    parser.add_argument("--fit", choices=("resample", "pad"), default="resample",
                        help="how --shape is reached: resample, or pad / crop (centred)")
    parser.add_argument("--dtype", choices=("float16", "float32"), default="float16",
                        help="stored precision of the volumes, in [0, 1] (default float16: "
                        "ample for 8 to 12-bit scans, half the size)")
    parser.add_argument("--chunk", type=int, help="volumes per chunk (default: ~64 MB)")
    parser.add_argument("--workers", type=int,
                        help="local Dask worker processes (default: one per CPU where over 2 "
                        "GiB of voxels are to be written, else the work runs in this process; "
                        "1: always in this process)")
    parser.add_argument("--cluster", metavar="tcp://HOST:PORT",
                        help="a running Dask scheduler to convert on (instead of --workers)")
    parser.add_argument("--series", action="append", default=[], metavar="NAME",
                        help="in DICOM folders of several series, convert only this series "
                        "(number, description, id or UID; repeat for more)")
    parser.add_argument("--min-slices", type=int, default=DEFAULT_MIN_SLICES,
                        help="in DICOM folders of several series, skip localizers and "
                        f"series of fewer slices (default {DEFAULT_MIN_SLICES})")
    parser.add_argument("--labels-out", type=location,
                        help="labels CSV of MedMNIST or BIDS sources (default STORE.labels.csv)")
    parser.add_argument("--fill-nonfinite", type=_fill, metavar="VALUE|min",
                        help="fill NaN and infinite voxels (e.g. outside a resampled field "
                        "of view) with VALUE or the volume's minimum, counted per volume in "
                        "filled_voxels; without it such volumes fail")
    parser.add_argument("--hash-sources", action="store_true",
                        help="record each source's sha256 besides its size and time (reads "
                        "every byte once more); a rerun then ignores sources only touched")
    parser.add_argument("--reconvert-changed", action="store_true",
                        help="on a rerun, reconvert volumes whose source changed since "
                        "(without it they are kept and named in a warning)")
    parser.add_argument("--exclude", action="append", default=[], metavar="ID|@FILE",
                        help="leave this volume out (marked failed: excluded), e.g. one "
                        "that kills its worker; @FILE: one id a line; repeatable")
    bids = parser.add_argument_group(
        "BIDS datasets", "SOURCE is a BIDS dataset's root; ids keep the entities that vary "
        "(sub-01, sub-01_ses-2...); the labels CSV (--labels-out) holds participants.tsv, "
        "sessions.tsv and the sidecars' scanner facts, split by subject")
    bids.add_argument("--bids", metavar="ENTITY=VALUE[,...]",
                      help="the images to convert, e.g. suffix=T1w or "
                      "suffix=T1w,ses=2,run=1,acq=mprage (suffix required)")
    bids.add_argument("--bids-derivatives", metavar="PIPELINE",
                      help="read the images of derivatives/PIPELINE (e.g. fmriprep, selected "
                      "with space=...,desc=preproc) instead of the raw data")
    bids.add_argument("--split-seed", type=int, default=0, metavar="N",
                      help="seed of the subjects' train/val/test split (default 0)")
    bids.add_argument("--split-fractions", type=_fractions, default=SPLIT_FRACTIONS,
                      metavar="TRAIN,VAL,TEST",
                      help="shares of the subjects in each split (default "
                      f"{','.join(map(str, SPLIT_FRACTIONS))})")
    parser.set_defaults(func=run)


def _excluded(values: list[str]) -> list[str]:
    """The ids of ``--exclude``: each an id, or @FILE naming a file of one id a line."""
    ids = []
    for value in values:
        if not value.startswith("@"):
            ids.append(value)
            continue
        try:
            lines = Path(value[1:]).read_text().splitlines()
        except OSError as error:
            raise RaptorzError(f"--exclude {value}: cannot read it ({error.strerror})") from None
        ids += [line.strip() for line in lines if line.strip()]
    return ids


def run(args: argparse.Namespace) -> int:
    """Convert, show progress and a summary; 1 when any volume failed."""
    from tqdm import tqdm

    from raptorz import convert

    if not args.sources and args.manifest is None:
        raise RaptorzError("give at least one SOURCE or --manifest")
    with tqdm(desc="convert", unit="vol", disable=None) as bar:

        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.update(done)

        summary = convert(
            args.sources, args.output, folder=args.folder, manifest=args.manifest,
            start=args.start, many=args.many, member=args.member,
            max_member_bytes=args.max_member_mb * 2**20, intensity=args.intensity,
            orientation=args.orientation, shape=args.shape, fit=args.fit, dtype=args.dtype,
            chunk=args.chunk, workers=args.workers, cluster=args.cluster,
            labels_out=args.labels_out, series=args.series, min_slices=args.min_slices,
            hash_sources=args.hash_sources, reconvert_changed=args.reconvert_changed,
            exclude=_excluded(args.exclude), fill_nonfinite=args.fill_nonfinite,
            bids=args.bids, bids_derivatives=args.bids_derivatives,
            split_seed=args.split_seed, split_fractions=args.split_fractions,
            storage_options={"anon": True} if args.anon else None,
            **({} if args.max_volume_bytes is None else
               {"max_volume_bytes": args.max_volume_bytes}),
            progress=progress,
        )
    for error in summary.failures.values():
        print(f"failed: {error}", file=sys.stderr)
    print(f"{summary.store}: {summary.converted} converted, {summary.failed} failed, "
          f"{summary.skipped} already done")
    if summary.labels:
        print(f"labels: {summary.labels}")
    return 0 if summary.ok else 1
