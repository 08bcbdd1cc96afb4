"""The shipped slide schedule and the ones it was measured against (benchmarks/slide_schedules.py:
phased, overlapped, sequential) give the same cells and scores,
on a synthetic pyramidal slide, with a small deterministic model standing in for the network."""

from __future__ import annotations

import dataclasses
import threading

import numpy as np
import pandas as pd
import pytest

from pipeline.config import ConfigError, SlideConfig
from pipeline.inference.predictor import Predictor
from pipeline.model_card import ModelCard
from benchmarks.slide_schedules import score_overlapped, score_phased, score_sequential
from pipeline.inference.slide_scoring import score_slide_cells as score_parallel
from pipeline.inference.slide_scoring import tile_groups
from pipeline.wsi.crops import read_crops, tile_crops
from pipeline.wsi.detection import detect_slide
from pipeline.wsi.readers import open_slide
from tests.slides import BLOB, CELLS, DEBRIS, SIZE, TILE, draw_cells, glass, write_pyramid


class PixelModel(Predictor):
    """Logits from fixed random projections of the normalised pixels: deterministic per cell,
    different for different cells, and sensitive to every pixel of the crop."""

    backend = "stub"

    def __init__(self, batch_size: int = 8, size: int = 32):
        meta = {
            "arch": "stub",
            "labels": ["benign", "malignant"],
            "positive_label": "malignant",
            "image_size": size,
            "mean": [0.5] * 3,
            "std": [0.5] * 3,
            "calibration": {"temperature": 1.0},
        }
        super().__init__("stub", ModelCard.from_dict(meta), batch_size)
        self.weights = np.random.default_rng(0).standard_normal((2, 3 * size * size)).astype(np.float32) / size
        self.threads: set[str] = set()

    def _forward(self, batch: np.ndarray) -> tuple[np.ndarray, None]:
        self.threads.add(threading.current_thread().name)
        return batch.reshape(len(batch), -1) @ self.weights.T, None


@pytest.fixture(scope="module")
def slide(tmp_path_factory):
    rng = np.random.default_rng(3)
    extra = [
        (int(x), int(y), int(r))
        for x, y, r in zip(
            rng.integers(60, SIZE[0] - 60, 25), rng.integers(60, SIZE[1] - 60, 25), rng.integers(18, 36, 25)
        )
    ]
    img = draw_cells(glass(SIZE, seed=1), CELLS + extra, DEBRIS, BLOB)
    return write_pyramid(tmp_path_factory.mktemp("slides") / "pipelined.tiff", img)


@pytest.fixture(scope="module")
def cfg() -> SlideConfig:
    return dataclasses.replace(SlideConfig(), tile_px=TILE, batch_size=5)


def test_tile_crops_are_the_model_input_of_read_crops(slide, cfg):
    from pipeline.data.transforms import base_resize

    with open_slide(slide) as src:
        cells = detect_slide(src, cfg, progress=False)
        some = cells.iloc[[0, 3, 7, len(cells) - 1]]
        cut = tile_crops(src, some, cfg.crop_margin, 48)
        one_by_one = np.stack([base_resize(c, 48) for c in read_crops(src, some, cfg.crop_margin)])
    assert cut.shape == (4, 48, 48, 3) and cut.dtype == np.uint8
    np.testing.assert_array_equal(cut, one_by_one)


@pytest.mark.parametrize("schedule", [score_parallel, score_phased, score_overlapped])
@pytest.mark.parametrize("workers,queue,batch,crop", [(1, 4, 5, 0), (2, 1, 5, 1), (2, 3, 64, 2), (3, 2, 3, 1)])
def test_pipelined_equals_sequential(slide, cfg, schedule, workers, queue, batch, crop):
    run_cfg = dataclasses.replace(
        cfg, detect_workers=workers, queue_tiles=queue, batch_size=batch, inference_workers=workers
    )
    extra = {"crop_workers": crop} if schedule is score_phased else {}
    with open_slide(slide) as src:
        cells_seq, scores_seq, _ = score_sequential(PixelModel(batch), src, run_cfg, tta=False, progress=False)
        model = PixelModel(batch)
        cells_pipe, scores_pipe, seconds = schedule(model, src, run_cfg, tta=False, progress=False, **extra)
        scores_seq, scores_pipe = scores_seq.p_malignant, scores_pipe.p_malignant
    assert len(cells_seq) >= len(CELLS)
    pd.testing.assert_frame_equal(cells_pipe, cells_seq)
    np.testing.assert_allclose(scores_pipe, scores_seq, rtol=0, atol=1e-6)
    assert len(np.unique(np.round(scores_seq, 6))) > len(scores_seq) // 2  # scores really differ per cell
    assert seconds["inference"] > 0
    if schedule is score_parallel:  # the model ran in the scoring workers, never in the caller's thread
        assert model.threads and all(name.startswith("score_") for name in model.threads)
        assert len(model.threads) <= workers
    else:
        assert model.threads == {"MainThread"}


def test_tile_groups_keep_order_and_reach_the_minimum():
    parts = [pd.DataFrame({"x": range(n)}) if n is not None else None for n in (3, None, 0, 4, 1, 2, 6, 1)]
    groups = tile_groups(parts, 5)
    assert [[len(p) for p in g] for g in groups] == [[3, 4], [1, 2, 6], [1]]
    assert tile_groups([None], 5) == [] and tile_groups([], 5) == []


@pytest.mark.parametrize("schedule", [score_parallel, score_phased, score_overlapped])
def test_pipelined_blank_slide_and_model_errors(tmp_path, cfg, schedule):
    blank = write_pyramid(tmp_path / "blank.tiff", glass((1500, 1200)))
    with open_slide(blank) as src:
        cells, scores, _ = schedule(PixelModel(), src, cfg, tta=False, progress=False)
    assert len(cells) == 0 and len(scores) == 0 and list(cells.columns)[0] == "cell_id"

    class Broken(PixelModel):
        def _forward(self, batch):
            raise RuntimeError("model exploded")

    slide = write_pyramid(tmp_path / "cells.tiff", draw_cells(glass(SIZE), CELLS))
    with open_slide(slide) as src, pytest.raises(RuntimeError, match="model exploded"):
        schedule(Broken(), src, cfg, tta=False, progress=False)


def test_slide_config_rejects_bad_pipeline_values():
    for field, value in (
        ("detect_workers", 0),
        ("queue_tiles", 0),
        ("batch_size", 0),
        ("inference_threads", -1),
        ("inference_workers", 0),
    ):
        with pytest.raises(ConfigError, match=f"slide.{field}"):
            SlideConfig(**{field: value})


def test_a_retired_schedule_key_says_where_the_schedules_went(tmp_path):
    from pipeline.config import load_params

    path = tmp_path / "params.yaml"
    path.write_text("slide:\n  schedule: phased\n")
    with pytest.raises(ConfigError, match=r"slide\.schedule: no longer read; .*benchmarks/slide_schedules\.py"):
        load_params(path)


def test_model_threads_share_the_cores_among_the_runs(monkeypatch):
    monkeypatch.setattr("os.cpu_count", lambda: 8)
    assert SlideConfig(inference_workers=2).model_threads() == 4
    assert SlideConfig(inference_workers=16).model_threads() == 1
    assert SlideConfig(inference_workers=1).model_threads() == 8
    assert SlideConfig(inference_threads=3).model_threads() == 3
