"""Harvest as a data source beside the real Herlev cells (one merged manifest), and model.init_from
on the session's tiny project."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pandas as pd
import pytest
import yaml

from pipeline import harvest
from pipeline.cli import main
from pipeline.config import load_params
from pipeline.data.images import ImageLimits
from pipeline.data.ingest import run_sources
from tests.conftest import ROOT
from tests.harvest_slides import write_labels, write_slide

MARGIN = 0.25


@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    folder = tmp_path_factory.mktemp("slides")
    a, a_cells = write_slide(folder, "slide-a", 1)
    return {"a": (a, a_cells, write_labels(folder / "a-labels.csv", a_cells))}


# --------------------------------------------------------------------------- several sources


def write_two_source_params(path: Path, herlev_dir: Path, harvest_dir: Path) -> Path:
    raw = load_params(ROOT / "configs/tiny.yaml").to_dict()  # an overlay: written out whole
    raw["data"]["sources"] = {
        "herlev": {
            "path": str(herlev_dir),
            "label_map": str(ROOT / "configs/labels/herlev_binary.yaml"),
            "group": {"regex": r"(\d+)-\d+-\d+"},
        },
        "harvest": {
            "path": str(harvest_dir / "manifest.csv"),
            "label_map": str(ROOT / "configs/labels/harvest_binary.yaml"),
            "group": {"column": "group"},
        },
    }
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def test_two_sources_merge_into_one_manifest(slides, tmp_path, herlev_dir):
    out = tmp_path / "harvest"
    harvest.run(*slides["a"], out, MARGIN)
    params = load_params(write_two_source_params(tmp_path / "params.yaml", herlev_dir, out))
    assert [s.name for s in params.data.source_list()] == ["herlev", "harvest"] and params.data.root == Path(".")
    assert load_params(tmp_path / "params.yaml").to_dict() == params.to_dict()  # round trip

    summary = run_sources(params.data.source_list(), ImageLimits(), str(tmp_path / "ingest"))
    manifest = pd.read_csv(tmp_path / "ingest/manifest.csv", dtype=str)
    assert summary["sources"]["herlev"]["n_accepted"] == 722 and summary["sources"]["harvest"]["n_accepted"] == 4
    assert manifest.groupby("source").size().to_dict() == {"harvest": 4, "herlev": 722}
    assert all(g.startswith(f"{s}:") for g, s in zip(manifest["group"], manifest["source"]))  # never collide
    assert set(manifest.loc[manifest["source"] == "harvest", "group"]) == {"harvest:slide-a"}
    assert all(Path(p).is_file() for p in manifest["path"])  # resolve from here (data.root)

    # The per-source DVC stages (--only) then --merge give the same manifest.
    for name in ("herlev", "harvest"):
        assert (
            main(
                [
                    "ingest",
                    "--params",
                    str(tmp_path / "params.yaml"),
                    "--only",
                    name,
                    "--out",
                    str(tmp_path / "sources" / name),
                ]
            )
            == 0
        )
    assert (
        main(
            [
                "ingest",
                "--params",
                str(tmp_path / "params.yaml"),
                "--merge",
                str(tmp_path / "sources"),
                "--out",
                str(tmp_path / "merged"),
            ]
        )
        == 0
    )
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "merged/manifest.csv", dtype=str), manifest)


# --------------------------------------------------------------------------- init_from


@pytest.fixture(scope="module")
def tiny(tiny_project):
    return tiny_project


def test_training_starts_from_a_registered_model(tiny_project_copy, tmp_path, monkeypatch):
    import torch

    from pipeline import train

    # A copy: the training logs a run and registers a version in the project's MLflow store.
    root, _, params = tiny_project_copy
    monkeypatch.chdir(root)  # the tiny project's MLflow store and paths
    source = json.loads((root / "models/train/model.json").read_text())
    # A learning rate of ~0 leaves the weights where they started: the registered model's, head included.
    p = dataclasses.replace(
        params,
        model=dataclasses.replace(params.model, init_from="models:/cytology-classifier/1"),
        train=dataclasses.replace(params.train, epochs=1, lr=1e-12),
    )
    result, metrics = train.run(
        p,
        root / "data/split/split.csv",
        root / "data/ingest/manifest.csv",
        tmp_path / "model",
        tmp_path / "ckpt",
        tmp_path / "reports",
    )
    before = torch.load(root / "models/train/model.pt", weights_only=True)
    after = torch.load(tmp_path / "model/model.pt", weights_only=True)
    for key, value in before.items():
        if value.dtype.is_floating_point and "running" not in key:  # BatchNorm statistics do move
            assert torch.allclose(value, after[key], atol=1e-6), key
    meta = json.loads((tmp_path / "model/model.json").read_text())
    assert meta["init_from"]["version"] == "1" and meta["init_from"]["head"] == "reused"
    assert meta["init_from"]["weights_sha256"] == source["sha256"]["model.pt"] and meta["mean"] == source["mean"]
    import mlflow

    tags = mlflow.MlflowClient(f"sqlite:///{root / 'mlflow.db'}").get_run(metrics["mlflow_run_id"]).data.tags
    assert tags["init_from.version"] == "1" and tags["init_from.uri"] == "models:/cytology-classifier/1"


def test_init_from_other_labels_reinitialises_the_head_and_bad_uris_fail(tiny, capsys):
    import torch

    from pipeline.models.backbones import WeightsError, build_model
    from pipeline.models.init_from import init_from_model

    root, _, params = tiny
    model = build_model(params.model.arch, 3, None)
    warnings = []
    info = init_from_model(model, str(root / "models/train"), params.model.arch, ("a", "b", "c"), None, warnings.append)
    source = torch.load(root / "models/train/model.pt", weights_only=True)
    state = model.state_dict()
    assert info["head"] == "reinitialised" and info["version"] == "1" and "re-initialised" in warnings[0]
    assert torch.equal(state["conv_stem.weight"], source["conv_stem.weight"])
    assert state["classifier.weight"].shape[0] == 3 and float(state["classifier.weight"].abs().max()) < 0.1

    uri = f"sqlite:///{root / 'mlflow.db'}"
    with pytest.raises(WeightsError) as err:
        init_from_model(model, "models:/cytology-classifier@nope", params.model.arch, ("a", "b", "c"), uri)
    assert "model.init_from: cannot resolve models:/cytology-classifier@nope" in str(err.value)
    assert "\n" not in str(err.value)


def test_init_from_an_onnx_export_follows_it_to_its_torch_version(tiny, tmp_path):
    from pipeline.models.init_from import _torch_model_dir

    root, _, _ = tiny
    # What the export stage writes beside model.onnx: the torch version it came from.
    (tmp_path / "metadata.json").write_text(
        json.dumps({"source": {"registered_model": "cytology-classifier", "version": "1"}})
    )
    folder, meta, version = _torch_model_dir(str(tmp_path), f"sqlite:///{root / 'mlflow.db'}")
    assert version == "1" and (folder / "model.pt").is_file()
    assert meta.sha256["model.pt"] == json.loads((root / "models/train/model.json").read_text())["sha256"]["model.pt"]
