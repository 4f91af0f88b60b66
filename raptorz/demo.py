"""``raptorz demo``: the whole pipeline on a small labelled set of volumes, anywhere.

The demo makes its own data (:func:`make_demo_data`): NIfTI volumes of a smooth "organ"
with noise, half of them with a bright "lesion", a labels CSV in the original tool's
layout with seeded train / val / test splits. It converts them, embeds them on a local
Dask cluster and fits the paper's linear head. On a CPU it uses a small DINOv2 (ViT-S/14),
on a GPU the paper's DINOv2-L. Where no weights can be had (offline, not cached) it uses
seeded random weights and says so: the pipeline runs, the metrics mean nothing.
"""

from __future__ import annotations

import socket
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

from raptorz.cluster import create_cluster, visible_gpus
from raptorz.defaults import DEFAULT_ENCODER, RANDOM_WEIGHTS
from raptorz.embedding.encoders import weights_available
from raptorz.embedding.projection import make_projector
from raptorz.errors import InputError

#: The encoder of the demo on a CPU: DINOv2 ViT-S/14, about 14x less compute than ViT-L/14.
CPU_ENCODER = "vit_small_patch14_dinov2.lvd142m"


@dataclass(frozen=True)
class DemoResult:
    """Where the demo put everything, and what it used."""

    data: Path
    labels: Path
    volumes: Path
    projector: Path
    embeddings: Path
    results: Path
    encoder: str
    weights: str
    metrics: dict


