"""REPORT_DIR/labels.csv, written by the viewer's server on every change: the columns of the report's
CSV export (cell_id,x,y,label,reviewer,timestamp,slide,model), the file `cytopipe harvest` reads."""

from __future__ import annotations

import csv
import io
import re
import threading
from datetime import datetime, timezone
from pathlib import Path

from pipeline import atomic
from pipeline.errors import CytopipeError
from pipeline.harvest import LABELS
from pipeline.viewer.errors import ViewerError

COLUMNS = ("cell_id", "x", "y", "label", "reviewer", "timestamp", "slide", "model")
REVIEWER = re.compile(r"[A-Za-z0-9][A-Za-z0-9 ._-]{0,31}")
# One lock for the whole process: every read-modify-write of any labels.csv holds it, so two reviewers
# labelling at once (two request threads) never interleave their writes.
_LOCK = threading.Lock()


class LabelError(CytopipeError, ValueError):
    """A label request the server refuses (unknown cell or label, bad initials)."""


class LabelStore:
    """The labels of one report folder: one row per labelled cell, the latest label wins."""

    def __init__(self, path: Path | str, cells: dict[str, dict], slide: str, model: str):
        self.path = Path(path)
        self.cells = cells  # cell_id (str) -> its row of cells.csv
        self.slide = slide
        self.model = model

    def _read(self) -> dict[str, dict]:
        if not self.path.is_file():
            return {}
        with open(self.path, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            if not reader.fieldnames or "cell_id" not in reader.fieldnames or "label" not in reader.fieldnames:
                raise ViewerError(f"{self.path}: not a labels file (needs columns {','.join(COLUMNS)})")
            return {row["cell_id"]: {k: row.get(k) or "" for k in COLUMNS} for row in reader if row.get("cell_id")}

    def current(self) -> dict[str, dict]:
        """cell_id -> {label, reviewer, timestamp} of every labelled cell."""
        with _LOCK:
            rows = self._read()
        return {cid: {k: r[k] for k in ("label", "reviewer", "timestamp")} for cid, r in rows.items()}

    def set(self, cell_id: str, label: str | None, reviewer: str) -> dict:
        """Label one cell (label None clears it) and rewrite labels.csv atomically; returns the new row."""
        cell_id = str(cell_id)
        if cell_id not in self.cells:
            raise LabelError(f"cell_id {cell_id[:40]!r} is not in cells.csv")
        if label is not None and label not in LABELS:
            raise LabelError(f"label {str(label)[:40]!r} is not one of {', '.join(LABELS)}")
        if not isinstance(reviewer, str) or not REVIEWER.fullmatch(reviewer):
            raise LabelError("reviewer initials: 1-32 letters, digits, spaces or . _ - (starting with one)")
        cell = self.cells[cell_id]
        row = {
            "cell_id": cell_id,
            "x": cell["x"],
            "y": cell["y"],
            "label": label,
            "reviewer": reviewer,
            "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "slide": self.slide,
            "model": self.model,
        }
        with _LOCK:
            rows = self._read()
            if label is None:
                rows.pop(cell_id, None)
            else:
                rows[cell_id] = row
            atomic.write_text(self.path, _csv_text(rows.values()))
        return row


def _csv_text(rows) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()
