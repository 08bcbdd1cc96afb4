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
- the ratios predict/bare and slide-inference/bare, against the bare graph with the same outputs.
Targets (issue 14): both ratios >= 0.9, the whole CSF slide <= 60 s, peak RSS < 2 GiB.

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


def bare_onnx(model: Path, batch: int, n_cells: int, outputs=PIPELINE_OUTPUTS, graph: Path | None = None,
              threads: int = 0, rounds: int = 3) -> float:
    """Cells/s of session.run alone on random, already-normalised tensors (median of rounds), asking
    the served graph (or `graph`) for `outputs`."""
    import numpy as np

    from pipeline.inference.predictor import OnnxPredictor, onnx_session

    predictor = OnnxPredictor(model, batch_size=batch, threads=threads)
    session = onnx_session(graph, threads) if graph is not None else predictor.session
    size = predictor.meta["image_size"]
    feed = {predictor.input_name: np.random.default_rng(0).standard_normal((batch, 3, size, size)).astype(np.float32)}
    session.run(list(outputs), feed)  # warm-up
    steps = max(1, n_cells // batch)
    rates = []
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(steps):
            session.run(list(outputs), feed)
        rates.append(steps * batch / (time.perf_counter() - t))
    return statistics.median(rates)


def stage_breakdown(model: Path, images: Path, batch: int, n_files: int = 512) -> dict[str, float]:
    """Milliseconds per cell of each step of `cytopipe predict`, run one after another on the same
    files (reading and preprocessing in this thread, the model on every core)."""
    import numpy as np

    from pipeline.calibration import Band
    from pipeline.data.images import IMAGE_SUFFIXES, load_rgb
    from pipeline.data.transforms import base_resize
    from pipeline.inference.predictor import OnnxPredictor
    from pipeline.ood import guard_calls

    predictor = OnnxPredictor(model, batch_size=batch)
    files = sorted(p for p in images.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)[:n_files]
    size, cal = predictor.meta["image_size"], predictor.calibration
    band = Band(float(cal.get("threshold", 0.5)), float(cal.get("band_width", 0.0)))
    predictor.array_scores(predictor.preprocess_array([np.asarray(load_rgb(files[0]))]))  # warm-up
    spent = dict.fromkeys(("read + decode", "resize", "normalise", "model (logits + features)", "OOD score",
                           "probabilities + calls"), 0.0)

    def timed(step, fn, *args):
        t = time.perf_counter()
        out = fn(*args)
        spent[step] += time.perf_counter() - t
        return out

    for start in range(0, len(files), batch):
        chunk = files[start:start + batch]
        decoded = timed("read + decode", lambda: [np.asarray(load_rgb(f)) for f in chunk])
        resized = timed("resize", lambda: np.stack([base_resize(im, size) for im in decoded]))
        x = timed("normalise", predictor.normalize_batch, resized)
        logits, feats = timed("model (logits + features)", predictor.array_outputs, x)
        scores = timed("OOD score", predictor.ood_scores, logits, feats)
        timed("probabilities + calls", lambda: guard_calls(
            band.call(predictor.malignant_probability(predictor.probabilities(logits))), predictor.in_domain(scores)))
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
    """(bare cells/s at the predict batch, at the slide batch, the (row name, text) table rows)."""
    bare_predict = bare_onnx(model, batch, 1024)
    bare_slide = bare_onnx(model, slide_batch, 1024) if slide_batch != batch else bare_predict
    with tempfile.TemporaryDirectory() as tmp:
        logits_only = bare_onnx(model, batch, 1024, ("logits",), graph_with_outputs(model, ("logits",), Path(tmp)))
    with_cam = bare_onnx(model, batch, 1024, PIPELINE_OUTPUTS + ("cam",))
    return bare_predict, bare_slide, [
        (f"bare ONNX Runtime, batch {batch}, logits + features (the ceiling)", f"{bare_predict:.1f} cells/s"),
        (f"bare ONNX Runtime, batch {slide_batch} (slide batch)", f"{bare_slide:.1f} cells/s"),
        ("bare, graph pruned to logits only", f"{logits_only:.1f} cells/s ({logits_only / bare_predict:.2f}x)"),
        ("bare, logits + features + cam (saliency for every cell)",
         f"{with_cam:.1f} cells/s ({with_cam / bare_predict:.2f}x)"),
        (f"where a cell's time goes (batch {batch}, steps one after another):", "")]


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
    bare_predict, bare_slide, rows = bare_rows(args.model, args.batch, slide_cfg.batch_size)
    steps = stage_breakdown(args.model, args.images, args.batch)
    total = sum(steps.values())
    rows += [(f"  {step}", f"{ms:.2f} ms/cell ({100 * ms / total:.0f}%)") for step, ms in steps.items()]
    rows.append(("  all steps, one after another", f"{total:.2f} ms/cell = {1000 / total:.1f} cells/s"))
    predict_rate, n_files = predict_folder(args.model, args.images, args.batch)
    rows += [(f"cytopipe predict, {n_files} files, end to end", f"{predict_rate:.1f} cells/s"),
             ("ratio predict / bare (same graph, same outputs)", f"{predict_rate / bare_predict:.2f} (target >= 0.9)")]
    sweep = []
    if not args.no_slide:
        s = score_slide_child(args.model, args.slide, args.params)
        info = s["inference"]
        rows += [(f"score-slide inference phase, {s['n_cells']} cells", f"{info['cells_per_second']:.1f} cells/s "
                  f"({info['seconds_in_model']:.1f} s in the model)"),
                 ("ratio slide inference / bare (same outputs)", f"{info['cells_per_second'] / bare_slide:.2f} (target >= 0.9)"),
                 ("whole CSF slide, wall", f"{s['wall_seconds']:.1f} s (target <= 60)"),
                 ("whole CSF slide, peak RSS", f"{s['peak_rss_gib']:.2f} GiB (target < 2)")]
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
