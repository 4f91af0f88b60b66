"""Where the processes raptorz starts listen: loopback unless asked, TLS for batch jobs.

Each check starts a real cluster and reads the sockets its processes hold (psutil), so it
tests what listens rather than the arguments given.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import stat
import sys
from collections.abc import Iterator
from pathlib import Path

import dask.config
import psutil
import pytest
from distributed import Client
from distributed.deploy import Cluster
from distributed.security import Security

from raptorz.cluster import create_cluster
from raptorz.defaults import EMBED_WORKER_IMPORTS
from raptorz.errors import RaptorzWarning
from raptorz.network import dashboard_link

WORKER = f"{sys.executable} -m distributed.cli.dask_worker"


def _listening(pids: set[int]) -> set[tuple[str, int]]:
    """The (address, port) pairs on which the processes ``pids`` accept connections."""
    found = set()
    for pid in pids:
        for connection in psutil.Process(pid).net_connections(kind="inet"):
            if connection.status == psutil.CONN_LISTEN:
                found.add((connection.laddr.ip, connection.laddr.port))
    return found


def _cluster_pids(client: Client) -> set[int]:
    """This process (scheduler, nannies) and every process under it (workers, fork server)."""
    here = psutil.Process()
    pids = {here.pid, *(child.pid for child in here.children(recursive=True))}
    assert set(client.run(os.getpid).values()) <= pids  # the workers are among them
    return pids


def _port(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


def _assert_loopback_only(cluster: Cluster, client: Client) -> set[tuple[str, int]]:
    listening = _listening(_cluster_pids(client))
    exposed = {(ip, port) for ip, port in listening if not ipaddress.ip_address(ip).is_loopback}
    assert not exposed, f"listening beyond loopback: {sorted(exposed)}"
    ports = {port for _, port in listening}
    assert _port(cluster.scheduler_address) in ports  # the check saw the cluster itself
    assert {_port(w) for w in client.scheduler_info()["workers"]} <= ports
    return listening


@pytest.fixture
def gpu_visible(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A machine where a GPU is visible (the workers only carry their pinning)."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    yield


def test_gpu_path_listens_on_loopback_only(gpu_visible: None) -> None:
    """`raptorz embed` on a GPU machine without dask-cuda: the pinned cluster."""
    # forked from the worker server, as `raptorz embed` starts them (the server is one per
    # process: these are the imports every later cluster of this process gets)
    with create_cluster("auto", worker_imports=EMBED_WORKER_IMPORTS) as cluster, \
            Client(cluster) as client:
        client.wait_for_workers(1)
        assert set(client.run(os.getenv, "CUDA_VISIBLE_DEVICES").values()) == {"0"}
        listening = _assert_loopback_only(cluster, client)
        link = dashboard_link(client)
        assert link is not None and link.startswith("http://127.0.0.1:")
        assert ("127.0.0.1", _port(link.split("/status")[0])) in listening  # what is printed


def test_cpu_path_listens_on_loopback_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    with create_cluster("auto", workers=1) as cluster, Client(cluster) as client:
        client.wait_for_workers(1)
        _assert_loopback_only(cluster, client)
        assert dashboard_link(client) == f"http://127.0.0.1:{cluster.scheduler.http_server.port}" \
            "/status"


def test_a_switched_off_dashboard_is_off(gpu_visible: None) -> None:
    """``dashboard_address=None`` (as `raptorz convert` asks): no dashboard, not on 8787."""
    with create_cluster("cuda", dashboard_address=None) as cluster, Client(cluster) as client:
        client.wait_for_workers(1)
        listening = _assert_loopback_only(cluster, client)
        assert 8787 not in {port for _, port in listening}
        assert dashboard_link(client) is None


def test_exposing_the_cluster_is_explicit_and_said(gpu_visible: None) -> None:
    with pytest.warns(RaptorzWarning) as seen, \
            create_cluster("cuda", host="0.0.0.0", dashboard_address="0.0.0.0:0") as cluster, \
            Client(cluster) as client:
        client.wait_for_workers(1)
        listening = _listening(_cluster_pids(client))
        assert ("0.0.0.0", _port(cluster.scheduler_address)) in listening
        link = dashboard_link(client)
        assert link is not None and "every interface" in link
    said = sorted(str(warning.message) for warning in seen)
    assert len(said) == 2
    assert said[0].startswith("the Dask dashboard listens on 0.0.0.0 (every interface)")
    assert said[1].startswith("the Dask scheduler and workers listen on 0.0.0.0 (every ")
    assert said[1].endswith("can run code as you")


def test_the_command_line_passes_host_and_dashboard() -> None:
    from raptorz.cli.embed import _cluster
    from raptorz.cli.main import build_parser

    args = build_parser().parse_args(["embed", "v.zarr", "-o", "e.zarr", "--projector", "p.npy",
                                      "--host", "0.0.0.0", "--cluster", "cuda"])
    start = _cluster(args)
    assert getattr(start, "keywords", {})["host"] == "0.0.0.0"
    args = build_parser().parse_args(["embed", "v.zarr", "-o", "e.zarr", "--projector", "p.npy",
                                      "--cluster", "slurm", "--no-tls"])
    keywords = getattr(_cluster(args), "keywords", {})
    assert keywords["tls"] is False and keywords["host"] is None


pytest.importorskip("dask_jobqueue")


@pytest.fixture
def on_loopback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Batch clusters here reach their scheduler on lo, and write credentials to tmp_path."""
    monkeypatch.chdir(tmp_path)
    with dask.config.set({"jobqueue.slurm.interface": "lo"}):
        yield tmp_path


