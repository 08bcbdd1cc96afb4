"""The `cytopipe` command: instant --help without heavy imports, one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import HEAVY_MODULES, ROOT, make_image

PROBE = """
import json, sys
from pipeline.cli import main
try:
    main({argv!r})
except SystemExit:
    pass
print(json.dumps(sorted(m for m in {heavy!r} if m in sys.modules)))
"""


COMMANDS = ("ingest", "split", "train", "evaluate", "cv", "export", "predict", "score-slide", "score-slides")


@pytest.mark.parametrize("argv", [["--help"]] + [[c, "--help"] for c in COMMANDS])
def test_help_imports_no_heavy_module(argv):
    code = PROBE.format(argv=argv, heavy=HEAVY_MODULES)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    lines = proc.stdout.strip().splitlines()
    assert "usage: cytopipe" in proc.stdout
    assert json.loads(lines[-1]) == []


def _cytopipe(*args, cwd):
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], capture_output=True, text=True, cwd=cwd)


def test_missing_source_is_one_line_without_traceback(tmp_path):
    proc = _cytopipe(
        "ingest",
        "--params",
        str(ROOT / "params.yaml"),
        "--source",
        str(tmp_path / "nope"),
        "--label-map",
        str(ROOT / "configs/labels/herlev_binary.yaml"),
        "--out",
        str(tmp_path / "o"),
        cwd=tmp_path,
    )
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "nope: not found" in proc.stderr


def test_ingest_then_split_from_the_cli(tmp_path, binary_map):
    src = tmp_path / "src"
    for g in range(12):
        for c in range(2):
            cls = "normal" if g % 2 else "cancer"
            make_image(src / cls / f"f{g}-{c}.png", seed=g * 10 + c)
    params = tmp_path / "params.yaml"
    params.write_text(
        f"data:\n  sources:\n    src:\n      path: {src}\n      label_map: {binary_map}\n"
        "      group:\n        regex: '^(f\\d+)-'\n"
        "split:\n  seed: 0\n  fractions: {train: 0.5, val: 0.25, test: 0.25}\n  folds: 2\n"
    )
    ingest = _cytopipe("ingest", "--params", str(params), "--out", "ing", cwd=tmp_path)
    assert ingest.returncode == 0, ingest.stderr
    assert "24 images accepted" in ingest.stdout
    split = _cytopipe("split", "--params", str(params), "--manifest", "ing/manifest.csv", "--out", "spl", cwd=tmp_path)
    assert split.returncode == 0, split.stderr
    assert (tmp_path / "spl" / "split.csv").is_file()
    assert "2 CV folds" in split.stdout and "total" in split.stdout


def test_split_with_missing_manifest(tmp_path):
    proc = _cytopipe("split", "--params", str(ROOT / "params.yaml"), "--manifest", "none.csv", cwd=tmp_path)
    assert proc.returncode == 1 and "none.csv: file not found" in proc.stderr and "Traceback" not in proc.stderr


def test_export_with_missing_inputs_is_one_line(tmp_path):
    proc = _cytopipe(
        "export", "--params", str(ROOT / "params.yaml"), "--model", "no-model", "--split", "none.csv", cwd=tmp_path
    )
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "none.csv" in proc.stderr
    assert not (tmp_path / "models").exists()
