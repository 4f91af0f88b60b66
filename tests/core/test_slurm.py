"""HPC clusters through dask-jobqueue: the job scripts it writes, and a real SLURM run."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from raptorz import stores
from raptorz.cluster import create_cluster
from raptorz.embedding.encoders import create_encoder
from raptorz.embedding.kernel import embed_block
from raptorz.embedding.projection import create_projector
from raptorz.embedding.settings import KernelSettings
from raptorz.ingest.volumes import convert
from raptorz.layouts import open_embeddings, open_volumes

pytest.importorskip("dask_jobqueue")

START_SLURM = Path(__file__).resolve().parents[3] / "shared" / "tools" / "start-local-slurm.sh"
WORKER = f"{sys.executable} -m distributed.cli.dask_worker"


@pytest.fixture(autouse=True)
def _credentials_in_tmp_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The jobs' TLS credentials are written to the working directory: not the checkout."""
    monkeypatch.chdir(tmp_path)


def _script(kind: str, **options: object) -> str:
    with create_cluster(kind, jobs=0, dashboard_address=":0",  # type: ignore[arg-type]
                        **options) as cluster:
        return str(cluster.job_script())


def test_slurm_job_script_requests_the_gpu() -> None:
    script = _script("slurm", queue="gpu", account="lab", walltime="02:00:00", cores=8,
                     memory="32GiB", gpus_per_job=1, job_extra=["--constraint=a100"],
                     job_script_prologue=["source /opt/env/bin/activate"])
    lines = script.splitlines()
    for directive in ("#SBATCH -p gpu", "#SBATCH -A lab", "#SBATCH -t 02:00:00",
                      "#SBATCH --cpus-per-task=8", "#SBATCH --gres=gpu:1",
                      "#SBATCH --constraint=a100"):
        assert directive in lines, script
    assert "source /opt/env/bin/activate" in lines
    worker = next(line for line in lines if "dask_worker" in line)
    assert worker.startswith(WORKER)  # this very environment's interpreter
    assert "--resources GPU=1" in worker and "--nworkers" not in worker  # one worker per job
    assert "--preload" not in worker


def test_pbs_job_script_requests_the_gpu() -> None:
    script = _script("pbs", queue="gpuq", account="lab", walltime="01:00:00", cores=4,
                     memory="16GiB", gpus_per_job=2)
    lines = script.splitlines()
    for directive in ("#PBS -q gpuq", "#PBS -A lab", "#PBS -l walltime=01:00:00",
                      "#PBS -l ngpus=2"):
        assert directive in lines, script
    worker = next(line for line in lines if "dask_worker" in line)
    # two GPUs: two worker processes, each pinned to one of them by the preload
    assert worker.startswith(WORKER)
    assert "--nworkers 2" in worker and "--resources GPU=1" in worker
    assert "--preload raptorz.batch" in worker


def test_sge_and_lsf_job_scripts() -> None:
    sge = _script("sge", queue="gpu.q", account="lab", gpus_per_job=1)
    assert "#$ -l gpu=1" in sge.splitlines() and "#$ -P lab" in sge.splitlines()
    lsf = _script("lsf", queue="gpu", gpus_per_job=1)
    assert '#BSUB -gpu "num=1"' in lsf.splitlines()
    cpu = _script("slurm", cores=2)
    assert "gres" not in cpu and "--resources" not in cpu


def test_jobqueue_config_file_and_flags(tmp_path: Path) -> None:
    config = tmp_path / "jobqueue.yaml"
    config.write_text(
        "jobqueue:\n"
        "  slurm:\n"
        "    queue: long\n"
        "    cores: 16\n"
        "    memory: 64GiB\n"
        "    walltime: '12:00:00'\n"
        "    job-extra-directives: ['--exclusive']\n"
    )
    script = _script("slurm", config=config, gpus_per_job=1, walltime="01:00:00")
    lines = script.splitlines()
    for directive in ("#SBATCH -p long", "#SBATCH --cpus-per-task=16", "#SBATCH --exclusive",
                      "#SBATCH --gres=gpu:1", "#SBATCH -t 01:00:00"):  # the flag wins
        assert directive in lines, script


