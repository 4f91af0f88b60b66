"""The README and the guides cannot rot: their commands parse, and those that can run here run.

Commands that need a GPU, a batch system or downloaded weights are checked against the
CLI's own parser; the README's main command (``raptorz demo``) and its tour run for real.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from raptorz.cli.main import build_parser

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
GUIDES = [README, *sorted((ROOT / "docs").glob("*.md"))]


def _blocks(path: Path, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", path.read_text(), flags=re.DOTALL)


def _commands(block: str) -> list[str]:
    """``raptorz`` command lines of a shell block (continuations joined, comments cut)."""
    commands = []
    # shell arithmetic and variables stand for numbers or paths the shell fills in
    block = re.sub(r"\$\(\([^)]*\)\)|\$\{?\w+\}?", "1", block.replace("\\\n", " "))
    for line in block.splitlines():
        for part in line.split("&&"):
            words = shlex.split(part, comments=True)
            while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):  # VAR=value raptorz ...
                words = words[1:]
            if words[:1] == ["raptorz"]:
                commands.append(shlex.join(words))
    return commands


def _all_commands() -> list[tuple[str, str]]:
    return [(path.name, command) for path in GUIDES for block in _blocks(path, "bash")
            for command in _commands(block)]


@pytest.mark.parametrize(("guide", "command"), _all_commands())
def test_documented_commands_parse(guide: str, command: str) -> None:
    try:
        build_parser().parse_args(shlex.split(command)[1:])
    except SystemExit as error:
        pytest.fail(f"{guide}: `{command}` is refused by the CLI's parser (exit {error.code})")


def _python_blocks() -> list[tuple[str, str]]:
    return [(path.name, block) for path in GUIDES for block in _blocks(path, "python")]


def test_the_guides_show_python() -> None:
    assert {guide for guide, _ in _python_blocks()} >= {"README.md", "embed.md", "fit.md"}


#: Calls that start Dask worker processes (convert's may): in a script they must sit under
#: ``if __name__ == "__main__":``, since each worker imports the script again.
STARTS_WORKERS = {"embed", "convert", "Client", "LocalCluster"}


@pytest.mark.parametrize(("guide", "block"), _python_blocks())
def test_documented_scripts_start_workers_under_a_main_guard(guide: str, block: str) -> None:
    unguarded = [ast.unparse(node) for statement in ast.parse(block).body
                 if not isinstance(statement, ast.If)
                 for node in ast.walk(statement) if isinstance(node, ast.Call)
                 and (getattr(node.func, "attr", None) or getattr(node.func, "id", None))
                 in STARTS_WORKERS]
    assert not unguarded, f"{guide}: put these under if __name__ == '__main__': {unguarded}"


@pytest.mark.parametrize(("guide", "block"), _python_blocks())
def test_documented_python_names_exist(guide: str, block: str) -> None:
    """Each Python example compiles, and every raptorz name it uses exists where it says."""
    import importlib

    import raptorz

    tree = ast.parse(block, filename=guide)  # a syntax error fails here
    missing = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("raptorz"):
            module = importlib.import_module(str(node.module))
            missing += [f"{node.module}.{alias.name}" for alias in node.names
                        if not hasattr(module, alias.name)]
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and \
                node.value.id == "raptorz" and not hasattr(raptorz, node.attr):
            missing.append(f"raptorz.{node.attr}")
    assert not missing, f"{guide}: the example uses names that do not exist: {missing}"


def test_ci_runs_the_readme_test_command() -> None:
    setup = _blocks(README, "bash")[0].splitlines()
    assert len(setup) == 2
    assert setup[0].endswith("raptorz demo")
    assert setup[1].split("&&")[-1].split()[0] == "pytest"
    ci = (ROOT / ".ci" / "run").read_text()
    pattern = re.search(r"grep -m1 -E '(.+?)' README.md", ci)
    assert pattern is not None
    matches = [line for line in README.read_text().splitlines()
               if re.search(pattern.group(1), line)]
    assert matches[0] == setup[1]


def test_readme_jobqueue_config_asks_for_a_gpu(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from raptorz.cluster import create_cluster

    monkeypatch.chdir(tmp_path)  # its relative log-directory is created on start

    config = tmp_path / "jobqueue.yaml"
    config.write_text(_blocks(README, "yaml")[0])
    with create_cluster("slurm", config=config, jobs=0, dashboard_address=":0") as cluster:
        script = cluster.job_script()
    assert "#SBATCH --gres=gpu:1" in script
    assert "#SBATCH --constraint=a100" in script
    assert "--resources GPU=1" in script
    assert "source /path/to/raptorz/.venv/bin/activate" in script


def _offline(tmp_path: Path) -> dict[str, str]:
    """This environment, offline and with an empty Hugging Face cache: the same situation
    on every machine, whatever it has cached or can reach."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    return {**env, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "empty-hf-home")}


