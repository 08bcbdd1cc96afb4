"""Score the whole CSF slide and print, from one run: the wall time of each step, the cells/s of
the crop + inference phase, peak RSS, and both ratios against the bare graph (same file, same outputs).

    python benchmarks/slide_throughput.py [--model models/exported]
        [--slide ../shared/data/slides/csf-breast-carcinoma-pap.tiff] [--images ../shared/data/herlev]
        [--reference-cells OLD_cells.csv] [--save-cells NEW_cells.csv]

- bare: ONNX Runtime's session.run alone on pre-made tensors, asking the served graph for the
  outputs the pipeline asks for (logits and features), at the slide's batch size; the ceiling is
  the faster of one run on every core and one 1-thread run per core side by side;
- predict: `cytopipe predict` on the Herlev folder, in-process, end to end;
- the slide: `score_slide` in this process (imports excluded from its steps, included in "wall").
`--reference-cells` compares the detected cells with an earlier run's cells.csv: the fraction of
those cells with a new cell within 4 um (and the other way round), so a faster detector can be
shown to find the same cells. Where the breakdown of a cell's time goes is
benchmarks/inference_throughput.py.

Targets on this 2-core machine (issue 14): the whole slide <= 60 s, detection <= 15 s, peak RSS
< 2 GiB, both ratios >= 0.9.
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

MATCH_UM = 4.0


def matched_fraction(reference, cells, mpp: float, radius_um: float = MATCH_UM) -> tuple[float, float]:
    """(fraction of reference cells with a cell within radius_um, the same for `cells` against reference)."""
    from scipy.spatial import cKDTree

    ref, new = reference[["x", "y"]].to_numpy(), cells[["x", "y"]].to_numpy()
    if not len(ref) or not len(new):
        return 0.0, 0.0
    to_new, _ = cKDTree(new).query(ref)
    to_ref, _ = cKDTree(ref).query(new)
    return float((to_new * mpp <= radius_um).mean()), float((to_ref * mpp <= radius_um).mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=ROOT / "models/exported", type=Path, help="exported (ONNX) model folder")
    ap.add_argument("--slide", default=ROOT.parent / "shared/data/slides/csf-breast-carcinoma-pap.tiff", type=Path)
    ap.add_argument(
        "--images", default=ROOT.parent / "shared/data/herlev", type=Path, help="image folder for the predict ratio"
    )
    ap.add_argument("--params", default=ROOT / "params.yaml", type=Path)
    ap.add_argument("--reference-cells", type=Path, help="an earlier cells.csv of this slide to compare with")
    ap.add_argument("--save-cells", type=Path, help="keep this run's cells.csv here")
    ap.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None)
    args = ap.parse_args()
    start = time.perf_counter()

    import shutil

    import pandas as pd
    from inference_throughput import bare_ceiling, predict_folder

    from pipeline.config import load_params
    from pipeline.inference.score_slide import score_slide

    cfg = load_params(args.params).slide
    bare, bare_table = bare_ceiling(args.model, cfg.batch_size)
    predict_rate, n_files = predict_folder(args.model, args.images, cfg.batch_size)
    t = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        summary = score_slide(str(args.slide), str(args.model), Path(out), cfg, tta=args.tta, log=lambda *_: None)
        slide_wall = time.perf_counter() - t
        cells = pd.read_csv(Path(out) / "cells.csv")
        if args.save_cells:
            shutil.copyfile(Path(out) / "cells.csv", args.save_cells)
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    info = summary["inference"]
    print(
        f"slide {args.slide.name}: {summary['width']}x{summary['height']} px, {summary['n_cells']} cells, "
        f"tta={summary['tta']}; model {args.model} ({info['backend']}), {info['inference_workers']} scoring workers x {info['model_threads']} threads"
    )
    print(f"{'step':<44}{'seconds':>9}")
    for step, s in summary["seconds"].items():
        print(f"{step:<44}{s:>9.1f}")
    phase = summary["n_cells"] / (summary["seconds"].get("crop + inference") or float("nan"))
    rows = [
        ("whole slide, wall (score_slide call)", f"{slide_wall:.1f} s (target <= 60)"),
        ("crop + inference phase", f"{phase:.1f} cells/s (model: {info['seconds_in_model']:.1f} s per worker)"),
        *bare_table,
        ("bare ceiling (the faster), logits + features", f"{bare:.1f} cells/s"),
        ("ratio slide crop + inference / bare ceiling", f"{phase / bare:.2f} (target >= 0.9)"),
        (f"cytopipe predict, {n_files} files", f"{predict_rate:.1f} cells/s"),
        ("ratio predict / bare ceiling", f"{predict_rate / bare:.2f} (target >= 0.9)"),
        ("peak RSS (this process)", f"{peak_gib:.2f} GiB (target < 2)"),
    ]
    if args.reference_cells:
        reference = pd.read_csv(args.reference_cells)
        ref_in_new, new_in_ref = matched_fraction(reference, cells, summary.get("mpp") or 0.25)
        rows += [
            ("cells: reference -> this run", f"{len(reference)} -> {len(cells)}"),
            (f"reference cells matched within {MATCH_UM:g} um", f"{ref_in_new:.4f}"),
            (f"this run's cells matched within {MATCH_UM:g} um", f"{new_in_ref:.4f}"),
        ]
    rows.append(("wall of this benchmark (incl. imports)", f"{time.perf_counter() - start:.1f} s"))
    width = max(len(k) for k, _ in rows)
    print()
    for key, value in rows:
        print(f"{key:<{width}}  {value}")


if __name__ == "__main__":
    main()
