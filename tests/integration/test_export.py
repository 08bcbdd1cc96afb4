"""Export stage and the ONNX Runtime path: validation, integrity, registry, and every inference
command (on the session's exported tiny project; REST serving with `mlflow models serve`:
tests/e2e/test_rest_serving.py)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline.config import ExportConfig
from pipeline.inference.predictor import OnnxPredictor, TorchPredictor
from pipeline.model_card import INT8_FILE, ONNX_FILE, ModelDirError
from pipeline.morphometry.cells import IMAGE_COLUMNS
from tests.conftest import ROOT, herlev_images

MODEL = "models:/cytology-classifier@champion"


@pytest.fixture(scope="module")
def project(exported_project):
    return exported_project


pytestmark = pytest.mark.usefixtures("no_mlflow_env")


@pytest.fixture
def exported(project) -> Path:
    return project["root"] / "models/exported"


def test_export_folder_metadata_and_validation(project, exported):
    import onnx

    meta = json.loads((exported / "metadata.json").read_text())
    calibrated = json.loads((project["root"] / "models/calibrated/model.json").read_text())
    assert sorted(p.name for p in exported.iterdir()) == [
        "metadata.json",
        INT8_FILE,
        ONNX_FILE,
        "model_card.md",
        "ood.npz",
    ]
    assert (exported / "model_card.md").read_text() == (project["root"] / "models/calibrated/model_card.md").read_text()
    assert meta["onnx_file"] == INT8_FILE and meta["quantization"]["served"]  # tiny.yaml: max_auc_drop 1
    q = meta["quantization"]
    assert 0 <= q["test_auc_int8"] <= 1 and q["auc_drop"] == pytest.approx(q["test_auc_fp32"] - q["test_auc_int8"])
    assert meta["labels"] == calibrated["labels"] and meta["image_size"] == calibrated["image_size"]
    assert meta["preprocessing"]["mean"] == calibrated["mean"] and "bicubic" in meta["preprocessing"]["resize"]
    cal = calibrated["calibration"]
    assert meta["temperature"] == cal["temperature"] and meta["threshold"] == cal["threshold"]
    assert meta["indeterminate_band"] == pytest.approx(
        [cal["threshold"] - cal["band_width"] / 2, cal["threshold"] + cal["band_width"] / 2]
    )
    assert meta["source"]["version"] == calibrated["mlflow"]["version"] == project["export"]["source_version"]
    assert meta["registered_version"] == project["export"]["model_version"] != meta["source"]["version"]
    import hashlib

    for name in (ONNX_FILE, INT8_FILE):
        assert meta["sha256"][name] == hashlib.sha256((exported / name).read_bytes()).hexdigest()
    assert meta["validation"]["images"] == project["params"].export.validation_images
    assert meta["validation"]["max_abs_diff"] <= 1e-4
    graph = onnx.load(str(exported / "model.onnx")).graph
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert [o.name for o in graph.output] == ["logits", "cam", "features"]
    metrics = json.loads((project["root"] / "reports/export/metrics.json").read_text())
    assert metrics["max_abs_diff"] == meta["validation"]["max_abs_diff"]


def test_onnx_matches_torch_for_any_batch_and_tta(project, exported):
    from PIL import Image

    images = [np.asarray(Image.open(p).convert("RGB")) for p in herlev_images(7)]
    torch_p = TorchPredictor(project["root"] / "models/calibrated", batch_size=3)
    onnx_p = OnnxPredictor(exported, batch_size=5, file=ONNX_FILE)
    for tta in (False, True):
        np.testing.assert_allclose(onnx_p.score(images, tta=tta).probs, torch_p.score(images, tta=tta).probs, atol=1e-4)
    single = np.concatenate([onnx_p.score([im], tta=False).probs for im in images])
    np.testing.assert_allclose(single, onnx_p.score(images, tta=False).probs, atol=1e-6)


def test_validation_fails_on_a_mismatched_model(project, tmp_path):
    import torch

    from pipeline.export import ExportError, export_model, validation_images

    model_dir = project["root"] / "models/calibrated"
    images, _ = validation_images(project["params"], project["root"] / "data/split/split.csv", 8)
    wrong = TorchPredictor(model_dir).model
    with torch.no_grad():
        wrong.get_classifier().bias += torch.tensor([0.5, -0.5])
    out = tmp_path / "exported"
    with pytest.raises(ExportError, match=r"does not match torch on 8 images"):
        export_model(model_dir, out, images, ExportConfig(), model=wrong)
    assert not out.exists() and list(tmp_path.iterdir()) == []  # no partial folder left


def test_int8_is_not_served_when_it_loses_auc(project, exported, tmp_path):
    from pipeline.export import int8_decision, split_images

    images, labels = split_images(project["params"], project["root"] / "data/split/split.csv", ("test",))
    y = np.array([label == "malignant" for label in labels], dtype=int)
    strict = int8_decision(exported, images, y, ExportConfig(max_auc_drop=-1.0))  # no model can pass
    assert not strict["served"] and strict["reason"].startswith("float served")
    lenient = int8_decision(exported, images, y, ExportConfig(max_auc_drop=1.0))
    assert lenient["served"] and lenient["test_auc_int8"] == strict["test_auc_int8"]
    # < 0.75, not 0.5: on this CPU the tiny 64 px model's int8 copy differs by up to 0.597 in P, the
    # same before issue 13's changes (floating point differs between CPUs).
    assert 0 <= lenient["call_agreement"] <= 1 and lenient["max_abs_diff_vs_fp32"] < 0.75


def test_tampered_onnx_is_refused(exported, tmp_path, capsys):
    from pipeline.cli import main

    bad = tmp_path / "tampered"
    shutil.copytree(exported, bad)
    for name in (INT8_FILE, ONNX_FILE):
        data = bytearray((bad / name).read_bytes())
        data[len(data) // 2] ^= 0xFF
        (bad / name).write_bytes(bytes(data))
        with pytest.raises(ModelDirError, match=rf"{name}: sha256 does not match metadata\.json"):
            OnnxPredictor(bad, file=name)
    code = main(["predict", str(herlev_images(1)[0]), "--model", str(bad)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and "sha256 does not match" in err[0] and "Traceback" not in err[0]


def test_registry_champion_is_the_onnx_export_and_runs_without_torch(project):
    from mlflow import MlflowClient

    root = project["root"]
    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    champion = client.get_model_version_by_alias("cytology-classifier", "champion")
    assert str(champion.version) == project["export"]["model_version"]
    assert champion.tags["format"] == "onnx" and champion.tags["source_version"] == project["export"]["source_version"]
    files = [str(p) for p in herlev_images(3)]
    code = f"""
