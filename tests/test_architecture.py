"""The import contracts in pyproject.toml hold, and each breaks when its rule is broken."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT = Path(sys.executable).with_name("lint-imports")
CONTRACTS = 5


@pytest.fixture(scope="module")
def lint() -> Path:
    """``lint-imports`` (a test extra): where it is missing, skip, except in CI: fail."""
    if LINT.exists():
        return LINT
    if os.environ.get("CI", "").lower() in ("true", "1", "yes"):
        pytest.fail("lint-imports is missing, and CI=true: CI must check the contracts",
                    pytrace=False)
    pytest.skip("import-linter is a test extra (pip install -e '.[test]')")


def _lint(lint: Path, root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(lint), "--no-cache", str(ROOT / "pyproject.toml")], cwd=root,
                          capture_output=True, text=True, timeout=120)


def test_the_checkout_keeps_every_contract(lint: Path) -> None:
    result = _lint(lint, ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{CONTRACTS} kept, 0 broken" in result.stdout


@pytest.mark.parametrize(("module", "line", "contract"), [
    ("raptorz/ingest/readers.py", "import raptorz.embedding.kernel",
     "each layer imports only the layers below it"),
    ("raptorz/stores.py", "import raptorz.layouts", "each layer imports only the layers below it"),
    ("raptorz/cluster.py", "import raptorz.downstream.fitting",
     "each layer imports only the layers below it"),
    ("raptorz/downstream/heads.py", "from raptorz.embedding import encoders",
     "downstream reads embeddings only through the embedding store's reader"),
    ("raptorz/layouts.py", "import torch", "the store layouts and readers import no torch"),
    ("raptorz/embedding/kernel.py", "import distributed", "the kernel imports no Dask"),
    ("cli/export.py", "from raptorz.embedding.embeddings import export_npy",
     "the command line imports only the public API, the defaults and the errors"),
])
def test_a_forbidden_import_breaks_its_contract(lint: Path, tmp_path: Path, module: str,
                                                line: str, contract: str) -> None:
    for folder in ("raptorz", "cli"):
        shutil.copytree(ROOT / folder, tmp_path / folder,
                        ignore=shutil.ignore_patterns("__pycache__"))
    path = tmp_path / module
    path.write_text(path.read_text() + f"\n{line}  # noqa\n")
    result = _lint(lint, tmp_path)
    assert result.returncode == 1
    assert f"{contract} BROKEN" in result.stdout
    assert f"{CONTRACTS - 1} kept, 1 broken" in result.stdout


def test_the_client_side_of_embed_imports_no_torch() -> None:
    """The run's client names the workers' functions (:mod:`raptorz.embedding.worker`)
    but must not load torch: checks and resumes stay fast, and the command's process
    stays small."""
    code = ("import sys, raptorz.embedding.runner, raptorz.embedding.worker; "
            "print(sorted(m for m in ('torch', 'timm') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120, check=True)
    assert result.stdout.strip() == "[]"
