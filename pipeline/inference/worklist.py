"""`cytopipe score-slides`: score a worklist of slides on Dask distributed, resumably, with a cohort report.

Each slide is one Dask task (`score_task`) that runs `score_slide.score_loaded` into DIR/<stem>/ (a staged
folder, moved into place only when complete) and then writes DIR/<stem>/done.json: the slide's sha256 and the
model's URI, version and card sha256. A slide whose report folder is complete and whose done.json matches the
slide bytes and the model is skipped without scoring, so a killed run re-run scores only what is missing. A
slide that fails is tried once more, then recorded with its error in one line. DIR/worklist.csv and .html list
every slide from the start (pending) and are rewritten as each one finishes.

Each worker process loads the model once (a per-process cache keyed by the model URI, the modification time of
its card and its thread budget) and scores with the threads the worker has: a worker that advertises the
resource `slide=1` (score-slides' own LocalCluster does) runs one slide at a time on all its threads; any
other worker runs one slide per thread, each on one thread.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from pipeline import atomic
from pipeline.config import SlideConfig
from pipeline.errors import CytopipeError, one_line
from pipeline.inference.score_slide import LoadedModel, load_model, score_loaded
from pipeline.model_card import META_FILE, ONNX_META_FILE, card_file, file_sha256
from pipeline.registry import MLFLOW_SCHEMES, pin_registered, resolve_model_dir
from pipeline.report.worklist_page import render_worklist

PROG = "cytopipe score-slides"
DONE = "done.json"
REPORT_FILES = ("summary.json", "cells.csv", "report.html", "heatmap.png")  # a complete report has all of them
SLIDE_SUFFIXES = {".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".svslide", ".bif", ".dcm"}
SLIDE_SUFFIXES |= {".png", ".jpg", ".jpeg"}  # plain field images, as score-slide reads them
COHORT_FILES = ("worklist.csv", "worklist.html")
RESOURCE = "slide"  # a worker with resources slide=1 runs one slide at a time on all its threads
ATTEMPTS = 2  # a failed slide is retried once
COLUMNS = [
    "slide",
    "case_id",
    "priority",
    "status",
    "slide_call",
    "n_cells",
    "n_malignant",
    "top_k_mean",
    "fraction_out_of_domain",
    "atypia_burden",
    "seconds",
    "model_version",
    "report",
    "error",
]


class WorklistError(CytopipeError, ValueError):
    """A worklist that cannot be read, or a Dask scheduler that cannot be reached."""


@dataclass(frozen=True)
class Entry:
    slide: str
    case_id: str = ""
    priority: str = ""

    @property
    def stem(self) -> str:
        return Path(self.slide).stem


@dataclass(frozen=True)
class Job:
    """What every task shares: the model, where reports go, the scoring settings."""

    model: str
    out_dir: str
    cfg: SlideConfig
    tracking_uri: str | None = None
    mpp: float | None = None
    top: int | None = None
    tta: bool | None = None
    per_slot: bool = False  # set by submit_all: each task holds the resource slide=1 of its worker


# --------------------------------------------------------------------------- the worklist


def read_worklist(path: Path | str) -> list[Entry]:
    """A folder of slides (files with a slide suffix, sorted) or a CSV `slide[,case_id,priority]` (paths
    relative to the CSV's folder). Two slides with one file stem would share a report folder: refused."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in SLIDE_SUFFIXES)
        entries = [Entry(str(p.absolute())) for p in files if not p.name.startswith(".")]
    elif path.is_file():
        entries = _read_csv(path)
    else:
        raise WorklistError(f"{path}: no such folder or CSV file")
    if not entries:
        raise WorklistError(f"{path}: no slides in the worklist")
    seen: dict[str, str] = {}
    for e in entries:
        if e.stem in seen:
            raise WorklistError(f"{path}: {seen[e.stem]} and {e.slide} would share the report folder {e.stem}/")
        seen[e.stem] = e.slide
    return entries


def _read_csv(path: Path) -> list[Entry]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            rows = list(reader)
            header = [(c or "").strip() for c in reader.fieldnames or []]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise WorklistError(f"{path}: not a readable CSV worklist ({exc})") from None
    if "slide" not in header:
        raise WorklistError(f"{path}: a worklist CSV needs a `slide` column (has: {', '.join(header)})")
    entries = []
    for row in rows:
        row = {(k or "").strip(): (v or "").strip() for k, v in row.items()}
        if not row.get("slide"):
            continue
        slide = Path(row["slide"])
        slide = slide if slide.is_absolute() else path.parent.absolute() / slide
        entries.append(Entry(str(slide), row.get("case_id", ""), row.get("priority", "")))
    return entries


# --------------------------------------------------------------------------- the skip rule


def model_key(loaded: LoadedModel) -> dict:
    """What done.json records of the model: its URI, its registered version, and the sha256 of its card (which
    holds the sha256 of every model file and the calibration), so a folder retrained in place under the same
    path and version ("unregistered") still counts as another model."""
    model_dir = Path(loaded.predictor.model_dir)
    card_sha256 = file_sha256(model_dir / card_file(model_dir))
    return {"uri": loaded.uri, "version": loaded.version, "card_sha256": card_sha256}


def is_done(report_dir: Path, sha256: str, model: dict) -> bool:
    """The report in `report_dir` is complete and was made from these slide bytes by this model."""
    try:
        done = json.loads((report_dir / DONE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    complete = all((report_dir / name).is_file() for name in REPORT_FILES)
    return complete and done.get("sha256") == sha256 and done.get("model") == model


# --------------------------------------------------------------------------- the task (runs on a worker)

_MODELS: dict[tuple, LoadedModel] = {}
_MODELS_LOCK = threading.Lock()


def model_stamp(model: str) -> tuple:
    """When a model folder's metadata last changed (its files' mtimes): a folder retrained in place under the
    same path gets a new stamp, so a long-lived worker loads it again. () for an MLflow URI, which pin_model
    has already pinned to one version."""
    if model.startswith(MLFLOW_SCHEMES):
        return ()
    stamps = []
    for name in (META_FILE, ONNX_META_FILE):
        try:
            stamps.append((Path(model) / name).stat().st_mtime_ns)
        except OSError:
            stamps.append(None)
    return tuple(stamps)


def worker_model(job: Job, cfg: SlideConfig, threads: int = 0) -> LoadedModel:
    """The model, loaded once per worker process for each model URI, state on disk and thread budget (an
    older state of the same model is dropped). On a Dask worker (`threads` > 0) the process-wide thread
    pools are set for scoring: a torch model's to the slide's threads, numpy's BLAS to one thread."""
    key = (job.model, model_stamp(job.model), job.tracking_uri, cfg.batch_size, cfg.model_threads())
    with _MODELS_LOCK:
        if key not in _MODELS:
            for stale in [k for k in _MODELS if k[0] == job.model and k[1] != key[1]]:
                del _MODELS[stale]
            _MODELS[key] = load_model(job.model, cfg, job.tracking_uri)
            if threads:
                _worker_thread_pools(_MODELS[key], threads)
        return _MODELS[key]


def _worker_thread_pools(loaded: LoadedModel, threads: int) -> None:
    """Why BLAS goes to one thread for the whole worker process: score-slide holds it there only around its
    scoring (`ood.one_blas_thread`, main thread only), and a Dask task runs in a worker thread, where that
    context does nothing. OpenBLAS's busy-waiting threads then took a core from ONNX Runtime: the CSF
    slide took 70.7 s in a Dask worker thread against 49.9 s in the main thread (py-spy: the OOD product
    13x slower), measured one after the other. A worker process of score-slides does nothing else."""
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=1, user_api="blas")
    if loaded.predictor.backend == "torch":
        import torch

        torch.set_num_threads(threads)


def slide_threads(per_slot: bool) -> int:
    """Threads one slide may use on this worker: its share of them when the tasks hold the resource `slide`
    (a worker with slide=1 runs one slide at a time on all its threads), else one per slide. Outside a Dask
    worker: 0 (the settings as they are)."""
    from distributed import get_worker

    try:
        worker = get_worker()
    except ValueError:
        return 0
    slots = worker.state.total_resources.get(RESOURCE)
    return max(1, int(worker.state.nthreads // slots)) if per_slot and slots else 1


def within_threads(cfg: SlideConfig, threads: int) -> SlideConfig:
    """The per-slide schedule (detection threads, inference runs, model threads) within `threads`."""
    if threads <= 0:
        return cfg
    runs = min(cfg.inference_workers, threads)
    model_threads = min(cfg.inference_threads or threads, max(1, threads // runs))
    return dataclasses.replace(
        cfg, detect_workers=min(cfg.detect_workers, threads), inference_workers=runs, inference_threads=model_threads
    )


def score_task(entry: Entry, job: Job) -> dict:
    """Score one slide (or skip it when done.json matches); returns its worklist row, never raises."""
    t = time.perf_counter()
    row = {"slide": entry.slide, "case_id": entry.case_id, "priority": entry.priority, "report": ""}
    report_dir = Path(job.out_dir) / entry.stem
    error = ""
    for _ in range(ATTEMPTS):
        try:
            threads = slide_threads(job.per_slot)
            cfg = within_threads(job.cfg, threads)
            loaded = worker_model(job, cfg, threads)
            sha, model = file_sha256(Path(entry.slide)), model_key(loaded)
            if is_done(report_dir, sha, model):
                return {**row, **report_row(report_dir), "status": "skipped"}
            (report_dir / DONE).unlink(missing_ok=True)
            score_loaded(loaded, entry.slide, report_dir, cfg, job.mpp, job.top, job.tta, log=lambda *_: None)
            seconds = round(time.perf_counter() - t, 2)
            done = {"slide": entry.slide, "sha256": sha, "model": model, "seconds": seconds}
            atomic.write_json(report_dir / DONE, done)
            return {**row, **report_row(report_dir), "status": "scored"}
        except Exception as exc:  # noqa: BLE001 - a bad slide is a row of the cohort, not a crash
            error = f"{entry.slide}: {one_line(exc)}" if entry.slide not in str(exc) else one_line(exc)
    return failed_row(entry, error, time.perf_counter() - t)


def failed_row(entry: Entry, error: str, seconds: float) -> dict:
    row = dict.fromkeys(COLUMNS, "")
    row.update(slide=entry.slide, case_id=entry.case_id, priority=entry.priority, status="failed")
    return {**row, "seconds": round(seconds, 2), "error": error.replace("\n", " ")}


def report_row(report_dir: Path) -> dict:
    """The cohort columns read back from a slide's summary.json and done.json."""
    summary = json.loads((report_dir / "summary.json").read_text(encoding="utf-8"))
    done = json.loads((report_dir / DONE).read_text(encoding="utf-8"))
    morphometry = summary.get("morphometry") or {}
    return {
        "slide_call": summary["slide_call"],
        "n_cells": summary["n_cells"],
        "n_malignant": summary["n_malignant"],
        "top_k_mean": None if summary["top_k_mean"] is None else round(summary["top_k_mean"], 6),
        "fraction_out_of_domain": round(summary["fraction_out_of_domain"], 6),
        "atypia_burden": morphometry.get("atypia_burden"),
        "seconds": done.get("seconds"),
        "model_version": summary["model"]["version"],
        "report": f"{report_dir.name}/report.html",
        "error": "",
    }


# --------------------------------------------------------------------------- the cohort table


STATUS_ORDER = {"scored": 0, "skipped": 0, "failed": 1, "pending": 2}


def suspicion_order(rows: list[dict]) -> list[dict]:
    """Most suspicious first: malignant cells, then the top-k mean; failed slides after them, then the
    slides not scored yet."""

    def key(row):
        status = STATUS_ORDER.get(row["status"], 1)
        return (status, -(row.get("n_malignant") or 0), -(row.get("top_k_mean") or 0.0), row["slide"])

    return sorted(rows, key=key)


def pending_row(entry: Entry) -> dict:
    row = dict.fromkeys(COLUMNS, "")
    return {**row, "slide": entry.slide, "case_id": entry.case_id, "priority": entry.priority, "status": "pending"}


def cohort_rows(entries: list[Entry], finished: dict[str, dict]) -> list[dict]:
    """Every slide of the worklist: its finished row (by slide path), else a pending one."""
    return [finished.get(entry.slide) or pending_row(entry) for entry in entries]


def write_cohort(rows: list[dict], out_dir: Path) -> None:
    """DIR/worklist.csv and the self-contained DIR/worklist.html, both written atomically."""
    import pandas as pd

    rows = suspicion_order(rows)
    csv_name, html_name = COHORT_FILES
    atomic.write_csv(out_dir / csv_name, pd.DataFrame(rows, columns=COLUMNS))
    atomic.write_text(out_dir / html_name, render_worklist(rows, out_dir))


# --------------------------------------------------------------------------- the client


# Dask's nanny puts MALLOC_TRIM_THRESHOLD_=65536 into its worker processes' environment. Set at all, it pins
# glibc's mmap threshold at 128 KiB, so every tile and crop array is a fresh mmap that page-faults: the CSF
# slide took 64.5 s with it against 49.2 s without, both in one plain process, one after the other. Our
# workers go without it; the nanny's one-thread OpenMP/MKL/OpenBLAS settings stay. `dask worker` reads the
# same setting from configs/dask/cytopipe.yaml (DASK_CONFIG=configs/dask).
WORKER_DASK_CONFIG = {"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None}
MALLOC_VARIABLE = "MALLOC_TRIM_THRESHOLD_"


@contextmanager
def environ_restored():
    """This process's environment as it was, once the block ends: a nanny also writes its workers' variables
    into the process that starts it, and a caller's later subprocesses (dvc, training) must not inherit
    one-thread OpenMP/BLAS settings from a worklist run."""
    import os

    before = dict(os.environ)
    try:
        yield
    finally:
        for key in set(os.environ) - set(before):
            del os.environ[key]
        os.environ.update(before)


@contextmanager
def dask_client(scheduler: str | None, workers: int, threads: int):
    """A Client of the scheduler at `scheduler`, else of a LocalCluster of `workers` processes on 127.0.0.1
    (no dashboard; its health routes on 127.0.0.1 too), each running one slide at a time on `threads` threads."""
    import logging

    import dask
    from distributed import Client, LocalCluster

    if scheduler:
        try:
            client = Client(scheduler, timeout="10s")
        except (OSError, TimeoutError) as exc:
            raise WorklistError(f"{scheduler}: cannot reach the Dask scheduler ({one_line(exc)})") from None
        with client:
            yield client
        return
    with environ_restored():
        with dask.config.set(WORKER_DASK_CONFIG):  # read when the nannies start, and on a worker's restart
            cluster = LocalCluster(
                host="127.0.0.1",
                dashboard_address=None,
                n_workers=workers,
                threads_per_worker=threads,
                processes=True,
                resources={RESOURCE: 1},
                silence_logs=logging.ERROR,
            )
        with cluster, Client(cluster) as client:
            yield client


def _malloc_setting() -> str | None:
    import os

    return os.environ.get(MALLOC_VARIABLE)


def warn_about_workers(client, log=print) -> None:
    """One line when some worker runs with MALLOC_TRIM_THRESHOLD_ set (a `dask worker` started without
    configs/dask): its slides take about a third longer."""
    slow = sorted(address for address, value in client.run(_malloc_setting).items() if value is not None)
    if slow:
        log(
            f"{PROG}: warning: {len(slow)} worker(s) run with {MALLOC_VARIABLE} set ({', '.join(slow)}), which "
            "makes each slide about a third slower; start them with DASK_CONFIG=configs/dask (docs/worklist.md)"
        )


def local_threads(workers: int) -> int:
    import os

    return max(1, (os.cpu_count() or 1) // max(1, workers))


def _resources(client) -> dict | None:
    """Submit with resources slide=1 only when every worker advertises it (else the tasks would wait forever)."""
    workers = client.scheduler_info().get("workers", {}).values()
    return {RESOURCE: 1} if workers and all(RESOURCE in (w.get("resources") or {}) for w in workers) else None


def _priority(entry: Entry) -> int:
    try:
        return int(float(entry.priority))
    except ValueError:
        return 0


def submit_all(client, entries: list[Entry], job: Job) -> dict:
    """One task per slide (a higher worklist priority starts first); future -> entry."""
    resources = _resources(client)
    job = dataclasses.replace(job, per_slot=resources is not None)
    return {
        client.submit(
            score_task,
            entry,
            job,
            key=f"score-slide-{i}-{entry.stem}-{time.time_ns()}",
            pure=False,
            priority=_priority(entry),
            resources=resources,
        ): entry
        for i, entry in enumerate(entries)
    }


def collect(futures: dict, progress: bool = True, on_row=lambda row: None) -> list[dict]:
    """The rows as the tasks finish (each also passed to `on_row`), with slides done / total, a rate and an
    ETA on the terminal."""
    from distributed import as_completed
    from tqdm import tqdm

    rows = []
    bar = tqdm(total=len(futures), unit="slide", desc="score-slides", disable=not progress)
    t0 = time.perf_counter()
    for future in as_completed(list(futures)):
        entry = futures[future]
        try:
            rows.append(future.result())
        except Exception as exc:  # noqa: BLE001 - a worker that died under the slide: a failed row
            rows.append(failed_row(entry, f"{entry.slide}: {one_line(exc)}", time.perf_counter() - t0))
        on_row(rows[-1])
        bar.set_postfix_str(f"{entry.stem}: {rows[-1]['status']}")
        bar.update(1)
    bar.close()
    return rows


def pin_model(job: Job) -> Job:
    """Before any worker starts: a model folder that is not one fails here, in one line, and becomes an
    absolute path (workers may run elsewhere); models:/NAME@ALIAS is pinned to its version now, so every
    worker scores with the same version even if the alias moves during the run."""
    if job.model.startswith(MLFLOW_SCHEMES):
        return dataclasses.replace(job, model=pin_registered(job.model, job.tracking_uri)[0])
    resolve_model_dir(job.model)
    return dataclasses.replace(job, model=str(Path(job.model).absolute()))


def remove_stale_staging(out_dir: Path, entries: list[Entry]) -> None:
    """Staging folders a killed run left beside the report folders (.<stem>.*.tmp: atomic.staged_dir), and the
    temporary files of a cohort rewrite it was killed in (.worklist.csv.*.tmp: atomic.atomic_path).
    One run per DIR at a time: another run's staging would go too."""
    import glob
    import shutil

    for entry in entries:
        for stale in out_dir.glob(f".{glob.escape(entry.stem)}.*.tmp"):
            if stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)
    for name in COHORT_FILES:  # a kill in the middle of a cohort rewrite leaves its temporary file
        for stale in out_dir.glob(f".{name}.*.tmp"):
            if stale.is_file():
                stale.unlink(missing_ok=True)


def run_worklist(
    worklist: Path | str,
    job: Job,
    scheduler: str | None = None,
    workers: int = 1,
    threads: int | None = None,
    progress: bool = True,
    log=print,
) -> int:
    """Score every slide of the worklist into job.out_dir, write the cohort report; the exit code: 0 when
    every slide was scored or skipped, 1 when any failed."""
    entries = read_worklist(worklist)
    job = pin_model(job)
    out_dir = Path(job.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(out_dir, entries)
    finished: dict[str, dict] = {}

    def record(row: dict) -> None:  # the cohort report is rewritten as each slide finishes
        finished[row["slide"]] = row
        write_cohort(cohort_rows(entries, finished), out_dir)

    write_cohort(cohort_rows(entries, finished), out_dir)
    with dask_client(scheduler, workers, threads or local_threads(workers)) as client:
        warn_about_workers(client, log)
        rows = collect(submit_all(client, entries, job), progress, record)
    for row in rows:
        if row["status"] == "failed":
            print(f"{PROG}: error: {row['error']}", file=sys.stderr)
    counts = {s: sum(r["status"] == s for r in rows) for s in ("scored", "skipped", "failed")}
    log(
        f"score-slides: {len(rows)} slides: {counts['scored']} scored, {counts['skipped']} skipped, "
        f"{counts['failed']} failed -> {out_dir / 'worklist.html'}"
    )
    return 1 if counts["failed"] else 0