def test_hpc_guide_config_makes_a_gpu_job(tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The complete configuration file of docs/hpc.md works as printed."""
    monkeypatch.chdir(tmp_path)  # its relative log-directory is created on start
    guide = (Path(__file__).resolve().parents[2] / "docs" / "hpc.md").read_text()
    config = tmp_path / "jobqueue.yaml"
    text = guide.split("```yaml\n", 1)[1].split("```", 1)[0]
    config.write_text(text.replace("interface: ib0", "interface: lo"))  # no InfiniBand here
    lines = _script("slurm", config=config).splitlines()
    for directive in ("#SBATCH -p gpu", "#SBATCH -A my-lab", "#SBATCH --gres=gpu:1",
                      "#SBATCH -t 08:00:00", "#SBATCH --cpus-per-task=8"):
        assert directive in lines
    worker = next(line for line in lines if "dask_worker" in line)
    assert "--resources GPU=1" in worker and "--lifetime 7h50m" in worker
    assert "export HF_HUB_OFFLINE=1" in lines


@pytest.fixture(scope="session")
def slurm() -> Iterator[dict[str, str]]:
    """A real single-node SLURM, started for the session and stopped after it."""
    if not START_SLURM.is_file():
        pytest.skip(f"{START_SLURM} not found")
    started = subprocess.run(["bash", str(START_SLURM)], capture_output=True, text=True,
                             timeout=900)
    if started.returncode != 0:
        pytest.fail(f"local SLURM did not start: {started.stderr[-2000:]}")
    env = dict(line.removeprefix("export ").split("=", 1)
               for line in started.stdout.splitlines() if line.startswith("export "))
    try:
        yield env
    finally:
        subprocess.run(["bash", str(START_SLURM), "stop"], capture_output=True, timeout=120)


@pytest.mark.slurm
@pytest.mark.slow
def test_embed_on_real_slurm_equals_local(slurm: dict[str, str], tmp_path: Path,
                                          tiny_vit_weights: tuple[str, Path]) -> None:
    images = np.random.default_rng(5).integers(0, 256, (4, 16, 16, 16), dtype=np.uint8)
    np.savez(tmp_path / "m.npz", train_images=images, train_labels=np.zeros((4, 1)),
             val_images=images[:0], val_labels=np.zeros((0, 1)),
             test_images=images[:0], test_labels=np.zeros((0, 1)))
    volumes = tmp_path / "volumes.zarr"
    convert([tmp_path / "m.npz"], volumes, chunk=2, workers=1)
    projector = create_projector(0, 64, 5, "p5")
    np.save(tmp_path / "p5.npy", projector.matrix)
    name, weights = tiny_vit_weights
    common = [sys.executable, "-m", "raptorz.cli.main", "embed", str(volumes),
              "--projector", str(tmp_path / "p5.npy"), "--encoder", name,
              "--weights", str(weights), "--keep-tokens", "--dashboard-address", ":0"]
    logs = tmp_path / "job-logs"
    env = {**os.environ, **slurm}
    on_slurm = subprocess.run(
        [*common, "-o", str(tmp_path / "slurm.zarr"), "--cluster", "slurm", "--jobs", "2",
         "--queue", slurm["LOCAL_SLURM_PARTITION"], "--cores", "1", "--memory", "2GiB",
         "--walltime", "00:20:00", "--job-log-dir", str(logs)],
        env=env, capture_output=True, text=True, timeout=900)
    assert on_slurm.returncode == 0, on_slurm.stderr
    assert any(logs.glob("*.err")), "no worker ran as a SLURM job"
    # what the same command computes locally: the kernel on the same volumes in this
    # process (no second command, no local cluster to start; the CLI's kernel defaults)
    local = embed_block(open_volumes(volumes)["volume"].values,
                        create_encoder(name, weights=weights, device="cpu"), [projector],
                        KernelSettings(keep_tokens=True))
    b = {"p5": local.projections["p5"], "tokens": local.tokens, "avgpool": local.avgpool}
    a = open_embeddings(tmp_path / "slurm.zarr")
    assert (stores.read_status(tmp_path / "slurm.zarr") == stores.OK).all()
    for variable in ("p5", "tokens", "avgpool"):
        # same kernel, same volumes; only the processes and batches differ (rtol 1e-5)
        np.testing.assert_allclose(a[variable].values, b[variable], rtol=1e-5, atol=1e-6,
                                   err_msg=variable)