import sys, json
sys.modules['torch'] = None  # any import of torch now fails
import mlflow, pandas as pd
from pipeline.inference.mlflow_pyfunc import encode_image_file
mlflow.set_tracking_uri({"sqlite:///" + str(root / "mlflow.db")!r})
model = mlflow.pyfunc.load_model({MODEL!r})
out = model.predict(pd.DataFrame({{'image': [encode_image_file(f) for f in {files!r}]}}))
print(json.dumps({{'p': out['p_malignant'].tolist(), 'v': out['model_version'].tolist(), 'e': out['error'].tolist(),
                  'outputs': model.metadata.get_output_schema().input_names()}}))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=root)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    from PIL import Image

    onnx_p = OnnxPredictor(root / "models/exported")
    want = onnx_p.score([np.asarray(Image.open(f).convert("RGB")) for f in files]).p_malignant
    np.testing.assert_allclose(got["p"], want, atol=1e-6)
    assert got["v"] == [project["export"]["model_version"]] * 3 and got["e"] == [""] * 3
    # The logged signature names every output column, the per-row `error` included.
    assert got["outputs"] == [
        "prob_benign",
        "prob_malignant",
        "p_malignant",
        "call",
        "in_domain",
        "ood_score",
        *IMAGE_COLUMNS,
        "model_version",
        "error",
    ]


