"""Bad-input corpus (issue 7, built by tests/corpus.py): every entry point (ingest, predict, evaluate
--data, score-slide; the REST server: tests/e2e/test_rest_serving.py) meets truncated, empty,
mislabelled, odd-mode, tiny, bomb, unreadable, dangling and oddly named inputs. Each bad input gets
one line naming it and the reason, without a traceback; the good inputs beside it are scored;
nothing half-written is left; the corpus is byte-identical afterwards. Lossless conversions and CMYK
are accepted and scored.

The CLI runs as a subprocess, so stderr is exactly what a user sees. As root (these tests run as
root) a chmod 000 file is still readable, so the subprocesses drop the capabilities that allow it.
"""

from __future__ import annotations

import struct
import subprocess
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from tests.conftest import without_root_file_access
from tests.corpus import (
    ACCEPTED,
    BAD_SLIDES,
    BENIGN,
    CALLS,
    EMPTY_CLASS,
    GOOD_SLIDES,
    LABELS,
    MALIGNANT,
    REJECTED,
    Run,
    corpus_state,
    cytopipe,
    leftovers,
    lines_about,
    run_cli,
    run_predict,
)


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def project(exported_project):
    return exported_project


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("work")


@pytest.fixture(scope="module")
def ingest_run(project, corpus, state_before, work) -> Run:
    return run_cli(
        corpus,
        work,
        "ingest",
        "ingest",
        "--params",
        project["root"] / "params.yaml",
        "--source",
        corpus / "images",
        "--label-map",
        LABELS,
        "--group-regex",
        "(.+)",
        "--out",
        work / "ingest",
    )


@pytest.fixture(scope="module")
def predict_run(project, corpus, state_before, work) -> Run:
    return run_predict(project, corpus, work)


@pytest.fixture(scope="module")
def evaluate_run(project, corpus, state_before, work) -> Run:
    return run_cli(
        corpus,
        work,
        "evaluate",
        "evaluate",
        "--data",
        corpus / "images",
        "--label-map",
        LABELS,
        "--model",
        project["root"] / "models/exported",
        "--params",
        project["root"] / "params.yaml",
        "--out",
        work / "evaluate",
    )


@pytest.fixture(scope="module")
def slides_run(project, corpus, state_before, work) -> Run:
    slides = [corpus / "slides" / c.rel for c in GOOD_SLIDES + BAD_SLIDES] + [corpus / "empty"]
    return run_cli(
        corpus,
        work,
        "slides",
        "score-slide",
        *slides,
        "--model",
        project["root"] / "models/exported",
        "--params",
        project["root"] / "params.yaml",
        "--out",
        work / "slides",
        "--top",
        2,
    )


RUNS = {"ingest": "ingest_run", "predict": "predict_run", "evaluate": "evaluate_run"}


# --------------------------------------------------------------------------- the premise


def test_subprocesses_cannot_read_a_chmod_000_file(corpus):
    locked = corpus / "images" / f"{MALIGNANT}/locked.jpg"
    proc = subprocess.run(without_root_file_access(["cat", str(locked)]), capture_output=True, text=True)
    assert proc.returncode != 0 and "Permission denied" in proc.stderr


def test_corpus_has_every_kind(corpus):
    modes = {c.rel: Image.open(corpus / "images" / c.rel).mode for c in ACCEPTED}
    assert modes == {c.rel: c.mode for c in ACCEPTED}
    bomb = (corpus / "images" / f"{BENIGN}/bomb.png").read_bytes()
    assert struct.unpack(">II", bomb[16:24]) == (60000, 60000) and len(bomb) < 1000
    assert not (corpus / "images" / f"{BENIGN}/dangling.jpg").exists()
    assert list((corpus / "images" / EMPTY_CLASS).iterdir()) == [] == list((corpus / "empty").iterdir())


# --------------------------------------------------------------------------- ingest, predict, evaluate --data


@pytest.mark.parametrize("entry", RUNS)
@pytest.mark.parametrize("case", REJECTED, ids=lambda c: c.id)
def test_each_bad_file_is_one_line_naming_it(request, entry, case):
    run = request.getfixturevalue(RUNS[entry])
    lines = lines_about(run.proc.stderr, case.rel)
    assert len(lines) == 1, (case.rel, run.proc.stderr)
    assert case.reason in lines[0], lines[0]


