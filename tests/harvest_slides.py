"""A small synthetic slide with known cells, its score-slide style cells.csv, and a reviewer's
labels for it: what `cytopipe harvest` reads (tests/unit/test_harvest.py, the harvest source in
tests/integration/test_harvest.py and tests/e2e/test_dvc_pipeline.py)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from tests.slides import draw_cells, glass, write_pyramid

SIZE = (1600, 1200)
# (cx, cy, r) on the small synthetic slide; the first touches the slide's edge, so its crop is shifted.
SLIDE_CELLS = [(20, 300, 18), (300, 300, 30), (800, 500, 35), (1200, 900, 25), (500, 1000, 20), (1400, 200, 28)]
LABELS = ["malignant", "benign", "unsure", "not_a_cell", "benign", "malignant"]


def write_slide(folder: Path, name: str, seed: int) -> tuple[Path, Path]:
    """A pyramidal slide with known cells and its score-slide style cells.csv."""
    folder.mkdir(parents=True, exist_ok=True)
    slide = write_pyramid(folder / f"{name}.tiff", draw_cells(glass(SIZE, seed), SLIDE_CELLS))
    cells = pd.DataFrame(
        [
            {
                "cell_id": i + 1,
                "x": float(cx),
                "y": float(cy),
                "x0": max(cx - r, 0),
                "y0": cy - r,
                "x1": cx + r + 1,
                "y1": cy + r + 1,
                "diameter_um": 2 * r * 0.25,
                "area_um2": 1.0,
                "score": 0.5,
                "call": "benign",
            }
            for i, (cx, cy, r) in enumerate(SLIDE_CELLS)
        ]
    )
    cells.to_csv(folder / f"{name}-cells.csv", index=False)
    return slide, folder / f"{name}-cells.csv"


def write_labels(path: Path, cells_csv: Path, labels=LABELS, slide="s") -> Path:
    cells = pd.read_csv(cells_csv)
    pd.DataFrame(
        [
            {
                "cell_id": r.cell_id,
                "x": r.x,
                "y": r.y,
                "label": lab,
                "reviewer": "dr a",
                "timestamp": "2026-12-01T10:00:00Z",
                "slide": slide,
                "model": "3",
            }
            for r, lab in zip(cells.itertuples(), labels)
        ]
    ).to_csv(path, index=False)
    return path
