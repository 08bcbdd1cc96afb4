"""Detect and score every cell of a slide.

Every tile is detected first by `detect_workers` threads (reading overlaps detection); then
`inference_workers` threads each cut the crops of their own group of tiles and score them, each
running the model on cores / inference_workers ONNX Runtime threads. On 2 cores, two 1-thread runs
side by side beat one 2-thread run (bare graph 552 vs 484 cells/s; crop + inference of the CSF
slide 40.8 vs 47.3 s, measured in one run): single-threaded runs never wait at the barriers of a
parallel operator, and cutting crops fills the gaps. The schedules it was measured against
(phased, overlapped, sequential) live in benchmarks/slide_schedules.py, with a test that all give
the same cells and scores.

At most `queue_tiles` tiles are read ahead, so memory stays flat however big the slide; OpenSlide,
OpenCV and ONNX Runtime release the GIL. Tiles are consumed in order and the final table comes
from `finish_cells`, so the result does not depend on the number of workers.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pandas as pd

from pipeline.concurrency import in_order
from pipeline.config import SlideConfig
from pipeline.inference.predictor import Scores
from pipeline.morphometry.slides import Morphometry
from pipeline.ood import one_blas_thread
from pipeline.wsi.crops import read_crops, tile_crops
from pipeline.wsi.detection import detect_tile, finish_cells, plan_detection


class Batcher:
    """Collects model-input crops and scores them in fixed-size batches, timing the model."""

    def __init__(self, predictor, batch_size: int, tta: bool):
        self.predictor, self.batch_size, self.tta = predictor, batch_size, tta
        self.pending: list[np.ndarray] = []
        self.n_pending = 0
        self.parts: list[Scores] = []
        self.busy = 0.0

    def _run(self, batch: np.ndarray) -> None:
        p = self.predictor
        t = time.perf_counter()
        self.parts.append(p.score_batch(p.normalize(batch), self.tta))
        self.busy += time.perf_counter() - t

    def add(self, crops: np.ndarray | None) -> None:
        if crops is None or not len(crops):
            return
        self.pending.append(crops)
        self.n_pending += len(crops)
        if self.n_pending >= self.batch_size:
            self._drain(final=False)

    def _drain(self, final: bool) -> None:
        if not self.pending:
            return
        crops = np.concatenate(self.pending) if len(self.pending) > 1 else self.pending[0]
        full = len(crops) if final else len(crops) // self.batch_size * self.batch_size
        for start in range(0, full, self.batch_size):
            self._run(crops[start : start + self.batch_size])
        self.pending = [crops[full:]] if full < len(crops) else []
        self.n_pending = len(crops) - full

    def finish(self) -> Scores:
        """Every cell's scores, in the order added."""
        self._drain(final=True)
        return Scores.concat(self.parts, len(self.predictor.labels))


def with_ood(cells: pd.DataFrame, ood_score: np.ndarray) -> pd.DataFrame:
    """The cells table with its `ood_score` column (NaN for a model without an OOD guard)."""
    return cells.assign(ood_score=np.asarray(ood_score, dtype=float))


def progress_bar(total: int, desc: str, progress: bool | None):
    from tqdm import tqdm

    return tqdm(
        total=total, desc=desc, unit="tile", file=sys.stderr, disable=None if progress is None else not progress
    )


def score_cells(predictor, source, cells, cfg: SlideConfig, tta: bool | None, progress: bool | None = None) -> Scores:
    """Every detected cell's scores; crops are read and scored batch by batch."""
    from tqdm import tqdm

    parts = []
    for start in tqdm(
        range(0, len(cells), cfg.batch_size),
        desc="score",
        unit="batch",
        file=sys.stderr,
        disable=None if progress is None else not progress,
    ):
        parts.append(
            predictor.score(read_crops(source, cells.iloc[start : start + cfg.batch_size], cfg.crop_margin), tta)
        )
    return Scores.concat(parts, len(predictor.labels))


