"""Inference speed on this machine, printed as one table from one run.

    python benchmarks/inference_throughput.py [--model models/exported] [--images ../shared/data/herlev]
        [--slide ../shared/data/slides/csf-breast-carcinoma-pap.tiff] [--sweep]

Rows:
- bare ONNX Runtime on pre-made tensors (the ceiling): the graph the pipeline serves, asked for the
  outputs the pipeline asks for (`logits` and `features`), at the predict and the slide batch size;
  the same graph pruned to `logits` only, and asked for `cam` too (what saliency for every cell
  would cost);
- where a cell's time goes, stage by stage on the same files in one thread (ms per cell): read and
  decode, resize, normalise, the model, the OOD score, probabilities and calls;
- `cytopipe predict` on the image folder, end to end in-process (model load, reading, decoding,
  preprocessing, inference, CSV), so process start-up is excluded, and the same with the read-ahead
  thread off (how much the decode thread and ONNX Runtime contend for the cores);
- `cytopipe score-slide` on the whole slide, in a child process: the time its inference phase
  spent in the model, its wall time and its peak RSS (the child's own getrusage);
- the ratios predict/bare and slide crop + inference/bare (cropping counted), against the bare
  ceiling with the same outputs.
Targets (issue 14): both ratios >= 0.9, the whole CSF slide <= 60 s, peak RSS < 2 GiB.

--sweep also scores the slide with other splits of the cores and with the schedules the shipped
one was measured against (benchmarks/slide_schedules.py; the whole-slide wall time of those
counts detection + crop + inference, without the report).

The ceiling is the faster of two ways to run the bare graph: one run on every core, or one
single-thread run per core side by side (on 2 cores the second: single-threaded runs never wait at
an operator's barriers).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


PIPELINE_OUTPUTS = ("logits", "features")  # what predict and score-slide ask the graph for


def graph_with_outputs(model: Path, outputs: tuple[str, ...], out_dir: Path) -> Path:
    """The served ONNX graph cut down to `outputs` (nodes nothing else needs are dropped)."""
    import onnx
    from onnx.utils import Extractor

    from pipeline.inference.predictor import OnnxPredictor

    served = model / OnnxPredictor(model).onnx_file
    graph = onnx.load(str(served))
    sub = Extractor(graph).extract_model([i.name for i in graph.graph.input], list(outputs))
    path = out_dir / f"{served.stem}.{'+'.join(outputs)}.onnx"
    onnx.save(sub, str(path))
    return path


def bare_onnx(
    model: Path,
    batch: int,
    n_cells: int,
    outputs=PIPELINE_OUTPUTS,
    graph: Path | None = None,
    threads: int = 0,
    rounds: int = 3,
    runs: int = 1,
) -> float:
    """Cells/s of session.run alone on random, already-normalised tensors (median of rounds), asking
    the served graph (or `graph`) for `outputs`; `runs` threads call one session at once."""
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    from pipeline.inference.predictor import OnnxPredictor, onnx_session

    predictor = OnnxPredictor(model, batch_size=batch, threads=threads)
    session = onnx_session(graph, threads) if graph is not None else predictor.session
    size = predictor.card.image_size
    feed = {predictor.input_name: np.random.default_rng(0).standard_normal((batch, 3, size, size)).astype(np.float32)}
    steps = max(1, n_cells // batch // runs)

    def loop(n: int) -> None:
        for _ in range(n):
            session.run(list(outputs), feed)

    rates = []
    with ThreadPoolExecutor(max_workers=runs) as pool:
        list(pool.map(loop, [1] * runs))  # warm-up
        for _ in range(rounds):
            t = time.perf_counter()
            list(pool.map(loop, [steps] * runs))
            rates.append(steps * runs * batch / (time.perf_counter() - t))
    return statistics.median(rates)


def bare_ceiling(model: Path, batch: int, n_cells: int = 1024) -> tuple[float, list]:
    """(the faster of one run on every core and one 1-thread run per core side by side, its rows):
    the most this graph gives on these cores, against which the pipeline's ratios are taken."""
    cores = os.cpu_count() or 1
    one_run = bare_onnx(model, batch, n_cells, threads=cores)
    side_by_side = bare_onnx(model, batch, n_cells, threads=1, runs=cores)
    return max(one_run, side_by_side), [
        (f"bare, batch {batch}: one run on {cores} threads", f"{one_run:.1f} cells/s"),
        (f"bare, batch {batch}: {cores} one-thread runs side by side", f"{side_by_side:.1f} cells/s"),
    ]


