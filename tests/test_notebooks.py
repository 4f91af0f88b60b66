"""The notebooks run from top to bottom (with a tiny random-weight encoder)."""

from __future__ import annotations

import re
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
#: The plots the quickstart's text promises, each by what its cell's code says.
QUICKSTART_PLOTS = {"the QC montage": "raptorz.plane_montage(",
                    "the ROC curves": '"roc.png"',
                    "the PCA of the embeddings": "raptorz.embedding_pca("}


def _execute(name: str, cwd: Path) -> nbformat.NotebookNode:
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    NotebookClient(notebook, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(cwd)}}).execute()
    return notebook


def _warnings(notebook: nbformat.NotebookNode) -> list[str]:
    """Lines of the notebook's outputs that show a Python warning."""
    return [line for cell in notebook.cells if cell.cell_type == "code"
            for output in cell.outputs for line in str(output.get("text", "")).splitlines()
            if re.search(r"\b\w*Warning\b", line)]


def _images(notebook: nbformat.NotebookNode, code: str) -> int:
    """PNG images shown by the one code cell whose source contains ``code``."""
    cells = [cell for cell in notebook.cells if cell.cell_type == "code" and code in cell.source]
    assert len(cells) == 1, f"{len(cells)} code cells contain {code!r}; expected one"
    return sum("image/png" in output.get("data", {}) for output in cells[0].outputs)


def _outputs(notebook: nbformat.NotebookNode) -> str:
    return "\n".join(str(output.get("text", "")) + str(output.get("data", ""))
                     for cell in notebook.cells if cell.cell_type == "code"
                     for output in cell.outputs)


@pytest.mark.slow
def test_quickstart_runs(tmp_path: Path, tiny_vit_weights: tuple[str, Path],
                         monkeypatch: pytest.MonkeyPatch) -> None:
    name, weights = tiny_vit_weights
    monkeypatch.setenv("RAPTORZ_ENCODER", name)
    monkeypatch.setenv("RAPTORZ_WEIGHTS", str(weights))
    monkeypatch.setenv("RAPTORZ_WORKDIR", str(tmp_path / "work"))
    notebook = _execute("quickstart.ipynb", tmp_path)
    results = tmp_path / "work" / "results"
    assert {"predictions.csv", "metrics.json", "roc.png"} <= {p.name for p in results.iterdir()}
    shown = {plot: _images(notebook, code) for plot, code in QUICKSTART_PLOTS.items()}
    assert shown == dict.fromkeys(QUICKSTART_PLOTS, 1)  # each promised plot, drawn once
    outputs = _outputs(notebook)
    assert "/status" in outputs  # the client's widget shows the dashboard link
    assert _warnings(notebook) == []  # e.g. none from xarray about unconsolidated stores


def test_hpc_notebook_shows_a_gpu_job_script(tmp_path: Path) -> None:
    outputs = _outputs(_execute("hpc.ipynb", tmp_path))
    assert "#SBATCH --gres=gpu:1" in outputs
    assert "--resources GPU=1" in outputs
