"""The notebooks run top to bottom against the session's tiny project (committed without outputs:
tests/unit/test_notebooks.py)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from tests.conftest import ROOT

NOTEBOOKS = ROOT / "notebooks"


@pytest.fixture(scope="module")
def tiny_project(tiny_project) -> Path:
    """The session's tiny project (read only: the notebooks only read it), as its folder."""
    root, _, _ = tiny_project
    return root


def execute(nb, timeout: int = 300):
    """Run every cell in a python3 kernel started in notebooks/; raises on the first failing cell."""
    NotebookClient(
        nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}}
    ).execute()
    return nb


def run_notebook(name: str, project: Path, monkeypatch) -> tuple[str, int]:
    """Execute a notebook against `project` (the kernel inherits this environment); returns its text and
    its number of PNG outputs."""
    monkeypatch.setenv("CYTOPIPE_PROJECT", str(project))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("NO_ALBUMENTATIONS_UPDATE", "1")
    nb = execute(nbformat.read(NOTEBOOKS / name, as_version=4))
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    errors = [f"{o.ename}: {o.evalue}" for o in outputs if o.output_type == "error"]
    assert not errors, errors
    text, pngs = [], 0
    for o in outputs:
        if o.output_type == "stream":
            text.append(o.text)
        elif "data" in o:
            text.append(o.data.get("text/plain", ""))
            pngs += "image/png" in o.data
    return "\n".join(text), pngs


def test_kernel_is_this_interpreter():
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("import sys; print(sys.prefix)")])
    execute(nb, timeout=120)
    assert Path(nb.cells[0].outputs[0].text.strip()).resolve() == Path(sys.prefix).resolve()


def test_data_exploration_runs(tiny_project, monkeypatch):
    text, pngs = run_notebook("01_data_exploration.ipynb", tiny_project, monkeypatch)
    assert pngs >= 4  # label bars, group histogram, size scatter, sample grid
    assert str(tiny_project) in text
    for expected in ("carcinoma_in_situ", "normal_columnar", "malignant", "benign", "groups in more than one split: 0"):
        assert expected in text


def test_error_analysis_runs(tiny_project, monkeypatch):
    text, pngs = run_notebook("02_error_analysis.ipynb", tiny_project, monkeypatch)
    run_id = json.loads((tiny_project / "models/calibrated/model.json").read_text())["mlflow"]["run_id"]
    assert f"run {run_id}" in text
    assert "roc_auc" in text and "normal_columnar" in text
    assert "false negative" in text and "indeterminate" in text
    assert pngs >= 2  # score histogram and reliability diagram, plus one grid per kind of error that occurred
