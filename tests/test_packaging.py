"""The dependency floors are written once and checked: ``constraints-min.txt`` pins every
``>=`` bound of ``pyproject.toml`` (``.ci/min-versions`` installs exactly those)."""

from __future__ import annotations

import re
from pathlib import Path

from packaging.version import Version

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
    assert len(runtime) == 17
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
