"""Bad-input corpus (issue 7): every entry point (ingest, predict, evaluate --data, score-slide and
the REST server) meets truncated, empty, mislabelled, odd-mode, tiny, bomb, unreadable, dangling
and oddly named inputs. Each bad input gets one line naming it and the reason, without a
traceback; the good inputs beside it are scored; nothing half-written is left; the corpus is
byte-identical afterwards. Lossless conversions and CMYK are accepted and scored.

The CLI runs as a subprocess, so stderr is exactly what a user sees. As root (these tests run as
root) a chmod 000 file is still readable, so the subprocesses drop the capabilities that allow it.
"""
from __future__ import annotations

import base64
import os
import shutil
import struct
import subprocess
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from tests.conftest import ROOT, png_header_only, tree_digest, without_root_file_access
from tests.serving import frame, post, serve
from tests.test_slide import draw_cells, glass, write_pyramid

HERLEV = ROOT.parent / "shared" / "data" / "herlev"
LABELS = ROOT / "configs" / "labels" / "herlev_binary.yaml"
MODEL = "models:/cytology-classifier@champion"
BENIGN, MALIGNANT = "normal_superficiel", "carcinoma_in_situ"
EMPTY_CLASS = "normal_columnar"  # a class of the label map whose folder is empty
ODD_DIR = "ünï cødé 细胞 folder"  # unicode and spaces in a path
CALLS = {"benign", "malignant", "indeterminate"}


# --------------------------------------------------------------------------- the corpus: images


def _copy(path: Path, src: Path) -> None:
    shutil.copyfile(src, path)


def _truncated(path: Path, src: Path) -> None:
    data = src.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _zero_bytes(path: Path, src: Path) -> None:
    path.write_bytes(b"")


def _text(path: Path, src: Path) -> None:
    path.write_text("field notes, not pixels\n")


def _html(path: Path, src: Path) -> None:
    path.write_text("<!doctype html><html><body><h1>404 Not Found</h1></body></html>\n")


def _alpha(path: Path, src: Path) -> None:
    rgba = Image.open(src).convert("RGBA")
    alpha = np.linspace(0, 255, rgba.width, dtype=np.uint8)[None, :].repeat(rgba.height, axis=0)
    rgba.putalpha(Image.fromarray(alpha))
    rgba.save(path, format="PNG")


def _grey(path: Path, src: Path) -> None:
    Image.open(src).convert("L").save(path, format="PNG")


def _palette(path: Path, src: Path) -> None:
    Image.open(src).convert("RGB").quantize(64).save(path, format="PNG")


def _cmyk(path: Path, src: Path) -> None:
    Image.open(src).convert("CMYK").save(path, format="JPEG", quality=95)


def _sixteen_bit(path: Path, src: Path) -> None:
    grey = np.asarray(Image.open(src).convert("L"), dtype=np.uint16) * 257
    Image.fromarray(grey).save(path, format="TIFF")


def _one_pixel(path: Path, src: Path) -> None:
    Image.new("RGB", (1, 1), (180, 120, 200)).save(path, format="PNG")


def _bomb(path: Path, src: Path) -> None:
    png_header_only(path, 60000, 60000)  # the header claims 3.6 gigapixels; the file is tiny


def _locked(path: Path, src: Path) -> None:
    shutil.copyfile(src, path)
    path.chmod(0)


def _dangling(path: Path, src: Path) -> None:
    path.symlink_to(path.parent / "gone.jpg")


def _folder(path: Path, src: Path) -> None:
    path.mkdir()


def _locked_folder(path: Path, src: Path) -> None:
    path.mkdir()
    shutil.copyfile(src, path / "inside.jpg")
    path.chmod(0)


@dataclass(frozen=True)
class Case:
    rel: str  # posix path under corpus/images: <class>/<name>
    reason: str | None  # in its one-line error; None: accepted and scored
    make: Callable[[Path, Path], None]  # (path, a real cell image to derive it from)
    mode: str = "RGB"  # the file's own mode, for accepted ones

    @property
    def id(self) -> str:
        return self.rel.rsplit("/", 1)[-1]


