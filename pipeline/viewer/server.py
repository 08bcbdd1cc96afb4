"""The viewer's HTTP server: standard library `http.server`, bound to 127.0.0.1, one thread per request.

Routes (GET unless noted):
  /                                   the viewer page (or a page saying why the slide cannot be shown)
  /static/<file>                      the page's script, style and vendored OpenSeadragon
  /info.json                          slide, model, size, gallery (top cells by score), labels
  /cells.json                         every cell of cells.csv ({columns, data})
  /labels.json                        cell_id -> {label, reviewer, timestamp}
  /slide.dzi, /slide_files/L/C_R.jpeg Deep Zoom descriptor and tiles (openslide's DeepZoomGenerator)
  /crop/<cell_id>.jpeg                one cell's crop
  /heatmap.png                        score-slide's heat map of the report folder (404 when it has none)
  POST /labels                        {"cell_id", "label" (null clears), "reviewer"} -> labels.csv
Anything else, any path with a `..` segment or outside the static folder: 403/404. A bad request gets a
4xx and the server keeps serving."""

from __future__ import annotations

import html
import json
import re
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pandas as pd

from pipeline.viewer.errors import ViewerError
from pipeline.viewer.labels import LabelError, LabelStore
from pipeline.viewer.tiles import SlideTiles

STATIC = Path(__file__).resolve().parent / "static"
HOST = "127.0.0.1"
MAX_BODY = 4096
GALLERY = 40
CELL_COLUMNS = ["cell_id", "x", "y", "x0", "y0", "x1", "y1", "score", "call", "in_domain"]
EXTRA_COLUMNS = ["ood_score", "diameter_um", "atypia", "nc_ratio", "nucleus_diameter_um"]
TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".png": "image/png",
    ".txt": "text/plain; charset=utf-8",
}
TILE = re.compile(r"/slide_files/(\d{1,3})/(\d{1,7})_(\d{1,7})\.jpeg")
CROP = re.compile(r"/crop/([\w.-]{1,64})\.jpeg")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# Host header values a loopback browser sends (with any port).
LOCAL_HOSTS = {"127.0.0.1", "localhost", "[::1]"}


class Report:
    """What the server shows: the report folder's cells, summary and labels, and the slide (or why not)."""

    def __init__(self, report_dir: Path | str, slide: Path | str | None = None):
        self.dir = Path(report_dir).resolve()
        summary_path, cells_path = self.dir / "summary.json", self.dir / "cells.csv"
        if not cells_path.is_file():
            raise ViewerError(f"{self.dir}: no cells.csv here (a report folder of `cytopipe score-slide`?)")
        self.summary = _read_summary(summary_path) if summary_path.is_file() else {}
        if slide is None and not self.summary.get("slide"):
            raise ViewerError(f"{summary_path}: no summary.json naming the slide; pass --slide")
        self.slide_path = Path(slide if slide is not None else self.summary["slide"]).expanduser()
        self.cells = _read_cells(cells_path)
        self.by_id = {str(r["cell_id"]): r for r in self.cells.to_dict("records")}
        model = self.summary.get("model") or {}
        self.model = f"{model.get('uri')}@{model.get('version')}" if model else ""
        self.labels = LabelStore(self.dir / "labels.csv", self.by_id, str(self.slide_path), self.model)
        self.cells_json = _cells_json(self.cells)
        try:
            self.tiles, self.slide_error = SlideTiles(self.slide_path), None
        except ViewerError as exc:
            self.tiles, self.slide_error = None, str(exc)

    def info(self) -> dict:
        top = self.cells.sort_values("score", ascending=False, kind="stable").head(GALLERY)
        w, h = self.tiles.dimensions if self.tiles else (self.summary.get("width"), self.summary.get("height"))
        return {
            "slide": str(self.slide_path),
            "model": self.model,
            "width": w,
            "height": h,
            "slide_call": self.summary.get("slide_call"),
            "n_cells": len(self.cells),
            "gallery": [str(c) for c in top["cell_id"]],
            "heatmap": self.heatmap() is not None,
        }

    def heatmap(self) -> bytes | None:
        """REPORT_DIR/heatmap.png, or None when absent (a report of an older score-slide, or an interrupted one).
        Read on each request because a new `score-slide` into the same folder replaces it; only a file that
        starts as a PNG does is served, so that nothing else can ever go out under this name."""
        try:
            body = (self.dir / "heatmap.png").read_bytes()
        except OSError:  # absent, a folder, unreadable
            return None
        return body if body.startswith(PNG_SIGNATURE) else None


