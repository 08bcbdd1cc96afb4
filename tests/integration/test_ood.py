"""The domain-shift (OOD) guard fitted by the evaluate stage and carried by the export, and that no
prediction path calls an out-of-domain cell benign or malignant (on the session's exported tiny
project; the guard's math: tests/unit/test_ood.py)."""

from __future__ import annotations

import base64
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipeline import ood
from pipeline.inference.predictor import OnnxPredictor, TorchPredictor
from pipeline.model_card import ModelDirError
from pipeline.morphometry.slides import CELL_COLUMNS as MORPH_COLUMNS
from tests.conftest import ROOT

HERLEV = ROOT.parent / "shared" / "data" / "herlev"
CALLS = {"benign", "malignant", "indeterminate"}


# ---------------------------------------------------------------- the tiny project


@pytest.fixture(scope="module")
def project(exported_project):
    return exported_project


pytestmark = pytest.mark.usefixtures("no_mlflow_env")


def synthetic_ood_images(n: int = 6) -> list[np.ndarray]:
    """Random noise, flat colours and stripes: nothing like a Pap-stained cell."""
    rng = np.random.default_rng(0)
    noise = [rng.integers(0, 256, (96, 96, 3), dtype=np.uint8) for _ in range(n)]
    flat = [np.full((96, 96, 3), c, np.uint8) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 0), (20, 200, 255))]
    stripes = []
    for period in (4, 8, 16):
        row = ((np.arange(96) // period) % 2 * 255).astype(np.uint8)
        stripes.append(np.repeat(np.repeat(row[None, :, None], 96, 0), 3, 2))
    return noise + flat + stripes


def test_cells(project, n: int = 24) -> list[np.ndarray]:
    split = pd.read_csv(project["root"] / "data/split/split.csv")
    rows = split[split["split"] == "test"].head(n)
    return [np.asarray(Image.open(HERLEV / p).convert("RGB")) for p in rows["path"]]


test_cells.__test__ = False  # a helper, not a test


def test_evaluate_writes_the_guard_beside_the_weights(project):
    model_dir = project["root"] / "models/calibrated"
    meta = json.loads((model_dir / "model.json").read_text())
    guard = meta["ood"]
    assert guard["method"] == "mahalanobis" and guard["pass_rate"] == 0.95 and guard["feature_dim"] == 1280
    assert guard["val_pass_rate"] >= 0.95 and 0 <= guard["test_pass_rate"] <= 1
    assert meta["sha256"][ood.OOD_FILE] and (model_dir / ood.OOD_FILE).is_file()
    assert project["evaluate"]["metrics"]["ood"]["threshold"] == pytest.approx(guard["threshold"])
    predictions = pd.read_csv(project["root"] / "reports/evaluate/test_predictions.csv")
    assert {"ood_score", "in_domain"} <= set(predictions.columns)
    assert predictions["in_domain"].mean() == pytest.approx(guard["test_pass_rate"])


def test_registry_records_the_guard(project):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=project["params"].mlflow.tracking_uri)  # the project's own store
    name = project["params"].mlflow.registered_model
    version = json.loads((project["root"] / "models/calibrated/model.json").read_text())["mlflow"]["version"]
    tags = client.get_model_version(name, version).tags
    assert tags["ood.method"] == "mahalanobis" and float(tags["ood.threshold"]) > 0
    assert tags["ood.pass_rate"] == "0.95" and tags["ood.feature_dim"] == "1280"


@pytest.mark.parametrize("folder", ["models/calibrated", "models/exported"])
def test_synthetic_inputs_score_higher_than_cells(project, folder):
    model_dir = project["root"] / folder
    # The float ONNX graph: the tiny int8 model (served by tiny.yaml) quantizes the near-zero
    # features of a black image to a low score, so its guard is checked on cells/noise only below.
    predictor = (
        OnnxPredictor(model_dir, file="model.onnx") if folder.endswith("exported") else TorchPredictor(model_dir)
    )
    # tta=None: the view setting the model (and its guard) was calibrated with.
    cells, odd = predictor.score(test_cells(project)), predictor.score(synthetic_ood_images())
    s_cells, in_cells, s_ood, in_ood = cells.ood_score, cells.in_domain, odd.ood_score, odd.in_domain
    assert np.isfinite(s_cells).all() and np.isfinite(s_ood).all()
    # All but one synthetic input score above the median cell. Why not all: on this CPU the tiny
    # 2-epoch, 64 px model scores the black image 33.9 against a cell median of 57.4, identically
    # before issue 13's changes (floating point differs between CPUs); the real model's guard is
    # measured in benchmarks/ood_comparison.py.
    assert np.sort(s_ood)[1] > np.median(s_cells)
    assert (~in_ood).mean() >= 0.8 and in_cells.mean() >= 0.7


def test_int8_guard_flags_noise_and_stripes(project):
    predictor = OnnxPredictor(project["root"] / "models/exported")  # int8, as tiny.yaml serves it
    assert predictor.precision == "int8"
    images = synthetic_ood_images()
    s_cells = predictor.score(test_cells(project)).ood_score
    odd = predictor.score(images[:6] + images[-3:])  # noise, stripes
    s_ood, in_ood = odd.ood_score, odd.in_domain
    assert s_ood.min() > np.median(s_cells) and not in_ood.any()


def test_export_carries_the_guard_and_matches_torch(project):
    exported = project["root"] / "models/exported"
    meta = json.loads((exported / "metadata.json").read_text())
    assert meta["outputs"] == ["logits", "cam", "features"]
    assert meta["ood"]["method"] == "mahalanobis" and meta["sha256"][ood.OOD_FILE]
    assert (exported / ood.OOD_FILE).read_bytes() == (project["root"] / "models/calibrated" / ood.OOD_FILE).read_bytes()
    check = meta["validation"]["ood"]
    assert check["max_rel_diff"] <= check["rtol"] and check["in_domain_agreement"] == 1.0
    images = test_cells(project, 8) + synthetic_ood_images(2)
    by_torch = TorchPredictor(project["root"] / "models/calibrated").score(images, tta=False)
    by_onnx = OnnxPredictor(exported, file="model.onnx").score(images, tta=False)
    s_torch, in_torch, s_onnx, in_onnx = by_torch.ood_score, by_torch.in_domain, by_onnx.ood_score, by_onnx.in_domain
    np.testing.assert_allclose(s_onnx, s_torch, rtol=1e-3)
    assert (in_onnx == in_torch).all()


@pytest.mark.parametrize("folder", ["models/calibrated", "models/exported"])
def test_tampered_guard_is_refused(project, tmp_path, folder):
    copy = tmp_path / "model"
    shutil.copytree(project["root"] / folder, copy)
    data = bytearray((copy / ood.OOD_FILE).read_bytes())
    data[-30] ^= 0xFF
    (copy / ood.OOD_FILE).write_bytes(bytes(data))
    cls = OnnxPredictor if folder.endswith("exported") else TorchPredictor
    with pytest.raises(ModelDirError, match=r"ood\.npz: sha256 does not match"):
        cls(copy)
    (copy / ood.OOD_FILE).unlink()
    with pytest.raises(ModelDirError, match="ood.npz missing"):
        cls(copy)


def test_model_without_guard_still_works(project, tmp_path, capsys):
    copy = tmp_path / "old"
    shutil.copytree(project["root"] / "models/calibrated", copy)
    meta = json.loads((copy / "model.json").read_text())
    meta.pop("ood")
    meta["sha256"].pop(ood.OOD_FILE)
    (copy / "model.json").write_text(json.dumps(meta))
    (copy / ood.OOD_FILE).unlink()
    predictor = TorchPredictor(copy)
    got = predictor.score(synthetic_ood_images(2) + synthetic_ood_images(2), tta=False)
    probs, scores, ok = got.probs, got.ood_score, got.in_domain
    assert predictor.ood is None and np.isnan(scores).all() and ok.all() and probs.shape == (len(ok), 2)
    err = capsys.readouterr().err
    assert err.count("has no OOD guard") == 1  # one line, once per loaded model


def _write_images(folder: Path, images: list[np.ndarray], prefix: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, im in enumerate(images):
        Image.fromarray(im).save(folder / f"{prefix}{i:02d}.png")


def test_predict_never_calls_an_out_of_domain_image(project, tmp_path):
    from pipeline.inference.files import predict_paths

    _write_images(tmp_path / "in", test_cells(project, 12), "cell")
    _write_images(tmp_path / "in", synthetic_ood_images(), "synthetic")
    out = tmp_path / "p.json"
    assert predict_paths([str(tmp_path / "in")], str(project["root"] / "models/exported"), str(out), None, None) == 0
    rows = json.loads(out.read_text())["predictions"]
    outside = [r for r in rows if r["in_domain"] is False]
    assert len(outside) >= 10 and all(r["call"] == ood.OUT_OF_DOMAIN for r in outside)
    assert all(r["call"] in CALLS for r in rows if r["in_domain"]) and any(r["in_domain"] for r in rows)
    assert all(isinstance(r["ood_score"], float) for r in rows)


def test_predict_workers_give_the_same_rows_in_order(project, tmp_path):
    """Batches scored by several workers at once come back in input order with the scores of one worker."""
    from pipeline.inference.files import predict_paths

    _write_images(tmp_path / "in", test_cells(project, 12), "cell")
    _write_images(tmp_path / "in", synthetic_ood_images(), "synthetic")
    (tmp_path / "in" / "cell05_bad.png").write_text("not an image")
    frames = []
    for workers in (1, 3):
        out = tmp_path / f"w{workers}.csv"
        assert (
            predict_paths(
                [str(tmp_path / "in")],
                str(project["root"] / "models/exported"),
                str(out),
                None,
                None,
                batch_size=4,
                workers=workers,
            )
            == 0
        )
        frames.append(pd.read_csv(out))
    one, three = frames
    assert list(one["path"]) == sorted(one["path"]) and list(three["path"]) == list(one["path"])
    assert list(three["error"].fillna("")) == list(one["error"].fillna("")) and one["error"].notna().sum() == 1
    np.testing.assert_allclose(three["p_malignant"], one["p_malignant"], atol=1e-5)
    np.testing.assert_allclose(three["ood_score"], one["ood_score"], rtol=1e-4)
    assert list(three["call"].fillna("")) == list(one["call"].fillna(""))
    assert (
        predict_paths([str(tmp_path / "in")], str(project["root"] / "models/exported"), None, None, None, workers=0)
        == 2
    )


def test_pyfunc_never_calls_an_out_of_domain_image(project):
    from pipeline.inference.mlflow_pyfunc import predict_frame

    def b64(im):
        buf = io.BytesIO()
        Image.fromarray(im).save(buf, format="PNG")
        return base64.b64encode(buf.getvalue()).decode()

    images = test_cells(project, 6) + synthetic_ood_images()
    frame = pd.DataFrame({"image": [b64(im) for im in images] + ["not base64!"]})
    out = predict_frame(OnnxPredictor(project["root"] / "models/exported"), frame)
    assert {"in_domain", "ood_score"} <= set(out.columns)
    good = out.iloc[:-1]
    assert (good.loc[good["in_domain"] == False, "call"] == ood.OUT_OF_DOMAIN).all()  # noqa: E712
    assert (good["in_domain"] == False).sum() >= 10  # noqa: E712
    assert set(good.loc[good["in_domain"] == True, "call"]) <= CALLS  # noqa: E712
    assert out.iloc[-1]["call"] == "error" and out.iloc[-1]["ood_score"] is None
    json.dumps(out.to_dict(orient="records"), allow_nan=False)  # strict JSON for the REST answer


def test_score_slide_excludes_out_of_domain_cells(project, tmp_path):
    from pipeline.inference.score_slide import score_slide
    from tests.slides import CELLS, SIZE, draw_cells, glass, write_pyramid

    slide = write_pyramid(tmp_path / "cells.tiff", draw_cells(glass(SIZE), CELLS))
    out = tmp_path / "report"
    summary = score_slide(
        str(slide), str(project["root"] / "models/exported"), out, project["params"].slide, top=6, log=lambda *_: None
    )
    cells = pd.read_csv(out / "cells.csv")
    assert list(cells.columns)[-3 - len(MORPH_COLUMNS) :] == ["call", "ood_score", "in_domain", *MORPH_COLUMNS]
    outside = cells[~cells["in_domain"]]
    assert (outside["call"] == ood.OUT_OF_DOMAIN).all()
    assert set(cells.loc[cells["in_domain"], "call"]) <= CALLS
    assert summary["n_out_of_domain"] == len(outside)
    assert summary["fraction_out_of_domain"] == pytest.approx(len(outside) / len(cells))
    assert summary["n_malignant"] == int((cells["call"] == "malignant").sum())
    assert summary["ood_warning"] == (summary["fraction_out_of_domain"] > summary["max_ood_fraction"])
    assert summary["max_ood_fraction"] == 0.3 and summary["ood_method"] == "mahalanobis"
    assert ("unreliable" in summary["slide_call"]) == summary["ood_warning"]
    assert "out-of-domain cells are not counted" in summary["rule"]


def test_score_slide_gallery_items_carry_the_guard(project, tmp_path, monkeypatch):
    import pipeline.inference.score_slide as scoring
    from pipeline.inference.score_slide import score_slide
    from tests.slides import CELLS, SIZE, draw_cells, glass, write_pyramid

    seen = {}
    real = scoring.render_html  # pipeline.report.page's, imported by name at the top of score_slide.py

    def spy(summary, heat, gallery, *args, **kwargs):
        seen["gallery"] = gallery
        return real(summary, heat, gallery, *args, **kwargs)

    monkeypatch.setattr(scoring, "render_html", spy)
    slide = write_pyramid(tmp_path / "cells.tiff", draw_cells(glass(SIZE), CELLS))
    score_slide(
        str(slide),
        str(project["root"] / "models/calibrated"),
        tmp_path / "r",
        project["params"].slide,
        top=4,
        log=lambda *_: None,
    )
    items = seen["gallery"]
    assert len(items) == 4
    for item in items:
        assert isinstance(item["in_domain"], bool) and isinstance(item["ood_score"], float)
        assert item["in_domain"] or item["call"] == ood.OUT_OF_DOMAIN
