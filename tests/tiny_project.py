"""Build a complete tiny project (ingest -> split -> train -> evaluate) in a folder, in-process.

The folder has the real project's layout (params.yaml, data/, models/, reports/, mlflow.db),
so notebooks and commands can be pointed at it.
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


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
    train.run(params, project / "data/split/split.csv", project / "data/ingest/manifest.csv",
              project / "models/train", project / "checkpoints/train", project / "reports/train")
    return evaluate.run(params, project / "models/train", project / "data/split/split.csv",
                        project / "models/calibrated", project / "reports/evaluate")


@contextmanager
def tiny_project(tmp_path_factory, **overrides):
    """A built tiny project for a module-scoped fixture: yields (root, evaluate result, params).

    MLFLOW_TRACKING_URI is unset while it lives, so the project's own sqlite store is used.
    """
    import pytest

    from pipeline.config import load_params

    herlev = ROOT.parent / "shared" / "data" / "herlev"
    if not (herlev / "MANIFEST.csv").is_file():
        pytest.fail(f"reference data missing: {herlev} (tests need ../shared/data from the project root)")
    mp = pytest.MonkeyPatch()
    mp.delenv("MLFLOW_TRACKING_URI", raising=False)
    try:
        root = tmp_path_factory.mktemp("project")
        out = build_tiny_project(root, herlev, **overrides)
        yield root, out, load_params(root / "params.yaml")
    finally:
        mp.undo()


@contextmanager
def exported_tiny_project(tmp_path_factory):
    """A tiny project whose calibrated model is exported to ONNX (models/exported) and registered
    as @champion: yields {"root", "evaluate", "export", "params"}."""
    from pipeline import export

    # Minimums of 0 so that the tiny model gets @champion, which the export then takes over.
    with tiny_project(tmp_path_factory, promotion__min_auc=0.0, promotion__min_sensitivity=0.0,
                     promotion__min_oof_auc_ci_low=0.0) as (root, out, params):
        result = export.run(params, root / "models/calibrated", root / "data/split/split.csv",
                            root / "models/exported", root / "reports/export")
        yield {"root": root, "evaluate": out, "export": result, "params": params}
