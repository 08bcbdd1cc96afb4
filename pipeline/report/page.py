"""The slide report page: one self-contained HTML file built from the score summary and gallery.

Everything the pathologist reviews is embedded (base64 images, inline CSS and script), so the report can
be mailed or archived as a single file. The stylesheet, script and page layout live beside this module
(static/, templates/) and are copied into every page.
"""

from __future__ import annotations

import base64
import functools
import html
import io
import re
import string
from importlib import resources
from pathlib import PurePosixPath, PureWindowsPath

import numpy as np

DISCLAIMER = (
    "Decision support only. These scores come from a machine-learning model and must be "
    "reviewed by a pathologist; they are not a diagnosis."
)


MIME = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp"}

# Gallery images (the network gallery's crops and saliency maps, the atypia gallery's crops) are JPEG at
# quality 90 with full-resolution colour (4:4:4). benchmarks/report_size.py on the CSF slide, --top 500
# (500 crops + 500 saliency maps + 24 atypia crops, 128 px): the gallery's base64 is 28.7 MB as PNG, 7.5 MB
# as JPEG q90 4:4:4 (crops 39.0 dB mean PSNR, min 36.2; saliency maps 44.9 dB); every pixel of the 1-px cyan
# nucleus outline stays within 60 RGB of cyan (mean distance 10). Chroma subsampling is what hides the
# outline: JPEG 4:2:0 at any quality 75-95 and WebP (always 4:2:0 when lossy; q90 3.6 MB) keep 0% of it
# near cyan (distance ~115-130, the line turns grey-blue), so WebP's smaller files are not worth it.
# q85 4:4:4 saves 1.3 MB but 1.5% of the outline fades; q95 costs 2.7 MB more for no visible gain.
GALLERY_FORMAT = "JPEG"
GALLERY_QUALITY = 90
GALLERY_SUBSAMPLING = 0  # 4:4:4

# The heat map thumbnail embedded in the page (1733 x 1776 px on the CSF slide) is JPEG too: 4.16 MB of
# base64 as PNG, 1.24 MB as JPEG q90 4:4:4 at 39.6 dB PSNR, its rank numbers and circles still sharp.
# heatmap.png beside the report stays lossless. With both, report.html for --top 500 is 9.29 MB against
# 33.35 MB all PNG (issue 17 asks for <= 15 MB).
HEATMAP_FORMAT, HEATMAP_QUALITY, HEATMAP_SUBSAMPLING = "JPEG", 90, 0


def image_data_uri(
    image: np.ndarray, fmt: str = "PNG", quality: int | None = None, subsampling: int | None = None
) -> str:
    """`image` (H x W x 3 uint8) encoded as `fmt` (PNG, JPEG or WEBP) in a data: URI."""
    from PIL import Image

    options = {k: v for k, v in (("quality", quality), ("subsampling", subsampling)) if v is not None}
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format=fmt, **options)
    return f"data:{MIME[fmt]};base64,{base64.b64encode(buf.getvalue()).decode('ascii')}"


def png_data_uri(image: np.ndarray, fmt: str = "PNG") -> str:
    """Lossless by default; the report's own images go through gallery_data_uri / heatmap_data_uri."""
    return image_data_uri(image, fmt, 90 if fmt == "JPEG" else None)


def gallery_data_uri(image: np.ndarray) -> str:
    """A gallery image as the report embeds it (see GALLERY_FORMAT)."""
    return image_data_uri(image, GALLERY_FORMAT, GALLERY_QUALITY, GALLERY_SUBSAMPLING)


def heatmap_data_uri(image: np.ndarray) -> str:
    """The heat map as the report embeds it (see HEATMAP_FORMAT)."""
    return image_data_uri(image, HEATMAP_FORMAT, HEATMAP_QUALITY, HEATMAP_SUBSAMPLING)


def _esc(value) -> str:
    """Text or attribute value, quotes included (every attribute here is quoted)."""
    return html.escape(str(value), quote=True)


def _table(rows: list[tuple[str, str]]) -> str:
    return "<table>" + "".join(f"<tr><th>{_esc(k)}</th><td>{_esc(v)}</td></tr>" for k, v in rows) + "</table>"


def _file_stem(slide: str) -> str:
    """A safe download-name stem from the slide path (the browser would mangle odd characters)."""
    stem = PureWindowsPath(slide).stem if "\\" in slide else PurePosixPath(slide).stem
    return re.sub(r"[^\w.-]+", "_", stem).strip("._") or "slide"


# Label values are what `cytopipe harvest` reads; the button text is for people.
LABELS = (("malignant", "malignant"), ("benign", "benign"), ("unsure", "unsure"), ("not_a_cell", "not a cell"))
PAGE_SIZE = 50
CALL_CLASSES = {"malignant", "benign", "indeterminate"}


