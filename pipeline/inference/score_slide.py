"""`cytopipe score-slide`: detect cells on a whole slide, score them, write cells.csv, a summary,
a heat map and a self-contained report.html.

Steps: foreground mask on a low-resolution level -> cell detection, tile by tile -> Herlev-style
crops (bounding box + margin, long side scaled to the model input, padded square) -> batched,
calibrated inference (detection and cropping overlap inference: `slide_scoring`) -> saliency
for the gallery (Grad-CAM on torch, CAM from the ONNX graph) -> report.

`score_slides` scores several slides with one loaded model: a slide that cannot be opened or
read is reported on one line and skipped, and leaves no output (each report is written into a
hidden staging folder and moved into place only when complete).
"""

from __future__ import annotations

import dataclasses
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline import atomic, ood, qupath
from pipeline.config import SlideConfig
from pipeline.data.transforms import base_resize
from pipeline.errors import one_line
from pipeline.inference.loading import load_predictor
from pipeline.inference.slide_scoring import score_slide_cells
from pipeline.morphometry.cells import nucleus_outline
from pipeline.morphometry.slides import CELL_COLUMNS as MORPH_COLUMNS
from pipeline.morphometry.slides import Morphometry, evidence_line, slide_morphometry_summary
from pipeline.report.page import gallery_data_uri, heatmap_data_uri, render_html
from pipeline.report.saliency import heatmap_overlay, saliency_maps
from pipeline.wsi.crops import read_crops
from pipeline.wsi.readers import SlideError, open_slide

SALIENCY = {
    "torch": "Grad-CAM (pytorch-grad-cam) at the last convolution, for the malignant output",
    "onnx": "CAM: the classifier's malignant weights on the last feature map (computed in the ONNX "
    "graph; for this pooled linear head it equals Grad-CAM at that layer)",
}


def slide_rule(cfg: SlideConfig) -> str:
    return (
        f"positive when at least {cfg.min_malignant_cells} cell(s) are called malignant, otherwise negative; "
        f"out-of-domain cells are not counted, and above {cfg.max_ood_fraction:.0%} of cells out of domain "
        "the call is marked unreliable"
    )


def ood_slide_call(call: str, fraction_ood: float, cfg: SlideConfig) -> str:
    """The slide call, marked unreliable when too many cells lie outside the model's training domain."""
    if fraction_ood > cfg.max_ood_fraction:
        return f"{call} (unreliable: {fraction_ood:.0%} of cells out of domain)"
    return call


PROG = "cytopipe score-slide"


@dataclass
class LoadedModel:
    uri: str
    predictor: object
    version: str
    load_s: float | None  # in the summary of the first slide scored only: it is paid once


def load_model(model: str, cfg: SlideConfig, tracking_uri: str | None = None) -> LoadedModel:
    t = time.perf_counter()
    predictor, version = load_predictor(model, tracking_uri, cfg.batch_size, threads=cfg.model_threads())
    return LoadedModel(model, predictor, version, time.perf_counter() - t)


def _missing_dirs(path: Path) -> list[Path]:
    """`path` and those of its ancestors that do not exist yet, deepest first."""
    missing = []
    while not path.exists() and path != path.parent:
        missing.append(path)
        path = path.parent
    return missing


def score_slides(
    slides: list[str],
    model: str,
    out_dir: Path,
    cfg: SlideConfig,
    mpp: float | None = None,
    top: int | None = None,
    tta: bool | None = None,
    tracking_uri: str | None = None,
    log=print,
) -> int:
    """Score each slide with one loaded model: one slide -> `out_dir`, several -> out_dir/<stem>.

    A slide that fails is reported on stderr as one line '<path>: <reason>' and skipped; the
    others are scored. Returns the exit code: 0 when every slide was scored, 1 when any failed
    (a failed slide has no report, so the exit code is the only record a script gets), 2 for
    arguments that cannot work."""

    out_dir = Path(out_dir)
    stems = [Path(s).stem for s in slides]
    twice = sorted({stem for stem in stems if stems.count(stem) > 1})
    if len(slides) > 1 and twice:
        print(
            f"{PROG}: error: several slides would share the report folder {out_dir / twice[0]}; "
            "score them in separate runs",
            file=sys.stderr,
        )
        return 2
    missing = _missing_dirs(out_dir)
    loaded = load_model(model, cfg, tracking_uri)
    failed = 0
    for slide, stem in zip(slides, stems):
        try:
            score_loaded(loaded, slide, out_dir if len(slides) == 1 else out_dir / stem, cfg, mpp, top, tta, log)
        except SlideError as exc:
            failed += 1
            print(f"{PROG}: error: {exc}", file=sys.stderr)
        except Exception as exc:  # noqa: BLE001 - one odd slide must not stop a batch of them
            failed += 1
            print(f"{PROG}: error: {slide}: {one_line(exc)}", file=sys.stderr)
    for folder in missing:  # folders made for reports that never came (rmdir keeps any with files)
        try:
            if folder.exists():
                folder.rmdir()
        except OSError:
            break
    if len(slides) > 1:
        log(f"score-slide: {len(slides) - failed} of {len(slides)} slides scored, {failed} failed -> {out_dir}")
    return 1 if failed else 0