ACCEPTED = [
    Case(f"{BENIGN}/good-1.jpg", None, _copy),
    Case(f"{BENIGN}/good-2.jpg", None, _copy),
    Case(f"{MALIGNANT}/good-1.jpg", None, _copy),
    Case(f"{MALIGNANT}/good-2.jpg", None, _copy),
    Case(f"{BENIGN}/alpha.png", None, _alpha, "RGBA"),
    Case(f"{BENIGN}/grey.png", None, _grey, "L"),
    Case(f"{BENIGN}/palette.png", None, _palette, "P"),
    Case(f"{MALIGNANT}/cmyk.jpg", None, _cmyk, "CMYK"),
    Case(f"{MALIGNANT}/deep-16bit.tif", None, _sixteen_bit, "I;16"),
    Case(f"{MALIGNANT}/{ODD_DIR}/cell with spaces ñ.jpg", None, _copy),
]
REJECTED = [
    Case(f"{MALIGNANT}/truncated.jpg", "truncated or corrupt", _truncated),
    Case(f"{BENIGN}/zero-bytes.jpg", "empty file (0 bytes)", _zero_bytes),
    Case(f"{MALIGNANT}/text.jpg", "not an image", _text),
    Case(f"{BENIGN}/page.png", "not an image", _html),
    Case(f"{MALIGNANT}/one-pixel.png", "below the minimum side", _one_pixel),
    Case(f"{BENIGN}/bomb.png", "decompression-bomb", _bomb),
    Case(f"{MALIGNANT}/locked.jpg", "permission denied", _locked),
    Case(f"{BENIGN}/dangling.jpg", "broken symlink", _dangling),
    Case(f"{MALIGNANT}/folder.jpg", "is a directory", _folder),
    Case(f"{BENIGN}/locked folder", "cannot list folder: Permission denied", _locked_folder),
]
# Kinds a REST client can send (file-system kinds never reach the server).
SENDABLE = {_truncated, _zero_bytes, _text, _html, _one_pixel, _bomb}
LOCKED = [c.rel for c in REJECTED if c.make in (_locked, _locked_folder)]


# --------------------------------------------------------------------------- the corpus: slides

SLIDE_MPP = 0.25
SLIDE_CELLS = [(200, 200, 30), (520, 300, 35), (820, 520, 25), (300, 600, 28)]


def _pyramid(path: Path, seed: int = 0, compression: str | None = None) -> Path:
    return write_pyramid(path, draw_cells(glass((1024, 768), seed=seed), SLIDE_CELLS), SLIDE_MPP, compression)


def _slide(path: Path) -> None:
    _pyramid(path, seed=1)


