"""`cytopipe score-slides`: a worklist of small synthetic slides scored on a Dask LocalCluster on loopback,
the cohort report, the skip rule (resume, changed bytes, another model version) and a SIGKILLed run."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import psutil
import pytest

from pipeline.inference.score_slide import score_slide
from pipeline.inference.worklist import (
    DONE,
    REPORT_FILES,
    Job,
    dask_client,
    environ_restored,
    read_worklist,
    run_worklist,
    warn_about_workers,
)
from tests.conftest import ROOT
from tests.slides import draw_cells, glass, write_pyramid

STEMS = ("a", "b", "c")
CELLS_B = [(300, 300, 30), (1024, 500, 35), (600, 900, 25), (1300, 700, 30), (900, 300, 28)]
CELLS_C = [(300, 400, 30), (700, 600, 25), (900, 300, 35), (400, 800, 28)]


def quiet(*_):
    pass


@pytest.fixture(scope="module")
def worklist_dir(tmp_path_factory, slides):
    """a: the session's synthetic slide; b, c: smaller slides with cells of their own; bad: not a slide."""
    folder = tmp_path_factory.mktemp("worklist")
    shutil.copy2(slides[0], folder / "a.tiff")
    write_pyramid(folder / "b.tiff", draw_cells(glass((1600, 1200), seed=1), CELLS_B))
    write_pyramid(folder / "c.tiff", draw_cells(glass((1200, 1000), seed=2), CELLS_C))
    (folder / "bad.tiff").write_bytes(b"not a slide\n" * 64)
    return folder


@pytest.fixture(scope="module")
def scheduler():
    """A LocalCluster of 2 worker processes of 1 thread on 127.0.0.1 (as score-slides makes it), reused by the
    in-process runs through --scheduler; nothing listens on another address."""
    with dask_client(None, workers=2, threads=1) as client:
        address = client.scheduler.address
        workers = client.scheduler_info()["workers"]
        assert address.startswith("tcp://127.0.0.1:")
        assert workers and all(a.startswith("tcp://127.0.0.1:") for a in workers)
        yield address


@pytest.fixture(scope="module")
def job(tiny_project):
    root, _, params = tiny_project

    def make(out: Path) -> Job:
        return Job(str(root / "models/calibrated"), str(out), params.slide, top=8)

    return make


@pytest.fixture(scope="module")
def first_run(worklist_dir, scheduler, job, tmp_path_factory):
    out = tmp_path_factory.mktemp("run1") / "out"
    code = run_worklist(worklist_dir, job(out), scheduler=scheduler, progress=False, log=quiet)
    return out, code


def _rows(out: Path) -> dict[str, dict]:
    table = pd.read_csv(out / "worklist.csv", dtype={"case_id": str, "priority": str, "model_version": str})
    return {Path(r["slide"]).stem: r for r in table.to_dict("records")}