def test_batch_clusters_use_tls(on_loopback: Path) -> None:
    with create_cluster("slurm", jobs=0) as cluster:
        assert cluster.scheduler_address.startswith("tls://127.0.0.1:")
        script = cluster.job_script()
        worker = next(line for line in script.splitlines() if "dask_worker" in line)
        assert "--protocol tls://" in worker
        files = [worker.split(f"--tls-{key} ", 1)[1].split()[0] for key in ("ca-file", "key")]
        for file in files:  # in the shared folder, readable by this user only
            assert Path(file).parent == on_loopback
            assert stat.S_IMODE(Path(file).stat().st_mode) == 0o600
        # the dashboard stays on this machine (an ssh tunnel reaches it)
        assert ipaddress.ip_address(cluster.scheduler.http_server.address).is_loopback
        # a client with credentials of its own is refused, and so is one without TLS
        with pytest.raises(OSError):
            Client(cluster.scheduler_address, security=Security.temporary(), timeout="3s")
        with pytest.raises(OSError):
            Client(cluster.scheduler_address.replace("tls://", "tcp://"), timeout="3s")


@pytest.mark.slow
def test_a_job_joins_over_tls(on_loopback: Path) -> None:
    """The worker command of the job script, run here: it holds what it needs to join."""
    import shlex
    import subprocess

    with create_cluster("slurm", jobs=0, cores=1, memory="1GiB") as cluster, \
            Client(cluster) as client:
        line = next(x for x in cluster.job_script().splitlines() if "dask_worker" in x)
        worker = subprocess.Popen([*shlex.split(line), "--no-dashboard"])
        try:
            client.wait_for_workers(1, timeout=120)
            assert client.submit(sum, [1, 2]).result() == 3
        finally:
            worker.terminate()
            worker.wait(60)


def test_no_tls_is_a_choice_and_said(on_loopback: Path) -> None:
    with pytest.warns(RaptorzWarning, match="without TLS"), \
            create_cluster("slurm", jobs=0, tls=False) as cluster:
        assert cluster.scheduler_address.startswith("tcp://")
        assert "--tls-" not in cluster.job_script()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_site_scheduler_options_are_kept(on_loopback: Path) -> None:
    """The site's ``scheduler-options`` win over raptorz's defaults, the caller's over both."""
    site, mine = _free_port(), _free_port()
    with dask.config.set({"jobqueue.slurm.scheduler-options": {"port": site,
                                                                 "dashboard_address": ":0"}}):
        with create_cluster("slurm", jobs=0) as cluster:
            assert _port(cluster.scheduler_address) == site
            assert cluster.scheduler.http_server.port != 8787  # the site's dashboard port
            assert ipaddress.ip_address(cluster.scheduler.http_server.address).is_loopback
        with create_cluster("slurm", jobs=0, scheduler_options={"port": mine}) as cluster:
            assert _port(cluster.scheduler_address) == mine
