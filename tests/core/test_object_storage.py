"""Sources and stores in object storage: a real S3 server of the tests' own (moto's server
mode on 127.0.0.1), read and written through s3fs, with the credentials and endpoint in
the environment as a user's would be."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from unittest import mock

import dask
import numpy as np
import pandas as pd
import pytest
import zarr

from raptorz import locations, stores
from raptorz.downstream.fitting import FitSettings, fit
from raptorz.errors import InputError, RaptorzWarning
from raptorz.ingest.volumes import convert
from raptorz.layouts import open_embeddings, open_volumes

s3fs = pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.server")

BUCKET = "raptorz-tests"
URL = f"s3://{BUCKET}"
#: Float32 encoder, float64 pooling; a recomputed volume may be batched differently.
TOLERANCE = {"rtol": 1e-5, "atol": 1e-6}
SHAPE = (8, 8, 8)
COUNT = 8


@dataclasses.dataclass
class Server:
    """The S3 server's file system and every request it answered, in order."""

    fs: s3fs.S3FileSystem
    requests: list[tuple[str, str]]

    def since(self, start: int, method: str, pattern: str) -> list[str]:
        """The paths of the ``method`` requests from ``start`` on that match ``pattern``."""
        return [path for verb, path in self.requests[start:]
                if verb == method and re.search(pattern, path)]


class _Recorder(logging.Handler):
    """Keeps the request lines werkzeug logs as the server answers each request."""

    LINE = re.compile(r'"([A-Z]+) (\S+) HTTP/')

    def __init__(self, requests: list[tuple[str, str]]) -> None:
        super().__init__(logging.INFO)
        self.requests = requests

    def emit(self, record: logging.LogRecord) -> None:
        found = self.LINE.search(record.getMessage())
        if found:
            self.requests.append((found[1], found[2]))


@pytest.fixture(scope="module", autouse=True)
def s3() -> Iterator[Server]:
    """The server, its credentials and endpoint in the environment of this process and of
    the workers of the ``client`` fixture (started after it: autouse comes first)."""
    requests: list[tuple[str, str]] = []
    log = logging.getLogger("werkzeug")
    saved = log.level, log.propagate
    recorder = _Recorder(requests)
    log.setLevel(logging.INFO)
    log.propagate = False
    log.addHandler(recorder)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    environ = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
               "AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_DEFAULT_REGION": "us-east-1"}
    nanny = {**dask.config.get("distributed.nanny.environ", default={}), **environ}
    try:
        with mock.patch.dict(os.environ, environ), \
                dask.config.set({"distributed.nanny.environ": nanny}):
            fs = s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False)
            fs.mkdir(BUCKET)
            yield Server(fs, requests)
    finally:
        server.stop()
        log.removeHandler(recorder)
        log.setLevel(saved[0])
        log.propagate = saved[1]


@pytest.fixture(scope="module")
def scans(s3: Server, tmp_path_factory: pytest.TempPathFactory,
          volume: Callable[..., np.ndarray], write_nifti: Callable[..., Path]) -> Path:
    """NIfTI scans on disk, uploaded to ``s3://BUCKET/scans/`` too."""
    folder = tmp_path_factory.mktemp("scans")
    for i in range(COUNT):
        write_nifti(folder / f"scan{i}.nii.gz", volume(SHAPE, seed=i))
    s3.fs.put(f"{folder}/", f"{BUCKET}/scans/", recursive=True)
    return folder


