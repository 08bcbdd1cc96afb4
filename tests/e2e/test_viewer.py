"""`cytopipe view`: the deep-zoom viewer's server (routes, refusals, labels.csv under concurrent writes) on a
hand-made report of the synthetic slide, and the page in Debian's Chromium on score-slide's real report."""

from __future__ import annotations

import csv
import http.client
import json
import os
import threading
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from pipeline.cli import main
from pipeline.viewer.labels import COLUMNS
from pipeline.viewer.server import serve, serve_in_thread
from tests.report_pages import chromium

CALLS = ["malignant", "indeterminate", "benign", "out of domain"]


@pytest.fixture
def report(slides, tmp_path) -> Path:
    """A report folder of the synthetic slide without a model: one row per drawn cell of tests/slides.py."""
    from tests.slides import CELLS

    out = tmp_path / "report"
    out.mkdir()
    rows = [
        {
            "cell_id": i,
            "x": x,
            "y": y,
            "x0": x - r,
            "y0": y - r,
            "x1": x + r,
            "y1": y + r,
            "score": round(1 - i / len(CELLS), 3),
            "call": CALLS[i % 4],
            "in_domain": CALLS[i % 4] != "out of domain",
        }
        for i, (x, y, r) in enumerate(CELLS)
    ]
    pd.DataFrame(rows).to_csv(out / "cells.csv", index=False)
    summary = {"slide": str(slides[0]), "width": 3000, "height": 2400, "model": {"uri": "m", "version": "1"}}
    (out / "summary.json").write_text(json.dumps(summary))
    # score-slide's heat map is a thumbnail with the slide's aspect ratio (3000 x 2400): a tiny stand-in
    Image.new("RGB", (30, 24), (200, 40, 40)).save(out / "heatmap.png")
    return out


@pytest.fixture
def running(report):
    server, url = serve_in_thread(report)
    yield server, report
    server.shutdown()
    server.server_close()


def request(server, path: str, method: str = "GET", body: bytes | None = None, headers: dict | None = None):
    """(status, content type, body) of one request sent as is (no client-side path normalising)."""
    host, port = server.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=30)
    try:
        conn.putrequest(method, path, skip_accept_encoding=True)
        for k, v in {**({"Content-Length": str(len(body))} if body is not None else {}), **(headers or {})}.items():
            conn.putheader(k, v)
        conn.endheaders(body)
        resp = conn.getresponse()
        return resp.status, resp.getheader("Content-Type"), resp.read()
    finally:
        conn.close()


def post_label(server, cell_id, label, reviewer="AB"):
    body = json.dumps({"cell_id": cell_id, "label": label, "reviewer": reviewer}).encode()
    return request(server, "/labels", "POST", body, {"Content-Type": "application/json"})


def test_serves_tiles_cells_and_crops_on_loopback(running):
    server, _ = running
    assert server.server_address[0] == "127.0.0.1"
    status, ctype, dzi = request(server, "/slide.dzi")
    assert status == 200 and b"<Image" in dzi and b'Width="3000"' in dzi
    status, ctype, tile = request(server, "/slide_files/12/0_0.jpeg")
    assert (status, ctype) == (200, "image/jpeg") and tile[:2] == b"\xff\xd8"
    status, _, cells = request(server, "/cells.json")
    table = json.loads(cells)
    assert status == 200 and len(table["data"]) == 12 and "category" in table["columns"]
    status, ctype, crop = request(server, "/crop/3.jpeg")
    assert (status, ctype) == (200, "image/jpeg") and crop[:2] == b"\xff\xd8"
    info = json.loads(request(server, "/info.json")[2])
    assert info["gallery"][0] == "0" and info["slide_error"] is None


def test_heatmap_is_served_at_its_fixed_route_only_when_present(running):
    server, report = running
    status, ctype, body = request(server, "/heatmap.png")
    assert (status, ctype) == (200, "image/png") and body == (report / "heatmap.png").read_bytes()
    assert json.loads(request(server, "/info.json")[2])["heatmap"] is True
    for path in ("/heatmap.png/..", "/static/../heatmap.png", "/heatmap.png%00.txt", "/cells.png"):
        assert request(server, path)[0] in (403, 404), path
    (report / "heatmap.png").write_text("not a png")  # only a PNG goes out under this name
    assert request(server, "/heatmap.png")[0] == 404
    (report / "heatmap.png").unlink()
    status, ctype, body = request(server, "/heatmap.png")
    assert (status, ctype) == (404, "application/json") and json.loads(body).keys() == {"error"}
    assert json.loads(request(server, "/info.json")[2])["heatmap"] is False
    assert request(server, "/slide.dzi")[0] == 200  # and the server keeps serving


