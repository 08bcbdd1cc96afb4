"""report.html as a labelling tool, in Chromium: label buttons, persistence, CSV export,
pagination of a large gallery, the out-of-domain display, and hostile slide paths.

Reports are built with `render_html` from synthetic summaries (no model; tests/report_pages.py), so
this stays fast.
"""

from __future__ import annotations

import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest

from pipeline.report.page import PAGE_SIZE, png_data_uri, render_html
from tests.report_pages import HEADER, OOD, chromium, export_csv, gallery, open_page, summary

HOSTILE = "/tmp/a'\"<script>x</script>.tiff"


def visible_image_widths(page) -> list[int]:
    page.wait_for_function("() => [...document.querySelectorAll('.cell:not([hidden]) img')].every(i => i.complete)")
    return page.eval_on_selector_all(".cell:not([hidden]) img", "imgs => imgs.map(i => i.naturalWidth)")


def write_report(folder: Path, name: str, summ: dict, items: list[dict]) -> str:
    path = folder / name
    path.write_text(render_html(summ, png_data_uri(np.zeros((8, 8, 3), np.uint8)), items), encoding="utf-8")
    return path.as_uri()


@pytest.fixture(scope="module")
def browser():
    with chromium() as b:
        yield b


def card(page, i: int) -> str:
    return f".cell[data-cell-id='{1000 + 7 * i}']"


def pressed(page, i: int) -> list[str]:
    return page.eval_on_selector_all(
        f"{card(page, i)} button[data-label]",
        "bs => bs.filter(b => b.getAttribute('aria-pressed') === 'true').map(b => b.dataset.label)",
    )


def test_label_change_clear_reload_and_export(browser, tmp_path):
    url = write_report(tmp_path, "report.html", summary(), gallery(6))
    context = browser.new_context(accept_downloads=True)
    page = open_page(context, url)
    started = datetime.now(timezone.utc) - timedelta(seconds=1)
    assert page.text_content("#label-count") == "0 of 6 cells labelled"

    page.click(f"{card(page, 0)} button[data-label='malignant']")
    page.click(f"{card(page, 1)} button[data-label='benign']")
    page.click(f"{card(page, 1)} button[data-label='unsure']")  # changed
    page.click(f"{card(page, 2)} button[data-label='not_a_cell']")
    page.click(f"{card(page, 2)} button.clear")  # cleared with the clear button
    page.click(f"{card(page, 3)} button[data-label='benign']")
    page.click(f"{card(page, 3)} button[data-label='benign']")  # pressing the chosen label again clears it
    page.focus(f"{card(page, 5)} button[data-label='benign']")
    page.keyboard.press("Enter")  # keyboard users can label too
    page.fill("#reviewer", "AB")
    page.click(f"{card(page, 4)} button[data-label='not_a_cell']")  # set while "AB" is typed
    page.fill("#reviewer", "CD")

    expected = {0: ["malignant"], 1: ["unsure"], 2: [], 3: [], 4: ["not_a_cell"], 5: ["benign"]}
    assert {i: pressed(page, i) for i in range(6)} == expected
    assert page.is_disabled(f"{card(page, 2)} button.clear") and not page.is_disabled(f"{card(page, 0)} button.clear")
    count = page.text_content("#label-count")
    assert count.startswith("4 of 6 cells labelled") and "not a cell 1" in count

    page.reload()
    page.wait_for_selector("#gallery[data-ready='1']")
    assert {i: pressed(page, i) for i in range(6)} == expected
    assert page.input_value("#reviewer") == "CD"
    assert page.text_content("#label-count").startswith("4 of 6 cells labelled")

    name, rows = export_csv(page)
    assert name == "case_17-labels.csv"
    assert rows[0] == HEADER
    got = {r[0]: r for r in rows[1:]}
    assert sorted(got) == sorted(str(1000 + 7 * i) for i in (0, 1, 4, 5))
    labels = {0: "malignant", 1: "unsure", 4: "not_a_cell", 5: "benign"}
    for i, label in labels.items():
        row = got[str(1000 + 7 * i)]
        assert row[1:4] == [str(10 + 3 * i), str(20 + 5 * i), label]
        # initials typed when the label was set, else the ones in the field at export
        assert row[4] == ("AB" if i == 4 else "CD")
        when = datetime.fromisoformat(row[5].replace("Z", "+00:00"))
        assert when.utcoffset() == timedelta(0) and started <= when <= datetime.now(timezone.utc)
        assert row[6:] == ["/slides/case 17.tiff", "models:/cytology-classifier@champion@3"]

    # Another model version of the same slide is another labelling session: nothing carried over.
    other = open_page(context, write_report(tmp_path, "v4.html", summary(version="4"), gallery(6)))
    assert other.text_content("#label-count") == "0 of 6 cells labelled" and pressed(other, 0) == []
    assert page.errors == [] and other.errors == []
    context.close()