def test_predict_and_evaluate_use_onnx(project, exported, tmp_path, capsys):
    from pipeline.evaluate_folder import evaluate_folder
    from pipeline.inference.files import predict_paths
    from pipeline.inference.loading import load_predictor

    root = project["root"]
    predictor, version = load_predictor(MODEL, f"sqlite:///{root / 'mlflow.db'}")
    assert predictor.backend == "onnx" and version == project["export"]["model_version"]
    assert predictor.onnx_file == INT8_FILE and predictor.precision == "int8"
    files = herlev_images(4)
    out_onnx = tmp_path / "onnx.csv"
    assert predict_paths([str(f) for f in files], str(exported), str(out_onnx), None, None) == 0
    a = pd.read_csv(out_onnx)
    from PIL import Image

    want = predictor.score([np.asarray(Image.open(f).convert("RGB")) for f in files]).p_malignant
    np.testing.assert_allclose(a["p_malignant"], want, atol=1e-6)
    assert (a["model_version"].astype(str) == project["export"]["model_version"]).all()

    data = tmp_path / "labelled"
    for f in files:
        (data / f.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy(f, data / f.parent.name / f.name)
    report = evaluate_folder(
        str(exported), data, ROOT / "configs/labels/herlev_binary.yaml", tmp_path / "ev", project["params"].evaluate
    )
    scored = pd.read_csv(tmp_path / "ev/predictions.csv").set_index("path")["p_malignant"]
    assert report["n_scored"] == 4
    for f, p in zip(files, a["p_malignant"]):
        assert scored[f"{f.parent.name}/{f.name}"] == pytest.approx(p, abs=1e-6)


def test_score_slide_with_onnx_has_cam_saliency(project, exported, tmp_path):
    from PIL import Image

    from pipeline.inference.score_slide import score_slide

    field = np.full((700, 900, 3), 235, np.uint8)
    for i, f in enumerate(herlev_images(3)):
        cell = np.asarray(Image.open(f).convert("RGB").resize((120, 120)))
        field[100 + 150 * i : 220 + 150 * i, 100 + 220 * i : 220 + 220 * i] = cell
    Image.fromarray(field).save(tmp_path / "field.png")
    summary = score_slide(
        str(tmp_path / "field.png"),
        str(exported),
        tmp_path / "out",
        project["params"].slide,
        mpp=0.5,
        log=lambda *_: None,
    )
    assert summary["inference"]["backend"] == "onnx" and summary["saliency"].startswith("CAM")
    assert summary["n_cells"] >= 1 and summary["model"]["version"] == project["export"]["model_version"]
    html = (tmp_path / "out/report.html").read_text()
    shown = min(summary["n_cells"], project["params"].slide.gallery)
    atypia_cells = html.count("class='atypia-cell")  # one outlined crop each
    assert "CAM: the classifier" in html and html.count("data:image/jpeg;base64,") == 1 + 2 * shown + atypia_cells


def test_cam_on_demand_equals_cam_for_every_cell(project, exported):
    """Scoring asks the graph for logits and features only; the report asks for `cam` of the gallery
    cells alone, in a second small pass. Those maps equal the ones a single pass over every cell
    (all three outputs at once, in other batches) gives, and the scores do not change either."""
    from PIL import Image

    from pipeline.inference.predictor import OnnxPredictor
    from pipeline.report.saliency import onnx_saliency_maps

    predictor = OnnxPredictor(exported, batch_size=4)
    crops = [np.asarray(Image.open(f).convert("RGB")) for f in herlev_images(10)]
    x = predictor.preprocess(crops)
    target = predictor.labels.index(predictor.positive_labels[0])
    run = predictor.session.run
    logits_all, cam_all, feats_all = run(["logits", "cam", "features"], {predictor.input_name: x})
    gallery = [7, 2, 5]
    np.testing.assert_allclose(predictor.cams(x[gallery], target), cam_all[gallery, target], rtol=1e-5, atol=1e-5)
    logits, feats = predictor.outputs(x)
    np.testing.assert_allclose(logits, logits_all, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(feats, feats_all, rtol=1e-5, atol=1e-5)
    # The report's overlays for the gallery alone equal those cut from the all-cells pass.
    shown = onnx_saliency_maps(predictor, [crops[i] for i in gallery])
    predictor.cams = lambda batch, label: cam_all[[gallery[j] for j in range(len(batch))], label]
    from_all = onnx_saliency_maps(predictor, [crops[i] for i in gallery])
    assert len(shown) == len(from_all) == len(gallery)
    for a, b in zip(shown, from_all):  # uint8 overlays of maps equal to ~1e-6: at most one grey level apart
        assert a.shape == b.shape and np.abs(a.astype(int) - b.astype(int)).max() <= 1
