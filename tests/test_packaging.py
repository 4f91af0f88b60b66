"""The package as pip builds it, and its dependency floors.

The wheel holds every file of raptorz/ and cli/, CI runs the tests on the installed wheel,
a base install serves the Dask dashboard, and the floors are written once and checked:
``constraints-min.txt`` pins every ``>=`` bound of ``pyproject.toml`` (``.ci/min-versions``
installs exactly those).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import urllib.request
import zipfile
from pathlib import Path

import pytest
from packaging.version import Version

import raptorz
import raptorz.cli
from raptorz.cluster import create_cluster

ROOT = Path(__file__).resolve().parents[1]
#: Installed at another version by .ci/min-versions (see constraints-min.txt).
UNTESTED_FLOORS = {"torch", "torchvision"}


def _floors(text: str) -> dict[str, str]:
    """``name>=version`` requirements of pyproject.toml (extras dropped)."""
    return {name.lower(): floor for name, floor in
            re.findall(r'"([A-Za-z0-9_.-]+)(?:\[[^\]]*\])?>=([0-9][^",;]*)"', text)}


def _pins(text: str) -> dict[str, str]:
    return dict(re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)", text, flags=re.MULTILINE))


def test_constraints_pin_every_floor_of_pyproject() -> None:
    pyproject = (ROOT / "pyproject.toml").read_text()
    # the runtime dependencies and the hpc extra (tools and notebook extras float)
    block = re.search(r"^dependencies = \[(.*?)^\]", pyproject, re.DOTALL | re.MULTILINE)
    hpc = re.search(r"^hpc = \[(.*?)\]", pyproject, re.MULTILINE)
    assert block is not None and hpc is not None
    floors = _floors(block.group(1) + hpc.group(1))
    pins = _pins((ROOT / "constraints-min.txt").read_text())
    runtime = list(floors)
    assert len(runtime) == 21
    assert "numpy" in runtime and floors["numpy"] == "2.0"  # np.dtypes.StringDType
    for name in runtime:
        assert name in pins, f"{name} has a floor in pyproject.toml but no pin"
        if name not in UNTESTED_FLOORS:
            assert Version(pins[name]) == Version(floors[name]), name
    assert pins["distributed"] == pins["dask"]


def test_conda_environment_has_the_same_floors() -> None:
    floors = _floors((ROOT / "pyproject.toml").read_text())
    conda = dict(re.findall(r"^  - ([a-z0-9_.-]+)>=(\S+)", (ROOT / "environment.yml").read_text(),
                            flags=re.MULTILINE))
    conda["torch"] = conda.pop("pytorch")
    floors["distributed"] = floors["dask"]  # pip's dask[distributed]
    for name, floor in conda.items():
        assert Version(floor) == Version(floors[name]), name


def test_min_versions_script_is_not_part_of_ci_run() -> None:
    script = ROOT / ".ci" / "min-versions"
    assert script.stat().st_mode & 0o111
    assert "constraints-min.txt" in script.read_text()
    assert "min-versions" not in (ROOT / ".ci" / "run").read_text()


def _installed_paths() -> set[str]:
    """Where pip installs each file of raptorz/ and cli/ (``cli/`` is ``raptorz.cli``)."""
    paths = set()
    for folder, package in (("raptorz", "raptorz"), ("cli", "raptorz/cli")):
        for path in (ROOT / folder).rglob("*"):
            if path.is_file() and "__pycache__" not in path.parts:
                paths.add(f"{package}/{path.relative_to(ROOT / folder).as_posix()}")
    return paths


@pytest.mark.slow
def test_the_wheel_holds_every_file_of_the_packages(tmp_path: Path) -> None:
    # built from a copy: pip builds in the source tree, and the checkout stays as it is
    source = tmp_path / "source"
    for folder in ("raptorz", "cli"):
        shutil.copytree(ROOT / folder, source / folder,
                        ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps",
                             "--no-build-isolation", "--quiet", "--wheel-dir",
                             str(tmp_path / "dist"), str(source)],
                            capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    (wheel,) = (tmp_path / "dist").glob("raptorz-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        (entry_points,) = [name for name in names if name.endswith(".dist-info/entry_points.txt")]
        scripts = archive.read(entry_points).decode()
    packaged = {name for name in names if ".dist-info/" not in name}
    # a package left out of [tool.setuptools] packages, or a data file (the __init__.pyi
    # that lazy_loader reads at run time, say) that setuptools does not pick up
    assert packaged == _installed_paths(), \
        f"the wheel lacks {sorted(_installed_paths() - packaged)}; " \
        f"holds besides {sorted(packaged - _installed_paths())}"
    assert "raptorz = raptorz.cli.main:console" in scripts


def test_ci_runs_the_tests_on_the_installed_wheel() -> None:
    """CI installs with ``pip install ".[test]"`` (no ``-e``) and runs pytest in tests/: the
    tests and the processes they start import raptorz from site-packages, so a module the
    wheel leaves out fails them."""
    if os.environ.get("CI", "").lower() not in ("true", "1", "yes"):
        pytest.skip("CI=true only: developers test an editable install of the checkout")
    for module in (raptorz, raptorz.cli):
        assert module.__file__ is not None
        where = Path(module.__file__).resolve()
        assert not where.is_relative_to(ROOT / "raptorz") and \
            not where.is_relative_to(ROOT / "cli"), f"{module.__name__} imported from the " \
            f"checkout ({where}), not from the installed wheel: install with `pip install .`"
    # a process the tests start (python -c, python -m) puts its working directory first
    started = subprocess.run([sys.executable, "-c", "import raptorz.cli; print(raptorz.__file__)"],
                             capture_output=True, text=True, timeout=120, check=False)
    assert started.returncode == 0, started.stderr
    where = Path(started.stdout.strip()).resolve()
    # the source folders, not ROOT: CI's virtual environment lies in the checkout (.venv/)
    assert not where.is_relative_to(ROOT / "raptorz"), f"a test's `python -c` imported " \
        f"raptorz from the " \
        f"checkout ({where}): run pytest from tests/, not from the checkout's root"


def test_a_base_install_serves_the_dashboard() -> None:
    """The dashboard address every run prints answers: bokeh is a dependency, not an extra."""
    with create_cluster("local", workers=1, dashboard_address=":0") as cluster, \
            urllib.request.urlopen(cluster.dashboard_link, timeout=60) as page:
        served = page.read().decode()
    # without bokeh the address answers too, with "Dask needs bokeh>=3.1.0 for the dashboard"
    assert "Bokeh.embed" in served, served[:300]