def stage_breakdown(model: Path, images: Path, batch: int, n_files: int = 512) -> dict[str, float]:
    """Milliseconds per cell of each step of `cytopipe predict`, run one after another on the same
    files (reading and preprocessing in this thread, the model on every core)."""
    import numpy as np

    from pipeline.calibration import malignant_probability
    from pipeline.data.images import IMAGE_SUFFIXES, load_rgb
    from pipeline.data.transforms import base_resize
    from pipeline.inference.predictor import OnnxPredictor
    from pipeline.ood import guard_calls, in_domain
    from pipeline.ood import score as score_ood

    predictor = OnnxPredictor(model, batch_size=batch)
    files = sorted(p for p in images.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)[:n_files]
    size, band = predictor.card.image_size, predictor.band
    positive = predictor.positive_labels
    predictor.score([np.asarray(load_rgb(files[0]))])  # warm-up
    spent = dict.fromkeys(
        ("read + decode", "resize", "normalise", "model (logits + features)", "OOD score", "probabilities + calls"), 0.0
    )

    def timed(step, fn, *args):
        t = time.perf_counter()
        out = fn(*args)
        spent[step] += time.perf_counter() - t
        return out

    for start in range(0, len(files), batch):
        chunk = files[start : start + batch]
        decoded = timed("read + decode", lambda: [np.asarray(load_rgb(f)) for f in chunk])
        resized = timed("resize", lambda: np.stack([base_resize(im, size) for im in decoded]))
        x = timed("normalise", predictor.normalize, resized)
        logits, feats = timed("model (logits + features)", predictor.outputs, x)
        scores = timed("OOD score", score_ood, predictor.ood, feats, logits)
        timed(
            "probabilities + calls",
            lambda: guard_calls(
                band.call(malignant_probability(logits, predictor.labels, positive, predictor.calibration.temperature)),
                in_domain(predictor.ood, scores),
            ),
        )
    return {step: 1000 * s / len(files) for step, s in spent.items()}


def predict_folder(model: Path, images: Path, batch: int, rounds: int = 3) -> tuple[float, int]:
    """(cells/s, files) of predict_paths, the body of `cytopipe predict`, median of rounds."""
    import contextlib
    import io

    from pipeline.inference.files import predict_paths

    rates, n = [], 0
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(rounds + 1):  # the first round warms caches and lazy imports
            out = Path(tmp) / f"p{i}.csv"
            with contextlib.redirect_stderr(io.StringIO()):
                t = time.perf_counter()
                code = predict_paths([str(images)], str(model), str(out), None, None, batch_size=batch)
                seconds = time.perf_counter() - t
            if code != 0:
                raise SystemExit(f"predict failed with exit code {code}")
            n = sum(1 for _ in open(out)) - 1
            if i:
                rates.append(n / seconds)
    return statistics.median(rates), n


