"""Morphometry on a slide: the features of every detected cell, measured on the crops the model scores,
and the slide-level atypia summary (burden, nuclear sizes) that goes into summary.json and the report."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from pipeline.config import MorphometryConfig, SlideConfig
from pipeline.morphometry.atypia import LogisticAtypia
from pipeline.morphometry.cells import ATYPIA_COLUMNS, measure_slide_crops
from pipeline.morphometry.features import COLUMNS
from pipeline.morphometry.segmentation import SegmentationSettings
from pipeline.wsi.crops import crop_boxes

# cells.csv columns added by morphometry, in order.
CELL_COLUMNS = (*COLUMNS, *ATYPIA_COLUMNS)
SIZE_BINS_UM = np.arange(0, 31, 1.0)  # the nuclear-diameter histogram of summary.json: 1 µm bins to 30


@dataclass(frozen=True)
class Morphometry:
    """What slide scoring needs to measure cells: the settings and the model's fitted atypia model."""

    cfg: MorphometryConfig
    logistic: LogisticAtypia | None = None
    darkness_threshold: float | None = None  # the slide's, from cell detection (set per slide)

    def measure(self, source, cells: pd.DataFrame, crops: np.ndarray, slide: SlideConfig) -> pd.DataFrame:
        """Features of `cells` (one tile group's, in order) from their model crops."""
        return self._measure(source, cells, crops, slide, with_masks=False)[0]

    def outlines(self, source, cells: pd.DataFrame, crops: np.ndarray, slide: SlideConfig) -> np.ndarray:
        """Nucleus masks of `cells` from their model crops (for the report's outlines)."""
        return self._measure(source, cells, crops, slide, with_masks=True)[1]

    def _measure(self, source, cells, crops, slide: SlideConfig, with_masks: bool):
        return measure_slide_crops(
            crops,
            crop_boxes(cells, slide.crop_margin, source.dimensions),
            cells[["x0", "y0", "x1", "y1"]].to_numpy(float),
            source.mpp,
            self.cfg.slide_size,
            SegmentationSettings.of(self.cfg),
            self.cfg.atypia,
            self.logistic,
            self.darkness_threshold,
            with_masks,
        )

    @staticmethod
    def concat(parts: list[pd.DataFrame]) -> pd.DataFrame:
        parts = [p for p in parts if p is not None]
        if not parts:
            return pd.DataFrame({c: pd.Series(dtype=object if c == "morph_reason" else float) for c in CELL_COLUMNS})
        return pd.concat(parts, ignore_index=True)


def atypical(cells: pd.DataFrame, cfg: MorphometryConfig) -> np.ndarray:
    """Cells that meet the atypia criteria: N/C >= nc_threshold and nuclear diameter >= min_nucleus_um."""
    nc = cells["nc_ratio"].to_numpy(float)
    diameter = cells["nucleus_diameter_um"].to_numpy(float)
    with np.errstate(invalid="ignore"):
        return (nc >= cfg.nc_threshold) & (diameter >= cfg.min_nucleus_um)


def slide_morphometry_summary(cells: pd.DataFrame, cfg: MorphometryConfig, seconds: float | None) -> dict:
    """summary.json's `morphometry`: the atypia burden and the distribution of nuclear sizes."""
    n = len(cells)
    measured = cells["morph_reason"].astype(str).eq("").to_numpy() if n else np.zeros(0, bool)
    burden = atypical(cells, cfg) if n else np.zeros(0, bool)
    diameter = cells["nucleus_diameter_um"].to_numpy(float)[measured] if n else np.zeros(0)
    counts, edges = np.histogram(np.clip(diameter, 0, SIZE_BINS_UM[-1] - 1e-9), bins=SIZE_BINS_UM)
    reasons = cells.loc[~measured, "morph_reason"].value_counts().to_dict() if n else {}
    atypia = cells["atypia"].to_numpy(float) if n else np.zeros(0)
    return {
        "atypia_method": cfg.atypia,
        "n_measured": int(measured.sum()),
        "not_measured": {str(k): int(v) for k, v in reasons.items()},
        "atypia_burden": int(burden.sum()),
        "atypia_burden_fraction": float(burden.mean()) if n else 0.0,
        "nc_threshold": cfg.nc_threshold,
        "min_nucleus_um": cfg.min_nucleus_um,
        "n_atypical_out_of_domain": int((burden & ~cells["in_domain"].to_numpy(bool)).sum())
        if n and "in_domain" in cells
        else 0,
        "atypia_max": float(np.nanmax(atypia)) if np.isfinite(atypia).any() else None,
        "nucleus_diameter_um": {
            "median": float(np.median(diameter)) if len(diameter) else None,
            "bin_edges": [float(e) for e in edges],
            "counts": [int(c) for c in counts],
        },
        "seconds": seconds,
    }


def evidence_line(summary: dict) -> str | None:
    """When the network's call is unreliable, what evidence remains: the cells meeting the atypia criteria."""
    m = summary.get("morphometry")
    if not m or not summary.get("ood_warning"):
        return None
    return (
        f"{m['atypia_burden']} cells meet the atypia criteria (N/C >= {m['nc_threshold']:g}, nucleus >= "
        f"{m['min_nucleus_um']:g} µm): review the atypia gallery"
    )
