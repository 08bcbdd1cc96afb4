"""Build a complete tiny project (ingest -> split -> train -> evaluate [-> export]) in a folder,
in-process, and copy one with its MLflow store.

The folder has the real project's layout (params.yaml, data/, models/, reports/, mlflow.db with
mlartifacts/ beside it), so notebooks and commands can be pointed at it. tests/conftest.py builds
one per session (the `tiny_project` and `exported_project` fixtures).
"""

from __future__ import annotations

import dataclasses
import shutil
import sqlite3
from contextlib import closing, contextmanager
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
HERLEV = ROOT.parent / "shared" / "data" / "herlev"
# Minimums of 0 so that the tiny model is promoted to @champion (which an export then takes over).
PROMOTED = {"promotion__min_auc": 0.0, "promotion__min_sensitivity": 0.0, "promotion__min_oof_auc_ci_low": 0.0}


def write_tiny_params(project: Path, herlev_dir: Path, **overrides) -> Path:
    """`project`/params.yaml: configs/tiny.yaml's effective values (an overlay on params.yaml, written out
    whole so the copy stands alone), with the Herlev source at `herlev_dir`, plus `overrides`."""
    from pipeline.config import load_params

    raw = load_params(ROOT / "configs" / "tiny.yaml").to_dict()
    herlev = raw["data"]["sources"]["herlev"]
    herlev.update(path=str(herlev_dir), label_map=str(ROOT / herlev["label_map"]))
    raw["mlflow"]["tracking_uri"] = f"sqlite:///{project / 'mlflow.db'}"
    for dotted, value in overrides.items():
        section, key = dotted.split("__")
        raw[section][key] = value
    path = project / "params.yaml"
    project.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def build_tiny_project(project: Path, herlev_dir: Path, **overrides) -> dict:
    """Run every stage on the tiny config into `project`; returns the evaluate stage's result."""
    from pipeline import evaluate, train
    from pipeline.config import load_params
    from pipeline.data import ingest, split
    from pipeline.data.images import ImageLimits

    params = load_params(write_tiny_params(project, herlev_dir, **overrides))
    d = params.data
    ingest.run(d.source, d.label_map, d.group, ImageLimits(d.min_side, d.max_pixels), str(project / "data/ingest"))
    split.run(project / "data/ingest/manifest.csv", params.split, project / "data/split")
    train.run(
        params,
        project / "data/split/split.csv",
        project / "data/ingest/manifest.csv",
        project / "models/train",
        project / "checkpoints/train",
        project / "reports/train",
    )
    return evaluate.run(
        params,
        project / "models/train",
        project / "data/split/split.csv",
        project / "models/calibrated",
        project / "reports/evaluate",
    )


def require_herlev() -> Path:
    import pytest

    if not (HERLEV / "MANIFEST.csv").is_file():
        pytest.fail(f"reference data missing: {HERLEV} (tests need ../shared/data from the project root)")
    return HERLEV


@contextmanager
def tiny_project(tmp_path_factory, **overrides):
    """A built tiny project: yields (root, evaluate result, params).

    MLFLOW_TRACKING_URI is unset while it lives, so the project's own sqlite store is used.
    """
    import pytest

    from pipeline.config import load_params

    herlev = require_herlev()
    mp = pytest.MonkeyPatch()
    mp.delenv("MLFLOW_TRACKING_URI", raising=False)
    try:
        root = tmp_path_factory.mktemp("project")
        out = build_tiny_project(root, herlev, **overrides)
        yield root, out, load_params(root / "params.yaml")
    finally:
        mp.undo()


def export_tiny_project(root: Path, evaluated: dict) -> dict:
    """Export the project's calibrated model to ONNX (models/exported), registered as a new version that
    takes over @champion: {"root", "evaluate", "export", "params"}. Run it with MLFLOW_TRACKING_URI unset."""
    from pipeline import export
    from pipeline.config import load_params

    params = load_params(root / "params.yaml")
    result = export.run(
        params,
        root / "models/calibrated",
        root / "data/split/split.csv",
        root / "models/exported",
        root / "reports/export",
    )
    return {"root": root, "evaluate": evaluated, "export": result, "params": params}


def copy_project(src: Path, dst: Path) -> Path:
    """A copy of the project at `src` that stands alone at `dst`: its files, and its MLflow store with
    every path it records (params.yaml's tracking URI, run and model artifact locations) moved to `dst`,
    so runs, versions and aliases made in the copy never reach the original. `src` must be idle."""
    shutil.copytree(src, dst, symlinks=True, ignore=shutil.ignore_patterns("mlflow.db", "mlflow.db-*", "serve-*.log"))
    old, new = f"{src}/", f"{dst}/"
    with closing(sqlite3.connect(src / "mlflow.db")) as a, closing(sqlite3.connect(dst / "mlflow.db")) as b:
        a.backup(b)  # consistent even with a write-ahead log beside the file
        tables = [r[0] for r in b.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        for table in tables:
            for _, column, kind, *_ in b.execute(f'PRAGMA table_info("{table}")').fetchall():
                if any(t in kind.upper() for t in ("CHAR", "TEXT", "CLOB")):
                    b.execute(
                        f'UPDATE "{table}" SET "{column}" = replace("{column}", ?, ?) WHERE instr("{column}", ?) > 0',
                        (old, new, old),
                    )
        b.commit()
    params = dst / "params.yaml"
    params.write_text(params.read_text().replace(old, new))
    return dst


def loaded_copy(src: tuple, dst: Path) -> tuple:
    """copy_project for a (root, evaluate result, params) triple: the copy's triple."""
    from pipeline.config import load_params

    root, out, _ = src
    copy = copy_project(root, dst)
    return copy, out, load_params(copy / "params.yaml")


def make_split(tmp: Path, herlev_dir: Path, label_map: str = "configs/labels/herlev_binary.yaml"):
    """Ingest + split the real Herlev cells into `tmp` (no training); returns (params, split.csv,
    manifest.csv), the params being configs/tiny.yaml's with an MLflow store in `tmp`."""
    import pandas as pd

    from pipeline.config import LabelMap, load_params
    from pipeline.data.ingest import ingest, write_outputs
    from pipeline.data.split import split_frame

    params = load_params(ROOT / "configs/tiny.yaml")
    lm = LabelMap.load(ROOT / label_map)
    result = ingest(herlev_dir, lm, params.data.group, progress=False)
    write_outputs(result, tmp / "ingest", str(herlev_dir), lm)
    split = split_frame(pd.DataFrame(result.rows), params.split)
    split.to_csv(tmp / "split.csv", index=False)
    params = dataclasses.replace(
        params,
        data=dataclasses.replace(
            params.data,
            sources={
                name: dataclasses.replace(src, path=str(herlev_dir), label_map=str(ROOT / label_map))
                for name, src in params.data.sources.items()
            },
        ),
        mlflow=dataclasses.replace(params.mlflow, tracking_uri=f"sqlite:///{tmp / 'mlflow.db'}"),
    )
    return params, tmp / "split.csv", tmp / "ingest" / "manifest.csv"