@functools.cache
def _package_file(folder: str, name: str) -> str:
    return (resources.files("pipeline.report") / folder / name).read_text(encoding="utf-8")


@functools.cache
def _template(name: str) -> string.Template:
    """A page template, written one element per line for reading: line breaks and indentation are not
    part of the page, so templates break lines only between tags. Every value put in is HTML already."""
    text = _package_file("templates", name)
    return string.Template("".join(line.lstrip() for line in text.splitlines()))


def _inline(tag: str, name: str) -> str:
    """A static file's text inside a <style> or <script> element, so the page needs no other file."""
    return f"<{tag}>\n{_package_file('static', name)}</{tag}>"


def _pct(value) -> str:
    try:
        return f"{float(value):.1%}"
    except (TypeError, ValueError):
        return "?"


def _ood_banner(summary: dict) -> str:
    """The out-of-domain warning; summaries written before the guard existed have no such keys."""
    if not summary.get("ood_warning"):
        return ""
    frac, limit = summary.get("fraction_out_of_domain"), summary.get("max_ood_fraction")
    text = f"{_pct(frac)} of cells" if frac is not None else "Too many cells"
    if summary.get("n_out_of_domain") is not None:
        text += f" ({summary['n_out_of_domain']} of {summary.get('n_cells', '?')})"
    text += " are outside the model's training domain"
    if limit is not None:
        text += f" (limit {_pct(limit)})"
    text += ": calls on this slide are not reliable. Review the cells yourself; do not rely on the slide call."
    method = f" Detected by {summary['ood_method']}." if summary.get("ood_method") else ""
    return f"<div class='ood-banner' id='ood-banner' role='alert'>{_esc(text)}{_esc(method)}</div>"


def _ood_rows(summary: dict) -> list[tuple[str, str]]:
    if summary.get("fraction_out_of_domain") is None:
        return []
    n = summary.get("n_out_of_domain")
    value = _pct(summary["fraction_out_of_domain"]) + (f" ({n} cells)" if n is not None else "")
    if summary.get("max_ood_fraction") is not None:
        value += f", limit {_pct(summary['max_ood_fraction'])}"
    if summary.get("ood_method"):
        value += f", {summary['ood_method']}"
    return [("Outside training domain", value)]


def _card(g: dict, index: int) -> str:
    cid = _esc(g["cell_id"])
    ood = g.get("in_domain") is False
    raw_call = str(g["call"])
    call = "out of domain" if ood else raw_call
    call_class = "out-of-domain" if ood else (raw_call if raw_call in CALL_CLASSES else "")
    # Images past the first page carry data-src; the script sets src when their page is shown.
    attr = "src" if index < PAGE_SIZE else "data-src"
    imgs = (
        f"<img {attr}='{_esc(g['crop_uri'])}' alt='cell {cid}' decoding='async' width='118' height='118'>"
        f"<img {attr}='{_esc(g['cam_uri'])}' alt='saliency of cell {cid}' decoding='async' width='118' "
        f"height='118'>"
    )
    badge = ""
    if ood:
        score = f" (score {float(g['ood_score']):.3f})" if g.get("ood_score") is not None else ""
        badge = (
            f"<div><span class='badge' title='{_esc('model call: ' + raw_call)}'>out of domain</span>"
            f"{_esc(score)} <small>model call {_esc(raw_call)}, not reliable</small></div>"
        )
    elif g.get("ood_score") is not None:
        badge = f"<div><small>OOD score {float(g['ood_score']):.3f}</small></div>"
    buttons = "".join(
        f"<button type='button' data-label='{v}' aria-pressed='false'>{_esc(t)}</button>" for v, t in LABELS
    )
    hidden = " hidden" if index >= PAGE_SIZE else ""
    return (
        f"<div class='cell{' ood' if ood else ''}' data-cell-id='{cid}' data-x='{_esc(g['x'])}' "
        f"data-y='{_esc(g['y'])}'{hidden}><div class='pair'>{imgs}</div>"
        f"<div>#{_esc(g['rank'])} · cell {cid} · <span class='{call_class}'>{_esc(call)}</span></div>{badge}"
        f"<div>score {float(g['p_malignant']):.3f} · {float(g['diameter_um']):.1f} µm</div>"
        f"{_morph_line(g)}"
        f"<div>level-0 x={_esc(g['x'])}, y={_esc(g['y'])}</div>"
        f"<div class='labels' role='group' aria-label='your label for cell {cid}'>{buttons}"
        f"<button type='button' class='clear' aria-label='clear the label of cell {cid}' disabled>clear"
        f"</button></div></div>"
    )


def _num(value, fmt: str) -> str:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return "n/a"
    return format(value, fmt) if np.isfinite(value) else "n/a"


