"""``raptorz demo``: the whole pipeline on a small labelled set of volumes, anywhere.

The demo makes its own data (:func:`make_demo_data`): NIfTI volumes of a smooth "organ"
with noise and one bright "lesion" of random size, contrast and place, on the left in
label 1 volumes and on the right in label 0 ones (the two overlap near the midline, so the
task is not trivial), and a labels CSV in the original tool's layout with seeded,
stratified train / val / test splits. It converts
them, embeds them on a local Dask cluster (every 6th slice of the made volumes) and fits
the paper's linear head on its own projector, then fits the same head on shuffled training
labels to show what chance looks like. On a CPU it uses DINOv2 ViT-S/14 (``dinov2-s``), on
a GPU the paper's DINOv2 ViT-L/14 (``dinov2-l``). Where no weights can be had (offline,
not cached) it uses seeded random weights and says so: a random ViT's tokens still carry
where the lesion is, so the task is solved, but the score then says nothing about the
pretrained encoder.
"""

from __future__ import annotations

import dataclasses
import socket
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pandas as pd

from raptorz.cluster import create_cluster, visible_gpus
from raptorz.defaults import RANDOM_WEIGHTS
from raptorz.embedding.encoders import EncoderInfo, weights_available
from raptorz.embedding.projection import create_projector, save_projector
from raptorz.errors import InputError

#: The demo's encoder on a CPU and on GPUs (``dinov2-l`` is raptorz's default encoder).
CPU_ENCODER, GPU_ENCODER = "dinov2-s", "dinov2-l"

#: Volumes the demo makes: at its 60 / 20 / 20 splits, 16 of them are tested.
DEMO_COUNT = 80

#: Slices the demo encodes of its own volumes: every 6th of 16 (slices 1, 7 and 13: 3 a
#: plane, 9 a volume). The middle one (7, at -0.07 of the half-width) cuts every lesion
#: (centres within 0.2 of the middle, radii from 0.25) in the two planes that show its
#: left-right place; the encoder's time is the demo's, and 9 slices a volume keep it near
#: 2 minutes on 2 CPU cores (every 8th, 2 a plane, misses most lesions: AUROC 0.70).
DEMO_SIZE, DEMO_SUBSAMPLE = 16, 6

#: The demo's projector: its name is the stem, and the demo fits on it by name, so that a
#: store given more projectors (``raptorz reproject``) is fitted the same on a rerun.
PROJECTOR = "proj_normal_k100_seed0"


@dataclass(frozen=True)
class DemoResult:
    """Where the demo put everything, and what it used.

    ``chance`` holds the scores of the same fit on shuffled training labels (empty where
    nothing was fitted).
    """

    data: Path
    labels: Path
    volumes: Path
    projector: Path
    embeddings: Path
    results: Path
    encoder: str
    weights: str
    metrics: dict
    chance: dict