def test_500_cells_are_paginated_and_all_reachable(browser, tmp_path):
    n = 500
    url = write_report(tmp_path, "big.html", summary(), gallery(n))
    context = browser.new_context(accept_downloads=True)
    t = time.perf_counter()
    page = open_page(context, url)
    load_s = time.perf_counter() - t
    assert load_s < 15, load_s  # generous: only a page that decodes everything at once gets near it
    pages = -(-n // PAGE_SIZE)
    assert page.eval_on_selector_all("nav.pager.top button[data-page]", "bs => bs.length") == pages
    # only the shown page's images are decoded: the others have no src yet
    assert page.eval_on_selector_all(".gallery img[src]", "imgs => imgs.length") == 2 * PAGE_SIZE

    seen = []
    for p in range(pages):
        if p:
            if p % 2:
                page.click("nav.pager.top button.next")
            else:
                page.click(f"nav.pager.bottom button[data-page='{p}']")
        ids = page.eval_on_selector_all(".cell:not([hidden])", "cs => cs.map(c => +c.dataset.cellId)")
        assert len(ids) == min(PAGE_SIZE, n - p * PAGE_SIZE)
        widths = visible_image_widths(page)
        assert len(widths) == 2 * len(ids) and all(w > 0 for w in widths), (p, widths)
        assert page.get_attribute(f"nav.pager.top button[data-page='{p}']", "aria-current") == "page"
        seen += ids
    assert seen == [1000 + 7 * i for i in range(n)]
    assert page.is_disabled("nav.pager.top button.next")

    page.click(f"{card(page, n - 1)} button[data-label='malignant']")  # last cell, last page
    page.click("nav.pager.top button[data-page='0']")
    assert page.is_disabled("nav.pager.top button.prev")
    page.click(f"{card(page, 3)} button[data-label='benign']")
    page.click(f"nav.pager.top button[data-page='{pages - 1}']")
    assert pressed(page, n - 1) == ["malignant"]
    _, rows = export_csv(page)
    assert [r[0] for r in rows[1:]] == [str(1000 + 7 * 3), str(1000 + 7 * (n - 1))]
    assert page.text_content("#label-count").startswith(f"2 of {n} cells labelled")
    assert page.errors == []
    context.close()


@pytest.mark.parametrize(
    "extra",
    [OOD, {**OOD, "ood_warning": False, "fraction_out_of_domain": 0.01}, {}],
    ids=["warning", "within-limit", "no-ood-keys"],
)
def test_out_of_domain_banner_and_cells(browser, tmp_path, extra):
    per_cell = {1: {"in_domain": False, "ood_score": 9.5}, 0: {"in_domain": True, "ood_score": 0.3}} if extra else {}
    url = write_report(tmp_path, "r.html", summary(**extra), gallery(4, per_cell=per_cell))
    page = open_page(browser.new_context(), url)
    banner = page.query_selector("#ood-banner")
    if extra.get("ood_warning"):
        assert banner is not None and banner.is_visible()
        text = banner.text_content()
        assert "12.0% of cells (96 of 800)" in text and "limit 5.0%" in text and "not reliable" in text
        # at the top, before the title
        assert page.evaluate("() => document.body.firstElementChild.id") == "ood-banner"
    else:
        assert banner is None
    if extra:
        assert "Outside training domain" in page.text_content("table")
        ood_card, ok_card = page.query_selector(card(page, 1)), page.query_selector(card(page, 0))
        assert ood_card.query_selector(".badge").is_visible() and ok_card.query_selector(".badge") is None
        assert "out of domain" in ood_card.text_content() and "out of domain" not in ok_card.text_content()
        assert "model call malignant" in ood_card.text_content()
        styles = [c.evaluate("c => getComputedStyle(c).borderTopStyle") for c in (ood_card, ok_card)]
        assert styles == ["dashed", "solid"]
    else:
        assert page.query_selector(".cell.ood") is None and page.query_selector(".badge") is None
    assert page.eval_on_selector_all(".cell:not([hidden]) img", "imgs => imgs.length") == 8
    assert all(w > 0 for w in visible_image_widths(page))
    assert page.errors == []


def test_hostile_slide_path_is_escaped_and_the_page_works(browser, tmp_path):
    slide = HOSTILE + ", ünï & co"  # a comma and quotes: the CSV must quote it
    summ = summary(slide=slide, rule="<b>bold</b> & 'quoted'")
    summ["model"]["uri"] = "models:/a\"b'<c>"
    html = render_html(summ, None, gallery(3))
    assert "<script>x</script>" not in html and html.count("<script") == 1  # ours only
    path = tmp_path / "hostile.html"
    path.write_text(html, encoding="utf-8")
    context = browser.new_context(accept_downloads=True)
    page = open_page(context, path.as_uri())
    assert page.title() == f"cytopipe slide report: {slide}"
    assert page.text_content("h1") == f"Slide report: {slide}"
    assert page.query_selector("b") is None and "<b>bold</b> & 'quoted'" in page.text_content("table")
    assert page.get_attribute("#gallery", "data-slide") == slide

    page.click(f"{card(page, 2)} button[data-label='benign']")
    page.reload()
    page.wait_for_selector("#gallery[data-ready='1']")
    assert pressed(page, 2) == ["benign"]  # the storage key survives the odd characters
    name, rows = export_csv(page)
    assert name == "script-labels.csv"
    assert rows[0] == HEADER and len(rows) == 2
    assert rows[1][3] == "benign" and rows[1][6:] == [slide, "models:/a\"b'<c>@3"]
    assert page.errors == []
    context.close()
