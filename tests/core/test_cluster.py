"""Cluster factory: GPU pinning on real worker processes, discovery, jobqueue config."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from distributed import Client, LocalCluster, Nanny, Scheduler, SpecCluster

from raptorz.cluster import (
    GPU_RESOURCE,
    WORKERS_PER_HOST,
    advertises_gpus,
    connect,
    create_cluster,
    pinned_gpu,
    visible_gpus,
    worker_device,
)
from raptorz.errors import InputError, RaptorzError, RaptorzWarning


def test_cuda_cluster_pins_one_device_per_worker() -> None:
    # No CUDA is touched: the workers only carry their pinning, checked in each process.
    with create_cluster("cuda", gpus=["0", "1"], dashboard_address=":0") as cluster, \
            Client(cluster) as client:
        client.wait_for_workers(2)
        seen = client.run(os.getenv, "CUDA_VISIBLE_DEVICES")
        pids = client.run(os.getpid)
        assert sorted(seen.values()) == ["0", "1"]
        assert len(set(pids.values())) == 2 and os.getpid() not in pids.values()
        assert advertises_gpus(client)
        resources = [w["resources"] for w in client.scheduler_info()["workers"].values()]
        assert resources == [{GPU_RESOURCE: 1}] * 2


def test_local_cluster_has_no_gpu_resource() -> None:
    with create_cluster("local", workers=2, dashboard_address=":0") as cluster, \
            connect(cluster) as client:
        client.wait_for_workers(2)
        assert len(client.scheduler_info()["workers"]) == 2
        assert not advertises_gpus(client)
        with connect(client) as same:  # an existing client is used as is, left open
            assert same is client
        assert client.status == "running"


def _imported(modules: tuple[str, ...]) -> bool:
    return all(name in sys.modules for name in modules)


def _cuda_initialised() -> bool:
    import torch

    return bool(torch.cuda.is_initialized())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="a Linux fork server")
def test_workers_start_with_their_imports_forked_from_one_server() -> None:
    """What ``raptorz embed`` starts: workers ready to encode, torch imported once."""
    modules = ("raptorz.embedding.worker", "torch", "timm")
    with create_cluster("local", workers=2, worker_imports=modules,
                        dashboard_address=":0") as cluster, Client(cluster) as client:
        client.wait_for_workers(2)
        assert all(client.run(_imported, modules).values())  # before any task
        parents = set(client.run(os.getppid).values())
        assert len(parents) == 1 and os.getpid() not in parents  # forked by the server
        assert set(client.run(os.getenv, WORKERS_PER_HOST).values()) == {"2"}
    with create_cluster("cuda", gpus=["0", "1"], worker_imports=modules,
                        dashboard_address=":0") as cluster, Client(cluster) as client:
        client.wait_for_workers(2)
        assert sorted(client.run(os.getenv, "CUDA_VISIBLE_DEVICES").values()) == ["0", "1"]
        assert set(client.run(os.getppid).values()) == parents  # the same server, reused
        # torch was imported before the fork, CUDA never initialised: each worker's own
        # CUDA_VISIBLE_DEVICES still decides its device
        assert not any(client.run(_cuda_initialised).values())
    with create_cluster("local", workers=1, dashboard_address=":0") as cluster, \
            Client(cluster) as client:  # the default: spawned, nothing imported ahead
        client.wait_for_workers(1)
        assert not any(client.run(_imported, ("timm",)).values())
        assert set(client.run(os.getppid).values()) == {os.getpid()}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="a Linux fork server")
def test_the_worker_server_ends_without_tearing_its_imports_down(tmp_path: Path) -> None:
    """The server holds the command's stdout and stderr; its teardown (torch, timm, Dask)
    made a caller that reads the output to its end wait 1.5 s after the command ended."""
    (tmp_path / "teardown_marker.py").write_text(textwrap.dedent("""
        import atexit, pathlib
        here = pathlib.Path(__file__).parent
        (here / "imported").touch()
        atexit.register((here / "exit_handler_ran").touch)

        class Module:
            def __del__(self):  # runs when the interpreter tears this module down
                (here / "torn_down").touch()

        held = Module()
    """))
    command = textwrap.dedent("""
        from multiprocessing import get_context
        from raptorz.cluster import start_worker_server
        assert start_worker_server(imports=("teardown_marker",))
        # a forked child: the server has imported its modules and serves
        child = get_context("forkserver").Process(target=print)
        child.start(); child.join()
        print("server up")
    """)
    done = subprocess.run([sys.executable, "-c", command], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(tmp_path)}, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "server up" in done.stdout and "leaked" not in done.stderr
    # the output was read to its end, so the server, which held it, is gone: it ran its
    # modules' exit handlers, and ended before tearing them down
    assert (tmp_path / "imported").exists() and (tmp_path / "exit_handler_ran").exists()
    assert not (tmp_path / "torn_down").exists()


@pytest.mark.slow
def test_preload_pins_the_workers_of_a_multi_gpu_job() -> None:
    """What a job with --gpus-per-job 2 runs: one worker per GPU, each pinned."""
    with LocalCluster(n_workers=0, dashboard_address=":0") as cluster, \
            Client(cluster) as client:
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": "3,5"}
        worker = subprocess.Popen(
            [sys.executable, "-m", "distributed.cli.dask_worker", cluster.scheduler_address,
             "--nworkers", "2", "--nthreads", "1", "--name", "job7", "--resources", "GPU=1",
             "--preload", "raptorz.batch", "--no-dashboard"], env=env)
        try:
            client.wait_for_workers(2, timeout=120)
            assert sorted(client.run(os.getenv, "CUDA_VISIBLE_DEVICES").values()) == ["3", "5"]
        finally:
            worker.terminate()
            worker.wait(60)


def test_visible_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2, 3")
    assert visible_gpus() == ["2", "3"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "-1")
    assert visible_gpus() == []
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert visible_gpus() == []
    with pytest.raises(RaptorzError, match="no GPU found"):
        create_cluster("cuda")


def test_refusals(tmp_path: Path) -> None:
    with pytest.raises(RaptorzError, match="unknown cluster kind"):
        create_cluster("kubernetes")  # type: ignore[arg-type]
    bad = tmp_path / "jobqueue.yaml"
    bad.write_text("distributed: {}\n")
    with pytest.raises(InputError, match="no 'jobqueue:' section"):
        create_cluster("slurm", config=bad, jobs=0)


def test_local_workers_take_the_gpus_in_turn() -> None:
    """`--cluster local` on a GPU machine: never every worker on cuda:0."""
    with create_cluster("local", workers=3, gpus=["0", "1"], dashboard_address=":0") \
            as cluster, Client(cluster) as client:
        client.wait_for_workers(3)
        assert sorted(client.run(os.getenv, "CUDA_VISIBLE_DEVICES").values()) == ["0", "0", "1"]
        assert sorted(client.run(os.getenv, WORKERS_PER_HOST).values()) == ["3"] * 3


def _device_and_gpu() -> tuple[str, str | None]:
    return worker_device(), pinned_gpu()


def test_each_worker_uses_its_own_device_with_rotated_lists() -> None:
    """dask-cuda gives worker i the list rotated by i ("0,1", "1,0"): cuda:0 is then
    physical GPU 0 for one worker and GPU 1 for the other. Checked by the code that
    decides it, in real worker processes, without CUDA."""
    spec = {f"w{i}": {"cls": Nanny, "options": {
        "nthreads": 1, "resources": {GPU_RESOURCE: 1},
        "env": {"CUDA_VISIBLE_DEVICES": devices}}}
        for i, devices in enumerate(["0,1", "1,0"])}
    with SpecCluster(workers=spec, scheduler={"cls": Scheduler, "options": {
            "dashboard_address": ":0"}}) as cluster, Client(cluster) as client:
        client.wait_for_workers(2)
        seen = sorted(client.submit(_device_and_gpu, workers=[w], pure=False).result()
                      for w in client.scheduler_info()["workers"])  # as in a task
    assert seen == [("cuda:0", "0"), ("cuda:0", "1")]


def test_a_gpu_worker_without_a_device_list_is_refused() -> None:
    """A batch job that offers GPU=1 but no CUDA_VISIBLE_DEVICES: refuse, never guess."""
    env = {"CUDA_VISIBLE_DEVICES": ""}
    with LocalCluster(n_workers=1, threads_per_worker=1, resources={GPU_RESOURCE: 1},
                      dashboard_address=":0", env=env) as cluster, Client(cluster) as client, \
            pytest.raises(RaptorzError, match="no device list"):
        client.submit(worker_device, resources={GPU_RESOURCE: 1}).result()
    assert worker_device() in ("cpu", "cuda:0")  # outside a GPU worker: no refusal


def test_a_failing_nvidia_smi_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    smi = tmp_path / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho 'NVIDIA-SMI has failed: driver mismatch' >&2\nexit 9\n")
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    with pytest.warns(RaptorzWarning, match="nvidia-smi is installed but failed.*mismatch"):
        assert visible_gpus() == []