def _files(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Bytes and mtime of every file of a report folder."""
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.iterdir()) if p.is_file()}


def test_a_cluster_scores_the_worklist_like_score_slide(first_run, worklist_dir, tiny_project, tmp_path):
    out, code = first_run
    assert code == 1  # one slide failed
    rows = _rows(out)
    assert set(rows) == {*STEMS, "bad"}
    assert [rows[s]["status"] for s in STEMS] == ["scored"] * 3 and rows["bad"]["status"] == "failed"
    assert "bad.tiff" in rows["bad"]["error"] and "\n" not in rows["bad"]["error"]
    assert not (out / "bad").exists()
    root, _, params = tiny_project
    for stem in STEMS:
        report = out / stem
        assert all((report / name).is_file() for name in (*REPORT_FILES, DONE))
        done = json.loads((report / DONE).read_text())
        assert len(done["sha256"]) == 64 and done["model"]["uri"] == str(root / "models/calibrated")
        assert len(done["model"]["card_sha256"]) == 64
        direct = tmp_path / stem
        want = score_slide(
            str(worklist_dir / f"{stem}.tiff"), done["model"]["uri"], direct, params.slide, top=8, log=quiet
        )
        got = json.loads((report / "summary.json").read_text())
        assert got["slide_call"] == want["slide_call"] and got["n_cells"] == want["n_cells"] > 0
        assert got["n_malignant"] == want["n_malignant"] == rows[stem]["n_malignant"]
        pd.testing.assert_frame_equal(pd.read_csv(report / "cells.csv"), pd.read_csv(direct / "cells.csv"), atol=1e-5)
        assert rows[stem]["slide_call"] == want["slide_call"] and rows[stem]["report"] == f"{stem}/report.html"
        assert rows[stem]["model_version"] == want["model"]["version"]
    page = (out / "worklist.html").read_text()
    assert page.count("data:image/jpeg;base64,") == 3 and page.count("<tr class=") == 4
    assert all(f'href="{s}/report.html"' in page for s in STEMS) and "Failed slides (1)" in page
    assert "http://" not in page and "https://" not in page  # self-contained
    table = pd.read_csv(out / "worklist.csv")  # most suspicious first, the failed slide last
    scored = table[table["status"] != "failed"]
    assert list(scored["n_malignant"]) == sorted(scored["n_malignant"], reverse=True)
    assert table["status"].iloc[-1] == "failed"


def test_a_rerun_scores_only_the_missing_report(first_run, worklist_dir, scheduler, job, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(first_run[0], out)
    shutil.rmtree(out / "b")
    (out / ".worklist.csv.k1ll3d.tmp").write_text("a rewrite a killed run left")
    before = {s: _files(out / s) for s in ("a", "c")}
    run_worklist(worklist_dir, job(out), scheduler=scheduler, progress=False, log=quiet)
    assert not list(out.glob(".*.tmp"))  # the killed rewrite's temporary file is cleared
    rows = _rows(out)
    assert {s: rows[s]["status"] for s in STEMS} == {"a": "skipped", "b": "scored", "c": "skipped"}
    assert rows["bad"]["status"] == "failed"  # a failed slide is tried again on every run
    assert {s: _files(out / s) for s in ("a", "c")} == before  # byte-identical, not rewritten
    assert rows["a"]["n_cells"] > 0 and rows["a"]["slide_call"]  # a skipped slide's row comes from its report


def test_changed_bytes_and_another_model_version_score_again(first_run, worklist_dir, scheduler, job, tmp_path):
    slides = tmp_path / "slides"
    slides.mkdir()
    for stem in STEMS:
        shutil.copy2(worklist_dir / f"{stem}.tiff", slides / f"{stem}.tiff")
    out = tmp_path / "out"
    shutil.copytree(first_run[0], out)
    write_pyramid(slides / "c.tiff", draw_cells(glass((1200, 1000), seed=5), CELLS_C[:2]))  # c changed on disk
    run_worklist(slides, job(out), scheduler=scheduler, progress=False, log=quiet)
    rows = _rows(out)
    assert {s: rows[s]["status"] for s in STEMS} == {"a": "skipped", "b": "skipped", "c": "scored"}
    assert json.loads((out / "c/summary.json").read_text())["n_cells"] == 2
    for stem in STEMS:  # as if the model had been another version
        done = json.loads((out / stem / DONE).read_text())
        done["model"]["version"] = "0"
        (out / stem / DONE).write_text(json.dumps(done))
    run_worklist(slides, job(out), scheduler=scheduler, progress=False, log=quiet)
    assert {s: r["status"] for s, r in _rows(out).items()} == dict.fromkeys(STEMS, "scored")


def test_a_worklist_csv_with_case_ids_and_priorities(worklist_dir, tmp_path):
    (tmp_path / "list.csv").write_text(f"slide,case_id,priority\n{worklist_dir}/a.tiff,C1,2\nb.tiff,C2,\n")
    (tmp_path / "b.tiff").write_bytes(b"x")
    entries = read_worklist(tmp_path / "list.csv")
    assert [(e.stem, e.case_id, e.priority) for e in entries] == [("a", "C1", "2"), ("b", "C2", "")]
    assert entries[1].slide == str(tmp_path / "b.tiff")
    (tmp_path / "nocol.csv").write_text("path\na.tiff\n")
    with pytest.raises(ValueError, match="nocol.csv: a worklist CSV needs a `slide` column"):
        read_worklist(tmp_path / "nocol.csv")
    (tmp_path / "twice.csv").write_text("slide\nx/a.tiff\ny/a.svs\n")
    with pytest.raises(ValueError, match="share the report folder a/"):
        read_worklist(tmp_path / "twice.csv")


def _cli(worklist: Path, out: Path, root: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "pipeline.cli",
        "score-slides",
        str(worklist),
        "--out",
        str(out),
        "--model",
        str(root / "models/calibrated"),
        "--params",
        str(root / "params.yaml"),
        "--workers",
        "1",
        "--threads",
        "1",
    ]


def test_a_killed_run_rerun_scores_only_what_is_missing(worklist_dir, tiny_project, tmp_path):
    root = tiny_project[0]
    worklist = tmp_path / "list.csv"
    worklist.write_text("slide,case_id,priority\n" + "".join(f"{worklist_dir}/{s}.tiff,case-{s},1\n" for s in STEMS))
    out = tmp_path / "out"
    env = dict(os.environ, NO_ALBUMENTATIONS_UPDATE="1", PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(
        _cli(worklist, out, root),
        cwd=tmp_path,
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 240
    try:
        while not list(out.glob(f"*/{DONE}")):
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "no slide was scored in time"
            time.sleep(0.1)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # the client, the scheduler and the workers at once
        proc.wait()
    done = sorted(p.parent.name for p in out.glob(f"*/{DONE}"))
    assert 1 <= len(done) < len(STEMS)
    killed = _rows(out)  # written as each slide finished: the slides not done are still pending
    assert set(killed) == set(STEMS) and {r["status"] for r in killed.values()} <= {"scored", "pending"}
    assert {s for s, r in killed.items() if r["status"] == "scored"} <= set(done)
    before = {s: _files(out / s) for s in done}
    rerun = subprocess.run(
        _cli(worklist, out, root), cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    rows = _rows(out)
    assert {s: rows[s]["status"] for s in STEMS} == {s: "skipped" if s in done else "scored" for s in STEMS}
    assert {s: _files(out / s) for s in done} == before
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no staging folder left behind
    assert rows["a"]["case_id"] == "case-a" and "score-slides: 3 slides" in rerun.stdout


def test_a_missing_worklist_is_one_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "score-slides", str(tmp_path / "nope"), "--out", str(tmp_path / "o")],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == f"cytopipe score-slides: error: {tmp_path / 'nope'}: no such folder or CSV file"


def test_a_model_folder_that_is_not_one_fails_before_any_worker_starts(worklist_dir, tmp_path):
    (tmp_path / "model").mkdir()
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "score-slides", str(worklist_dir), "--out", "o", "--model", "model"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=60,
    )
    assert proc.returncode == 1 and "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1
    assert proc.stderr.startswith("cytopipe score-slides: error: model: not a model folder")


def test_the_cohort_page_sorts_by_a_clicked_column_in_chromium(first_run):
    from tests.report_pages import chromium

    out = first_run[0]
    with chromium() as browser:
        page = browser.new_page()
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto((out / "worklist.html").as_uri())
        headers = page.eval_on_selector_all("#cohort th", "hs => hs.map(h => h.textContent)")
        column = lambda name: page.eval_on_selector_all(  # noqa: E731
            "#cohort tbody tr", f"rs => rs.map(r => r.cells[{headers.index(name)}].textContent)"
        )
        assert column("status")[-1] == "failed"  # most suspicious first, the failed slide last
        page.click(f"#cohort th:nth-child({headers.index('slide') + 1})")
        assert column("slide") == ["a.tiff", "b.tiff", "bad.tiff", "c.tiff"]
        page.click(f"#cohort th:nth-child({headers.index('slide') + 1})")
        assert column("slide") == ["c.tiff", "bad.tiff", "b.tiff", "a.tiff"]
        page.click(f"#cohort th:nth-child({headers.index('n cells') + 1})")
        cells = [float(c) if c else -1 for c in column("n cells")]
        assert cells == sorted(cells)
        assert not errors


NANNY_VARIABLES = ("MALLOC_TRIM_THRESHOLD_", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def _nanny_variables() -> dict:
    return {k: os.environ.get(k) for k in NANNY_VARIABLES}


def test_local_workers_listen_on_loopback_without_malloc_trim_and_the_caller_keeps_its_environment():
    before = dict(os.environ)
    messages = []
    with dask_client(None, workers=1, threads=1) as client:
        (worker_env,) = client.run(_nanny_variables).values()
        warn_about_workers(client, messages.append)
        pids = [os.getpid(), *client.run(os.getpid).values()]  # the scheduler runs in this process
        listening = [
            c.laddr.ip for pid in pids for c in psutil.Process(pid).net_connections("inet") if c.status == "LISTEN"
        ]
    assert len(listening) >= 3 and set(listening) == {"127.0.0.1"}  # scheduler, its HTTP routes, the worker
    assert worker_env["MALLOC_TRIM_THRESHOLD_"] is None and worker_env["OPENBLAS_NUM_THREADS"] == "1"
    assert messages == [] and dict(os.environ) == before  # the nanny's os.environ.update is undone


def test_a_worker_with_dasks_default_malloc_trim_is_named_in_a_warning():
    from distributed import Client, LocalCluster

    messages = []
    with (
        environ_restored(),
        LocalCluster(host="127.0.0.1", dashboard_address=None, n_workers=1, threads_per_worker=1) as c,
    ):
        with Client(c) as client:
            warn_about_workers(client, messages.append)
    assert len(messages) == 1 and "1 worker(s) run with MALLOC_TRIM_THRESHOLD_ set" in messages[0]
    assert "DASK_CONFIG=configs/dask" in messages[0]


def test_numpys_blas_goes_to_one_thread_in_a_worker_process():
    """A Dask task runs in a worker thread, where ood.one_blas_thread does nothing: the worker's model load
    sets BLAS to one thread for the whole process."""
    code = (
        "from types import SimpleNamespace as N; from threadpoolctl import threadpool_info as info;"
        "from pipeline.inference.worklist import _worker_thread_pools;"
        "blas = lambda: max(i['num_threads'] for i in info() if i['user_api'] == 'blas');"
        "before = blas(); _worker_thread_pools(N(predictor=N(backend='onnx')), 2); print(before, blas())"
    )
    env = {k: v for k, v in os.environ.items() if k not in NANNY_VARIABLES}
    env["OPENBLAS_NUM_THREADS"] = "2"  # as on a 2-core machine, whatever this one has
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.split() == ["2", "1"]


def test_two_machines_scheduler_and_worker_processes_on_loopback(worklist_dir, job, tmp_path):
    """The documented two-machine commands, as processes on this host: `dask scheduler` and `dask worker`
    with DASK_CONFIG=configs/dask, listening on 127.0.0.1 only; score-slides joins with --scheduler."""
    from distributed import Client

    dask = str(Path(sys.executable).with_name("dask"))
    env = dict(os.environ, DASK_CONFIG=str(ROOT / "configs/dask"), NO_ALBUMENTATIONS_UPDATE="1")
    file, log = tmp_path / "scheduler.json", open(tmp_path / "dask.log", "wb")  # noqa: SIM115
    common = ["--host", "127.0.0.1", "--no-dashboard"]
    start = lambda cmd: subprocess.Popen([dask, *cmd, *common], env=env, stdout=log, stderr=log)  # noqa: E731
    procs = [start(["scheduler", "--port", "0", "--scheduler-file", str(file)])]
    try:
        deadline = time.monotonic() + 60
        while not file.exists():
            assert time.monotonic() < deadline and procs[0].poll() is None, "the scheduler did not start"
            time.sleep(0.1)
        procs.append(start(["worker", "--scheduler-file", str(file), "--nthreads", "1", "--resources", "slide=1"]))
        address = json.loads(file.read_text())["address"]
        with Client(address) as client:
            client.wait_for_workers(1, timeout=60)
            assert address.startswith("tcp://127.0.0.1:")
            assert all(w.startswith("tcp://127.0.0.1:") for w in client.scheduler_info()["workers"])
        worklist = tmp_path / "list.csv"
        worklist.write_text(f"slide\n{worklist_dir}/c.tiff\n")
        messages = []
        code = run_worklist(worklist, job(tmp_path / "out"), scheduler=address, progress=False, log=messages.append)
    finally:
        for proc in reversed(procs):
            proc.terminate()
            proc.wait(timeout=60)
        log.close()
    assert code == 0 and not [m for m in messages if "warning" in m]  # DASK_CONFIG took MALLOC_TRIM away
    assert _rows(tmp_path / "out")["c"]["status"] == "scored"