def score_slide(
    slide: str,
    model: str,
    out_dir: Path,
    cfg: SlideConfig,
    mpp: float | None = None,
    top: int | None = None,
    tta: bool | None = None,
    tracking_uri: str | None = None,
    log=print,
) -> dict:
    """Score one slide into `out_dir`; returns the summary dict (raises SlideError for a bad slide)."""
    return score_loaded(load_model(model, cfg, tracking_uri), slide, Path(out_dir), cfg, mpp, top, tta, log)


def score_loaded(
    loaded: LoadedModel,
    slide: str,
    out_dir: Path,
    cfg: SlideConfig,
    mpp: float | None = None,
    top: int | None = None,
    tta: bool | None = None,
    log=print,
) -> dict:
    """Score one slide with a loaded model into `out_dir`, all files or none; returns the summary."""
    with atomic.staged_dir(Path(out_dir)) as staging:
        summary = _score_into(loaded, slide, staging, cfg, mpp, top, tta, log)
    loaded.load_s = None
    log(
        f"score-slide: {summary['n_cells']} cells, {summary['n_malignant']} malignant "
        f"({summary['fraction_malignant']:.1%}), {summary['n_indeterminate']} indeterminate, "
        f"{summary['n_out_of_domain']} out of domain; slide call: "
        f"{summary['slide_call']} ({summary['rule']}); {summary['seconds']['total']:.1f}s "
        f"-> {Path(out_dir) / 'report.html'}"
    )
    return summary