@pytest.mark.parametrize(
    "path",
    [
        "/../summary.json",
        "/../cells.csv",
        "/static/../server.py",
        "/static/..%2f..%2fpyproject.toml",
        "/static/%2e%2e/%2e%2e/%2e%2e/pyproject.toml",
        "/%2e%2e/%2e%2e/pyproject.toml",
        "/static/%2e%2e%2fserver.py",
        "/static/..%5cserver.py",
        "/static//etc/passwd",
        "/crop/..%2f..%2fsummary.json",
        "/slide_files/..%2f..%2fsummary.json",
    ],
)
def test_traversal_is_refused(running, path):
    server, _ = running
    status, _, body = request(server, path)
    assert status in (400, 403, 404), (path, status)
    assert json.loads(body).keys() == {"error"}  # nothing of the report, the sources or the system leaks
    assert request(server, "/info.json")[0] == 200  # and the server keeps serving


@pytest.mark.parametrize(
    "path",
    [
        "/slide_files/99/0_0.jpeg",
        "/slide_files/a/b.jpeg",
        "/slide_files/12/99_0.jpeg",
        "/slide_files/0/1_0.jpeg",
        "/slide_files/0/0.jpeg",
    ],
)
def test_bad_tile_coordinates_are_4xx(running, path):
    server, _ = running
    status, _, _ = request(server, path)
    assert 400 <= status < 500, (path, status)
    assert request(server, "/slide_files/0/0_0.jpeg")[0] == 200


def test_label_posts_are_validated_and_written_for_harvest(running, slides, tmp_path):
    from pipeline import harvest

    server, report = running
    assert post_label(server, "999", "malignant")[0] == 400  # unknown cell
    assert post_label(server, "1", "cancer")[0] == 400  # unknown label
    assert post_label(server, "1", "benign", reviewer="")[0] == 400  # no initials
    assert post_label(server, "1", "benign", reviewer="a,b\n=cmd")[0] == 400
    assert request(server, "/labels", "POST", b"x" * 10_000)[0] == 413
    assert request(server, "/labels", "POST", b"[not json")[0] == 400
    assert request(server, "/labels", "POST", b"[1, 2]")[0] == 400
    assert not (report / "labels.csv").exists()
    assert post_label(server, "1", "malignant")[0] == 200
    assert post_label(server, "2", "not_a_cell", reviewer="CD")[0] == 200
    assert post_label(server, "5", "benign")[0] == 200
    assert post_label(server, "5", None)[0] == 200  # cleared again
    rows = list(csv.DictReader((report / "labels.csv").open()))
    assert tuple(rows[0]) == COLUMNS
    assert [(r["cell_id"], r["label"], r["reviewer"]) for r in rows] == [
        ("1", "malignant", "AB"),
        ("2", "not_a_cell", "CD"),
    ]
    assert json.loads(request(server, "/labels.json")[2])["2"]["label"] == "not_a_cell"
    result = harvest.run(slides[0], report / "cells.csv", report / "labels.csv", tmp_path / "ds", 0.25)
    assert result["cells"] == 2


