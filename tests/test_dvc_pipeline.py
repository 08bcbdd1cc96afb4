"""`dvc repro` runs ingest -> split in a scratch copy of the repo, and `dvc status` tracks the source."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.slow


def _project_files() -> list[str]:
    """Tracked plus untracked-but-not-ignored files: what a clone of this work tree would hold."""
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    return [f for f in out.splitlines() if (ROOT / f).is_file() and f != "dvc.lock"]


def _run(args, cwd, env):
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, f"{' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def test_dvc_repro_in_a_scratch_repo(tmp_path, herlev_dir):
    # Same layout as the real checkout, so params.yaml's ../shared/data/herlev resolves unchanged;
    # the data is a copy so the test can change it.
    repo = tmp_path / "main"
    shutil.copytree(herlev_dir, tmp_path / "shared" / "data" / "herlev")
    for rel in _project_files():
        (repo / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, repo / rel)
    env = {**os.environ, "DVC_NO_ANALYTICS": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    _run(["git", "init", "-q"], repo, env)

    _run(["dvc", "repro"], repo, env)
    split = pd.read_csv(repo / "data/split/split.csv", dtype={"group": str})
    assert len(split) == 722
    assert (split.groupby("group")["split"].nunique() == 1).all()
    assert "Data and pipelines are up to date" in _run(["dvc", "status"], repo, env)
    dag = _run(["dvc", "dag"], repo, env)
    assert "ingest" in dag and "split" in dag
    lock = (repo / "dvc.lock").read_text()
    assert "../shared/data/herlev" in lock and "nfiles: 723" in lock

    # Removing one image from the source is noticed.
    victim = next((tmp_path / "shared/data/herlev/normal_columnar").iterdir())
    victim.unlink()
    status = _run(["dvc", "status"], repo, env)
    assert "ingest" in status and "modified" in status and "shared/data/herlev" in status
    _run(["dvc", "repro"], repo, env)
    assert len(pd.read_csv(repo / "data/ingest/manifest.csv")) == 721