def _morph_line(g: dict) -> str:
    """Nuclear diameter, N/C ratio and atypia score of a gallery cell (absent in older reports)."""
    if "nc_ratio" not in g:
        return ""
    reason = f" <small>({_esc(g['morph_reason'])})</small>" if g.get("morph_reason") else ""
    return (
        f"<div class='morph'>nucleus {_num(g.get('nucleus_diameter_um'), '.1f')} µm · N/C "
        f"{_num(g.get('nc_ratio'), '.2f')} · atypia {_num(g.get('atypia'), '.2f')}{reason}</div>"
    )


def _atypia_card(g: dict) -> str:
    """One cell of the atypia gallery: its crop with the nucleus outlined, its measures and the network's call."""
    cid = _esc(g["cell_id"])
    ood = g.get("in_domain") is False
    call = f"out of domain (model call {g['call']})" if ood else str(g["call"])
    return (
        f"<div class='atypia-cell{' ood' if ood else ''}' data-cell-id='{cid}' data-x='{_esc(g['x'])}' "
        f"data-y='{_esc(g['y'])}'><img src='{_esc(g['crop_uri'])}' alt='cell {cid}, nucleus outlined' "
        f"decoding='async' width='118' height='118'><div>#{_esc(g['rank'])} · cell {cid}</div>{_morph_line(g)}"
        f"<div>network: {_esc(call)}, score {_num(g.get('p_malignant'), '.3f')}</div>"
        f"<div>level-0 x={_esc(g['x'])}, y={_esc(g['y'])}</div></div>"
    )


def _size_histogram(morph: dict) -> str:
    """The nuclear-diameter histogram as an inline SVG bar chart (no image file, no plotting library)."""
    sizes = morph.get("nucleus_diameter_um") or {}
    counts, edges = sizes.get("counts") or [], sizes.get("bin_edges") or []
    if not counts or not any(counts):
        return ""
    top, width, height = max(counts), 12, 80
    bars = "".join(
        f"<rect x='{i * width}' y='{height - round(c / top * height)}' width='{width - 1}' "
        f"height='{round(c / top * height)}'><title>{edges[i]:g}-{edges[i + 1]:g} µm: {c} cells</title></rect>"
        for i, c in enumerate(counts)
    )
    ticks = "".join(
        f"<text x='{i * width}' y='{height + 12}'>{edges[i]:g}</text>" for i in range(0, len(counts) + 1, 5)
    )
    return (
        f"<figure class='sizes'><svg id='size-histogram' role='img' width='{len(counts) * width + 20}' "
        f"height='{height + 16}' aria-label='nuclear diameters of the measured cells, µm'>{bars}{ticks}</svg>"
        f"<figcaption>Nuclear diameter (µm) of the {morph.get('n_measured')} measured cells; median "
        f"{_num(sizes.get('median'), '.1f')} µm.</figcaption></figure>"
    )


def _atypia_section(summary: dict, atypia_gallery: list[dict] | None) -> str:
    """The morphometry summary, the size histogram and the most atypical cells over all cells."""
    morph = summary.get("morphometry")
    if not morph or atypia_gallery is None:
        return ""
    burden = (
        f"{morph['atypia_burden']} cells ({_pct(morph['atypia_burden_fraction'])}) meet the atypia criteria: N/C "
        f">= {morph['nc_threshold']:g} and a nucleus >= {morph['min_nucleus_um']:g} µm across "
        f"({morph['n_atypical_out_of_domain']} of them out of the network's domain)."
    )
    cards = "".join(_atypia_card(g) for g in atypia_gallery)
    return (
        "<h2>Most atypical cells</h2>"
        f"<p>The {len(atypia_gallery)} cells with the highest atypia score ({_esc(morph['atypia_method'])}), over "
        "all cells, those out of the network's domain included: nuclear criteria (N/C ratio, hyperchromasia, "
        "nuclear outline, nuclear size) measured on each crop, nucleus outlined. When the network is out of its "
        f"domain, review these.</p><p id='atypia-burden'>{_esc(burden)}</p>{_size_histogram(morph)}"
        f"<div class='gallery' id='atypia-gallery'>{cards}</div>"
    )


