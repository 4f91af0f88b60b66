"""What each GPU worker is given: its share of the memory, its environment, its device."""

from __future__ import annotations

import importlib.util
import os
import sys
import textwrap
from pathlib import Path
from types import ModuleType

import pytest
from distributed import Client, LocalCluster
from distributed.system import MEMORY_LIMIT

from raptorz.cluster import (
    WORKERS_PER_HOST,
    create_cluster,
    pinned_gpu,
    share_cpus,
    visible_gpus,
)

UUIDS = ("GPU-6f1c2a40-0000-4000-8000-00000000000a", "GPU-6f1c2a40-0000-4000-8000-00000000000b")


def test_pinned_workers_get_their_share_of_the_memory() -> None:
    """As LocalCluster and LocalCUDACluster give: RAM / workers, whatever the threads."""
    with create_cluster("cuda", gpus=["0", "1"], dashboard_address=None) as cluster, \
            Client(cluster) as client:
        client.wait_for_workers(2)
        limits = [w["memory_limit"] for w in client.scheduler_info()["workers"].values()]
    assert limits == [MEMORY_LIMIT // 2] * 2


def test_gpu_jobs_request_memory_for_the_model(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("dask_jobqueue")
    monkeypatch.chdir(tmp_path)  # the jobs' TLS credentials are written here
    for gpus, memory in ((0, "--mem=4G"), (1, "--mem=16G"), (2, "--mem=32G")):
        with create_cluster("slurm", jobs=0, gpus_per_job=gpus,
                            dashboard_address=None) as cluster:
            assert f"#SBATCH {memory}" in cluster.job_script().splitlines()


def _stand_in_nvidia_smi(folder: Path) -> None:
    """An nvidia-smi that lists two GPUs: indices in PCI order, or their UUIDs."""
    smi = folder / "nvidia-smi"
    smi.write_text(textwrap.dedent(f"""\
        #!/bin/sh
        case "$*" in
          *--query-gpu=uuid*) printf '%s\\n' {UUIDS[0]} {UUIDS[1]} ;;
          *--query-gpu=index*) printf '0\\n1\\n' ;;
          *) exit 2 ;;
        esac
        """))
    smi.chmod(0o755)


def test_gpus_found_by_nvidia_smi_are_pinned_by_uuid(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """nvidia-smi numbers GPUs in PCI order, CUDA fastest first: a UUID names one GPU in
    both, so each worker gets, and records, the GPU that nvidia-smi listed."""
    _stand_in_nvidia_smi(tmp_path)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert visible_gpus() == list(UUIDS)
    with create_cluster("cuda", dashboard_address=None) as cluster, Client(cluster) as client:
        client.wait_for_workers(2)
        assert sorted(client.run(pinned_gpu).values()) == sorted(UUIDS)


def _stand_in_dask_cuda(folder: Path) -> ModuleType:
    """A LocalCUDACluster that, like dask-cuda's (local_cuda_cluster.py, new_worker_spec),
    replaces each worker spec's ``env`` with its own CUDA_VISIBLE_DEVICES rotation."""
    path = folder / "dask_cuda.py"
    path.write_text(textwrap.dedent("""\
        import copy

        from distributed import LocalCluster


        class LocalCUDACluster(LocalCluster):
            def __init__(self, CUDA_VISIBLE_DEVICES, threads_per_worker=1, **kwargs):
                self.cuda_visible_devices = list(CUDA_VISIBLE_DEVICES)
                super().__init__(n_workers=0, threads_per_worker=threads_per_worker,
                                 processes=True, **kwargs)
                self.scale(len(self.cuda_visible_devices))
                self.sync(self._correct_state)

            def new_worker_spec(self):
                name = min(set(self.cuda_visible_devices) - set(self.worker_spec))
                spec = copy.deepcopy(self.new_spec)
                i = self.cuda_visible_devices.index(name)
                devices = self.cuda_visible_devices[i:] + self.cuda_visible_devices[:i]
                spec["options"].update({"env": {"CUDA_VISIBLE_DEVICES": ",".join(devices)}})
                return {name: spec}
        """))
    spec = importlib.util.spec_from_file_location("dask_cuda", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_dask_cuda_workers_keep_their_share_of_the_cpus(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # in sys.modules for this test only: the other tests take the path without dask-cuda
    monkeypatch.setitem(sys.modules, "dask_cuda", _stand_in_dask_cuda(tmp_path))
    # a count inherited from a batch job's environment, which a nanny prefers to Dask's
    # configuration: the cluster's own count wins, and the job's is back afterwards
    monkeypatch.setenv(WORKERS_PER_HOST, "1")
    with create_cluster("cuda", gpus=["0", "1"], dashboard_address=None) as cluster, \
            Client(cluster) as client:
        assert type(cluster).__module__ == "dask_cuda"
        client.wait_for_workers(2)
        assert sorted(client.run(os.getenv, "CUDA_VISIBLE_DEVICES").values()) == ["0,1", "1,0"]
        assert set(client.run(os.getenv, WORKERS_PER_HOST).values()) == {"2"}
        assert {w["host"] for w in client.scheduler_info()["workers"].values()} == {"127.0.0.1"}
    assert os.environ[WORKERS_PER_HOST] == "1"


def test_sharing_the_cpus_of_in_process_workers_leaves_this_process_environment_alone(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A threads cluster's workers run in the client's process: their share must not leak
    into the clusters this process starts later."""
    monkeypatch.delenv(WORKERS_PER_HOST, raising=False)
    with LocalCluster(n_workers=2, processes=False, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        share_cpus(client)
    assert WORKERS_PER_HOST not in os.environ
    with create_cluster("local", workers=2, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        client.wait_for_workers(2)
        assert set(client.run(os.getenv, WORKERS_PER_HOST).values()) == {"2"}