def _read_summary(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ViewerError(f"{path}: cannot read ({exc})") from None


def _read_cells(path: Path) -> pd.DataFrame:
    try:
        cells = pd.read_csv(path, dtype={"cell_id": str})
    except (OSError, ValueError) as exc:
        raise ViewerError(f"{path}: cannot read ({str(exc).splitlines()[0]})") from None
    missing = [c for c in CELL_COLUMNS if c not in cells.columns]
    if missing:
        raise ViewerError(f"{path}: missing column(s) {', '.join(missing)}")
    return cells


def _category(call: str, in_domain) -> str:
    return "out of domain" if str(in_domain) == "False" or call == "out of domain" else str(call)


def _cells_json(cells: pd.DataFrame) -> bytes:
    """Every cell as one row of a table (about 80 bytes a cell), categories resolved for the overlay."""
    cols = CELL_COLUMNS + [c for c in EXTRA_COLUMNS if c in cells.columns]
    frame = cells[cols].copy()
    frame["category"] = [_category(c, d) for c, d in zip(frame["call"], frame["in_domain"])]
    return frame.to_json(orient="split", index=False).encode()  # {"columns": [...], "data": [[...], ...]}


def _missing_slide_page(report: Report) -> bytes:
    text = html.escape(report.slide_error or "")
    return (
        "<!doctype html><html lang='en'><head><meta charset='utf-8'><title>cytopipe view: no slide</title></head>"
        f"<body><h1>The slide cannot be shown</h1><p id='slide-error'>{text}</p>"
        f"<p>Report folder: {html.escape(str(report.dir))}. Start the viewer again with "
        "<code>cytopipe view REPORT_DIR --slide PATH</code>.</p></body></html>"
    ).encode()


class Handler(BaseHTTPRequestHandler):
    """One request: route, answer, and never let a bad request take the server down."""

    server_version = "cytopipe-view"
    protocol_version = "HTTP/1.1"

    @property
    def report(self) -> Report:
        return self.server.report  # type: ignore[attr-defined]

    def log_message(self, format, *args) -> None:  # noqa: A002 - the base class's name
        if getattr(self.server, "verbose", False):
            super().log_message(format, *args)

    def _send(self, status: int, body: bytes, ctype: str, cache: bool = False) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "max-age=3600" if cache else "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, obj, status: int = 200) -> None:
        self._send(status, json.dumps(obj).encode(), "application/json")

    def _error(self, status: int, message: str) -> None:
        self._send(status, json.dumps({"error": message}).encode(), "application/json")

    def _path(self) -> str | None:
        """The decoded request path; None (after a 403) when it tries to climb out of what is served."""
        path = unquote(urlsplit(self.path).path)
        if "\\" in path or "\0" in path or any(seg in ("..", ".") for seg in path.split("/")):
            self._error(HTTPStatus.FORBIDDEN, "path refused")
            return None
        return path

    def do_GET(self) -> None:
        self._guarded(self._get)

    def do_HEAD(self) -> None:
        self._guarded(self._get)

    def do_POST(self) -> None:
        self._guarded(self._post)

    def _guarded(self, answer) -> None:
        try:
            if not self._local_host():
                self._error(HTTPStatus.FORBIDDEN, "the viewer answers requests for 127.0.0.1 or localhost only")
                return
            answer()
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception as exc:  # a bug in one request must not stop the server
            self.log_error("%s: %s", type(exc).__name__, exc)
            try:
                self._error(HTTPStatus.INTERNAL_SERVER_ERROR, f"{type(exc).__name__}: {exc}")
            except OSError:
                self.close_connection = True

    def _local_host(self) -> bool:
        """The Host header names this machine: a page from elsewhere that rebinds its DNS name to
        127.0.0.1 (DNS rebinding) sends its own name, and must not read the slide or write labels."""
        host = (self.headers.get("Host") or "").strip().lower()
        name = host.rsplit(":", 1)[0] if not host.startswith("[") else host.split("]", 1)[0] + "]"
        return name in LOCAL_HOSTS

    def _get(self) -> None:
        path = self._path()
        if path is None:
            return
        report = self.report
        fixed = {
            "/info.json": lambda: self._json({**report.info(), "slide_error": report.slide_error}),
            "/cells.json": lambda: self._send(200, report.cells_json, "application/json"),
            "/labels.json": lambda: self._json(report.labels.current()),
            "/": self._index,
            "/index.html": self._index,
            "/slide.dzi": self._dzi,
            "/heatmap.png": self._heatmap,
            "/favicon.ico": lambda: self._send(HTTPStatus.NO_CONTENT, b"", "image/x-icon"),
        }
        if path in fixed:
            return fixed[path]()
        if path.startswith("/static/"):
            return self._static(path[len("/static/") :])
        if path.startswith("/slide_files/"):
            return self._tile(path)
        if path.startswith("/crop/"):
            return self._crop(path)
        self._error(HTTPStatus.NOT_FOUND, "not found")

    def _index(self) -> None:
        if self.report.tiles is None:
            return self._send(200, _missing_slide_page(self.report), TYPES[".html"])
        self._send(200, (STATIC / "viewer.html").read_bytes(), TYPES[".html"])

    def _static(self, rel: str) -> None:
        target = (STATIC / rel).resolve()
        if not target.is_relative_to(STATIC):
            return self._error(HTTPStatus.FORBIDDEN, "path refused")
        if not target.is_file() or target.suffix not in TYPES:
            return self._error(HTTPStatus.NOT_FOUND, "not found")
        self._send(200, target.read_bytes(), TYPES[target.suffix], cache=True)

    def _dzi(self) -> None:
        if self.report.tiles is None:
            return self._error(HTTPStatus.NOT_FOUND, self.report.slide_error or "no slide")
        self._send(200, self.report.tiles.dzi().encode(), "application/xml")

    def _heatmap(self) -> None:
        body = self.report.heatmap()
        if body is None:
            return self._error(HTTPStatus.NOT_FOUND, "no heatmap.png in the report folder")
        self._send(200, body, TYPES[".png"])

    def _tile(self, path: str) -> None:
        match = TILE.fullmatch(path)
        if not match:
            return self._error(HTTPStatus.BAD_REQUEST, "tile path must be /slide_files/LEVEL/COL_ROW.jpeg")
        if self.report.tiles is None:
            return self._error(HTTPStatus.NOT_FOUND, self.report.slide_error or "no slide")
        level, col, row = (int(v) for v in match.groups())
        try:
            body = self.report.tiles.tile(level, col, row)
        except ValueError as exc:
            return self._error(HTTPStatus.NOT_FOUND, str(exc))
        self._send(200, body, "image/jpeg", cache=True)

    def _crop(self, path: str) -> None:
        match = CROP.fullmatch(path)
        cell = self.report.by_id.get(match.group(1)) if match else None
        if cell is None:
            return self._error(HTTPStatus.NOT_FOUND, "no such cell")
        if self.report.tiles is None:
            return self._error(HTTPStatus.NOT_FOUND, self.report.slide_error or "no slide")
        self._send(200, self.report.tiles.crop(cell), "image/jpeg", cache=True)

    def _post(self) -> None:
        path = self._path()
        if path is None:
            return
        if path != "/labels":
            return self._error(HTTPStatus.NOT_FOUND, "not found")
        body = self._body()
        if body is None:
            return
        try:
            row = self.report.labels.set(body.get("cell_id"), body.get("label"), body.get("reviewer"))
        except LabelError as exc:
            return self._error(HTTPStatus.BAD_REQUEST, str(exc))
        self._json({k: row[k] for k in ("cell_id", "label", "reviewer", "timestamp")})

    def _body(self) -> dict | None:
        """The POST body as a JSON object; None after answering 4xx (too long, not JSON, not an object)."""
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            self.close_connection = True
            self._error(HTTPStatus.LENGTH_REQUIRED, "Content-Length required")
            return None
        if not 0 <= length <= MAX_BODY:
            self.close_connection = True  # the unread body would be taken for the next request
            self._error(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"body over {MAX_BODY} bytes")
            return None
        try:
            body = json.loads(self.rfile.read(length) or b"null")
        except ValueError:
            body = None
        if not isinstance(body, dict):
            self._error(HTTPStatus.BAD_REQUEST, "body must be a JSON object {cell_id, label, reviewer}")
            return None
        return body


def serve(report_dir: Path | str, slide: Path | str | None = None, port: int = 0, verbose: bool = False):
    """A started-but-not-serving server on 127.0.0.1:`port` (0: any free port) for the report folder;
    call `serve_forever()` on it (in a thread in tests) and `shutdown()` + `server_close()` after."""
    report = Report(report_dir, slide)
    try:
        server = ThreadingHTTPServer((HOST, port), Handler)
    except OSError as exc:
        raise ViewerError(
            f"port {port}: cannot listen on {HOST} ({exc.strerror or exc}); pass another --port"
        ) from None
    server.daemon_threads = True
    server.report = report  # type: ignore[attr-defined]
    server.verbose = verbose  # type: ignore[attr-defined]
    return server


def serve_in_thread(report_dir: Path | str, slide: Path | str | None = None, port: int = 0):
    """`serve` running in a daemon thread: (server, url)."""
    server = serve(report_dir, slide, port)
    threading.Thread(target=server.serve_forever, daemon=True, name="cytopipe-view").start()
    host, port = server.server_address[:2]
    return server, f"http://{host}:{port}"
