"""Inference speed on this machine, printed as one table from one run.

    python benchmarks/inference_throughput.py [--model models/exported] [--images ../shared/data/herlev]
        [--slide ../shared/data/slides/csf-breast-carcinoma-pap.tiff] [--sweep]

Rows:
- bare ONNX Runtime on pre-made tensors (the ceiling), at the predict and the slide batch size;
- `cytopipe predict` on the image folder, end to end in-process (model load, reading, decoding,
  preprocessing, inference, CSV), so process start-up is excluded;
- `cytopipe score-slide` on the whole slide, in a child process: the time its inference phase
  spent in the model, its wall time and its peak RSS (the child's own getrusage);
- the ratios predict/bare and slide-inference/bare.
Targets: both ratios >= 0.8, the whole CSF slide <= 90 s, peak RSS < 4 GiB.

--sweep also scores the slide with the other schedules and splits of the 2 cores between
detection threads and ONNX Runtime threads, to choose slide.schedule, slide.detect_workers and
slide.inference_threads.
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


def bare_onnx(model: Path, batch: int, n_cells: int, threads: int = 0, rounds: int = 3) -> float:
    """Cells/s of session.run alone on random, already-normalised tensors (median of rounds)."""
    import numpy as np

    from pipeline.inference.predictor import OnnxPredictor

    predictor = OnnxPredictor(model, batch_size=batch, threads=threads)
    size = predictor.meta["image_size"]
    x = np.random.default_rng(0).standard_normal((batch, 3, size, size)).astype(np.float32)
    predictor.array_logits(x)  # warm-up
    steps = max(1, n_cells // batch)
    rates = []
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(steps):
            predictor.array_logits(x)
        rates.append(steps * batch / (time.perf_counter() - t))
    return statistics.median(rates)


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
    cfg_threads = slide_cfg.inference_threads or os.cpu_count()
    print(f"machine: {os.cpu_count()} cores; model {args.model}", flush=True)
    bare_predict = bare_onnx(args.model, args.batch, 1024)
    bare_slide = bare_onnx(args.model, slide_cfg.batch_size, 1024) if slide_cfg.batch_size != args.batch else bare_predict
    predict_rate, n_files = predict_folder(args.model, args.images, args.batch)
    rows = [(f"bare ONNX Runtime, batch {args.batch} (ceiling)", f"{bare_predict:.1f} cells/s"),
            (f"bare ONNX Runtime, batch {slide_cfg.batch_size} (slide batch)", f"{bare_slide:.1f} cells/s"),
            (f"cytopipe predict, {n_files} files, end to end", f"{predict_rate:.1f} cells/s"),
            ("ratio predict / bare", f"{predict_rate / bare_predict:.2f} (target >= 0.8)")]
    sweep = []
    if not args.no_slide:
        s = score_slide_child(args.model, args.slide, args.params)
        info = s["inference"]
        rows += [(f"score-slide inference phase, {s['n_cells']} cells", f"{info['cells_per_second']:.1f} cells/s "
                  f"({info['seconds_in_model']:.1f} s in the model)"),
                 ("ratio slide inference / bare", f"{info['cells_per_second'] / bare_slide:.2f} (target >= 0.8)"),
                 ("whole CSF slide, wall", f"{s['wall_seconds']:.1f} s (target <= 90)"),
                 ("whole CSF slide, peak RSS", f"{s['peak_rss_gib']:.2f} GiB (target < 4)")]
        steps = ", ".join(f"{k} {v:.1f}" for k, v in s["seconds"].items())
        rows.append(("slide steps (s)", steps))
        if args.sweep:
            for schedule, workers, crop, threads in (("overlapped", 1, 1, 2), ("overlapped", 1, 1, 1),
                                                     ("phased", 1, 1, 2), ("phased", 2, 0, 2), ("sequential", 1, 1, 2)):
                r = score_slide_child(args.model, args.slide, args.params,
                                      {"schedule": schedule, "detect_workers": workers, "crop_workers": crop,
                                       "inference_threads": threads})
                sweep.append((schedule, workers, crop if schedule == "phased" else "-", threads,
                              r["inference"]["batch_size"], r["wall_seconds"], r["inference"]["cells_per_second"],
                              r["peak_rss_gib"]))
                print(f"sweep: {sweep[-1]}", file=sys.stderr, flush=True)
    width = max(len(k) for k, _ in rows)
    print(f"\n{'measure':<{width}}  value")
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    if sweep:
        print("\ncore split on the slide (detect threads, crop threads, ONNX Runtime threads):")
        info = s["inference"]
        sweep.insert(0, (f"{info['schedule']} (default)", info["detect_workers"], info["crop_workers"], cfg_threads,
                         info["batch_size"], s["wall_seconds"], info["cells_per_second"], s["peak_rss_gib"]))
        print(f"{'schedule':<20} {'detect':>6} {'crop':>4} {'ort':>4} {'batch':>5} {'wall s':>7} {'model cells/s':>14} "
              f"{'RSS GiB':>8}")
        for schedule, workers, crop, threads, batch, wall, rate, rss in sweep:
            print(f"{schedule:<20} {workers:>6} {crop:>4} {threads:>4} {batch:>5} {wall:>7.1f} {rate:>14.1f} {rss:>8.2f}")


if __name__ == "__main__":
    main()