def score_slide_child(model: Path, slide: Path, params: Path, overrides: dict | None = None) -> dict:
    """Run score-slide in a child process; its summary plus wall time and the child's peak RSS."""
    code = f"""
import json, resource, sys, time, dataclasses
from pathlib import Path
sys.path.insert(0, {str(ROOT)!r})
from pipeline.config import load_params
from pipeline.inference.score_slide import score_slide
cfg = dataclasses.replace(load_params({str(params)!r}).slide, **{overrides or {}!r})
t = time.perf_counter()
summary = score_slide({str(slide)!r}, {str(model)!r}, Path(sys.argv[1]), cfg, log=lambda *_: None)
summary["wall_seconds"] = time.perf_counter() - t
summary["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
print(json.dumps(summary))
"""
    with tempfile.TemporaryDirectory() as out:
        proc = subprocess.run([sys.executable, "-c", code, out], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"score-slide failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def bare_rows(model: Path, batch: int, slide_batch: int) -> tuple[float, float, list]:
    """(the bare ceiling at the predict batch, at the slide batch, the (row name, text) table rows)."""
    bare_predict, rows = bare_ceiling(model, batch)
    if slide_batch != batch:
        bare_slide, slide_rows = bare_ceiling(model, slide_batch)
        rows += slide_rows
    else:
        bare_slide = bare_predict
    with tempfile.TemporaryDirectory() as tmp:
        logits_only = bare_onnx(model, batch, 1024, ("logits",), graph_with_outputs(model, ("logits",), Path(tmp)))
    with_cam = bare_onnx(model, batch, 1024, PIPELINE_OUTPUTS + ("cam",))
    one_run = bare_onnx(model, batch, 1024)
    return (
        bare_predict,
        bare_slide,
        rows
        + [
            ("bare ceiling, logits + features (the faster of the two)", f"{bare_predict:.1f} cells/s"),
            ("bare one run, graph pruned to logits only", f"{logits_only:.1f} cells/s ({logits_only / one_run:.2f}x)"),
            (
                "bare one run, logits + features + cam (saliency for every cell)",
                f"{with_cam:.1f} cells/s ({with_cam / one_run:.2f}x)",
            ),
            (f"where a cell's time goes (batch {batch}, steps one after another):", ""),
        ],
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="models/exported", type=Path, help="exported (ONNX) model folder")
    ap.add_argument("--images", default=ROOT.parent / "shared/data/herlev", type=Path)
    ap.add_argument("--slide", default=ROOT.parent / "shared/data/slides/csf-breast-carcinoma-pap.tiff", type=Path)
    ap.add_argument("--params", default=ROOT / "params.yaml", type=Path)
    ap.add_argument("--batch", type=int, default=32, help="predict batch size (default: %(default)s)")
    ap.add_argument("--sweep", action="store_true", help="also try each split of the cores on the slide")
    ap.add_argument("--no-slide", action="store_true", help="skip the slide rows (quick check)")
    args = ap.parse_args()

    from pipeline.config import load_params

    slide_cfg = load_params(args.params).slide
    print(f"machine: {os.cpu_count()} cores; model {args.model}", flush=True)
    bare_predict, bare_slide, rows = bare_rows(args.model, args.batch, slide_cfg.batch_size)
    steps = stage_breakdown(args.model, args.images, args.batch)
    total = sum(steps.values())
    rows += [(f"  {step}", f"{ms:.2f} ms/cell ({100 * ms / total:.0f}%)") for step, ms in steps.items()]
    rows.append(("  all steps, one after another", f"{total:.2f} ms/cell = {1000 / total:.1f} cells/s"))
    predict_rate, n_files = predict_folder(args.model, args.images, args.batch)
    rows += [
        (f"cytopipe predict, {n_files} files, end to end", f"{predict_rate:.1f} cells/s"),
        (
            "ratio predict / bare ceiling (same graph, same outputs)",
            f"{predict_rate / bare_predict:.2f} (target >= 0.9)",
        ),
    ]
    sweep = []
    if not args.no_slide:
        s = score_slide_child(args.model, args.slide, args.params)
        info, phase = s["inference"], scoring_phase_rate(s)
        rows += [
            (
                f"score-slide crop + inference phase, {s['n_cells']} cells",
                f"{phase:.1f} cells/s ({s['seconds'].get('crop + inference', 0):.1f} s wall)",
            ),
            (
                "  of which the model",
                f"{info['seconds_in_model']:.1f} s per worker = {info['cells_per_second']:.1f} cells/s",
            ),
            ("ratio slide crop + inference / bare ceiling", f"{phase / bare_slide:.2f} (target >= 0.9)"),
            ("whole CSF slide, wall", f"{s['wall_seconds']:.1f} s (target <= 60)"),
            ("whole CSF slide, peak RSS", f"{s['peak_rss_gib']:.2f} GiB (target < 2)"),
        ]
        steps = ", ".join(f"{k} {v:.1f}" for k, v in s["seconds"].items())
        rows.append(("slide steps (s)", steps))
        if args.sweep:
            sweep = [sweep_row(s, "(default)")]
            for summary in sweep_runs(args.model, args.slide, args.params):
                sweep.append(sweep_row(summary))
                print(f"sweep: {sweep[-1]}", file=sys.stderr, flush=True)
    width = max(len(k) for k, _ in rows)
    print(f"\n{'measure':<{width}}  value")
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    if sweep:
        print("\nschedules and core splits on the slide:")
        print(
            f"{'schedule':<20} {'detect':>6} {'crop':>4} {'workers':>7} {'ort':>4} {'wall s':>7} "
            f"{'phase cells/s':>14} {'RSS GiB':>8}"
        )
        for row in sweep:
            print("{:<20} {:>6} {:>4} {:>7} {:>4} {:>7.1f} {:>14.1f} {:>8.2f}".format(*row))


# Splits of the cores and other schedules tried by --sweep (the default run comes first): the
# shipped schedule through score-slide, the others (benchmarks/slide_schedules.py) on one
# ONNX Runtime run over every core.
SWEEP = (
    {"inference_workers": 3},
    {"schedule": "phased", "detect_workers": 2, "crop_workers": 1},
    {"schedule": "overlapped", "detect_workers": 1},
    {"schedule": "sequential", "detect_workers": 2},
)


def schedule_child(
    model: Path, slide: Path, params: Path, schedule: str, detect_workers: int, crop_workers: int = 1
) -> dict:
    """Detect and score the slide with one of benchmarks/slide_schedules.py in a child process."""
    code = f"""
import dataclasses, json, os, resource, sys, time
sys.path.insert(0, {str(ROOT)!r})
from benchmarks.slide_schedules import SCHEDULES
from pipeline.config import load_params
from pipeline.inference.loading import load_predictor
from pipeline.wsi.readers import open_slide
cfg = dataclasses.replace(load_params({str(params)!r}).slide, detect_workers={detect_workers})
predictor, _ = load_predictor({str(model)!r}, None, cfg.batch_size, threads=os.cpu_count())
extra = {{"crop_workers": {crop_workers}}} if {schedule!r} == "phased" else {{}}
t = time.perf_counter()
with open_slide({str(slide)!r}) as source:
    cells, scores, seconds = SCHEDULES[{schedule!r}](predictor, source, cfg, None, False, **extra)
wall = time.perf_counter() - t
print(json.dumps({{"n_cells": len(cells), "seconds": seconds, "wall_seconds": wall,
                  "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                  "inference": {{"schedule": {schedule!r}, "detect_workers": {detect_workers},
                                "crop_workers": {crop_workers}, "inference_workers": 1,
                                "model_threads": os.cpu_count(),
                                "cells_per_second": len(cells) / max(seconds["inference"], 1e-9)}}}}))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"schedule {schedule} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def sweep_runs(model: Path, slide: Path, params: Path):
    """One summary per SWEEP entry, as it comes."""
    for entry in SWEEP:
        entry = dict(entry)
        schedule = entry.pop("schedule", "parallel")
        if schedule == "parallel":
            yield score_slide_child(model, slide, params, entry)
        else:
            yield schedule_child(model, slide, params, schedule, **entry)


def scoring_phase_rate(summary: dict) -> float:
    """Cells/s of the crop + inference phase, wall clock (cropping included); the model's share for
    the overlapped schedule, which has no separate phase."""
    wall = summary["seconds"].get("crop + inference")
    return summary["n_cells"] / wall if wall else summary["inference"]["cells_per_second"]


def sweep_row(summary: dict, note: str = "") -> tuple:
    info = summary["inference"]
    schedule = info.get("schedule", "parallel")
    return (
        f"{schedule} {note}".strip(),
        info["detect_workers"],
        info["crop_workers"] if schedule == "phased" else "-",
        info.get("inference_workers", 1),
        info.get("model_threads", "?"),
        summary["wall_seconds"],
        scoring_phase_rate(summary),
        summary["peak_rss_gib"],
    )


if __name__ == "__main__":
    main()