@pytest.fixture(scope="module")
def converted(s3: Server, scans: Path, client: object,
              tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The scans converted from disk to disk, and from the bucket to the bucket on the
    cluster (one volume a chunk)."""
    local = tmp_path_factory.mktemp("local") / "volumes.zarr"
    convert([scans], local, chunk=1, workers=1)
    remote = f"{URL}/volumes.zarr"
    convert([f"{URL}/scans"], remote, chunk=1, cluster=client)
    return local, remote


@pytest.fixture(scope="module")
def reference(converted: tuple[Path, str], client: object,
              tmp_path_factory: pytest.TempPathFactory, tiny_vit_weights: tuple[str, Path],
              embed_tiny: Callable[..., object]) -> Path:
    """The volumes on disk embedded into a store on disk."""
    output = tmp_path_factory.mktemp("reference") / "embeddings.zarr"
    embed_tiny(converted[0], output, client, tiny_vit_weights)
    return output


@pytest.fixture(scope="module")
def embedded(s3: Server, converted: tuple[Path, str], client: object,
             tiny_vit_weights: tuple[str, Path], embed_tiny: Callable[..., object]
             ) -> tuple[str, Server]:
    """The bucket's volumes embedded into the bucket in one run, and the server with the
    requests of that run only."""
    output, start = f"{URL}/once.zarr", len(s3.requests)
    embed_tiny(converted[1], output, client, tiny_vit_weights)
    return output, Server(s3.fs, s3.requests[start:])


def test_convert_reads_a_bucket_and_writes_a_store_there(
        s3: Server, converted: tuple[Path, str]) -> None:
    local, remote = converted
    a, b = open_volumes(local), open_volumes(remote)
    assert a.id.values.tolist() == b.id.values.tolist() == [f"scan{i}" for i in range(COUNT)]
    np.testing.assert_array_equal(a.volume.values, b.volume.values)
    assert (b.status.values == stores.OK).all()
    assert b.source.values.tolist() == [f"{URL}/scans/scan{i}.nii.gz" for i in range(COUNT)]
    sizes = [s3.fs.info(f"{BUCKET}/scans/scan{i}.nii.gz")["size"] for i in range(COUNT)]
    assert b.source_size.values.tolist() == sizes and (b.source_mtime.values > 0).all()
    np.testing.assert_array_equal(a.checksum.values, b.checksum.values)


def test_a_resumed_convert_on_the_bucket_sees_a_changed_source(
        s3: Server, scans: Path, converted: tuple[Path, str], tmp_path: Path,
        volume: Callable[..., np.ndarray], write_nifti: Callable[..., Path]) -> None:
    remote = f"{URL}/resumed.zarr"
    s3.fs.copy(f"{BUCKET}/volumes.zarr", f"{BUCKET}/resumed.zarr", recursive=True)
    assert convert([f"{URL}/scans"], remote, chunk=1).skipped == COUNT
    changed = write_nifti(tmp_path / "scan3.nii.gz", volume(SHAPE, seed=99))
    s3.fs.put_file(str(changed), f"{BUCKET}/scans/scan3.nii.gz")
    try:
        with pytest.warns(RaptorzWarning, match="scan3.nii.gz: changed since converted"):
            convert([f"{URL}/scans"], remote, chunk=1)
        summary = convert([f"{URL}/scans"], remote, chunk=1, reconvert_changed=True)
        assert summary.converted == 1
        now, before = open_volumes(remote).volume.values, open_volumes(converted[0]).volume.values
        assert not np.array_equal(now[3], before[3])
        np.testing.assert_array_equal(np.delete(now, 3, 0), np.delete(before, 3, 0))
    finally:
        s3.fs.put_file(str(scans / "scan3.nii.gz"), f"{BUCKET}/scans/scan3.nii.gz")


def test_a_source_object_over_the_cap_is_refused_before_it_is_fetched(
        s3: Server, scans: Path, tmp_path: Path) -> None:
    start = len(s3.requests)
    summary = convert([f"{URL}/scans/scan0.nii.gz"], tmp_path / "v.zarr", shape=SHAPE,
                      max_volume_bytes=64, max_member_bytes=64)
    size = s3.fs.info(f"{BUCKET}/scans/scan0.nii.gz")["size"]
    assert summary.failures == {"scan0": f"{URL}/scans/scan0.nii.gz: holds {size} bytes, "
                                "over the 128 bytes a volume may take (raise "
                                "--max-volume-bytes for a genuine giant)"}
    assert not s3.since(start, "GET", r"scans/scan0\.nii\.gz$")


def test_missing_and_unreadable_urls_are_named(s3: Server, tmp_path: Path) -> None:
    with pytest.raises(InputError, match=f"{URL}/nothing-here/\\*.nii.gz: the pattern"):
        convert([f"{URL}/nothing-here/*.nii.gz"], tmp_path / "v.zarr")
    s3.fs.pipe_file(f"{BUCKET}/odd/notes.txt", b"not a scan")
    with pytest.raises(InputError, match=f"{URL}/odd: holds no file raptorz reads"):
        convert([f"{URL}/odd"], tmp_path / "v.zarr")


def test_a_bids_dataset_in_the_bucket_converts_as_on_disk(
        s3: Server, tmp_path: Path, volume: Callable[..., np.ndarray],
        write_nifti: Callable[..., Path]) -> None:
    root = tmp_path / "ds"
    (root / "sub-03" / "anat").mkdir(parents=True)
    (root / "dataset_description.json").write_text('{"Name": "tiny", "BIDSVersion": "1.9.0"}')
    (root / "T1w.json").write_text('{"MagneticFieldStrength": 3}')
    (root / "participants.tsv").write_text("participant_id\tage\nsub-01\t30\nsub-02\t41\n"
                                           "sub-03\t52\nsub-04\t63\n")
    for s in (1, 2, 3):
        anat = root / f"sub-{s:02d}" / "anat"
        anat.mkdir(parents=True, exist_ok=True)
        write_nifti(anat / f"sub-{s:02d}_T1w.nii.gz", volume(SHAPE, seed=s))
        (anat / f"sub-{s:02d}_T1w.json").write_text(f'{{"Manufacturer": "M{s}"}}')
    write_nifti(root / "sub-01" / "anat" / "sub-01_T2w.nii.gz", volume(SHAPE, seed=9))
    s3.fs.put(f"{root}/", f"{BUCKET}/ds/", recursive=True)
    unseen = r"participants.tsv: 1 subject\(s\) have no image matching suffix=T1w: sub-04"
    with pytest.warns(RaptorzWarning, match=unseen):
        here = convert([root], tmp_path / "here.zarr", bids="suffix=T1w", chunk=1)
    with pytest.warns(RaptorzWarning, match=f"^{URL}/ds/{unseen}"):
        there = convert([f"{URL}/ds"], f"{URL}/bids.zarr", bids="suffix=T1w", chunk=1)
    a, b = open_volumes(here.store), open_volumes(there.store)
    assert b.id.values.tolist() == a.id.values.tolist() == ["sub-01", "sub-02", "sub-03"]
    assert b.source.values.tolist() == [f"{URL}/ds/sub-0{s}/anat/sub-0{s}_T1w.nii.gz"
                                        for s in (1, 2, 3)]
    np.testing.assert_array_equal(a.volume.values, b.volume.values)
    assert there.labels == f"{URL}/bids.labels.csv"
    labels = s3.fs.cat_file(f"{BUCKET}/bids.labels.csv")
    assert labels == Path(here.labels).read_bytes() and b",M2" in labels  # a sidecar's fact


def _unit_writes(s3: Server, start: int, store: str, variables: tuple[str, ...]
                 ) -> list[tuple[str, int]]:
    """(variable, unit) of each chunk PUT into ``store`` since ``start``, in order."""
    found = []
    for path in s3.since(start, "PUT", rf"^/{BUCKET}/{store}/[^/]+/c/\d+"):
        name, unit = re.match(rf"^/{BUCKET}/{store}/([^/]+)/c/(\d+)", path).groups()
        if name in (*variables, "status"):
            found.append((name, int(unit)))
    return found


def _assert_data_before_status(writes: list[tuple[str, int]], variables: tuple[str, ...]
                               ) -> int:
    """Every status chunk PUT follows the PUTs of its unit's data chunks (since the unit's
    previous status): a unit is never committed before its data is in the bucket."""
    pending: dict[int, set[str]] = {}
    commits = 0
    for name, unit in writes:
        if name != "status":
            pending.setdefault(unit, set()).add(name)
            continue
        assert pending.get(unit, set()) == set(variables), \
            f"unit {unit}: status written before {set(variables) - pending.get(unit, set())}"
        pending[unit] = set()
        commits += 1
    return commits


def _wait_for_a_commit(s3: Server, start: int, output: str, running: Callable[[], bool]
                       ) -> bool:
    """Poll (20 ms) until a volume of ``output`` is OK (True) or ``running()`` turns False.

    The server runs in this process: a poll that asked it would take its time (and the
    GIL) from the run it watches. The status is read only after the server has answered a
    PUT of a status object since the last look, found in the request log.
    """
    status = rf"^/{BUCKET}/{re.escape(output.removeprefix(URL + '/'))}/status/"
    seen = start
    while running():
        end = len(s3.requests)
        if any(verb == "PUT" and re.search(status, path)
               for verb, path in s3.requests[seen:end]) and \
                s3.fs.exists(f"{output.removeprefix('s3://')}/status/zarr.json") and \
                (stores.read_status(output) == stores.OK).any():
            return True
        seen = end
        time.sleep(0.02)
    return False


@pytest.mark.slow
def test_embed_in_the_bucket_killed_and_resumed_equals_an_uninterrupted_run(
        s3: Server, converted: tuple[Path, str], client: object, tmp_path: Path,
        reference: Path, tiny_vit_weights: tuple[str, Path],
        embed_tiny: Callable[..., object], run_projectors: list[object]) -> None:
    remote = converted[1]
    output = f"{URL}/embeddings.zarr"
    name, weights = tiny_vit_weights
    projector = run_projectors[0]
    np.save(tmp_path / f"{projector.name}.npy", projector.matrix)  # type: ignore[attr-defined]
    command = [sys.executable, "-m", "raptorz.cli.main", "embed", remote, "-o", output,
               "--encoder", name, "--weights", str(weights), "--keep-tokens",
               "--batch-size", "32", "--projector", str(tmp_path / "p4.npy"),
               # one task at a time: the kill falls between two units' commits
               "--cluster", "local", "--workers", "1", "--threads", "1",
               "--dashboard-address", ":0"]
    start = len(s3.requests)
    run = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    if _wait_for_a_commit(s3, start, output, lambda: run.poll() is None):
        run.send_signal(signal.SIGKILL)
    run.wait(600)
    assert run.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    interrupted = stores.read_status(output)
    assert (interrupted != stores.FAILED).all() and not interrupted.all()
    variables = ("p4", "avgpool", "tokens")
    ok = np.flatnonzero(interrupted == stores.OK)
    a, b = open_embeddings(output), open_embeddings(reference)
    for variable in variables:  # what a killed run committed is whole
        np.testing.assert_allclose(a[variable].values[ok], b[variable].values[ok], **TOLERANCE)
    summary = embed_tiny(remote, output, client, tiny_vit_weights)
    assert summary.ok == COUNT and summary.computed <= COUNT - len(ok)  # type: ignore[attr-defined]
    a = open_embeddings(output)
    for variable in variables:
        np.testing.assert_allclose(a[variable].values, b[variable].values, **TOLERANCE)
    assert a.status.values.tolist() == b.status.values.tolist()
    commits = _assert_data_before_status(
        _unit_writes(s3, start, "embeddings.zarr", variables), variables)
    assert commits >= COUNT


@pytest.mark.slow
def test_embed_reads_each_volume_chunk_once_and_lists_no_bucket(
        embedded: tuple[str, Server]) -> None:
    s3, start = embedded[1], 0
    reads = Counter(s3.since(start, "GET", rf"^/{BUCKET}/volumes\.zarr/volume/c/"))
    assert len(reads) == COUNT and set(reads.values()) == {1}, reads
    listings = s3.since(start, "GET", r"[?&]list-type=2")
    assert listings and all(re.search(r"prefix=(volumes|once)\.zarr", p) for p in listings), \
        [p for p in listings if not re.search(r"prefix=(volumes|once)\.zarr", p)]


#: Most requests of the stores' metadata (a ``zarr.json``, GET or HEAD) per volume of the
#: ``embedded`` run, and most requests in all: each task reads the output's metadata once,
#: and once more as it commits. Measured: 18 and 56 (the store's creation is most of the
#: metadata); 231 and 331 when each task reopened the stores, every array's metadata
#: after a listing, for each read and write.
METADATA_PER_VOLUME, REQUESTS_PER_VOLUME = 25, 100


@pytest.mark.slow
def test_embed_reads_the_stores_metadata_a_few_times_per_volume(
        embedded: tuple[str, Server]) -> None:
    s3 = embedded[1]
    metadata = [path for verb, path in s3.requests if verb in ("GET", "HEAD") and
                re.search(rf"^/{BUCKET}/(once|volumes)\.zarr/([^?]+/)?zarr\.json", path)]
    counts = Counter(path.split("/")[2] for path in metadata)
    assert len(metadata) <= METADATA_PER_VOLUME * COUNT, \
        f"{len(metadata)} metadata requests ({dict(counts)}) of {len(s3.requests)}"
    assert len(s3.requests) <= REQUESTS_PER_VOLUME * COUNT, Counter(v for v, _ in s3.requests)


@pytest.mark.slow
def test_fit_reads_embeddings_and_labels_from_the_bucket(
        s3: Server, embedded: tuple[str, Server], reference: Path, tmp_path: Path) -> None:
    output = embedded[0]
    rows = ["id,split,label"] + [f"scan{i},{('train', 'train', 'val', 'test')[i % 4]},{i // 4}"
                                 for i in range(COUNT)]
    s3.fs.pipe_file(f"{BUCKET}/labels.csv", ("\n".join(rows) + "\n").encode())
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    settings = FitSettings(bootstrap=10)
    remote_fit = fit(output, f"{URL}/labels.csv", tmp_path / "remote", settings=settings)
    local_fit = fit(reference, tmp_path / "labels.csv", tmp_path / "local", settings=settings)
    pd.testing.assert_frame_equal(remote_fit.predictions, local_fit.predictions,
                                  check_exact=False, rtol=1e-4)


def test_the_lock_of_a_store_in_the_bucket_is_an_object_taken_in_turn(
        s3: Server, converted: tuple[Path, str]) -> None:
    _, remote = converted
    lock = f"{BUCKET}/volumes.zarr/{stores.LOCK_FILE}"
    with stores.store_lock(remote, "first"):
        assert b'"command": "first"' in s3.fs.cat_file(lock)
        with stores.store_lock(remote, "inner"):  # reentrant in one thread
            pass
        assert s3.fs.exists(lock)
    assert not s3.fs.exists(lock)
    s3.fs.pipe_file(lock, b'{"host": "elsewhere", "pid": 1, "command": "embed", '
                    b'"since": "2026-01-01T00:00:00"}')
    try:
        with pytest.warns(RaptorzWarning, match="held by elsewhere pid 1 \\(embed"), \
                pytest.raises(InputError, match="delete this object"), \
                stores.store_lock(remote, "second", timeout=0.5):
            pass
    finally:
        s3.fs.rm_file(lock)
    s3.fs.pipe_file(lock, json.dumps({  # a pid beyond Linux's largest: no process has it
        "host": socket.gethostname(), "pid": 2**22 + 7, "command": "gone", "since": "x"}).encode())
    with stores.store_lock(remote, "takes over", timeout=5):
        assert b"takes over" in s3.fs.cat_file(lock)
    assert zarr.open_group(remote, mode="r").attrs[stores.KIND_ATTR] == "volumes"
    assert locations.is_url(remote) and not locations.is_url(str(converted[0]))
