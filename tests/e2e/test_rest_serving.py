"""REST serving with `mlflow models serve` of the session's exported tiny project (its @champion, the
ONNX export): the served scores match `cytopipe predict`, bad rows are reported one by one beside the
good ones, and a malformed request fails as a whole. The model's other paths:
tests/integration/test_export.py and tests/integration/test_bad_inputs.py."""

from __future__ import annotations

import base64
import json

import numpy as np
import pandas as pd
import pytest

from tests.conftest import SHARED_DATA, herlev_images, tree_digest
from tests.corpus import ACCEPTED, CALLS, REJECTED, SENDABLE, Run, _zero_bytes, corpus_state, run_predict
from tests.serving import frame, post, serve

HERLEV = SHARED_DATA / "herlev"
MODEL = "models:/cytology-classifier@champion"


@pytest.fixture(scope="module")
def project(exported_project):
    return exported_project


# --------------------------------------------------------------------------- good images, bad rows (test_export)


@pytest.fixture
def server(project):
    with serve(project["root"], MODEL) as port:
        yield port


def test_rest_server_matches_predict_and_reports_bad_rows(project, server, tmp_path):
    from pipeline.inference.files import predict_paths
    from pipeline.inference.mlflow_pyfunc import encode_image_file

    files = herlev_images(8)
    before = tree_digest(HERLEV)
    status, body = post(server, frame([encode_image_file(f) for f in files]))
    assert status == 200, body
    served = pd.DataFrame(body["predictions"])
    out = tmp_path / "predict.json"
    assert (
        predict_paths([str(f) for f in files], MODEL, str(out), None, f"sqlite:///{project['root'] / 'mlflow.db'}") == 0
    )
    rows = json.loads(out.read_text())["predictions"]
    np.testing.assert_allclose(served["p_malignant"], [r["p_malignant"] for r in rows], atol=1e-5)
    assert list(served["call"]) == [r["call"] for r in rows]
    assert list(served["in_domain"]) == [r["in_domain"] for r in rows]
    np.testing.assert_allclose(served["ood_score"], [r["ood_score"] for r in rows], rtol=1e-5)
    assert (
        list(served["model_version"]) == [r["model_version"] for r in rows] == [project["export"]["model_version"]] * 8
    )
    assert list(served["error"]) == [""] * 8

    # A bad row is reported in its own `error` and skipped; the good rows around it are scored.
    bad = {
        "!!!not base64!!!": "row 1: not valid base64",
        base64.b64encode(b"plain text, no pixels").decode(): "row 2: not an image",
        "": "row 3: empty",
    }
    good = encode_image_file(files[0])
    status, body = post(server, frame([good, *bad, good]))
    assert status == 200, body
    got = body["predictions"]
    assert len(got) == 5
    for r, message in zip(got[1:4], bad.values()):
        assert r["error"].startswith(message) and "\n" not in r["error"], r
        assert r["call"] == "error" and r["p_malignant"] is None and r["prob_malignant"] is None
    for r in (got[0], got[4]):
        assert r["error"] == "" and r["p_malignant"] == pytest.approx(rows[0]["p_malignant"], abs=1e-5)

    # A request that is malformed as a whole still fails as a whole.
    whole = {
        "no rows": (frame([]), "no rows"),
        "empty body": (b"", "JSON"),
        "no image column": ({"dataframe_split": {"columns": ["picture"], "data": [[good]]}}, "image"),
    }
    for what, (payload, message) in whole.items():
        status, body = post(server, payload)
        assert 400 <= status < 500, (what, status, body)
        assert message in body.get("message", ""), (what, body)
    status, body = post(server, frame([good]))  # still serving
    assert status == 200 and body["predictions"][0]["p_malignant"] == pytest.approx(rows[0]["p_malignant"], abs=1e-5)
    assert tree_digest(HERLEV) == before


# --------------------------------------------------------------------------- the bad-input corpus (test_bad_inputs)


@pytest.fixture(scope="module")
def predict_run(project, corpus, state_before, tmp_path_factory) -> Run:
    return run_predict(project, corpus, tmp_path_factory.mktemp("work"))


def test_rest_server_reports_bad_rows_and_scores_the_rest(project, corpus, predict_run, state_before):
    images = corpus / "images"
    sent = ACCEPTED + [c for c in REJECTED if c.make in SENDABLE]
    rows = [base64.b64encode((images / c.rel).read_bytes()).decode() for c in sent] + ["%%% not base64 %%%", None]
    reasons = [c.reason for c in sent] + ["not valid base64", "empty or not a string"]
    reasons[sent.index(next(c for c in sent if c.make is _zero_bytes))] = "empty or not a string"
    with serve(project["root"], MODEL) as port:
        status, body = post(port, frame(rows))
    assert status == 200, body
    got = body["predictions"]
    assert len(got) == len(rows)
    expected = pd.read_csv(predict_run.out / "predictions.csv").set_index("path")["p_malignant"]
    for i, (row, reason) in enumerate(zip(got, reasons)):
        if reason is None:
            assert row["error"] == "" and (
                row["call"] in CALLS if row["in_domain"] else row["call"] == "out of domain"
            ), (i, row)
            assert row["p_malignant"] == pytest.approx(expected[str(images / sent[i].rel)], abs=1e-5)
        else:
            assert row["error"].startswith(f"row {i}: ") and reason in row["error"], (i, row)
            assert "\n" not in row["error"] and row["call"] == "error" and row["p_malignant"] is None
    assert corpus_state(corpus) == state_before