def _run(command: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    words = shlex.split(command)
    raptorz = [sys.executable, "-m", "raptorz.cli.main"]
    return subprocess.run([*raptorz, *words[1:]], cwd=cwd, capture_output=True, text=True,
                          timeout=1200, check=False, env=env)


@pytest.mark.slow
def test_readme_main_command_and_tour_run(tmp_path: Path) -> None:
    demo = _blocks(README, "bash")[0].splitlines()[0].split("&&")[-1].strip()
    env = _offline(tmp_path)
    result = _run(demo, tmp_path, env)
    assert result.returncode == 0, result.stderr[-3000:]
    for line in ("dashboard:", "volumes:", "embeddings:", "results:"):
        assert line in result.stdout
    # offline with an empty cache, the demo must say that its weights are random
    assert ("weights:     not in the Hugging Face cache and the hub is out of reach; using "
            "seeded RANDOM weights") in result.stdout
    assert "note:        random encoder weights" in result.stdout
    workdir = tmp_path / "raptorz-demo"
    assert (workdir / "results" / "metrics.json").is_file()
    # the store records the projector's seed, as the README says of every projected store
    projectors = json.loads((workdir / "embeddings.zarr" / "zarr.json").read_text())[
        "attributes"]["projectors"]
    assert [p["seed"] for p in projectors.values()] == [0], projectors
    # the task is solved well above chance, even by random weights
    value, low, chance = _score(result.stdout)
    assert value >= 0.85 and low > 0.6 and value - chance >= 0.25, result.stdout
    tour = _commands(_blocks(README, "bash")[1])
    assert len(tour) == 11
    for command in tour:
        result = _run(command, tmp_path, env)
        assert result.returncode == 0, f"`{command}`: {result.stderr[-3000:]}"
    assert len(list((tmp_path / "embs").rglob("*.npy"))) == 2 * 80  # two projectors, 80 volumes
    assert (tmp_path / "results-mlp" / "metrics.json").is_file()
    assert (tmp_path / "predictions.csv").read_text().startswith("id")
    scores = (tmp_path / "scores" / "scores.csv").read_text().splitlines()
    assert [line.split(",")[0] for line in scores[1:]] == ["linear", "mlp", "voxels"]
    assert len((tmp_path / "sweep" / "runs.csv").read_text().splitlines()) == 1 + 2 * 2 * 2
    # the tour added a projector to the demo's store: a rerun resumes (nothing embedded
    # again) and fits the demo's own projector to the same score
    again = _run(demo, tmp_path, env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert _score(again.stdout) == (value, low, chance)
    assert " 0 embedded by this run" in again.stdout, again.stdout
    assert "(0 converted, 0 failed, 80 already done)" in again.stdout, again.stdout


def _score(stdout: str) -> tuple[float, float, float]:
    """The demo's test AUROC, the low end of its interval and the shuffled-label AUROC."""
    found = re.search(r"^score: +test AUROC ([\d.]+) \[([\d.]+), [\d.]+\]; on shuffled "
                      r"labels ([\d.]+)$", stdout, flags=re.MULTILINE)
    assert found, stdout
    value, low, chance = map(float, found.groups())
    return value, low, chance
