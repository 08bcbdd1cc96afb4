"""DIR/worklist.html of `cytopipe score-slides`: one self-contained page for a cohort of slides.

A table with one row per slide, most suspicious first (the rows arrive in that order), sortable by a
click on any column header (a few lines of inline JS), a small JPEG thumbnail of each slide's heat map
embedded as a data URI, a relative link to each slide's report.html, and the failed slides with their
reason. Decision support only: every slide is reviewed by a pathologist.
"""

from __future__ import annotations

import base64
import functools
import io
from html import escape
from pathlib import Path

from PIL import Image

THUMB_PX = 120

STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse;font-size:14px}
th,td{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:middle}
th{background:#f0f0f0;cursor:pointer;user-select:none}
th:hover{background:#e0e0e0}
tr.failed td{background:#fdecea}
tr.pending td{color:#888}
td.num{text-align:right;font-variant-numeric:tabular-nums}
img{display:block;max-width:120px}
"""

# Sort by the clicked column: numbers numerically (data-v), text alphabetically; a second click reverses.
SCRIPT = """
document.querySelectorAll("#cohort th").forEach((th, col) => th.addEventListener("click", () => {
  const body = document.querySelector("#cohort tbody"), rows = [...body.rows];
  const dir = th.dataset.dir === "asc" ? -1 : 1; th.dataset.dir = dir === 1 ? "asc" : "desc";
  const val = r => { const c = r.cells[col], v = c.dataset.v; return v !== undefined ? parseFloat(v) : c.textContent; };
  rows.sort((a, b) => { const x = val(a), y = val(b);
    return dir * (typeof x === "number" && typeof y === "number" ? x - y : String(x).localeCompare(String(y))); });
  rows.forEach(r => body.appendChild(r));
}));
"""

NUMERIC = {"n_cells", "n_malignant", "top_k_mean", "fraction_out_of_domain", "atypia_burden", "seconds"}
SHOWN = ["thumbnail", "slide", "case_id", "priority", "status", "slide_call", "n_malignant", "top_k_mean"]
SHOWN += ["fraction_out_of_domain", "atypia_burden", "n_cells", "seconds", "model_version", "report"]


def thumbnail_uri(heatmap: Path) -> str | None:
    """A small JPEG of the slide's heat map as a data URI, or None when there is none. Cached by the file's
    modification time: the page is rewritten as each slide finishes."""
    try:
        stamp = Path(heatmap).stat().st_mtime_ns
    except OSError:
        return None
    return _thumbnail(str(heatmap), stamp)


@functools.lru_cache(maxsize=1024)
def _thumbnail(heatmap: str, stamp: int) -> str | None:
    try:
        with Image.open(heatmap) as img:
            img = img.convert("RGB")
            img.thumbnail((THUMB_PX, THUMB_PX))
            buf = io.BytesIO()
            img.save(buf, format="JPEG", quality=80)
    except OSError:
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _number(value) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return None if number != number else number  # NaN: no value


def _cell(row: dict, column: str, out_dir: Path) -> str:
    value = row.get(column)
    if column == "thumbnail":
        uri = thumbnail_uri(out_dir / Path(row["report"]).parent / "heatmap.png") if row.get("report") else None
        return f'<td><img alt="heat map" src="{uri}"></td>' if uri else "<td></td>"
    if column == "report":
        return f'<td><a href="{escape(str(value), quote=True)}">report</a></td>' if value else "<td></td>"
    if column == "slide":
        return f'<td title="{escape(str(value), quote=True)}">{escape(Path(str(value)).name)}</td>'
    if column in NUMERIC or column == "priority":
        number = _number(value)
        sort_value = number if number is not None else -1
        text = "" if number is None else (f"{number:.3f}" if column in ("top_k_mean",) else f"{number:g}")
        if column == "fraction_out_of_domain" and number is not None:
            text = f"{number:.1%}"
        if column == "priority" and number is None:
            text = escape(str(value or ""))
        return f'<td class="num" data-v="{sort_value}">{text}</td>'
    return f"<td>{escape(str(value or ''))}</td>"


def _failed_list(rows: list[dict]) -> str:
    failed = [r for r in rows if r["status"] == "failed"]
    if not failed:
        return "<p>No slide failed.</p>"
    items = "".join(f"<li><b>{escape(Path(r['slide']).name)}</b>: {escape(r['error'] or '')}</li>" for r in failed)
    return f"<h2>Failed slides ({len(failed)})</h2><ul>{items}</ul>"


def render_worklist(rows: list[dict], out_dir: Path) -> str:
    """The page for `rows` (worklist.csv's rows, most suspicious first); thumbnails read from `out_dir`."""
    out_dir = Path(out_dir)
    head = "".join(f"<th>{escape(c.replace('_', ' '))}</th>" for c in SHOWN)
    body = "".join(
        f'<tr class="{escape(r["status"])}">' + "".join(_cell(r, c, out_dir) for c in SHOWN) + "</tr>" for r in rows
    )
    counts = {s: sum(r["status"] == s for r in rows) for s in ("scored", "skipped", "failed", "pending")}
    pending = f", {counts['pending']} not scored yet (the run goes on)" if counts["pending"] else ""
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>Slide worklist</title>'
        f"<style>{STYLE}</style></head><body><h1>Slide worklist</h1>"
        f"<p>{len(rows)} slides: {counts['scored']} scored, {counts['skipped']} already scored (skipped), "
        f"{counts['failed']} failed{pending}. Most suspicious first (malignant cells, then the top-k mean); click a "
        "column header to sort by it. Decision support only: every slide is reviewed by a pathologist.</p>"
        f'<table id="cohort"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'
        f"{_failed_list(rows)}<script>{SCRIPT}</script></body></html>\n"
    )
