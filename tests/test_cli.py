"""The command line's own behaviour: help, version, refusal of unknown verbs."""

from __future__ import annotations

import subprocess
import sys

import pytest

from raptorz import __version__
from raptorz.cli.main import build_parser, main


def test_version_is_printed(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert __version__ in capsys.readouterr().out


def test_every_verb_has_help(capsys: pytest.CaptureFixture[str]) -> None:
    parser = build_parser()
    verbs = parser._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    for verb in verbs:
        with pytest.raises(SystemExit) as exit_info:
            main([verb, "--help"])
        assert exit_info.value.code == 0
        assert verb in capsys.readouterr().out


def test_console_script_runs() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "raptorz.cli.main", "--help"],
        capture_output=True, text=True, check=False,
    )
    assert result.returncode == 0
    assert "raptorz" in result.stdout
