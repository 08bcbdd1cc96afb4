"""`cytopipe predict` body: files and folders in, one row per file out (CSV/JSON), on a tiny trained project."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipeline.calibration import Band
from pipeline.inference.files import COLUMNS, DEFAULT_MODEL, collect_paths, predict_paths
from tests.conftest import ROOT, tree_digest

HERLEV = ROOT.parent / "shared" / "data" / "herlev"
GOOD = ["a_good.jpg", "sub/g_good.JPG", "sub/h_good.png", "z_good.jpg"]
# Relative path -> the reason its row must carry (substring).
BAD = {
    "b_empty.jpg": "empty file",
    "c_text.png": "not an image",
    "d_trunc.jpg": "truncated or corrupt",
    "e_broken.jpg": "broken symlink",
    "f_dir.jpg": "is a directory",
}
ORDER = [
    "a_good.jpg",
    "b_empty.jpg",
    "c_text.png",
    "d_trunc.jpg",
    "e_broken.jpg",
    "f_dir.jpg",
    "sub/g_good.JPG",
    "sub/h_good.png",
    "z_good.jpg",
]


@pytest.fixture(scope="module")
def project(tiny_project):
    # The session's tiny project: minimums of 0, so the tiny model has @champion (read only here).
    root, _, _p = tiny_project
    return root


pytestmark = pytest.mark.usefixtures("no_mlflow_env")


@pytest.fixture
def model_dir(project) -> Path:
    return project / "models" / "calibrated"


@pytest.fixture
def meta(model_dir) -> dict:
    return json.loads((model_dir / "model.json").read_text())


@pytest.fixture
def cases(tmp_path) -> Path:
    """A folder (with a subfolder) of good Herlev images and every kind of bad file."""
    folder = tmp_path / "cases"
    (folder / "sub").mkdir(parents=True)
    sources = [
        sorted((HERLEV / c).glob("*.jpg"))[0]
        for c in ("normal_superficiel", "carcinoma_in_situ", "normal_intermediate", "severe_dysplastic")
    ]
    shutil.copyfile(sources[0], folder / "a_good.jpg")
    shutil.copyfile(sources[1], folder / "sub/g_good.JPG")  # suffixes match case-insensitively
    Image.open(sources[2]).save(folder / "sub/h_good.png")
    shutil.copyfile(sources[3], folder / "z_good.jpg")
    (folder / "b_empty.jpg").write_bytes(b"")
    (folder / "c_text.png").write_text("not a picture\n")
    data = sources[0].read_bytes()
    (folder / "d_trunc.jpg").write_bytes(data[: len(data) // 2])
    (folder / "e_broken.jpg").symlink_to(folder / "nowhere.jpg")
    (folder / "f_dir.jpg").mkdir()
    # Neither an error nor a row: hidden files and non-image names inside folders.
    shutil.copyfile(sources[0], folder / ".hidden.jpg")
    (folder / "notes.txt").write_text("hello\n")
    return folder


def _rows_by_rel(frame: pd.DataFrame, folder: Path) -> dict[str, pd.Series]:
    return {str(Path(p).relative_to(folder)): row for p, row in zip(frame["path"], frame.to_dict("records"))}


def test_collect_paths_expands_folders_and_reports_bad_paths(cases, tmp_path):
    files, errors = collect_paths([str(cases), str(cases / "notes.txt"), str(tmp_path / "missing")])
    assert [str(p.relative_to(cases)) for p in files] == [
        "a_good.jpg",
        "b_empty.jpg",
        "c_text.png",
        "d_trunc.jpg",
        "sub/g_good.JPG",
        "sub/h_good.png",
        "z_good.jpg",
    ]
    reasons = {Path(e["path"]).name: e["error"] for e in errors}
    assert reasons["e_broken.jpg"] == "broken symlink"
    assert "directory" in reasons["f_dir.jpg"]
    assert "unsupported file type .txt" in reasons["notes.txt"]
    assert reasons["missing"] == "no such file or directory"


def test_folder_rows_in_order_with_errors(project, model_dir, meta, cases, tmp_path, capsys):
    before = tree_digest(cases)
    out = tmp_path / "out" / "pred.csv"
    assert predict_paths([str(cases)], str(model_dir), str(out), None, None) == 0
    frame = pd.read_csv(out, keep_default_na=False, dtype={"model_version": str})
    assert tuple(frame.columns) == COLUMNS
    assert [str(Path(p).relative_to(cases)) for p in frame["path"]] == ORDER
    rows = _rows_by_rel(frame, cases)
    cal = meta["calibration"]
    band = Band(cal["threshold"], cal["band_width"])
    for rel in GOOD:
        row = rows[rel]
        p = float(row["p_malignant"])
        assert row["error"] == "" and 0.0 <= p <= 1.0 and row["in_domain"] in ("True", "False")
        # An out-of-domain image is never called benign/malignant (pipeline/ood.py).
        assert row["call"] == (band.call([p])[0] if row["in_domain"] == "True" else "out of domain")
        assert float(row["ood_score"]) >= 0
    for rel, reason in BAD.items():
        row = rows[rel]
        assert reason in row["error"] and "\n" not in row["error"], rel
        assert row["p_malignant"] == "" and row["call"] == "" and row["in_domain"] == row["ood_score"] == ""
    assert set(frame["model_version"]) == {str(meta["mlflow"]["version"])}
    err = capsys.readouterr().err
    for rel in BAD:
        assert f"skipped: {cases / rel}: " in err
    assert "Traceback" not in err
    n_mal = sum(rows[r]["call"] == "malignant" for r in GOOD)
    n_ind = sum(rows[r]["call"] == "indeterminate" for r in GOOD)
    n_ood = sum(rows[r]["call"] == "out of domain" for r in GOOD)
    assert (
        f"predict: 4 scored, {n_mal} malignant, {n_ind} indeterminate, {n_ood} out of domain, 5 errors -> {out}" in err
    )
    assert tree_digest(cases) == before
    assert (cases / "e_broken.jpg").is_symlink() and (cases / "f_dir.jpg").is_dir()


def test_csv_and_json_outputs(project, model_dir, meta, cases, tmp_path, capsys):
    missing = tmp_path / "no_such_dir"
    args = [str(cases / "a_good.jpg"), str(missing), str(cases / "b_empty.jpg"), str(cases / "sub")]
    csv_out, json_out = tmp_path / "p.csv", tmp_path / "p.json"
    assert predict_paths(args, str(model_dir), str(csv_out), None, None) == 0
    assert predict_paths(args, str(model_dir), str(json_out), None, None) == 0
    frame = pd.read_csv(csv_out)
    assert tuple(frame.columns) == COLUMNS
    doc = json.loads(json_out.read_text(), parse_constant=lambda c: pytest.fail(f"invalid JSON constant {c}"))
    assert set(doc) == {"model", "model_version", "threshold", "band", "tta", "ood", "predictions"}
    assert doc["ood"]["method"] == "mahalanobis" and doc["ood"]["threshold"] == pytest.approx(meta["ood"]["threshold"])
    cal = meta["calibration"]
    assert doc["model"] == str(model_dir) and doc["model_version"] == str(meta["mlflow"]["version"])
    assert doc["threshold"] == pytest.approx(cal["threshold"])
    assert doc["band"] == pytest.approx(cal["band"]) and doc["tta"] is bool(cal.get("tta", False))
    preds = doc["predictions"]
    assert [tuple(r) for r in preds] == [COLUMNS] * len(preds)
    expected_paths = [
        str(cases / "a_good.jpg"),
        str(missing),
        str(cases / "b_empty.jpg"),
        str(cases / "sub/g_good.JPG"),
        str(cases / "sub/h_good.png"),
    ]
    assert [r["path"] for r in preds] == expected_paths == list(frame["path"])
    assert preds[1]["error"] == "no such file or directory" and preds[1]["p_malignant"] is None
    assert preds[1]["call"] == "" and "empty file" in preds[2]["error"]
    good = [i for i in (0, 3, 4)]
    assert np.allclose([preds[i]["p_malignant"] for i in good], frame["p_malignant"].iloc[good].to_numpy())
    assert all(preds[i]["error"] == "" for i in good)
    assert frame["p_malignant"].isna().tolist() == [False, True, True, False, False]

    capsys.readouterr()
    bad = tmp_path / "p.xlsx"
    assert predict_paths(args, str(model_dir), str(bad), None, None) == 2
    assert not bad.exists() and "unsupported output type .xlsx" in capsys.readouterr().err


def test_nothing_scorable_writes_nothing(project, model_dir, cases, tmp_path, capsys):
    bad = [str(cases / n) for n in ("b_empty.jpg", "c_text.png", "d_trunc.jpg")] + [str(tmp_path / "gone.jpg")]
    out = tmp_path / "new.csv"
    assert predict_paths(bad, str(model_dir), str(out), None, None) == 1
    assert not out.exists()
    captured = capsys.readouterr()
    assert captured.out == "" and "none of 4 file(s) could be scored" in captured.err
    # An existing output survives a failed run.
    kept = tmp_path / "kept.json"
    kept.write_text('{"old": true}\n')
    assert predict_paths(bad, str(model_dir), str(kept), None, None) == 1
    assert kept.read_text() == '{"old": true}\n'
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp files left
    assert predict_paths([str(cases / "f_dir.jpg")], str(model_dir), None, None, None) == 1
    assert "no image files found" in capsys.readouterr().err


def test_stdout_csv(project, model_dir, cases, capsys):
    assert predict_paths([str(cases / "sub")], str(model_dir), None, None, None) == 0
    captured = capsys.readouterr()
    frame = pd.read_csv(io.StringIO(captured.out))
    assert tuple(frame.columns) == COLUMNS and len(frame) == 2
    assert frame["p_malignant"].between(0, 1).all()
    assert "predict: 2 scored" in captured.err and "->" not in captured.err


def test_mlflow_uri_matches_folder_and_missing_alias_helps(project, model_dir, meta, cases, tmp_path, capsys):
    uri = f"sqlite:///{project / 'mlflow.db'}"
    by_dir, by_uri = tmp_path / "dir.json", tmp_path / "uri.json"
    assert predict_paths([str(cases)], str(model_dir), str(by_dir), None, None) == 0
    assert predict_paths([str(cases)], DEFAULT_MODEL, str(by_uri), None, uri) == 0
    a, b = (json.loads(p.read_text()) for p in (by_dir, by_uri))
    assert [r["path"] for r in a["predictions"]] == [r["path"] for r in b["predictions"]]
    pa = [r["p_malignant"] for r in a["predictions"] if not r["error"]]
    pb = [r["p_malignant"] for r in b["predictions"] if not r["error"]]
    assert len(pa) == 4 and np.allclose(pa, pb, atol=1e-6)
    # The version comes from the registry (the logged model.json holds the training registration's).
    assert b["model_version"] == str(meta["mlflow"]["version"]) and b["model"] == DEFAULT_MODEL
    pinned = tmp_path / "pinned.csv"
    assert predict_paths([str(cases / "a_good.jpg")], "models:/cytology-classifier/1", str(pinned), None, uri) == 0
    assert pd.read_csv(pinned, dtype={"model_version": str})["model_version"].tolist() == ["1"]

    capsys.readouterr()
    empty_uri = f"sqlite:///{tmp_path / 'empty.db'}"  # a registry without the model
    out = tmp_path / "none.csv"
    assert predict_paths([str(cases)], DEFAULT_MODEL, str(out), None, empty_uri) == 1
    err = capsys.readouterr().err
    # MLflow itself may log (e.g. creating tables); ours is exactly one line.
    lines = [line for line in err.splitlines() if line.startswith("cytopipe predict:")]
    assert len(lines) == 1 and lines[0].startswith("cytopipe predict: error: ")
    assert "make run" in lines[0] and "--model models/calibrated" in lines[0] and "@champion" in lines[0]
    assert "Traceback" not in err
    assert not out.exists()
    # Another missing alias: the registry's own reason, still one line.
    assert predict_paths([str(cases)], "models:/cytology-classifier@nosuch", None, None, uri) == 1
    err = capsys.readouterr().err
    assert err.startswith("cytopipe predict: error: models:/cytology-classifier@nosuch") and "Traceback" not in err


def test_batch_size_does_not_change_scores(project, model_dir, cases, tmp_path):
    small, large = tmp_path / "b2.csv", tmp_path / "b32.csv"
    assert predict_paths([str(cases)], str(model_dir), str(small), None, None, batch_size=2) == 0
    assert predict_paths([str(cases)], str(model_dir), str(large), None, None, batch_size=32) == 0
    a, b = pd.read_csv(small), pd.read_csv(large)
    assert list(a["path"]) == list(b["path"]) and list(a["error"].fillna("")) == list(b["error"].fillna(""))
    assert np.allclose(a["p_malignant"], b["p_malignant"], atol=1e-5, equal_nan=True)
    assert list(a["call"].fillna("")) == list(b["call"].fillna(""))


def test_uncalibrated_model_warns_once(project, cases, tmp_path, capsys):
    train_dir = project / "models" / "train"
    if json.loads((train_dir / "model.json").read_text()).get("calibration"):
        pytest.skip("the trained model already carries a calibration")
    out = tmp_path / "u.json"
    assert predict_paths([str(cases / "a_good.jpg")], str(train_dir), str(out), None, None) == 0
    assert capsys.readouterr().err.count("no calibration") == 1
    doc = json.loads(out.read_text())
    assert doc["threshold"] == 0.5 and doc["band"] == [0.5, 0.5]
    p = doc["predictions"][0]["p_malignant"]
    assert doc["predictions"][0]["call"] == ("malignant" if p >= 0.5 else "benign")