def _truncated_slide(path: Path) -> None:
    data = _pyramid(path).read_bytes()
    path.write_bytes(data[: len(data) * 6 // 10])


def _corrupt_tile_slide(path: Path) -> None:
    """Opens fine (its corners are intact), then a tile of level 1 fails to decode in the middle
    of cell detection, in a worker thread."""
    import tifffile

    _pyramid(path, compression="zlib")
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[1]
        offset, size = page.dataoffsets[1], page.databytecounts[1]  # top right: not a probed corner
    data = bytearray(path.read_bytes())
    data[offset:offset + size] = b"\0" * size
    path.write_bytes(bytes(data))


def _no_mpp(path: Path) -> None:
    Image.fromarray(draw_cells(glass((400, 300)), [(150, 150, 30)])).save(path, format="PNG")


def _text_slide(path: Path) -> None:
    path.write_text("not a slide\n")


def _locked_slide(path: Path) -> None:
    _pyramid(path)
    path.chmod(0)


def _dangling_slide(path: Path) -> None:
    path.symlink_to(path.parent / "gone.tiff")


def _folder_slide(path: Path) -> None:
    path.mkdir()


def _missing(path: Path) -> None:
    pass


@dataclass(frozen=True)
class SlideCase:
    rel: str  # under corpus/slides
    reason: str | None
    make: Callable[[Path], None]

    @property
    def id(self) -> str:
        return self.rel.rsplit("/", 1)[-1]


GOOD_SLIDES = [SlideCase("field.tiff", None, _slide),
               SlideCase(f"{ODD_DIR}/slide with spaces ñ.tiff", None, _slide)]
BAD_SLIDES = [
    SlideCase("truncated.tiff", "truncated or corrupt", _truncated_slide),
    SlideCase("corrupt-tile.tiff", "cannot read region", _corrupt_tile_slide),
    SlideCase("no-mpp.png", "has no mpp", _no_mpp),
    SlideCase("notes.tiff", "not a slide", _text_slide),
    SlideCase("locked.tiff", "permission denied", _locked_slide),
    SlideCase("dangling.tiff", "broken symlink", _dangling_slide),
    SlideCase("folder.tiff", "is a directory", _folder_slide),
    SlideCase("missing.tiff", "not found", _missing),
]


# --------------------------------------------------------------------------- building and checking


def _real_cells(n: int) -> list[Path]:
    """n distinct real Herlev crops (distinct bytes, so ingest finds no duplicates)."""
    if not (HERLEV / "MANIFEST.csv").is_file():
        pytest.fail(f"reference data missing: {HERLEV} (tests need ../shared/data from the project root)")
    files = sorted((HERLEV / BENIGN).glob("*.jpg"))[:n // 2] + sorted((HERLEV / MALIGNANT).glob("*.jpg"))[:n - n // 2]
    assert len(files) == n
    return files


def build_corpus(folder: Path) -> Path:
    images = folder / "images"
    (images / EMPTY_CLASS).mkdir(parents=True)
    for case, src in zip(ACCEPTED + REJECTED, _real_cells(len(ACCEPTED) + len(REJECTED))):
        path = images / case.rel
        path.parent.mkdir(parents=True, exist_ok=True)
        case.make(path, src)
    for case in GOOD_SLIDES + BAD_SLIDES:
        path = folder / "slides" / case.rel
        path.parent.mkdir(parents=True, exist_ok=True)
        case.make(path)
    (folder / "empty").mkdir()
    return folder


@contextmanager
def _unlocked(corpus: Path):
    """Locked entries readable for a moment, so a non-root digest can read them too."""
    paths = [corpus / "images" / rel for rel in LOCKED] + [corpus / "slides" / "locked.tiff"]
    for p in paths:
        p.chmod(0o700)
    try:
        yield
    finally:
        for p in paths:
            p.chmod(0)


def corpus_state(corpus: Path) -> tuple[dict, dict]:
    """sha256 of every file, and every entry's mode and link target (a chmod or a lost link shows)."""
    with _unlocked(corpus):
        files = tree_digest(corpus)
    entries = {}
    for dirpath, dirnames, filenames in os.walk(corpus):
        for name in dirnames + filenames:
            p = Path(dirpath, name)
            entries[str(p.relative_to(corpus))] = (p.lstat().st_mode, os.readlink(p) if p.is_symlink() else None)
    return files, entries


def cytopipe(*args, cwd: Path) -> subprocess.CompletedProcess:
    """`cytopipe ARGS` as a user runs it, with file permissions that apply even to root."""
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    cmd = without_root_file_access([sys.executable, "-m", "pipeline.cli", *map(str, args)])
    return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env=env, timeout=600)


def lines_about(stderr: str, path: str) -> list[str]:
    return [line for line in stderr.splitlines() if f"{path}: " in line]


def leftovers(folder: Path) -> list[str]:
    """Temporary or hidden files an interrupted write would leave."""
    return [str(p) for p in folder.rglob("*") if p.name.startswith(".") or p.suffix == ".tmp"]


@dataclass
class Run:
    proc: subprocess.CompletedProcess
    out: Path
    state_after: tuple[dict, dict]


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def project(exported_project):
    return exported_project


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return build_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def state_before(corpus) -> tuple[dict, dict]:
    return corpus_state(corpus)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("work")


def _run(corpus, work, name: str, *args) -> Run:
    out = work / name
    proc = cytopipe(*args, cwd=work)
    return Run(proc, out, corpus_state(corpus))


@pytest.fixture(scope="module")
def ingest_run(project, corpus, state_before, work) -> Run:
    return _run(corpus, work, "ingest", "ingest", "--params", project["root"] / "params.yaml",
                "--source", corpus / "images", "--label-map", LABELS, "--group-regex", "(.+)",
                "--out", work / "ingest")


@pytest.fixture(scope="module")
def predict_run(project, corpus, state_before, work) -> Run:
    return _run(corpus, work, "predict", "predict", corpus / "images", corpus / "empty", corpus / "nowhere",
                "--model", project["root"] / "models/exported", "--params", project["root"] / "params.yaml",
                "--out", work / "predict" / "predictions.csv")


@pytest.fixture(scope="module")
def evaluate_run(project, corpus, state_before, work) -> Run:
    return _run(corpus, work, "evaluate", "evaluate", "--data", corpus / "images", "--label-map", LABELS,
                "--model", project["root"] / "models/exported", "--params", project["root"] / "params.yaml",
                "--out", work / "evaluate")


@pytest.fixture(scope="module")
def slides_run(project, corpus, state_before, work) -> Run:
    slides = [corpus / "slides" / c.rel for c in GOOD_SLIDES + BAD_SLIDES] + [corpus / "empty"]
    return _run(corpus, work, "slides", "score-slide", *slides, "--model", project["root"] / "models/exported",
                "--params", project["root"] / "params.yaml", "--out", work / "slides", "--top", 2)


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
        "ingest": ["ingest", "--params", root / "params.yaml", "--source", corpus / "empty",
                   "--label-map", LABELS, "--out", out],
        "predict": ["predict", corpus / "empty", "--model", root / "models/exported", "--out", out / "p.csv"],
        "evaluate": ["evaluate", "--params", root / "params.yaml", "--data", corpus / "empty",
                     "--label-map", LABELS, "--model", root / "models/exported", "--out", out],
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
        assert sorted(p.name for p in report.iterdir()) == ["cells.csv", "heatmap.png", "report.html", "summary.json"]
        assert len(pd.read_csv(report / "cells.csv")) == pd.read_json(report / "summary.json", typ="series")["n_cells"]
        assert pd.read_json(report / "summary.json", typ="series")["n_cells"] >= 1
    assert slides_run.state_after == state_before


@pytest.mark.parametrize("existing", [False, True], ids=["new folder", "existing folder"])
def test_a_report_that_fails_half_way_leaves_nothing(tmp_path, existing):
    from pipeline import atomic

    out = tmp_path / "report"
    if existing:
        out.mkdir()
        (out / "cells.csv").write_text("old\n")
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic.staged_dir(out) as staging:
            (staging / "cells.csv").write_text("new\n")
            raise RuntimeError("disk full")
    assert [p.name for p in tmp_path.iterdir()] == (["report"] if existing else [])
    assert not existing or [p.name for p in out.iterdir()] == ["cells.csv"] and (out / "cells.csv").read_text() == "old\n"


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
    proc = cytopipe("score-slide", slide, "--model", project["root"] / "models/exported",
                    "--params", project["root"] / "params.yaml", "--out", tmp_path / "report", "--top", 2, cwd=tmp_path)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    assert sorted(p.name for p in (tmp_path / "report").iterdir()) == ["cells.csv", "heatmap.png", "report.html",
                                                                        "summary.json"]
    assert str(slide) in (tmp_path / "report" / "report.html").read_text()


# --------------------------------------------------------------------------- REST server


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
            assert row["error"] == "" and (row["call"] in CALLS if row["in_domain"] else
                                           row["call"] == "out of domain"), (i, row)
            assert row["p_malignant"] == pytest.approx(expected[str(images / sent[i].rel)], abs=1e-5)
        else:
            assert row["error"].startswith(f"row {i}: ") and reason in row["error"], (i, row)
            assert "\n" not in row["error"] and row["call"] == "error" and row["p_malignant"] is None
    assert corpus_state(corpus) == state_before
