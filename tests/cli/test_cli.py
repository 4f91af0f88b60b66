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


def test_parser_imports_no_heavy_library() -> None:
    # A snappy CLI: building the parser (every verb's help and defaults) loads neither
    # torch nor the Dask / xarray / Zarr stack; each verb imports them in its run().
    heavy = ("torch", "timm", "dask", "distributed", "xarray", "zarr")
    code = ("import sys\n"
            "from raptorz.cli.main import build_parser\n"
            "build_parser()\n"
            f"print(','.join(m for m in {heavy!r} if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "", f"heavy modules imported: {result.stdout.strip()}"