def make_demo_data(folder: str | Path, *, count: int = 16, size: int = 24,
                   seed: int = 0) -> Path:
    """Write ``count`` labelled NIfTI volumes of ``size``³ voxels and their labels CSV.

    Label 1 volumes carry a bright ellipsoid "lesion" inside the "organ"; the splits are
    a seeded 60 / 20 / 20, with both labels in every split.

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
        radii = rng.uniform(0.6, 0.85, 3)
        organ = np.exp(-np.sum((grid / radii[:, None, None, None]) ** 4, axis=0))
        volume = 400 * organ + rng.normal(0, 20, grid.shape[1:])
        if label:
            centre = rng.uniform(-0.3, 0.3, 3)
            lesion = np.sum(((grid - centre[:, None, None, None]) / 0.2) ** 2, axis=0) < 1
            volume += 300 * lesion
        affine = np.diag([1.5, 1.5, 1.5, 1.0])
        name = f"demo_{i:03d}"
        nib.save(nib.Nifti1Image(volume.astype(np.int16), affine), folder / f"{name}.nii.gz")
        rows.append({"id": name, "split": splits[i], "label": int(label)})
    labels_csv = folder / "labels.csv"
    pd.DataFrame(rows).to_csv(labels_csv, index=False)
    return labels_csv


def run_demo(workdir: str | Path = "raptorz-demo", *, data: str | Path | None = None,
             labels: str | Path | None = None, encoder: str | None = None,
             weights: str | Path | None = None, workers: int | None = None,
             count: int = 16, log: Callable[[str], None] = print) -> DemoResult:
    """Convert, embed and fit a small labelled set of volumes, printing every step.

    Parameters
    ----------
    workdir
        Folder for every output (created; a rerun resumes what is there).
    data, labels
        The user's own volumes (a folder, file or glob of NIfTI / DICOM / zip / npz) and
        labels CSV; by default the demo makes :func:`make_demo_data` in ``workdir/data``.
        ``labels`` without ``data`` is refused (:class:`~raptorz.errors.InputError`).
    encoder, weights
        The slice encoder; default ViT-S/14 DINOv2 on a CPU and ViT-L/14 on a GPU, with
        cached or downloaded weights where they can be had, else seeded random weights.
    workers
        Dask workers (default one per GPU, else 2 CPU workers).
    count
        Volumes the demo makes when ``data`` is not given.
    log
        Called with one line per step.
    """
    from raptorz.downstream.fitting import fit
    from raptorz.embedding.runner import embed
    from raptorz.embedding.settings import KernelSettings
    from raptorz.ingest.volumes import convert

    if labels is not None and data is None:
        raise InputError(labels, "labels need data (--data): the demo makes its own labels "
                         "otherwise")
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    if data is None:
        data = workdir / "data"
        labels = make_demo_data(data, count=count)
        log(f"data:        {count} labelled volumes made in {data} (labels {labels})")
    gpus = visible_gpus()
    encoder = encoder or (DEFAULT_ENCODER if gpus else CPU_ENCODER)
    where = (f"on {len(gpus)} GPU(s)" if gpus else
             f"on the CPU: a small DINOv2, ~14x less compute than the default {DEFAULT_ENCODER}")
    log(f"encoder:     {encoder} ({where})")
    weights = weights if weights is not None else _weights_for(encoder, log)
    volumes, embeddings = workdir / "volumes.zarr", workdir / "embeddings.zarr"
    projector = workdir / "proj_normal_k100_seed0.npy"
    with create_cluster("cuda" if gpus else "local", workers=workers or (None if gpus else 2),
                        dashboard_address=":0") as cluster:
        log(f"dashboard:   {cluster.dashboard_link}")
        summary = convert([str(data)], volumes, cluster=cluster)
        log(f"volumes:     {volumes} ({summary.converted} converted, {summary.failed} failed)")
        np.save(projector, make_projector(0, _embed_dim(encoder), 100))
        log(f"projector:   {projector} (seed 0, K = 100)")
        # pooled tokens kept: new projections need no encoder run (raptorz reproject)
        done = embed(volumes, embeddings, [projector], encoder=encoder, weights=weights,
                     settings=KernelSettings(keep_tokens=True), cluster=cluster,
                     progress=True)
        log(f"embeddings:  {embeddings} ({done.ok} ok, {done.failed} failed)")
    results = workdir / "results"
    metrics: dict = {}
    if labels is None:
        log("results:     no labels given (--labels), so nothing to fit")
    else:
        fitted = fit(embeddings, labels, results, log=lambda line: log(f"  fit: {line}"))
        metrics = fitted.metrics
        log(f"results:     {results} (predictions.csv, metrics.json, plots, model/)")
    if weights == RANDOM_WEIGHTS:
        log("note:        random encoder weights: the pipeline ran end to end, but these "
            "metrics mean nothing. Provide weights (--weights FILE) or run online.")
    return DemoResult(Path(data), Path(labels) if labels else Path(), volumes, projector,
                      embeddings, results, encoder, str(weights), metrics)


def _weights_for(encoder: str, log: Callable[[str], None]) -> str | None:
    """``None`` (the cache or the hub) where weights can be had, else random weights."""
    from raptorz.embedding.encoders import create_encoder
    from raptorz.errors import RaptorzError

    if weights_available(encoder):
        log("weights:     from the Hugging Face cache")
        return None
    if not _hub_reachable():
        log("weights:     not in the Hugging Face cache and the hub is out of reach; using "
            "seeded RANDOM weights: the pipeline runs, the metrics mean nothing")
        return RANDOM_WEIGHTS
    try:  # downloads into the cache once, so that every worker finds it there
        create_encoder(encoder, device="cpu")
    except RaptorzError as error:
        log(f"weights:     none to be had ({str(error).split(':')[0]}); using seeded RANDOM "
            "weights: the pipeline runs, the metrics mean nothing")
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


def _embed_dim(encoder: str) -> int:
    """Token width of ``encoder``, from its architecture alone (no weights, no memory)."""
    import timm
    import torch

    from raptorz.embedding.encoders import SMALL_ENCODERS

    architecture, overrides = SMALL_ENCODERS.get(encoder, (encoder, {}))
    with torch.device("meta"):
        model = timm.create_model(architecture, pretrained=False, **overrides)
    return int(model.embed_dim)  # type: ignore[arg-type]
