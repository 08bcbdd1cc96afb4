"""Harvest (labelled slide cells -> class-folder dataset), multi-source ingest, and model.init_from."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from pipeline import harvest
from pipeline.cli import main
from pipeline.config import DataSource, GroupRule, LabelMap, load_params
from pipeline.data.ingest import ingest, ingest_sources, run_sources
from pipeline.data.images import ImageLimits
from pipeline.wsi.crops import read_crops
from pipeline.wsi.readers import open_slide
from tests.conftest import ROOT
from tests.test_slide import draw_cells, glass, write_pyramid
from tests.tiny_project import tiny_project

MARGIN = 0.25
SIZE = (1600, 1200)
# (cx, cy, r) on the small synthetic slide; the first touches the slide's edge, so its crop is shifted.
SLIDE_CELLS = [(20, 300, 18), (300, 300, 30), (800, 500, 35), (1200, 900, 25), (500, 1000, 20), (1400, 200, 28)]
LABELS = ["malignant", "benign", "unsure", "not_a_cell", "benign", "malignant"]


def write_slide(folder: Path, name: str, seed: int) -> tuple[Path, Path]:
    """A pyramidal slide with known cells and its score-slide style cells.csv."""
    folder.mkdir(parents=True, exist_ok=True)
    slide = write_pyramid(folder / f"{name}.tiff", draw_cells(glass(SIZE, seed), SLIDE_CELLS))
    cells = pd.DataFrame([{"cell_id": i + 1, "x": float(cx), "y": float(cy), "x0": max(cx - r, 0), "y0": cy - r,
                           "x1": cx + r + 1, "y1": cy + r + 1, "diameter_um": 2 * r * 0.25, "area_um2": 1.0,
                           "score": 0.5, "call": "benign"} for i, (cx, cy, r) in enumerate(SLIDE_CELLS)])
    cells.to_csv(folder / f"{name}-cells.csv", index=False)
    return slide, folder / f"{name}-cells.csv"


def write_labels(path: Path, cells_csv: Path, labels=LABELS, slide="s") -> Path:
    cells = pd.read_csv(cells_csv)
    pd.DataFrame([{"cell_id": r.cell_id, "x": r.x, "y": r.y, "label": lab, "reviewer": "dr a",
                   "timestamp": "2026-12-01T10:00:00Z", "slide": slide, "model": "3"}
                  for r, lab in zip(cells.itertuples(), labels)]).to_csv(path, index=False)
    return path


@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    folder = tmp_path_factory.mktemp("slides")
    a, a_cells = write_slide(folder, "slide-a", 1)
    b, b_cells = write_slide(folder, "slide-b", 2)
    return {"a": (a, a_cells, write_labels(folder / "a-labels.csv", a_cells)),
            "b": (b, b_cells, write_labels(folder / "b-labels.csv", b_cells, LABELS[::-1]))}


def test_harvest_cuts_the_scoring_crops_and_ingest_accepts_them(slides, tmp_path):
    slide, cells_csv, labels_csv = slides["a"]
    out = tmp_path / "harvest"
    summary = harvest.run(slide, cells_csv, labels_csv, out, MARGIN)
    assert summary["cells"] == 6 and summary["skipped"] == 0

    manifest = pd.read_csv(out / "manifest.csv", dtype=str)
    assert list(manifest.columns) == list(harvest.MANIFEST_COLUMNS)
    assert set(manifest["group"]) == {"slide-a"} and sorted(manifest["class"]) == sorted(LABELS)
    cells = pd.read_csv(cells_csv)
    with open_slide(slide, mpp=1.0) as src:
        expected = read_crops(src, cells, MARGIN)
    for crop, label, cell_id in zip(expected, LABELS, cells["cell_id"]):
        png = out / label / f"slide-a-{cell_id}.png"
        assert np.array_equal(np.asarray(Image.open(png).convert("RGB")), crop), png  # lossless, same pixels
    row = manifest[manifest["cell_id"] == "2"].iloc[0]
    assert row["reviewer"] == "dr a" and row["x"] == "300.0"
    assert row["sha256"] == harvest.hashlib.sha256((out / row["path"]).read_bytes()).hexdigest()

    # ingest reads it as a CSV source grouped by the `group` column; unsure / not_a_cell are excluded.
    result = ingest(out / "manifest.csv", LabelMap.load(ROOT / "configs/labels/harvest_binary.yaml"),
                    GroupRule(regex=None, column="group"), progress=False)
    assert sorted(r["label"] for r in result.rows) == ["benign", "benign", "malignant", "malignant"]
    assert {r["group"] for r in result.rows} == {"slide-a"}
    assert sorted(r["original_class"] for r in result.rejects) == ["not_a_cell", "unsure"]


def test_slides_merge_and_rerunning_a_slide_replaces_its_cells(slides, tmp_path):
    out = tmp_path / "harvest"
    for key in ("a", "b"):
        harvest.run(*slides[key], out, MARGIN)
    manifest = pd.read_csv(out / "manifest.csv", dtype=str)
    assert len(manifest) == 12 and manifest.groupby("slide").size().to_dict() == {"slide-a": 6, "slide-b": 6}
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png"))
    assert files == sorted(manifest["path"])

    harvest.run(*slides["a"], out, MARGIN)  # the same again: nothing changes
    again = pd.read_csv(out / "manifest.csv", dtype=str)
    pd.testing.assert_frame_equal(again, manifest)

    # Relabelling a cell moves its crop to the new class folder; the old file goes.
    slide, cells_csv, _ = slides["a"]
    relabelled = write_labels(tmp_path / "relabel.csv", cells_csv, ["benign"] + LABELS[1:])
    harvest.run(slide, cells_csv, relabelled, out, MARGIN)
    final = pd.read_csv(out / "manifest.csv", dtype=str)
    assert len(final) == 12 and "benign/slide-a-1.png" in set(final["path"])
    assert not (out / "malignant/slide-a-1.png").exists() and (out / "benign/slide-a-1.png").is_file()
    assert (out / "malignant/slide-b-1.png").is_file()  # the other slide is untouched


def test_bad_label_rows_are_reported_and_skipped(slides, tmp_path, capsys):
    slide, cells_csv, labels_csv = slides["a"]
    rows = pd.read_csv(labels_csv)
    rows.loc[1, "cell_id"] = 99  # not in cells.csv
    rows.loc[2, "x"] = rows.loc[2, "x"] + 40  # another slide's cell 3
    rows.to_csv(tmp_path / "labels.csv", index=False)
    summary = harvest.run(slide, cells_csv, tmp_path / "labels.csv", tmp_path / "out", MARGIN, slide_id="case7")
    err = capsys.readouterr().err.splitlines()
    assert summary["cells"] == 4 and summary["skipped"] == 2
    assert any("line 3: cell_id '99' is not in cells.csv" in e for e in err)
    assert any("line 4: cell 3 is at" in e for e in err)
    assert (tmp_path / "out/malignant/case7-1.png").is_file()  # --slide-id names the files and the group

    rows = pd.read_csv(labels_csv)
    rows.loc[4, "label"] = "maybe"
    rows.to_csv(tmp_path / "bad.csv", index=False)
    code = main(["harvest", str(slide), "--cells", str(cells_csv), "--labels", str(tmp_path / "bad.csv"),
                 "--out", str(tmp_path / "out2")])
    err = capsys.readouterr().err
    assert code == 1 and "bad.csv: line 6: label 'maybe' is not one of" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out2").exists()
    rows = pd.read_csv(labels_csv).assign(cell_id=lambda f: f["cell_id"] + 100)  # another slide's labels
    rows.to_csv(tmp_path / "other.csv", index=False)
    with pytest.raises(harvest.HarvestError, match="no label row matches"):
        harvest.run(slide, cells_csv, tmp_path / "other.csv", tmp_path / "out", MARGIN, slide_id="case7")
    assert len(pd.read_csv(tmp_path / "out/manifest.csv")) == 4  # the earlier harvest is intact
    with pytest.raises(harvest.HarvestError, match="slide id"):
        harvest.slide_id_of(slide, "../x")


# --------------------------------------------------------------------------- several sources


def write_two_source_params(path: Path, herlev_dir: Path, harvest_dir: Path) -> Path:
    raw = load_params(ROOT / "configs/tiny.yaml").to_dict()  # an overlay: written out whole
    raw["data"]["sources"] = {
        "herlev": {"path": str(herlev_dir), "label_map": str(ROOT / "configs/labels/herlev_binary.yaml"),
                   "group": {"regex": r"(\d+)-\d+-\d+"}},
        "harvest": {"path": str(harvest_dir / "manifest.csv"),
                    "label_map": str(ROOT / "configs/labels/harvest_binary.yaml"), "group": {"column": "group"}}}
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
        assert main(["ingest", "--params", str(tmp_path / "params.yaml"), "--only", name,
                     "--out", str(tmp_path / "sources" / name)]) == 0
    assert main(["ingest", "--params", str(tmp_path / "params.yaml"), "--merge", str(tmp_path / "sources"),
                 "--out", str(tmp_path / "merged")]) == 0
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "merged/manifest.csv", dtype=str), manifest)


def test_sources_config_errors(tmp_path):
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["data"]["source"] = "x"
    (tmp_path / "both.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(ValueError, match="data.sources replaces data.source"):
        load_params(tmp_path / "both.yaml")
    raw["data"].pop("source")
    raw["data"]["sources"]["herlev"]["group"] = {"regex": None, "column": None}
    (tmp_path / "group.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(ValueError, match=r"data.sources.herlev.group: set exactly one"):
        load_params(tmp_path / "group.yaml")
    # Label maps that disagree on the model's labels are refused.
    seven = DataSource("h7", "x", str(ROOT / "configs/labels/herlev_7class.yaml"))
    binary = DataSource("h", "x", str(ROOT / "configs/labels/herlev_binary.yaml"))
    with pytest.raises(ValueError, match="differ from"):
        ingest_sources((binary, seven))


# --------------------------------------------------------------------------- init_from


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    with tiny_project(tmp_path_factory) as built:
        yield built


def test_training_starts_from_a_registered_model(tiny, tmp_path, monkeypatch):
    import torch

    from pipeline import train

    root, _, params = tiny
    monkeypatch.chdir(root)  # the tiny project's MLflow store and paths
    source = json.loads((root / "models/train/model.json").read_text())
    # A learning rate of ~0 leaves the weights where they started: the registered model's, head included.
    p = dataclasses.replace(params, model=dataclasses.replace(params.model, init_from="models:/cytology-classifier/1"),
                            train=dataclasses.replace(params.train, epochs=1, lr=1e-12))
    result, metrics = train.run(p, root / "data/split/split.csv", root / "data/ingest/manifest.csv",
                                tmp_path / "model", tmp_path / "ckpt", tmp_path / "reports")
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
    info = init_from_model(model, str(root / "models/train"), params.model.arch, ("a", "b", "c"), None,
                           warnings.append)
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
    (tmp_path / "metadata.json").write_text(json.dumps({"source": {"registered_model": "cytology-classifier",
                                                                   "version": "1"}}))
    folder, meta, version = _torch_model_dir(str(tmp_path), f"sqlite:///{root / 'mlflow.db'}")
    assert version == "1" and (folder / "model.pt").is_file()
    assert meta.sha256["model.pt"] == json.loads((root / "models/train/model.json").read_text())["sha256"]["model.pt"]
