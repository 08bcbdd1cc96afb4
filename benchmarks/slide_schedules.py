"""The slide-scoring schedules that `slide_scoring.score_slide_cells` (the one that ships) was
measured against, kept so that the measurement can be repeated (`inference_throughput.py --sweep`)
and so that a test holds every schedule to the same cells and scores:

- `sequential`: detect every cell, then read and score the crops one batch at a time;
- `phased`: detect every tile, then cut crops in `crop_workers` threads while the model runs on every core;
- `overlapped`: `detect_workers` threads each read a tile, detect its cells and cut their crops
  from one read, while the main thread feeds the crops to the model.

On this 2-core machine the shipped `parallel` schedule was the fastest (docs/benchmarks.md):
anything running beside a 2-thread model stalls it at its barriers.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pandas as pd

from pipeline.concurrency import in_order
from pipeline.config import SlideConfig
from pipeline.inference.slide_scoring import Batcher, detect_all, progress_bar, score_cells, score_slide_cells, with_ood
from pipeline.wsi.crops import tile_crops
from pipeline.wsi.detection import detect_slide, detect_tile, finish_cells, plan_detection


def score_sequential(predictor, source, cfg: SlideConfig, tta: bool, progress: bool | None = None):
    """Detect all cells, then score them: (cells, scores, seconds)."""
    seconds = {}
    t = time.perf_counter()
    cells = detect_slide(source, cfg, progress=progress)
    seconds["detect cells"] = time.perf_counter() - t
    t = time.perf_counter()
    scores = score_cells(predictor, source, cells, cfg, tta, progress)
    cells = with_ood(cells, scores.ood_score)
    seconds["crop + inference"] = time.perf_counter() - t
    seconds["inference"] = seconds["crop + inference"]  # reading crops is inside this loop
    return cells, scores, seconds


def score_overlapped(predictor, source, cfg: SlideConfig, tta: bool, progress: bool | None = None):
    """Reading + detection + cropping of each tile in worker threads, overlapping inference."""
    seconds = {}
    t0 = time.perf_counter()
    plan = plan_detection(source, cfg)
    seconds["plan tiles"] = time.perf_counter() - t0
    size = predictor.card.image_size

    def job(tile_no: int):
        part = detect_tile(source, plan, tile_no, cfg)
        return part, (tile_crops(source, part, cfg.crop_margin, size) if part is not None else None)

    batcher = Batcher(predictor, cfg.batch_size, tta)
    parts: list[pd.DataFrame | None] = []
    with (
        progress_bar(len(plan.tiles), f"score {source.path.name}", progress) as bar,
        ThreadPoolExecutor(max_workers=cfg.detect_workers, thread_name_prefix="detect") as pool,
    ):
        for part, crops in in_order(pool, job, range(len(plan.tiles)), cfg.queue_tiles):
            parts.append(part)
            batcher.add(crops)
            bar.update()
        scores = batcher.finish()
    cells, rows = finish_cells(parts, source, cfg)
    scores = scores.select(rows)
    cells = with_ood(cells, scores.ood_score)
    seconds["detect + crop + inference (overlapped)"] = time.perf_counter() - t0 - seconds["plan tiles"]
    seconds["inference"] = batcher.busy
    return cells, scores, seconds


def score_phased(predictor, source, cfg: SlideConfig, tta: bool, progress: bool | None = None, crop_workers: int = 1):
    """Detect every tile (worker threads; reading overlaps detection), then crop in `crop_workers`
    threads while the model scores (0: between the model's batches, in its own thread)."""
    seconds = {}
    _, parts = detect_all(source, cfg, progress, seconds)
    size = predictor.card.image_size
    t = time.perf_counter()
    batcher = Batcher(predictor, cfg.batch_size, tta)
    with_cells = [p for p in parts if p is not None]

    def crop(part):
        return tile_crops(source, part, cfg.crop_margin, size)

    with (
        progress_bar(len(with_cells), "score", progress) as bar,
        ThreadPoolExecutor(max_workers=max(1, crop_workers), thread_name_prefix="crop") as pool,
    ):
        # crop_workers 0: cut crops between model batches, so nothing preempts the model's threads.
        stream = in_order(pool, crop, with_cells, cfg.queue_tiles) if crop_workers else map(crop, with_cells)
        for crops in stream:
            batcher.add(crops)
            bar.update()
        scores = batcher.finish()
    seconds["crop + inference"] = time.perf_counter() - t
    cells, rows = finish_cells(parts, source, cfg)
    scores = scores.select(rows)
    cells = with_ood(cells, scores.ood_score)
    seconds["inference"] = batcher.busy
    return cells, scores, seconds


SCHEDULES = {
    "parallel": score_slide_cells,
    "phased": score_phased,
    "overlapped": score_overlapped,
    "sequential": score_sequential,
}