def _score_into(
    loaded: LoadedModel,
    slide: str,
    out_dir: Path,
    cfg: SlideConfig,
    mpp: float | None,
    top: int | None,
    tta: bool | None,
    log,
) -> dict:
    """Detect, score and write the report files into `out_dir` (the staging folder)."""

    predictor = loaded.predictor
    use_tta = predictor.calibration.tta if tta is None else tta
    seconds: dict[str, float] = {} if loaded.load_s is None else {"load model": loaded.load_s}
    t = time.perf_counter()
    source = open_slide(slide, mpp)
    seconds["open slide"] = time.perf_counter() - t
    with source:
        log(
            f"score-slide: {slide}: {source.dimensions[0]}x{source.dimensions[1]} px, {source.mpp:.4f} µm/px "
            f"(from {source.mpp_source})"
        )
        morphometry = Morphometry(predictor.morphometry, predictor.atypia_model)
        cells, scores, steps = score_slide_cells(predictor, source, cfg, use_tta, morphometry=morphometry)
        inference_s, morphometry_s = steps.pop("inference"), steps.pop("morphometry", None)
        morphometry = dataclasses.replace(morphometry, darkness_threshold=cells.attrs.get("darkness_threshold"))
        seconds.update(steps)
        log(
            f"score-slide: {len(cells)} cells detected and scored in {sum(steps.values()):.1f}s "
            f"({predictor.backend}; {inference_s:.1f}s in the model, {morphometry_s or 0:.1f}s in morphometry)"
        )
        order = np.argsort(-scores.p_malignant, kind="stable")[: cfg.gallery if top is None else top]
        t = time.perf_counter()
        top_cells = cells.iloc[order]
        crops = read_crops(source, top_cells, cfg.crop_margin) if len(order) else []
        cams = saliency_maps(predictor, crops)
        seconds["saliency"] = time.perf_counter() - t
        t = time.perf_counter()
        shown = outlined_crops(predictor, morphometry, source, top_cells, crops, cfg)
        atypia_gallery = atypia_cells(predictor, morphometry, source, cells, scores, cfg)
        thumbnail, downsample = source.thumbnail(cfg.mask_max_px)
        heat = heatmap_overlay(thumbnail, downsample, cells, scores.p_malignant, mark=len(order))
    out_dir = Path(out_dir)
    table = cells_table(cells, scores)
    atomic.write_csv(out_dir / "cells.csv", table)
    qupath.write_cells_geojson(out_dir / "cells.geojson", table)  # for review in QuPath (docs/qupath.md)
    with atomic.atomic_path(out_dir / "heatmap.png") as tmp:
        from PIL import Image

        Image.fromarray(heat).save(tmp, format="PNG")
    summary = slide_summary(loaded, slide, source, scores, cfg, use_tta, seconds, inference_s)
    summary["morphometry"] = slide_morphometry_summary(
        cells.assign(in_domain=scores.in_domain), morphometry.cfg, morphometry_s
    )
    summary["slide_call"] = with_evidence(summary)
    gallery = [
        {
            "rank": r + 1,
            "cell_id": int(row.cell_id),
            "x": int(row.x),
            "y": int(row.y),
            "diameter_um": float(row.diameter_um),
            "p_malignant": float(scores.p_malignant[i]),
            "call": str(scores.call[i]),
            "in_domain": bool(scores.in_domain[i]),
            "ood_score": float(scores.ood_score[i]),
            **morph_values(row),
            "crop_uri": gallery_data_uri(shown[r]),
            "cam_uri": gallery_data_uri(cams[r]),
        }
        for r, (i, row) in enumerate(zip(order, top_cells.itertuples()))
    ]
    seconds["report"] = time.perf_counter() - t
    seconds["total"] = sum(v for key, v in seconds.items() if key != "total")
    atomic.write_text(out_dir / "report.html", render_html(summary, heatmap_data_uri(heat), gallery, atypia_gallery))
    atomic.write_json(out_dir / "summary.json", summary)
    if not len(cells):
        log("score-slide: no cells found; the report says so")
    return summary


def morph_values(row) -> dict:
    """A cell's morphometry for the report (plain floats, NaN as None)."""
    value = lambda v: None if v is None or not np.isfinite(v) else float(v)  # noqa: E731
    return {
        "nucleus_diameter_um": value(row.nucleus_diameter_um),
        "nc_ratio": value(row.nc_ratio),
        "atypia": value(row.atypia),
        "morph_reason": str(row.morph_reason),
    }


def outlined_crops(predictor, morphometry, source, cells, crops, cfg: SlideConfig) -> list[np.ndarray]:
    """The crops as the model saw them, each with its nucleus outlined as morphometry segmented it."""
    model_crops = [np.asarray(predictor_crop(predictor, c)) for c in crops]
    if not model_crops:
        return []
    nuclei = morphometry.outlines(source, cells, np.stack(model_crops), cfg)
    return [nucleus_outline(c, n) for c, n in zip(model_crops, nuclei)]


def atypia_cells(predictor, morphometry, source, cells, scores, cfg: SlideConfig) -> list[dict]:
    """The report's second gallery: the most atypical cells over all cells, out-of-domain ones included."""
    atypia = cells["atypia"].to_numpy(float) if len(cells) else np.zeros(0)
    order = np.argsort(-np.nan_to_num(atypia, nan=-1.0), kind="stable")[: morphometry.cfg.gallery]
    order = order[np.isfinite(atypia[order])]
    picked = cells.iloc[order]
    crops = read_crops(source, picked, cfg.crop_margin) if len(order) else []
    shown = outlined_crops(predictor, morphometry, source, picked, crops, cfg)
    return [
        {
            "rank": r + 1,
            "cell_id": int(row.cell_id),
            "x": int(row.x),
            "y": int(row.y),
            **morph_values(row),
            "p_malignant": float(scores.p_malignant[i]),
            "call": str(scores.call[i]),
            "in_domain": bool(scores.in_domain[i]),
            "crop_uri": gallery_data_uri(shown[r]),
        }
        for r, (i, row) in enumerate(zip(order, picked.itertuples()))
    ]


