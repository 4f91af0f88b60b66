"""Tests that need ../shared/data say so, skip in a clone without it, and fail in CI.

Runs this project's own ``conftest.py`` in a pytester sandbox, where no ``shared/data``
lies beside the sandbox's root.
"""

from __future__ import annotations

from pathlib import Path

import pytest

CONFTEST = (Path(__file__).parent / "conftest.py").read_text()
INI = """[pytest]
addopts = --strict-markers
markers =
    requires_data: needs ../shared/data
"""
MARKED = """
import pytest

@pytest.mark.requires_data
def test_reads_real_scans(shared_data):
    assert (shared_data / "README.md").is_file()
"""


@pytest.fixture
def sandbox(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.makeconftest(CONFTEST)
    pytester.makeini(INI)
    assert not (pytester.path.parent / "shared" / "data").exists()
    return pytester


def test_missing_data_skips_in_a_clone(sandbox: pytest.Pytester,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CI", raising=False)
    sandbox.makepyfile(MARKED)
    result = sandbox.runpytest("-rs")
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(["*real data not found at*absent in a clone*"])


def test_missing_data_fails_in_ci(sandbox: pytest.Pytester,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "true")
    sandbox.makepyfile(MARKED)
    result = sandbox.runpytest()
    result.assert_outcomes(errors=1)  # failed in setup: the run fails, nothing is skipped
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(["*real data not found at*CI=true: CI must have it*"])


def test_unmarked_use_of_the_data_is_refused(sandbox: pytest.Pytester) -> None:
    sandbox.makepyfile("def test_sneaky(shared_data):\n    assert shared_data\n")
    result = sandbox.runpytest()
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*without @pytest.mark.requires_data*test_sneaky"])


@pytest.mark.requires_data
def test_the_data_is_here_when_present(shared_data: Path) -> None:
    assert (shared_data / "README.md").is_file()