def make_demo_data(folder: str | Path, *, count: int = DEMO_COUNT, size: int = DEMO_SIZE,
                   seed: int = 0) -> Path:
    """Write ``count`` labelled NIfTI volumes of ``size``³ voxels and their labels CSV.

    Every volume has a smooth "organ" of random extent with noise and one bright
    ellipsoid "lesion" of random size (a mean radius of 0.3-0.45 of the volume's
    half-width), shape and contrast. Its centre is on the left (RAS x from -0.6 to 0.05
    of the half-width) in label 1 volumes and on the right (-0.05 to 0.6) in label 0
    ones, within 0.2 of the middle in the other two axes: the ranges overlap, so that no
    score is perfect by construction. The splits are a seeded, stratified 60 / 20 / 20.

    Returns
    -------
    Path
        The labels CSV (``folder/labels.csv``: id, split, label).
    """
    if count < 10:
        raise InputError("--count", f"the demo needs at least 10 volumes, got {count}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, size)] * 3, indexing="ij"))
    labels = np.arange(count) % 2
    rng.shuffle(labels)
    splits = np.array(["train"] * count, dtype=object)
    order = {label: rng.permutation(np.flatnonzero(labels == label)) for label in (0, 1)}
    for label in (0, 1):  # stratified: val and test each get a fifth of every label
        fifth = max(1, round(len(order[label]) / 5))
        splits[order[label][:fifth]] = "val"
        splits[order[label][fifth:2 * fifth]] = "test"
    rows = []
    for i, label in enumerate(labels.tolist()):
        radii = rng.uniform(0.7, 0.9, 3)
        organ = np.exp(-np.sum((grid / radii[:, None, None, None]) ** 4, axis=0))
        volume = 400 * organ + rng.normal(0, 20, grid.shape[1:])
        axes = rng.uniform(0.3, 0.45) * rng.uniform(0.85, 1.15, 3)
        # a place, not a size: a linear head on the tokens (one per place) learns a place
        # from 48 volumes, while a size spread over random places it does not
        left = rng.uniform(-0.6, 0.05) if label else rng.uniform(-0.05, 0.6)
        centre = np.array([left, *rng.uniform(-0.2, 0.2, 2)])
        lesion = np.sum(((grid - centre[:, None, None, None]) / axes[:, None, None, None]) ** 2,
                        axis=0) < 1
        volume += rng.uniform(200, 400) * lesion
        affine = np.diag([1.5, 1.5, 1.5, 1.0])
        name = f"demo_{i:03d}"
        nib.save(nib.Nifti1Image(volume.astype(np.int16), affine), folder / f"{name}.nii.gz")
        rows.append({"id": name, "split": splits[i], "label": int(label)})
    labels_csv = folder / "labels.csv"
    pd.DataFrame(rows).to_csv(labels_csv, index=False)
    return labels_csv


def _demo_data_made(labels: Path, count: int) -> bool:
    """Whether ``labels`` lists ``count`` demo volumes that are all there."""
    if not labels.is_file():
        return False
    ids = pd.read_csv(labels)["id"].astype(str).tolist()
    return len(ids) == count and all((labels.parent / f"{i}.nii.gz").is_file() for i in ids)


def describe_encoder(encoder: str) -> EncoderInfo:
    """What ``encoder`` (a named encoder or a timm model name) is, without its weights.

    Raises
    ------
    InputError
        Where ``encoder`` is neither a named encoder nor a timm model name.
    """
    from raptorz.embedding.encoders import describe, resolve_config

    try:
        return describe(resolve_config(encoder))
    except RuntimeError as error:  # timm: unknown model
        raise InputError("--encoder", f"{encoder!r} is neither a named encoder (`raptorz "
                         f"encoders` lists them) nor a timm model name ({error})") from None


def run_demo(workdir: str | Path = "raptorz-demo", *, data: str | Path | None = None,
             labels: str | Path | None = None, encoder: str | None = None,
             weights: str | Path | None = None, workers: int | None = None,
             count: int = DEMO_COUNT, log: Callable[[str], None] = print) -> DemoResult:
    """Convert, embed and fit a small labelled set of volumes, printing every step.

    Parameters
    ----------
    workdir
        Folder for every output (created; a rerun resumes what is there, and fits on the
        demo's projector whatever other projectors the store was given since).
    data, labels
        The user's own volumes (a folder, file or glob of NIfTI / DICOM / zip / npz) and
        labels CSV; by default the demo makes :func:`make_demo_data` in ``workdir/data``
        and encodes every 6th slice of them. ``labels`` without ``data`` is refused
        (:class:`~raptorz.errors.InputError`).
    encoder, weights
        The slice encoder: a named encoder (``raptorz encoders``) or a timm model name;
        default ``dinov2-s`` on a CPU and ``dinov2-l`` on a GPU, with cached or
        downloaded weights where they can be had, else seeded random weights.
    workers
        Dask workers (default one per GPU, else 2 CPU workers).
    count
        Volumes the demo makes when ``data`` is not given.
    log
        Called with one line per step.

    Raises
    ------
    InputError
        For ``labels`` without ``data`` and an unknown ``encoder``, before anything is done.
    """
    from raptorz.downstream.fitting import FitSettings, fit
    from raptorz.embedding.runner import embed
    from raptorz.embedding.settings import KernelSettings
    from raptorz.ingest.volumes import convert

    if labels is not None and data is None:
        raise InputError(labels, "labels need data (--data): the demo makes its own labels "
                         "otherwise")
    gpus = visible_gpus()
    encoder = encoder or (GPU_ENCODER if gpus else CPU_ENCODER)
    info = describe_encoder(encoder)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    subsample = 1
    if data is None:
        data, subsample = workdir / "data", DEMO_SUBSAMPLE
        labels = data / "labels.csv"
        # a rerun keeps the files it made (seeded, the same): written again, they would
        # count as sources changed since they were converted
        if not _demo_data_made(labels, count):
            labels = make_demo_data(data, count=count)
        log(f"data:        {count} labelled volumes of {DEMO_SIZE}³ made in {data} (labels "
            f"{labels}): a lesion on the left in label 1, on the right in label 0")
    where = f"on {len(gpus)} GPU(s)" if gpus else "on the CPU"
    log(f"encoder:     {encoder}: {info.config.description}, width {info.width}, "
        f"{info.tokens} tokens a slice, {info.parameters / 1e6:.0f}M parameters ({where})")
    weights = weights if weights is not None else _weights_for(encoder, log)
    volumes, embeddings = workdir / "volumes.zarr", workdir / "embeddings.zarr"
    projector = workdir / f"{PROJECTOR}.npy"
    with create_cluster("cuda" if gpus else "local", workers=workers or (None if gpus else 2),
                        dashboard_address=":0") as cluster:
        log(f"dashboard:   {cluster.dashboard_link}")
        summary = convert([str(data)], volumes, cluster=cluster)
        log(f"volumes:     {volumes} ({summary.converted} converted, {summary.failed} failed, "
            f"{summary.skipped} already done)")
        # with its seed in a sidecar, so that the store records it
        save_projector(create_projector(0, info.width, 100, name=PROJECTOR), projector)
        log(f"projector:   {projector} (seed 0, K = 100)")
        # pooled tokens kept: new projections need no encoder run (raptorz reproject)
        done = embed(volumes, embeddings, [projector], encoder=encoder, weights=weights,
                     settings=KernelSettings(keep_tokens=True, subsample=subsample),
                     cluster=cluster, progress=True)
        every = f", every {subsample}th slice" if subsample > 1 else ""
        log(f"embeddings:  {embeddings} ({done.ok} ok, {done.failed} failed, {done.computed} "
            f"embedded by this run{every})")
    results = workdir / "results"
    metrics: dict = {}
    chance: dict = {}
    if labels is None:
        log("results:     no labels given (--labels), so nothing to fit")
    else:
        settings = FitSettings(projector=PROJECTOR)
        fitted = fit(embeddings, labels, results, settings,
                     log=lambda line: log(f"  fit: {line}"))
        metrics = fitted.metrics
        log(f"results:     {results} (predictions.csv, metrics.json, plots, model/)")
        shuffled = shuffle_train_labels(labels, workdir / "shuffled" / "labels.csv")
        chance = fit(embeddings, shuffled, workdir / "shuffled" / "results",
                     dataclasses.replace(settings, bootstrap=0)).metrics
        log(f"score:       {_headline(metrics, chance)}")
    if weights == RANDOM_WEIGHTS:
        log("note:        random encoder weights: the pipeline ran end to end, and a random "
            "ViT's tokens carry a lesion's place, but this score says nothing about "
            "the pretrained encoder. Provide weights (--weights FILE) or run online.")
    return DemoResult(Path(data), Path(labels) if labels else Path(), volumes, projector,
                      embeddings, results, encoder, str(weights), metrics, chance)


def shuffle_train_labels(labels: str | Path, output: str | Path, *, seed: int = 0) -> Path:
    """Write ``labels`` with the targets of its train rows permuted among them (seeded).

    Val and test keep their labels: a head fitted on the result scores what chance
    looks like on the same test split.

    Returns
    -------
    Path
        ``output``.
    """
    from raptorz.downstream.labels import read_labels

    read_labels(labels)  # the file's problems are reported as fit reports them
    frame = pd.read_csv(labels, dtype=str)
    train = np.flatnonzero(frame["split"].str.strip().str.lower() == "train")
    targets = [c for c in frame.columns[1:] if c != "split"]
    permuted = np.random.default_rng(seed).permutation(train)
    frame.loc[train, targets] = frame.loc[permuted, targets].to_numpy()
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(output, index=False)
    return output


def _headline(metrics: dict[str, Any], chance: dict[str, Any]) -> str:
    """``test auroc 0.97 [0.91, 1.00]; on shuffled labels 0.52``: the first metric."""
    name, score = next(iter(metrics["mean"].items()))
    interval = (f" [{score['low']:.2f}, {score['high']:.2f}]"
                if score["low"] is not None and score["high"] is not None else "")

    def number(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.2f}"

    return (f"test {name.upper()} {number(score['value'])}{interval}; on shuffled labels "
            f"{number(chance['mean'][name]['value'])}")


def _weights_for(encoder: str, log: Callable[[str], None]) -> str | None:
    """``None`` (the cache or the hub) where weights can be had, else random weights."""
    from raptorz.embedding.encoders import create_encoder
    from raptorz.errors import RaptorzError

    random = ("using seeded RANDOM weights: the pipeline runs, the score shows it, not the "
              "pretrained encoder")
    if weights_available(encoder):
        log("weights:     from the Hugging Face cache")
        return None
    if not _hub_reachable():
        log(f"weights:     not in the Hugging Face cache and the hub is out of reach; {random}")
        return RANDOM_WEIGHTS
    try:  # downloads into the cache once, so that every worker finds it there
        create_encoder(encoder, device="cpu")
    except RaptorzError as error:
        log(f"weights:     none to be had ({str(error).split(':')[0]}); {random}")
        return RANDOM_WEIGHTS
    log("weights:     downloaded from the hub into the Hugging Face cache")
    return None


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers at all (huggingface_hub retries for a minute)."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    host = urllib.parse.urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
    except OSError:
        return False
    return True