def _pager(n: int, where: str) -> str:
    pages = -(-n // PAGE_SIZE)
    if pages <= 1:
        return ""
    nums = "".join(
        f"<button type='button' data-page='{p}' aria-label='page {p + 1}'>{p + 1}</button>" for p in range(pages)
    )
    return (
        f"<nav class='pager {where}' aria-label='gallery pages ({where})'>"
        f"<button type='button' class='prev'>&larr; previous</button>{nums}"
        f"<button type='button' class='next'>next &rarr;</button><span class='page-info' aria-live='polite'>"
        f"</span></nav>"
    )


def _card_rows(model: dict) -> list[tuple[str, str]]:
    """Key facts of the model's card (model_card.md beside its weights): evidence and domain."""
    card = model.get("card") or {}
    if not card:
        return [("Model card", "none (a model made before model cards)")]
    low, high = card.get("heldout_auc_ci") or [None, None]
    fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    return [
        (
            "Held-out AUC",
            f"{fmt(card.get('heldout_auc'))} [{fmt(low)}, {fmt(high)}] "
            f"({card.get('heldout_source')}, {card.get('heldout_n')} cells)",
        ),
        ("Validated on", str(card.get("validated_domain"))),
        ("Promotion", f"{card.get('promotion')} (model_card.md in the model folder)"),
    ]


def _gallery_section(summary: dict, gallery: list[dict]) -> str:
    """The review toolbar and the paged gallery of cell cards."""
    model = summary["model"]
    slide = str(summary["slide"])
    return _template("gallery.html").substitute(
        count=len(gallery),
        saliency=_esc(summary.get("saliency") or "Grad-CAM for the malignant output"),
        top_pager=_pager(len(gallery), "top"),
        bottom_pager=_pager(len(gallery), "bottom"),
        slide=_esc(slide),
        model=_esc(f"{model.get('uri')}@{model.get('version')}"),
        stem=_esc(_file_stem(slide)),
        page_size=PAGE_SIZE,
        cards="".join(_card(g, i) for i, g in enumerate(gallery)),
    )


def render_html(
    summary: dict, heatmap_uri: str | None, gallery: list[dict], atypia_gallery: list[dict] | None = None
) -> str:
    """The report page. `gallery` items: rank, cell_id, x, y, diameter_um, p_malignant, call, crop_uri,
    cam_uri, and optionally in_domain, ood_score (the out-of-domain guard's; absent in older summaries),
    nucleus_diameter_um, nc_ratio, atypia, morph_reason. `atypia_gallery`: the most atypical cells (rank,
    cell_id, x, y, the morphometry keys, p_malignant, call, in_domain, crop_uri)."""
    call = summary["slide_call"]
    model = summary["model"]
    slide = str(summary["slide"])
    details = _table(
        [
            ("Slide", slide),
            ("Dimensions (level 0)", f"{summary['width']} x {summary['height']} px"),
            ("Resolution", f"{summary['mpp']:.4f} µm/px ({summary['mpp_source']})"),
            ("Cells scored", str(summary["n_cells"])),
            ("Called malignant", f"{summary['n_malignant']} ({summary['fraction_malignant']:.1%})"),
            ("Indeterminate", str(summary["n_indeterminate"])),
            (f"Mean score of top {summary['top_k']}", f"{summary['top_k_mean']:.3f}" if summary["n_cells"] else "n/a"),
            ("Slide rule", summary["rule"]),
            *_ood_rows(summary),
        ]
    )
    model_rows = _table(
        [
            ("Model", str(model.get("uri"))),
            ("Registered version", str(model.get("version"))),
            *_card_rows(model),
            ("Threshold", f"{summary['threshold']:.4f}"),
            ("Indeterminate band", f"[{summary['band'][0]:.4f}, {summary['band'][1]:.4f})"),
            ("Temperature", f"{summary['temperature']:.3f}"),
            ("Test-time augmentation", str(summary["tta"])),
            ("Runtime", ", ".join(f"{k} {v:.1f}s" for k, v in summary["seconds"].items())),
        ]
    )
    if gallery:
        gallery_html = _gallery_section(summary, gallery)
        # report.js keeps labels in localStorage under a key per slide and model (the gallery's data-slide and
        # data-model), so two reports opened from file:// (one origin) never share labels.
        script = _inline("script", "report.js")
    else:
        gallery_html = "<p><strong>No cells found.</strong> Nothing was scored on this slide.</p>"
        script = ""
    heat = (
        f"<img class='thumb' src='{_esc(heatmap_uri)}' alt='slide thumbnail with heat map'>"
        "<p>Colour: highest cell score in each area (dark = low, bright = high). Circled numbers: gallery rank.</p>"
        if heatmap_uri
        else ""
    )
    return _template("report.html").substitute(
        slide=_esc(slide),
        style=_inline("style", "report.css"),
        ood_banner=_ood_banner(summary),
        disclaimer=_esc(DISCLAIMER),
        call_class={"positive": "positive", "negative": "negative"}.get(call, "none"),
        headline=_esc("no cells found" if summary["n_cells"] == 0 else call),
        details=details,
        heat=heat,
        gallery=gallery_html,
        atypia=_atypia_section(summary, atypia_gallery),
        model_rows=model_rows,
        script=script,
    )