@pytest.mark.parametrize("entry", RUNS)
def test_run_succeeds_without_traceback_and_leaves_inputs_alone(request, entry, state_before):
    run = request.getfixturevalue(RUNS[entry])
    assert run.proc.returncode == 0, run.proc.stderr
    assert "Traceback" not in run.proc.stderr
    assert run.state_after == state_before
    assert leftovers(run.out) == []


@pytest.mark.parametrize("entry", ["ingest", "evaluate"])
def test_an_empty_class_folder_is_reported(request, entry):
    run = request.getfixturevalue(RUNS[entry])
    lines = lines_about(run.proc.stderr, EMPTY_CLASS)
    assert len(lines) == 1 and "empty class folder" in lines[0], run.proc.stderr


def test_ingest_accepts_good_and_converted_images(ingest_run):
    manifest = pd.read_csv(ingest_run.out / "manifest.csv")
    assert sorted(manifest["path"]) == sorted(c.rel for c in ACCEPTED)
    assert dict(zip(manifest["path"], manifest["mode"])) == {c.rel: c.mode for c in ACCEPTED}
    rejects = pd.read_csv(ingest_run.out / "rejects.csv")
    assert sorted(rejects["path"]) == sorted([c.rel for c in REJECTED] + [EMPTY_CLASS])
    assert sorted(p.name for p in ingest_run.out.iterdir()) == ["manifest.csv", "rejects.csv", "summary.json"]


def test_predict_scores_every_good_file_and_has_a_row_for_each_bad_one(predict_run, corpus):
    rows = pd.read_csv(predict_run.out / "predictions.csv", keep_default_na=False).set_index("path")
    images = corpus / "images"
    for case in ACCEPTED:
        row = rows.loc[str(images / case.rel)]
        assert row["error"] == "" and 0 <= float(row["p_malignant"]) <= 1, case.rel
        # Synthetic images may lie outside the training domain: then, and only then, no call.
        assert row["call"] in CALLS if row["in_domain"] == "True" else row["call"] == "out of domain", case.rel
    for case in REJECTED:
        row = rows.loc[str(images / case.rel)]
        assert case.reason in row["error"] and row["p_malignant"] == "" and row["call"] == "", case.rel
    assert rows.loc[str(corpus / "empty"), "error"] == "no image files found in this folder"
    assert rows.loc[str(corpus / "nowhere"), "error"] == "no such file or directory"
    assert len(rows) == len(ACCEPTED) + len(REJECTED) + 2
    assert f"predict: {len(ACCEPTED)} scored" in predict_run.proc.stderr
    assert sorted(p.name for p in predict_run.out.iterdir()) == ["predictions.csv"]


def test_evaluate_scores_good_files_and_measures_them(evaluate_run):
    predictions = pd.read_csv(evaluate_run.out / "predictions.csv")
    assert sorted(predictions["path"]) == sorted(c.rel for c in ACCEPTED)
    inside = predictions["in_domain"]
    assert predictions["p_malignant"].between(0, 1).all() and set(predictions.loc[inside, "call"]) <= CALLS
    assert (predictions.loc[~inside, "call"] == "out of domain").all()
    rejects = pd.read_csv(evaluate_run.out / "rejects.csv")
    assert sorted(rejects["path"]) == sorted([c.rel for c in REJECTED] + [EMPTY_CLASS])
    assert (evaluate_run.out / "metrics.json").is_file() and (evaluate_run.out / "roc.csv").is_file()