def detect_all(source, cfg: SlideConfig, progress: bool | None, seconds: dict):
    """(plan, parts): every tile detected by `detect_workers` threads (reading overlaps detection)."""

    t0 = time.perf_counter()
    plan = plan_detection(source, cfg)
    seconds["plan tiles"] = time.perf_counter() - t0
    t = time.perf_counter()
    with (
        progress_bar(len(plan.tiles), f"cells {source.path.name}", progress) as bar,
        ThreadPoolExecutor(max_workers=cfg.detect_workers, thread_name_prefix="detect") as pool,
    ):
        parts = []
        for part in in_order(
            pool, lambda i: detect_tile(source, plan, i, cfg), range(len(plan.tiles)), cfg.queue_tiles
        ):
            parts.append(part)
            bar.update()
    seconds["detect cells"] = time.perf_counter() - t
    return plan, parts


def tile_groups(parts: list, min_cells: int) -> list[list]:
    """Consecutive tiles with cells, grouped until each group holds >= min_cells cells (the last
    may hold fewer): a worker's unit, big enough that partial batches are rare."""
    groups, current, n = [], [], 0
    for part in parts:
        if part is None or not len(part):
            continue
        current.append(part)
        n += len(part)
        if n >= min_cells:
            groups.append(current)
            current, n = [], 0
    return groups + ([current] if current else [])


def score_slide_cells(
    predictor, source, cfg: SlideConfig, tta: bool, progress: bool | None = None, morphometry: Morphometry | None = None
):
    """(cells, Scores, seconds): detect every tile, then `inference_workers` threads each crop and score
    their own tiles. seconds["inference"] is the model's share; `cells` has an `ood_score` column, and with
    `morphometry` the nuclear features and atypia scores of every cell, measured on the same crops (and
    the slide's detection threshold, which morphometry used, in cells.attrs["darkness_threshold"])."""

    seconds = {}
    plan, parts = detect_all(source, cfg, progress, seconds)
    size = predictor.card.image_size
    if morphometry:
        morphometry = dataclasses.replace(morphometry, darkness_threshold=plan.threshold)
    groups = tile_groups(parts, 2 * cfg.batch_size)

    def crop_and_score(group):
        batcher = Batcher(predictor, cfg.batch_size, tta)
        crops = np.concatenate([tile_crops(source, part, cfg.crop_margin, size) for part in group])
        batcher.add(crops)
        t = time.perf_counter()
        features = morphometry.measure(source, pd.concat(group), crops, cfg) if morphometry else None
        return batcher.finish(), batcher.busy, len(group), features, time.perf_counter() - t

    t = time.perf_counter()
    scores, features, busy, morph_busy = [], [], 0.0, 0.0
    with (
        progress_bar(sum(len(g) for g in groups), "score", progress) as bar,
        one_blas_thread(),
        ThreadPoolExecutor(max_workers=cfg.inference_workers, thread_name_prefix="score") as pool,
    ):
        for group_scores, group_busy, n_tiles, group_features, group_morph in in_order(
            pool, crop_and_score, groups, cfg.inference_workers + 1
        ):
            scores.append(group_scores)
            features.append(group_features)
            busy += group_busy
            morph_busy += group_morph
            bar.update(n_tiles)
    seconds["crop + inference"] = time.perf_counter() - t
    cells, rows = finish_cells(parts, source, cfg)
    scores = Scores.concat(scores, len(predictor.labels)).select(rows)
    cells = with_ood(cells, scores.ood_score)
    if morphometry:
        cells = pd.concat([cells, morphometry.concat(features).iloc[rows].reset_index(drop=True)], axis=1)
        cells.attrs["darkness_threshold"] = plan.threshold  # what the report's nucleus outlines must use too
        seconds["morphometry"] = morph_busy / cfg.inference_workers  # its share of crop + inference
    # The model's share of the phase: its time summed over the workers, per worker.
    seconds["inference"] = busy / cfg.inference_workers
    return cells, scores, seconds
