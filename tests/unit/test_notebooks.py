"""The notebooks are committed without outputs (that they run: tests/e2e/test_notebooks.py)."""

from __future__ import annotations

import nbformat
import pytest

from tests.conftest import ROOT

NOTEBOOKS = ROOT / "notebooks"
NAMES = ["01_data_exploration.ipynb", "02_error_analysis.ipynb"]


@pytest.mark.parametrize("name", NAMES)
def test_committed_without_outputs(name):
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbformat.validate(nb)
    assert nb.metadata["kernelspec"]["name"] == "python3"
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [], f"{name}: a cell has outputs (strip them before committing)"
            assert cell.execution_count is None, f"{name}: a cell has an execution count"
