"""Morphometry's cost on the whole CSF slide, measured in one run: per cell on one thread and on every core,
and its share of slide scoring (the crop + inference phase with and without it, side by side).

    python benchmarks/morphometry_cost.py [--model models/exported]
        [--slide ../shared/data/slides/csf-breast-carcinoma-pap.tiff] [--size 128] [--skip-slide]

1. detect every cell and cut the model's crops once (not timed);
2. `measure_slide_crops` on all crops: one thread, then `inference_workers` threads over chunks;
3. unless --skip-slide, `score_slide_cells` without and with morphometry (the shipped schedule, where each
   worker measures the crops it has just scored), and the difference as a share of the slide's time.

Target (issue 16): <= 5 s for the ~20,400 cells of the CSF slide on 2 cores.
"""

from __future__ import annotations

import argparse
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def measure_all(morphometry, source, cells, crops, slide_cfg, workers: int, chunk: int = 512) -> float:
    """Seconds to measure every crop on `workers` threads (chunks of `chunk` cells, in order)."""
    import pandas as pd

    starts = range(0, len(cells), chunk)

    def one(start):
        return morphometry.measure(source, cells.iloc[start : start + chunk], crops[start : start + chunk], slide_cfg)

    t = time.perf_counter()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        parts = list(pool.map(one, starts))
    seconds = time.perf_counter() - t
    assert len(pd.concat(parts)) == len(cells)
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=ROOT / "models/exported", type=Path, help="model folder (for the slide share)")
    ap.add_argument("--slide", default=ROOT.parent / "shared/data/slides/csf-breast-carcinoma-pap.tiff", type=Path)
    ap.add_argument("--params", default=ROOT / "params.yaml", type=Path)
    ap.add_argument("--size", type=int, help="segmentation size in px (default: params.yaml morphometry.slide_size)")
    ap.add_argument("--skip-slide", action="store_true", help="only time morphometry on the crops")
    args = ap.parse_args()

    import dataclasses

    import numpy as np

    from pipeline.config import load_params
    from pipeline.morphometry.slides import Morphometry
    from pipeline.wsi.crops import tile_crops
    from pipeline.wsi.detection import detect_slide, plan_detection
    from pipeline.wsi.readers import open_slide

    params = load_params(args.params)
    slide_cfg, cfg = params.slide, params.morphometry
    if args.size:
        cfg = dataclasses.replace(cfg, slide_size=args.size)
    source = open_slide(str(args.slide), None)
    cells = detect_slide(source, slide_cfg, progress=False)
    crops = np.concatenate(
        [tile_crops(source, cells.iloc[s : s + 512], slide_cfg.crop_margin, 128) for s in range(0, len(cells), 512)]
    )
    morphometry = Morphometry(cfg, darkness_threshold=plan_detection(source, slide_cfg).threshold)
    one = measure_all(morphometry, source, cells, crops, slide_cfg, 1)
    many = measure_all(morphometry, source, cells, crops, slide_cfg, slide_cfg.inference_workers)
    n = len(cells)
    print(f"cells: {n} ({args.slide.name}), each cell's window segmented at {cfg.slide_size} px")
    print(f"morphometry, 1 thread: {one:.2f} s = {one / n * 1e3:.3f} ms/cell")
    print(
        f"morphometry, {slide_cfg.inference_workers} threads: {many:.2f} s = {many / n * 1e3:.3f} ms/cell "
        f"(target <= 5 s for the slide)"
    )
    if args.skip_slide:
        return
    from pipeline.inference.loading import load_predictor
    from pipeline.inference.slide_scoring import score_slide_cells

    predictor, _ = load_predictor(str(args.model), None, slide_cfg.batch_size, threads=slide_cfg.model_threads())
    timings = {}
    for name, morph in (("without", None), ("with", Morphometry(cfg)), ("without again", None)):
        t = time.perf_counter()
        _, _, steps = score_slide_cells(predictor, source, slide_cfg, False, morphometry=morph)
        timings[name] = (time.perf_counter() - t, steps["crop + inference"])
        print(f"slide scoring {name} morphometry: {timings[name][0]:.1f} s (crop + inference {timings[name][1]:.1f} s)")
    base = (timings["without"][0] + timings["without again"][0]) / 2
    print(
        f"morphometry's share of the slide: {timings['with'][0] - base:.1f} s of {timings['with'][0]:.1f} s "
        f"= {(timings['with'][0] - base) / timings['with'][0]:.1%} (mean of the two runs without it as the base)"
    )


if __name__ == "__main__":
    main()
