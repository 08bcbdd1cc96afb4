"""Detect and score every cell of a slide: one step after the other, or pipelined.

Pipelined: `detect_workers` threads each take a tile, read it (OpenSlide and OpenCV release
the GIL), detect its cells and cut their model-input crops from one level-0 read; the main
thread batches those crops into the model (ONNX Runtime also runs without the GIL). At most
`queue_tiles` tiles are in flight, so memory stays flat however big the slide. Tiles are
consumed in order and the final table is built by the same `finish_cells` as the sequential
path, so both give the same cells and scores.
"""
from __future__ import annotations

import sys
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pandas as pd

from pipeline.config import SlideConfig


def score_cells(predictor, source, cells, cfg: SlideConfig, tta: bool | None, progress: bool | None = None) -> np.ndarray:
    """Calibrated P(malignant) per detected cell; crops are read and scored batch by batch."""
    from tqdm import tqdm

    from pipeline.inference.slide import read_crops

    scores = []
    for start in tqdm(range(0, len(cells), cfg.batch_size), desc="score", unit="batch", file=sys.stderr,
                      disable=None if progress is None else not progress):
        crops = read_crops(source, cells.iloc[start:start + cfg.batch_size], cfg.crop_margin)
        scores.append(predictor.malignant_probability(predictor.probabilities(predictor.predict_logits(crops, tta))))
    return np.concatenate(scores) if scores else np.zeros(0)


def score_sequential(predictor, source, cfg: SlideConfig, tta: bool, progress: bool | None = None):
    """Detect all cells, then score them: (cells, scores, seconds)."""
    from pipeline.inference.slide import detect_slide

    seconds = {}
    t = time.perf_counter()
    cells = detect_slide(source, cfg, progress=progress)
    seconds["detect cells"] = time.perf_counter() - t
    t = time.perf_counter()
    scores = score_cells(predictor, source, cells, cfg, tta, progress)
    seconds["crop + inference"] = time.perf_counter() - t
    seconds["inference"] = seconds["crop + inference"]
    return cells, scores, seconds


def _tile_job(source, plan, tile_no: int, cfg: SlideConfig, size: int):
    from pipeline.inference.slide import detect_tile, tile_crops

    part = detect_tile(source, plan, tile_no, cfg)
    if part is None:
        return None, None
    return part, tile_crops(source, part, cfg.crop_margin, size)


def score_pipelined(predictor, source, cfg: SlideConfig, tta: bool, progress: bool | None = None):
    """Overlap reading, detection and cropping (worker threads) with inference (this thread).

    Returns (cells, scores, seconds); seconds["inference"] is the time spent in the model."""
    from tqdm import tqdm

    from pipeline.inference.slide import finish_cells, plan_detection

    seconds = {}
    t0 = time.perf_counter()
    plan = plan_detection(source, cfg)
    seconds["plan tiles"] = time.perf_counter() - t0
    size = predictor.meta["image_size"]
    parts: list[pd.DataFrame | None] = []
    scores: list[np.ndarray] = []
    pending: list[np.ndarray] = []
    n_pending = 0
    busy = 0.0

    def run(batch: np.ndarray) -> None:
        nonlocal busy
        t = time.perf_counter()
        logits = predictor.array_logits(predictor.normalize_batch(batch), tta)
        scores.append(predictor.malignant_probability(predictor.probabilities(logits)))
        busy += time.perf_counter() - t

    def drain(final: bool) -> None:
        nonlocal pending, n_pending
        if not pending or (n_pending < cfg.batch_size and not final):
            return
        crops = np.concatenate(pending) if len(pending) > 1 else pending[0]
        full = len(crops) if final else len(crops) // cfg.batch_size * cfg.batch_size
        for start in range(0, full, cfg.batch_size):
            run(crops[start:start + cfg.batch_size])
        pending = [crops[full:]] if full < len(crops) else []
        n_pending = len(crops) - full

    tiles = range(len(plan.tiles))
    bar = tqdm(total=len(plan.tiles), desc=f"score {source.path.name}", unit="tile", file=sys.stderr,
               disable=None if progress is None else not progress)
    with bar, ThreadPoolExecutor(max_workers=cfg.detect_workers, thread_name_prefix="detect") as pool:
        in_flight: deque = deque()
        next_tile = iter(tiles)
        for tile_no in next_tile:
            in_flight.append(pool.submit(_tile_job, source, plan, tile_no, cfg, size))
            if len(in_flight) >= cfg.queue_tiles:
                break
        try:
            while in_flight:
                part, crops = in_flight.popleft().result()
                for tile_no in next_tile:  # refill before scoring, so the workers never idle
                    in_flight.append(pool.submit(_tile_job, source, plan, tile_no, cfg, size))
                    break
                parts.append(part)
                if crops is not None and len(crops):
                    pending.append(crops)
                    n_pending += len(crops)
                    drain(final=False)
                bar.update()
            drain(final=True)
        except BaseException:
            for future in in_flight:
                future.cancel()
            raise
    all_scores = np.concatenate(scores) if scores else np.zeros(0)
    cells, rows = finish_cells(parts, source, cfg)
    seconds["detect + crop + inference (pipelined)"] = time.perf_counter() - t0
    seconds["inference"] = busy
    return cells, all_scores[rows], seconds


def score_slide_cells(predictor, source, cfg: SlideConfig, tta: bool, progress: bool | None = None):
    """(cells, scores, seconds) by the configured path: pipelined unless slide.pipelined is false."""
    if cfg.pipelined:
        return score_pipelined(predictor, source, cfg, tta, progress)
    return score_sequential(predictor, source, cfg, tta, progress)
