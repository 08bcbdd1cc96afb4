"""The house rules a reviewer would otherwise check by hand: ruff lint and format, the import-linter layer contracts
in pyproject.toml, functions that fit on a screen, project imports at the top of each module, and
model.json read through pipeline/model_card.py only."""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
from pathlib import Path

from pipeline.errors import CytopipeError
from tests.conftest import ROOT

PACKAGE = ROOT / "pipeline"
MAX_FUNCTION_LINES = 80
# The CLI imports each command's module only when that command runs, so `cytopipe --help` stays instant.
LAZY_PROJECT_IMPORTS_ALLOWED = {"pipeline/cli.py"}
# MLflow loads this module as the logged model's code, so it imports MLflow at its top; importing it
# lazily keeps MLflow out of every process that never logs a model.
LAZY_PROJECT_MODULES_ALLOWED = {"pipeline.inference.mlflow_pyfunc"}


def _tool(name: str) -> str:
    path = shutil.which(name, path=str(Path(sys.executable).parent))
    assert path, f"{name} is not installed in this environment (pip install -e '.[test]')"
    return path


def _modules():
    return sorted(PACKAGE.rglob("*.py"))


def test_ruff_finds_nothing():
    proc = subprocess.run(
        [_tool("ruff"), "check", "--output-format", "concise", "."], cwd=ROOT, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-1000:]


def test_the_code_is_ruff_formatted():
    proc = subprocess.run([_tool("ruff"), "format", "--check", "."], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, "run `ruff format .` to fix:\n" + proc.stdout[-3000:] + proc.stderr[-1000:]


def test_the_layer_contracts_hold():
    proc = subprocess.run([_tool("lint-imports")], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0 and "broken" in proc.stdout and " 0 broken" in proc.stdout, proc.stdout[-3000:]


def test_no_function_is_longer_than_a_screen():
    long = []
    for path in _modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({length} lines)")
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {long}"


def test_project_imports_sit_at_the_top():
    lazy = []
    for path in _modules():
        if str(path.relative_to(ROOT)) in LAZY_PROJECT_IMPORTS_ALLOWED:
            continue
        for func in ast.walk(ast.parse(path.read_text())):
            if not isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(func):
                names = (
                    [node.module or ""]
                    if isinstance(node, ast.ImportFrom)
                    else [a.name for a in node.names]
                    if isinstance(node, ast.Import)
                    else []
                )
                if any(
                    (name == "pipeline" or name.startswith("pipeline.")) and name not in LAZY_PROJECT_MODULES_ALLOWED
                    for name in names
                ):
                    lazy.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not lazy, f"project imports inside functions (put them at the top of the module): {lazy}"


def test_model_json_is_read_only_through_the_model_card():
    pattern = re.compile(r"\bmeta\[|read_metadata\(|\.meta\.get\(")
    offenders = [
        f"{p.relative_to(ROOT)}:{i}"
        for p in _modules()
        if p.name != "model_card.py"
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert not offenders, f"model.json read outside pipeline/model_card.py: {offenders}"


def test_every_user_facing_error_shares_one_base():
    name = CytopipeError.__name__
    classes = []
    for path in _modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and node.name.endswith("Error") and node.name != name:
                classes.append((path, node))
    assert classes, "the scan found no error classes"
    orphans = [
        f"{p.relative_to(ROOT)}:{n.lineno} {n.name}"
        for p, n in classes
        if not any(isinstance(b, ast.Name) and b.id == name for b in n.bases)
    ]
    assert not orphans, f"errors not derived from {name} (pipeline/errors.py): {orphans}"