@pytest.mark.parametrize("entry", RUNS)
def test_an_empty_folder_alone_is_a_one_line_failure(entry, project, corpus, state_before, tmp_path):
    root = project["root"]
    out = tmp_path / "out"
    args = {
        "ingest": [
            "ingest",
            "--params",
            root / "params.yaml",
            "--source",
            corpus / "empty",
            "--label-map",
            LABELS,
            "--out",
            out,
        ],
        "predict": ["predict", corpus / "empty", "--model", root / "models/exported", "--out", out / "p.csv"],
        "evaluate": [
            "evaluate",
            "--params",
            root / "params.yaml",
            "--data",
            corpus / "empty",
            "--label-map",
            LABELS,
            "--model",
            root / "models/exported",
            "--out",
            out,
        ],
    }[entry]
    proc = cytopipe(*args, cwd=tmp_path)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    about = lines_about(proc.stderr, str(corpus / "empty"))
    assert about and all("no image files" in line or "no class subfolders" in line for line in about), proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(f"cytopipe {entry}: error: ")
    assert not out.exists()
    assert corpus_state(corpus) == state_before


# --------------------------------------------------------------------------- score-slide


@pytest.mark.parametrize("case", BAD_SLIDES, ids=lambda c: c.id)
def test_each_bad_slide_is_one_line_and_leaves_no_report(slides_run, corpus, case):
    path = corpus / "slides" / case.rel
    lines = lines_about(slides_run.proc.stderr, str(path))
    assert len(lines) == 1 and case.reason in lines[0], slides_run.proc.stderr
    assert lines[0].startswith(f"cytopipe score-slide: error: {path}: ")
    assert not (slides_run.out / path.stem).exists()


def test_an_empty_folder_is_not_a_slide(slides_run, corpus):
    lines = lines_about(slides_run.proc.stderr, str(corpus / "empty"))
    assert len(lines) == 1 and "is a directory" in lines[0]


def test_good_slides_are_scored_beside_bad_ones(slides_run, state_before):
    proc = slides_run.proc
    assert proc.returncode == 1 and "Traceback" not in proc.stderr  # 1: some slides failed
    n = len(GOOD_SLIDES) + len(BAD_SLIDES) + 1
    assert f"{len(GOOD_SLIDES)} of {n} slides scored, {n - len(GOOD_SLIDES)} failed" in proc.stdout
    assert len(proc.stderr.strip().splitlines()) == n - len(GOOD_SLIDES)
    stems = sorted(Path(c.rel).stem for c in GOOD_SLIDES)
    assert sorted(p.name for p in slides_run.out.iterdir()) == stems  # no staging folder left
    for stem in stems:
        report = slides_run.out / stem
        assert sorted(p.name for p in report.iterdir()) == [
            "cells.csv",
            "cells.geojson",
            "heatmap.png",
            "report.html",
            "summary.json",
        ]
        assert len(pd.read_csv(report / "cells.csv")) == pd.read_json(report / "summary.json", typ="series")["n_cells"]
        assert pd.read_json(report / "summary.json", typ="series")["n_cells"] >= 1
    assert slides_run.state_after == state_before


def test_failed_slides_leave_no_folders_and_shared_names_are_refused(project, corpus, tmp_path, capsys):
    from pipeline.inference.score_slide import score_slides

    cfg = project["params"].slide
    model = str(project["root"] / "models/exported")
    bad = [str(corpus / "slides" / c.rel) for c in BAD_SLIDES[:2]]
    assert score_slides(bad, model, tmp_path / "a" / "b" / "c", cfg, log=lambda *_: None) == 1
    assert list(tmp_path.iterdir()) == []  # not even the parents made for the reports
    twice = [str(corpus / "slides" / GOOD_SLIDES[0].rel)] * 2
    capsys.readouterr()
    assert score_slides(twice, model, tmp_path / "out", cfg, log=lambda *_: None) == 2
    assert "share the report folder" in capsys.readouterr().err and list(tmp_path.iterdir()) == []


def test_one_slide_in_an_odd_path_reports_into_out_itself(project, corpus, tmp_path):
    slide = corpus / "slides" / GOOD_SLIDES[1].rel
    proc = cytopipe(
        "score-slide",
        slide,
        "--model",
        project["root"] / "models/exported",
        "--params",
        project["root"] / "params.yaml",
        "--out",
        tmp_path / "report",
        "--top",
        2,
        cwd=tmp_path,
    )
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    assert sorted(p.name for p in (tmp_path / "report").iterdir()) == [
        "cells.csv",
        "cells.geojson",
        "heatmap.png",
        "report.html",
        "summary.json",
    ]
    assert str(slide) in (tmp_path / "report" / "report.html").read_text()
