"""The embedding run on the client: check, plan, start the cluster, submit, follow.

:func:`embed` checks everything it can without the encoder (the stores, the projectors,
the range, a resumed store's settings) before any cluster starts, has every worker build
the encoder, creates the store, splits the volumes to do into tasks of whole units sized
by work, and follows them with a progress bar (:mod:`raptorz.embedding.progress`). The
tasks themselves run on the workers (:mod:`raptorz.embedding.worker`): this module never
imports torch, so checks and resumes stay fast.

Resume: a volume is to do while its embedding is pending, or failed while its source is
ok (a kernel failure is retried; a volume that failed conversion is recorded as failed
and left alone), or stale: its volume was converted again since it was embedded (its
``checksum`` differs). ``start`` / ``many`` select ids exactly as the original's manifest
options do; since the embeddings store is written in whole units, processes given
disjoint ranges never write the same file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from distributed import Client, as_completed, default_client
from distributed.deploy import Cluster

from raptorz import locations, stores
from raptorz.cluster import (
    GPU_RESOURCE,
    ExitOnClose,
    advertises_gpus,
    connect,
    create_cluster,
    share_cpus,
)
from raptorz.defaults import DEFAULT_ENCODER, Precision
from raptorz.embedding.embeddings import (
    check_identity,
    create_embeddings,
    embeddings_template,
    store_unit,
    token_kind_coordinate,
    unit_size,
)
from raptorz.embedding.planning import (
    check_encoder_asked,
    fill_missing_projections,
    plan_tasks,
    region_request,
    select_ids,
    slices_per_volume,
    volumes_to_do,
    weights_option,
)
from raptorz.embedding.progress import ProgressBar
from raptorz.embedding.projection import Projector, load_projector
from raptorz.embedding.settings import PLANE_NAMES, KernelSettings, RegionSettings
from raptorz.embedding.worker import (
    RETIRED_TOPIC,
    EmbedTask,
    EncoderOptions,
    embed_task,
    encoder_provenance,
    provenance_difference,
)
from raptorz.errors import RaptorzError
from raptorz.layouts import EMBEDDINGS, VOLUMES
from raptorz.network import dashboard_link

#: The share of a GPU worker's ``GPU`` resource a task asks for: two tasks in flight per
#: worker, so that one reads and writes while the other encodes; the worker's kernel
#: lock keeps one at a time on the device.
TASK_GPU_SHARE = 0.5
#: Seconds between the run's looks at retired workers while it waits for tasks.
RETIRED_POLL_SECONDS = 1.0


@dataclass(frozen=True)
class EmbedSummary:
    """What an embedding run did, over the ids it was asked for.

    Attributes
    ----------
    output
        The embeddings store.
    total, ok, failed
        Volumes in the selected range, and how many of them are embedded / failed now;
        the rest are still pending (a task that kept failing, e.g. ``KilledWorker``).
    computed
        Volumes embedded (or attempted) by this call; 0 when there was nothing to do.
    errors
        Failed volume id -> error, over the range.
    seconds
        Wall time of the call.
    batch_size
        The smallest batch the encoder ran in this call (less than the settings' or the
        device's default where a batch ran out of device memory and was halved); ``None``
        when nothing ran.
    startup
        Of ``seconds``, the time before the first task was submitted: checks, cluster
        start, the encoder's first load on a worker, the store's creation.
    """

    output: str | Path
    total: int
    ok: int
    failed: int
    computed: int
    errors: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    batch_size: int | None = None
    startup: float = 0.0

    @property
    def pending(self) -> int:
        """Volumes of the range neither embedded nor failed: a rerun will retry them."""
        return self.total - self.ok - self.failed

    @property
    def nothing_to_do(self) -> bool:
        """Whether the store was already complete for the range."""
        return self.computed == 0


def embed(
    volumes: str | Path,
    output: str | Path,
    projectors: Sequence[Projector | str | Path],
    *,
    encoder: str = DEFAULT_ENCODER,
    weights: str | Path | None = None,
    settings: KernelSettings | None = None,
    precision: Precision | None = None,
    device: str | None = None,
    cluster: Client | Cluster | str | Callable[[], Cluster] | None = None,
    start: int = 0,
    many: int | None = None,
    torch_threads: int | None = None,
    progress: bool = True,
    masks: str | Path | None = None,
    regions: str | Sequence[str] = "all",
    region_settings: RegionSettings | None = None,
) -> EmbedSummary:
    """Embed the volumes of ``volumes`` into the store ``output`` on a Dask cluster.

    Everything that can be checked without the encoder (the stores, the projectors, the
    range, a resumed store's settings) is checked before any cluster is started, and a
    store that is already complete starts none.

    Parameters
    ----------
    volumes
        A ``volumes.zarr`` store (``raptorz convert``).
    output
        The ``embeddings.zarr`` store: created, or resumed where it exists.
    projectors
        :class:`~raptorz.embedding.projection.Projector` objects or ``.npy`` files.
    encoder, weights, precision
        The slice encoder (:func:`~raptorz.embedding.encoders.create_encoder`), built once
        per worker, on every connected worker at once before the first task.
    settings
        :class:`~raptorz.embedding.settings.KernelSettings` (planes, preprocessing, tokens...).
    device
        The torch device of every worker (``"cpu"``, ``"cuda:1"``); by default each
        worker uses the GPU it is pinned to, else the CPU. For single-worker runs.
    cluster
        A :class:`~distributed.Client`, a cluster, a scheduler address, a function that
        starts a cluster (called only when there is work; the cluster is closed after
        the call), or ``None``: the active client if there is one (Dask's convention),
        else a cluster started for this call (one worker per GPU, else one CPU worker).
    start, many
        Embed only ids ``start`` to ``start + many`` (the original's job splitting).
    torch_threads
        Torch threads per worker. By default each worker takes its share of the CPUs it
        may run on (:func:`raptorz.cluster.worker_threads`).
    progress
        Show a progress bar in volumes (a widget in Jupyter) and the dashboard address.
    masks, regions, region_settings
        Embed per region (docs/regions.md): a ``masks.zarr`` of these volumes
        (``raptorz masks``), the regions (names or label values, or ``"all"``) and how
        (:class:`~raptorz.embedding.settings.RegionSettings`: one pass by default). The
        store gets a ``roi`` dimension and ``region_status(id, roi)``.

    Returns
    -------
    EmbedSummary
    """
    began = time.perf_counter()
    settings = settings or KernelSettings()
    volumes, output = locations.resolved(volumes), locations.resolved(output)
    loaded = [p if isinstance(p, Projector) else load_projector(p) for p in projectors]
    source = VOLUMES.open(volumes)
    ids = stores.store_ids(source)
    exists = EMBEDDINGS.exists(output)
    selected = select_ids(len(ids), start, many,
                          store_unit(output) if exists else unit_size(len(ids)))
    options = EncoderOptions(encoder, weights_option(weights), precision, device=device)
    attrs = _attrs(volumes, source.attrs, settings, projectors=loaded)
    request = None if masks is None else region_request(
        masks, list(regions) if not isinstance(regions, str) else regions,
        region_settings or RegionSettings(), ids)
    if request is not None:
        attrs["regions"] = {"masks": request.masks, "labels": dict(zip(
            request.names, request.values, strict=True)),
            **dataclasses.asdict(request.settings)}
    if exists:
        check_identity(output, ids, attrs, [p.provenance() for p in loaded],
                       keys=("source", "settings", "regions"))  # the encoder is not loaded
        healed = fill_missing_projections(output, stores.id_range(len(ids), start, many))
        if healed:
            print(f"raptorz embed: filled, from the stored tokens, projections of {healed} "
                  "volume(s) left NaN by an older raptorz", file=sys.stderr)
    todo = volumes_to_do(volumes, output if exists else None, selected)
    if not todo.any():
        if exists:
            check_encoder_asked(output, options)
        return _summary(output, ids, selected, 0, began)
    slices = slices_per_volume(source, settings)
    with _client(cluster) as client:
        if progress and (link := dashboard_link(client)):  # where it listens, as bound
            print(f"raptorz embed: dashboard at {link}", file=sys.stderr)
        if torch_threads is None:
            share_cpus(client)
        resources = {GPU_RESOURCE: TASK_GPU_SHARE} if advertises_gpus(client) else None
        info = _load_encoders(client, options, resources)
        template = embeddings_template(
            list(ids), plane_names=[PLANE_NAMES[p] for p in settings.planes], projectors=loaded,
            token_kind=token_kind_coordinate(info["num_tokens"], info["num_prefix_tokens"],
                                   tokens=settings.tokens),
            embed_dim=info["embed_dim"], keep_tokens=settings.keep_tokens,
            attrs={**attrs, "encoder": info},
            regions=None if request is None else attrs["regions"]["labels"],
        )
        create_embeddings(output, template)
        todo = volumes_to_do(volumes, output, selected)  # another process may have done some
        topic = f"raptorz-progress-{uuid.uuid4().hex}"
        tasks = [EmbedTask(str(volumes), str(output), span.start, span.stop,
                           tuple(int(i) for i in np.flatnonzero(todo[span]) + span.start),
                           options, settings, torch_threads, slices, topic, request)
                 for span in plan_tasks(todo, store_unit(output), slices,
                                    _expected_workers(client))]
        startup = time.perf_counter() - began
        used, halved = _run(client, tasks, resources, ids, total=int(selected.sum()),
                            done=int(selected.sum() - todo.sum()), progress=progress)
    if halved:
        print(f"raptorz embed: a batch ran out of device memory; batches of {used} were used",
              file=sys.stderr)
    return _summary(output, ids, selected, int(todo.sum()), began, batch_size=used,
                    startup=startup)


def _load_encoders(client: Client, options: EncoderOptions,
                   resources: dict[str, float] | None) -> dict[str, Any]:
    """Build the encoder on every connected worker at once; the first one's provenance.

    All during start-up, so that no worker spends the run importing torch and reading
    weights while the others encode, and a worker that cannot load it refuses before any
    task. Every worker's provenance is compared with the first's: a worker that differs
    (another GPU kind, say, without bf16) would write other embeddings, so it is retired
    and the run says which. A worker that joins later builds the encoder on its first
    task, which compares it with the store's.
    """
    tag = uuid.uuid4().hex[:8]
    workers: list[str | None] = [*client.scheduler_info(n_workers=-1)["workers"]] or [None]
    infos = client.gather([
        client.submit(encoder_provenance, options, resources=resources, pure=False,
                      workers=worker, allow_other_workers=True,  # a worker may leave
                      key=f"embed-load-encoder-{tag}-{n}")
        for n, worker in enumerate(workers)])
    refused = next((info for info in infos if "refused" in info), None)
    if refused is not None:
        raise RaptorzError(refused["refused"])
    differ = {info["worker"]: provenance_difference(info, infos[0]) for info in infos[1:]}
    differ = {worker: how for worker, how in differ.items() if how}
    for worker, how in differ.items():
        print(f"raptorz embed: worker {worker} differs from worker {infos[0]['worker']} "
              f"({how.replace('the store', 'that worker')}): it is retired", file=sys.stderr)
    if differ:
        client.retire_workers(workers=list(differ), close_workers=True)
    return {key: value for key, value in infos[0].items()
            if key not in ("worker", "device_kind")}


def _expected_workers(client: Client) -> int:
    """Workers the run can count on: those connected, or those a cluster will start."""
    connected = len(client.scheduler_info(n_workers=-1)["workers"])
    planned = len(getattr(client.cluster, "worker_spec", None) or {})
    return max(connected, planned, 1)


def _attrs(volumes: str | Path, source_attrs: dict[str, Any], settings: KernelSettings, *,
           projectors: Sequence[Projector]) -> dict[str, Any]:
    """Provenance attributes of a new embeddings store (the encoder's come from a worker)."""
    return {
        **stores.provenance(),
        "settings": dataclasses.asdict(settings),
        "projectors": {p.name: p.provenance() for p in projectors},
        "source": {"path": str(volumes), "attrs": source_attrs},
    }


@contextlib.contextmanager
def _client(cluster: Client | Cluster | str | Callable[[], Cluster] | None) -> Iterator[Client]:
    """A client for ``cluster``; a cluster started here lives only for the call."""
    if cluster is None:
        try:
            cluster = default_client()  # the active client, as dask's compute() uses
        except ValueError:
            cluster = functools.partial(create_cluster, "auto")
    if callable(cluster) and not isinstance(cluster, (Client, Cluster)):
        with cluster() as made, connect(made) as client:
            client.register_plugin(ExitOnClose())  # this call's cluster closes at once
            yield client
        return
    with connect(cluster) as client:
        yield client


def _run(client: Client, tasks: list[EmbedTask], resources: dict[str, float] | None,
         ids: np.ndarray, *, total: int, done: int,
         progress: bool) -> tuple[int | None, bool]:
    """Submit the tasks and follow them: the smallest batch size a task used, and whether
    a task ran out of device memory and halved its batches.

    A task that fails is retried by Dask on another worker; one that keeps failing
    leaves its volumes pending and its error is printed (a rerun retries them). A worker
    that retires (its device failed) hands its task to the others, and the run says so;
    once every worker has retired, the rest stays pending.
    """
    bar = ProgressBar(total, done, progress)
    bar.start(task.key for task in tasks)
    if progress and tasks:
        client.subscribe_topic(tasks[0].topic, bar.report)
    run = uuid.uuid4().hex[:8]
    futures = {client.submit(embed_task, task, resources=resources, pure=False, retries=2,
                             key=f"embed-{ids[task.start]}-{ids[task.stop - 1]}-{run}"):
               task for task in tasks}
    used: list[int] = []
    halved = False
    retired: set[str] = set()
    waiting, looked = as_completed(futures, loop=client.loop), time.monotonic()
    try:
        while not waiting.is_empty():
            finished = waiting.next_batch(block=False)
            if not finished:
                time.sleep(0.05)  # as_completed waits without a timeout: the run polls
            for future in finished:
                task = futures[future]
                if future.status == "error":
                    error = future.exception()
                    print(f"raptorz embed: a task failed and its {len(task.indices)} volumes "
                          f"stay pending ({type(error).__name__}: {error}); rerun to retry",
                          file=sys.stderr)
                else:
                    result = future.result()
                    used.append(result["batch_size"])
                    halved |= result["halved"]
                bar.finish(task.key, len(task.indices))
                future.release()
            if time.monotonic() - looked < RETIRED_POLL_SECONDS:
                continue
            looked = time.monotonic()
            if _new_retirements(client, tasks[0].topic, retired) and \
                    not client.scheduler_info(n_workers=-1)["workers"]:
                left = sum(len(futures[future].indices) for future in futures
                           if future.status == "pending")
                print(f"raptorz embed: every worker retired; {left} volumes stay pending; "
                      "rerun to retry", file=sys.stderr)
                client.cancel([future for future in futures if future.status == "pending"])
                break
    finally:
        if progress and tasks:
            client.unsubscribe_topic(tasks[0].topic)
        bar.close()
    return (min(used) if used else None), halved


def _new_retirements(client: Client, topic: str | None, retired: set[str]) -> bool:
    """Print the workers of this run that retired since the last look; whether any has."""
    for _, event in client.get_events(RETIRED_TOPIC):
        if event.get("run") == topic and event["worker"] not in retired:
            retired.add(event["worker"])
            print(f"raptorz embed: worker {event['worker']} retired: {event['problem']}; "
                  "its tasks go to the other workers", file=sys.stderr)
    return bool(retired)


def _summary(output: str | Path, ids: np.ndarray, selected: np.ndarray, computed: int,
             began: float, batch_size: int | None = None, startup: float = 0.0) -> EmbedSummary:
    status = (stores.read_status(output) if locations.exists(output)
              else np.zeros(len(ids), np.int8))
    failed = selected & (status == stores.FAILED)
    errors: dict[str, str] = {}
    if failed.any():
        error = EMBEDDINGS.read(output)["error"]
        errors = {str(ids[i]): str(error[int(i)].values) for i in np.flatnonzero(failed)}
    return EmbedSummary(output, int(selected.sum()), int((selected & (status == stores.OK)).sum()),
                        int(failed.sum()), computed, errors, time.perf_counter() - began,
                        batch_size, startup)