def with_evidence(summary: dict) -> str:
    """The slide call, and when the network's call is unreliable, which evidence remains."""
    line = evidence_line(summary)
    return f"{summary['slide_call']}; {line}" if line else summary["slide_call"]


def cells_table(cells, scores):
    """cells.csv: one row per detected cell; x0..y1 is the level-0 bounding box (harvest re-cuts it).
    Out-of-domain cells are called "out of domain", never benign/malignant."""
    import pandas as pd

    some = len(cells) > 0
    return pd.DataFrame(
        {
            **{k: cells[k].to_numpy() if some else [] for k in ("cell_id", "x", "y", "x0", "y0", "x1", "y1")},
            "diameter_um": cells["diameter_um"].round(2).to_numpy() if some else [],
            "area_um2": cells["area_um2"].round(1).to_numpy() if some else [],
            "score": np.round(scores.p_malignant, 6),
            "call": scores.call,
            "ood_score": np.round(scores.ood_score, 6),
            "in_domain": scores.in_domain,
            **{
                name: (cells[name].round(4).to_numpy() if cells[name].dtype.kind == "f" else cells[name].to_numpy())
                if some and name in cells
                else []
                for name in MORPH_COLUMNS
            },
        }
    )


def slide_summary(
    loaded: LoadedModel, slide: str, source, scores, cfg: SlideConfig, use_tta: bool, seconds: dict, inference_s: float
) -> dict:
    """summary.json: the slide call and its counts, the model, the timings (`seconds` is filled later)."""
    predictor, card, band = loaded.predictor, loaded.predictor.card, loaded.predictor.band
    p, calls, in_domain = scores.p_malignant, scores.call, scores.in_domain
    n, n_mal, n_ood = len(p), int((calls == "malignant").sum()), int((~in_domain).sum())
    fraction_ood = n_ood / n if n else 0.0
    k, k_in = min(cfg.top_k, n), min(cfg.top_k, int(in_domain.sum()))
    return {
        "slide": str(slide),
        "width": source.dimensions[0],
        "height": source.dimensions[1],
        "mpp": source.mpp,
        "mpp_source": source.mpp_source,
        "n_cells": n,
        "n_malignant": n_mal,
        "fraction_malignant": n_mal / n if n else 0.0,
        "n_indeterminate": int((calls == "indeterminate").sum()),
        "top_k": cfg.top_k,
        "top_k_mean": float(np.sort(p)[::-1][:k].mean()) if k else None,
        "top_k_mean_in_domain": float(np.sort(p[in_domain])[::-1][:k_in].mean()) if k_in else None,
        "slide_call": ood_slide_call("positive" if n_mal >= cfg.min_malignant_cells else "negative", fraction_ood, cfg)
        if n
        else "no cells found",
        "rule": slide_rule(cfg),
        "n_out_of_domain": n_ood,
        "fraction_out_of_domain": fraction_ood,
        "max_ood_fraction": cfg.max_ood_fraction,
        "ood_warning": bool(fraction_ood > cfg.max_ood_fraction),
        "ood_method": ood.method_of(predictor.ood) if predictor.ood is not None else None,
        "threshold": band.threshold,
        "band": [band.lower, band.upper],
        "temperature": float(predictor.calibration.temperature),
        "tta": bool(use_tta),
        "model": {
            "uri": loaded.uri,
            "version": loaded.version,
            "registered_model": (card.mlflow or {}).get("registered_model"),
            "arch": card.arch,
            "card": card.card,
        },
        "seconds": seconds,
        "inference": {
            "backend": predictor.backend,
            "precision": getattr(predictor, "precision", "fp32"),
            "seconds_in_model": inference_s,
            "cells_per_second": n / inference_s if n and inference_s > 0 else None,
            "detect_workers": cfg.detect_workers,
            "inference_workers": cfg.inference_workers,
            "model_threads": cfg.model_threads(),
            "batch_size": cfg.batch_size,
        },
        "saliency": SALIENCY[predictor.backend],
    }


def predictor_crop(predictor, crop: np.ndarray) -> np.ndarray:
    """The crop as the model saw it: long side scaled to the input size, padded square."""
    return base_resize(crop, predictor.card.image_size)
