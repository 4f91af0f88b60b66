"""The command line's own behaviour: help, version, refusal of unknown verbs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from raptorz import __version__
from raptorz.cli.main import VERBS, build_parser, main

#: The installed console script, beside this interpreter (the venv's bin/).
CONSOLE = Path(sys.executable).with_name("raptorz")


def test_version_is_printed(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"raptorz {__version__}"


@pytest.mark.parametrize("verb", VERBS)
def test_every_verb_has_help_with_a_description_and_options(
        verb: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([verb, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith(f"usage: raptorz {verb} ")
    subparser = build_parser()._subparsers._group_actions[0].choices[verb]  # type: ignore
    assert subparser.description, f"raptorz {verb} --help has no description"
    options = [a for a in subparser._actions if a.dest != "help"]
    assert options, f"raptorz {verb} takes no option"
    for action in options:  # every option and argument is shown, with its help text
        shown = action.option_strings[0] if action.option_strings else action.metavar or \
            action.dest
        assert str(shown) in text, f"raptorz {verb} --help does not show {shown}"
        assert action.help, f"raptorz {verb}: {shown} has no help text"
    assert "%%" not in text and "%(" not in text  # argparse formatting left unformatted


def test_the_installed_command_lists_every_verb_and_refuses_an_unknown_one() -> None:
    assert CONSOLE.exists(), f"no console script at {CONSOLE}: pip install the package"
    shown = subprocess.run([str(CONSOLE), "--help"], capture_output=True, text=True,
                           timeout=120, check=False)
    assert shown.returncode == 0, shown.stderr
    listed = [line.split()[0] for line in shown.stdout.split("positional arguments:")[1]
              .split("options:")[0].splitlines() if line.startswith("    ") and
              not line.startswith("     ")]
    assert listed == list(VERBS)
    refused = subprocess.run([str(CONSOLE), "frobnicate"], capture_output=True, text=True,
                             timeout=120, check=False)
    assert refused.returncode == 2
    assert "invalid choice: 'frobnicate'" in refused.stderr


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


def test_a_weights_file_named_random_is_a_file(tmp_path: Path) -> None:
    """``--weights random`` asks for random weights; ``--weights ./random`` loads the file."""
    from raptorz.embedding.planning import weights_option

    args = build_parser().parse_args(["embed", "v.zarr", "-o", "e.zarr", "--projector",
                                      "p.npy", "--weights", "random"])
    assert weights_option(args.weights) == "random"
    args = build_parser().parse_args(["embed", "v.zarr", "-o", "e.zarr", "--projector",
                                      "p.npy", "--weights", "./random"])
    assert weights_option(args.weights) == str(Path("random").resolve())
    assert weights_option(tmp_path / "random") == str(tmp_path / "random")


def test_the_command_prints_each_warning_once_on_one_line(tmp_path: Path) -> None:
    images = np.random.default_rng(0).integers(0, 255, (3, 8, 8, 8), np.uint8)
    images[1] = 7  # a constant volume: converted, with a warning
    np.savez(tmp_path / "m.npz", train_images=images, train_labels=np.zeros((3, 1)),
             val_images=images[:0], val_labels=np.zeros((0, 1)), test_images=images[:0],
             test_labels=np.zeros((0, 1)))
    result = subprocess.run([str(CONSOLE), "convert", str(tmp_path / "m.npz"), "-o",
                             str(tmp_path / "m.zarr")], capture_output=True, text=True,
                            timeout=300, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines() == [
        "raptorz convert: warning: train_1: constant volume (every voxel is 7); converted"]


def _scorable(folder: Path) -> tuple[Path, Path]:
    """A labels CSV and one model's predictions of its test split."""
    rng = np.random.default_rng(0)
    ids = [f"v{i}" for i in range(30)]
    truth = rng.integers(0, 2, 30)
    rows = [f"{i},{'train' if n < 10 else 'test'},{t}" for n, (i, t) in
            enumerate(zip(ids, truth, strict=True))]
    (folder / "labels.csv").write_text("id,split,sex\n" + "\n".join(rows) + "\n")
    p1 = rng.random(20)
    (folder / "p.csv").write_text("id,sex_0,sex_1\n" + "\n".join(
        f"{i},{1 - p},{p}" for i, p in zip(ids[10:], p1, strict=True)) + "\n")
    return folder / "labels.csv", folder / "p.csv"


def test_score_refuses_two_models_of_one_name(tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    labels, predictions = _scorable(tmp_path)
    code = main(["score", f"a={predictions}", f"a={predictions}", "--labels", str(labels),
                 "--bootstrap", "5", "-o", str(tmp_path / "scores")])
    assert code == 2
    assert "given more than once: a" in capsys.readouterr().err
    assert not (tmp_path / "scores").exists()


def test_an_output_that_is_a_file_is_refused_naming_it(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Not a traceback and exit 1 ("some volumes failed"), but the path and exit 2."""
    labels, predictions = _scorable(tmp_path)
    code = main(["score", f"a={predictions}", "--labels", str(labels), "--bootstrap", "5",
                 "-o", str(labels)])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("raptorz score: error: ") and str(labels) in err
    assert "Traceback" not in err


def test_no_workers_is_refused_before_anything_starts(
        capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["embed", "v.zarr", "-o", "e.zarr", "--workers", "0"])
    assert exit_.value.code == 2
    assert "--workers: must be at least 1, not 0" in capsys.readouterr().err


def test_score_names_its_metric(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    labels, predictions = _scorable(tmp_path)
    for metric, named in (("r2", "squared Pearson r"), ("auroc", "AUROC")):
        assert main(["score", f"a={predictions}", "--labels", str(labels), "--bootstrap",
                     "5", "--metric", metric, "-o", str(tmp_path / metric)]) == 0
        assert capsys.readouterr().out.startswith(named)