def test_two_reviewers_labelling_at_once_leave_a_well_formed_file(running):
    server, report = running
    barrier = threading.Barrier(2)
    failures = []

    def reviewer(initials, ids, label):
        barrier.wait()
        for _ in range(5):
            for cid in ids:
                status, _, body = post_label(server, str(cid), label, initials)
                if status != 200:
                    failures.append(body)

    threads = [
        threading.Thread(target=reviewer, args=("AB", range(0, 6), "malignant")),
        threading.Thread(target=reviewer, args=("CD", range(6, 12), "benign")),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []
    rows = list(csv.DictReader((report / "labels.csv").open()))
    assert all(tuple(r) == COLUMNS and None not in r.values() for r in rows)
    assert {r["cell_id"]: (r["label"], r["reviewer"]) for r in rows} == {
        **{str(i): ("malignant", "AB") for i in range(6)},
        **{str(i): ("benign", "CD") for i in range(6, 12)},
    }
    assert not [p for p in report.iterdir() if p.name.startswith(".")]  # no temporary files left behind


def test_a_missing_slide_gives_a_clear_page_and_the_server_keeps_serving(report, tmp_path):
    server, _ = serve_in_thread(report, slide=tmp_path / "gone.tiff")
    try:
        status, ctype, page = request(server, "/")
        assert status == 200 and ctype.startswith("text/html")
        assert b"The slide cannot be shown" in page and b"gone.tiff: slide not found" in page
        assert request(server, "/slide.dzi")[0] == 404
        assert request(server, "/slide_files/0/0_0.jpeg")[0] == 404
        assert request(server, "/crop/1.jpeg")[0] == 404
        assert request(server, "/cells.json")[0] == 200
    finally:
        server.shutdown()
        server.server_close()


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["view", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "no cells.csv" in err
    with pytest.raises(Exception, match="no cells.csv"):
        serve(tmp_path)


# --------------------------------------------------------------------------- in the browser


def _centre(page) -> list[float]:
    return page.evaluate(
        "(() => { const v = window.viewer.viewport, slide = window.viewer.world.getItemAt(0);"
        " const p = slide.viewportToImageCoordinates(v.getCenter(true)); return [p.x, p.y]; })()"
    )


def test_viewer_in_chromium(scored, tmp_path):
    """Tiles render, the overlay draws, gallery cell #1 centres the slide on it, a label click writes
    labels.csv and a reload shows it; the screenshot goes to $CYTOPIPE_SCREENSHOT or tmp_path."""
    out, _ = scored
    cells = pd.read_csv(out / "cells.csv", dtype={"cell_id": str}).set_index("cell_id")
    server, url = serve_in_thread(out)
    try:
        with chromium() as browser:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            errors = []
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            with page.expect_response(lambda r: "/slide_files/" in r.url) as tile:
                page.goto(url + "/")
            assert tile.value.status == 200 and tile.value.header_value("content-type") == "image/jpeg"
            page.wait_for_selector("body[data-ready='1']")
            page.wait_for_function(
                "window.viewer.world.getItemCount() && window.viewer.world.getItemAt(0).getFullyLoaded()"
            )
            page.wait_for_function("Number(document.getElementById('overlay').dataset.drawn) > 0")

            first = page.get_attribute("#gallery li[data-rank='1']", "data-cell-id")
            page.click("#gallery li[data-rank='1'] img")
            page.wait_for_function(
                "!window.viewer.viewport.getCenter(true).equals(window.viewer.viewport.getCenter(false)) || true"
            )
            page.wait_for_timeout(1500)  # the pan-and-zoom animation (0.6 s)
            x, y = _centre(page)
            cell = cells.loc[first]
            assert abs(x - cell["x"]) < 2 and abs(y - cell["y"]) < 2, ((x, y), (cell["x"], cell["y"]))
            assert page.text_content("#details h2") == f"Cell {first}"

            page.fill("#reviewer", "QA")
            page.click("#gallery li[data-rank='1'] button[data-label='malignant']")
            page.wait_for_function("document.getElementById('status').textContent.startsWith('Saved')")
            rows = list(csv.DictReader((out / "labels.csv").open()))
            assert [(r["cell_id"], r["label"], r["reviewer"]) for r in rows] == [(first, "malignant", "QA")]

            page.reload()
            page.wait_for_selector("body[data-ready='1']")
            pressed = page.get_attribute("#gallery li[data-rank='1'] button[data-label='malignant']", "aria-pressed")
            assert pressed == "true"
            page.click("#gallery li[data-rank='1'] img")
            page.wait_for_timeout(1500)
            shot = Path(os.environ.get("CYTOPIPE_SCREENSHOT") or tmp_path / "viewer.png")
            shot.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(shot))
            assert shot.stat().st_size > 10_000

            # the page's own zoom buttons drive OpenSeadragon (none of its button images are shipped)
            before = page.evaluate("window.viewer.viewport.getZoom(true)")
            page.click("#zoom-in")
            page.wait_for_timeout(1200)
            assert page.evaluate("window.viewer.viewport.getZoom(true)") > before

            # the heat map layer: a second world item over the slide's full extent, removed again
            assert page.is_enabled("#heatmap") and not page.is_checked("#heatmap")
            page.check("#heatmap")
            page.wait_for_function(
                "window.viewer.world.getItemCount() === 2 && window.viewer.world.getItemAt(1).getFullyLoaded()"
            )
            bounds = page.evaluate(
                "(() => { const b = window.viewer.world.getItemAt(1).getBounds(); return [b.x, b.y, b.width]; })()"
            )
            assert bounds == [0, 0, 1]
            page.fill("#heatmap-opacity", "0.3")
            assert page.evaluate("window.viewer.world.getItemAt(1).getOpacity()") == 0.3
            page.click("#gallery li[data-rank='2'] img")  # the overlay still lines up with two items
            page.wait_for_timeout(1500)
            second = cells.loc[page.get_attribute("#gallery li[data-rank='2']", "data-cell-id")]
            x, y = _centre(page)
            assert abs(x - second["x"]) < 2 and abs(y - second["y"]) < 2
            page.uncheck("#heatmap")
            page.wait_for_function("window.viewer.world.getItemCount() === 1")
            assert errors == []
    finally:
        server.shutdown()
        server.server_close()
        (out / "labels.csv").unlink(missing_ok=True)  # the session's report is shared: leave it as found


def test_a_request_for_another_host_name_is_refused(report):
    """DNS rebinding: a page served as evil.example that resolves to 127.0.0.1 sends its own Host name."""
    import http.client

    server, _ = serve_in_thread(report)
    try:
        port = server.server_address[1]
        for host, status in (("evil.example", 403), (f"evil.example:{port}", 403), (f"localhost:{port}", 200)):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            conn.request("GET", "/info.json", headers={"Host": host})
            assert conn.getresponse().status == status, host
            conn.close()
    finally:
        server.shutdown()
        server.server_close()
