"""The import contracts in pyproject.toml hold, and break when a rule is broken."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT = Path(sys.executable).with_name("lint-imports")

pytestmark = pytest.mark.skipif(not LINT.exists(), reason="import-linter is a test extra")


def _lint(root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(LINT), "--no-cache", str(ROOT / "pyproject.toml")], cwd=root,
                          capture_output=True, text=True, timeout=120)


def _copy(tmp_path: Path) -> Path:
    for folder in ("raptorz", "cli"):
        shutil.copytree(ROOT / folder, tmp_path / folder,
                        ignore=shutil.ignore_patterns("__pycache__"))
    return tmp_path


def test_the_checkout_keeps_every_contract() -> None:
    result = _lint(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "4 kept, 0 broken" in result.stdout


@pytest.mark.parametrize(("module", "line", "contract"), [
    ("raptorz/ingest/readers.py", "import raptorz.embedding.kernel",
     "ingest and embedding never import each other BROKEN"),
    ("raptorz/downstream/heads.py", "from raptorz.embedding import encoders",
     "downstream reads embeddings only through the embedding store's reader BROKEN"),
    ("raptorz/stores.py", "import raptorz.ingest.volumes",
     "the core imports no stage BROKEN"),
    ("cli/export.py", "from raptorz.embedding.embeddings import export_npy",
     "the command line imports only the public API and the defaults BROKEN"),
])
def test_a_forbidden_import_breaks_its_contract(tmp_path: Path, module: str, line: str,
                                                contract: str) -> None:
    root = _copy(tmp_path)
    path = root / module
    path.write_text(path.read_text() + f"\n{line}  # noqa\n")
    result = _lint(root)
    assert result.returncode == 1
    assert contract in result.stdout
