"""dvc.yaml's code dependencies cannot drift from the code: each stage lists every project module
its command imports, directly or through others, lazily or not (an edit to any of them must make
`dvc status` report the stage), and nothing that no longer exists."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT

# The module each stage's `cytopipe` command runs (pipeline/cli.py only parses arguments and calls it).
STAGE_ENTRY = {
    "ingest-source": "pipeline.data.ingest",
    "ingest": "pipeline.data.ingest",
    "split": "pipeline.data.split",
    "train": "pipeline.train",
    "cv": "pipeline.cv",
    "evaluate": "pipeline.evaluate",
    "morphometry": "pipeline.morphometry_stage",
    "export": "pipeline.export",
}


def module_file(name: str) -> Path | None:
    base = ROOT / Path(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def imported_modules(path: Path) -> set[str]:
    """Every pipeline module `path` imports, at the top or inside functions."""
    found = set()
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                )
            found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names}  # `from pipeline import ood`
    return {name for name in found if name.split(".")[0] == "pipeline" and module_file(name)}


def import_closure(entry: str) -> set[Path]:
    seen, todo = set(), [entry]
    while todo:
        name = todo.pop()
        path = module_file(name)
        if path is None or path in seen:
            continue
        seen.add(path)
        todo.extend(imported_modules(path))
        parts = name.split(".")  # importing a.b.c runs a/__init__.py and a/b/__init__.py too
        todo.extend(".".join(parts[:i]) for i in range(1, len(parts)))
    return {p.relative_to(ROOT) for p in seen}


def stage_deps() -> dict[str, list[str]]:
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    return {name: (stage.get("do") or stage)["deps"] for name, stage in stages.items()}


def covered(path: Path, deps: list[str]) -> bool:
    return any(path == Path(d) or Path(d) in path.parents for d in deps)


@pytest.mark.parametrize("stage", sorted(STAGE_ENTRY))
def test_each_stage_lists_every_module_it_imports(stage):
    deps = stage_deps()[stage]
    missing = sorted(
        str(p) for p in import_closure(STAGE_ENTRY[stage]) if not covered(p, deps) and p.name != "__init__.py"
    )
    assert not missing, f"dvc.yaml stage {stage} misses code it runs: {', '.join(missing)}"


@pytest.mark.parametrize("stage", sorted(STAGE_ENTRY))
def test_each_listed_code_path_exists(stage):
    gone = [d for d in stage_deps()[stage] if d.startswith("pipeline/") and not (ROOT / d).exists()]
    assert not gone, f"dvc.yaml stage {stage} lists code that no longer exists: {gone}"


def test_the_closure_follows_lazy_and_package_imports():
    closure = import_closure("pipeline.evaluate")
    assert Path("pipeline/data/transforms.py") in closure  # via the predictor's preprocessing
    assert Path("pipeline/model_card.py") in closure and Path("pipeline/cli.py") not in closure
