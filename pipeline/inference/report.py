"""Slide report: heat-map overlay, Grad-CAM saliency, and one self-contained HTML file.

Everything the pathologist reviews is embedded (base64 images, inline CSS), so the report can
be mailed or archived as a single file.
"""
from __future__ import annotations

import base64
import html
import io
import re
from pathlib import PurePosixPath, PureWindowsPath

import numpy as np

DISCLAIMER = ("Decision support only. These scores come from a machine-learning model and must be "
              "reviewed by a pathologist; they are not a diagnosis.")


def png_data_uri(image: np.ndarray, fmt: str = "PNG") -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    mime = "image/png" if fmt == "PNG" else "image/jpeg"
    return f"data:{mime};base64,{base64.b64encode(buf.getvalue()).decode('ascii')}"


def heatmap_overlay(thumbnail: np.ndarray, downsample: float, cells, scores: np.ndarray, mark: int = 0,
                    bin_px: int = 24) -> np.ndarray:
    """Thumbnail with the maximum cell score per bin as a translucent colour map; the `mark`
    most suspicious cells are circled and numbered."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import colormaps
    from PIL import Image, ImageDraw

    h, w = thumbnail.shape[:2]
    grid = np.zeros((h // bin_px + 1, w // bin_px + 1), dtype=np.float32)
    has = np.zeros_like(grid, dtype=bool)
    if len(cells):
        gx = np.clip((cells["x"].to_numpy() / downsample / bin_px).astype(int), 0, grid.shape[1] - 1)
        gy = np.clip((cells["y"].to_numpy() / downsample / bin_px).astype(int), 0, grid.shape[0] - 1)
        np.maximum.at(grid, (gy, gx), scores.astype(np.float32))
        has[gy, gx] = True
    big = np.kron(grid, np.ones((bin_px, bin_px), dtype=np.float32))[:h, :w]
    mask = np.kron(has, np.ones((bin_px, bin_px), dtype=bool))[:h, :w]
    colour = (colormaps["inferno"](big)[..., :3] * 255).astype(np.float32)
    out = thumbnail.astype(np.float32)
    alpha = 0.55
    out[mask] = (1 - alpha) * out[mask] + alpha * colour[mask]
    image = Image.fromarray(out.clip(0, 255).astype(np.uint8))
    if mark and len(cells):
        draw = ImageDraw.Draw(image)
        order = np.argsort(-scores)[:mark]
        for rank, i in enumerate(order, start=1):
            x, y = cells["x"].iloc[i] / downsample, cells["y"].iloc[i] / downsample
            draw.ellipse([x - 7, y - 7, x + 7, y + 7], outline=(0, 200, 255), width=2)
            draw.text((x + 8, y - 8), str(rank), fill=(0, 120, 255))
    return np.asarray(image)


def _cam_layer(model):
    """The last convolutional feature layer (timm EfficientNet: conv_head; else the last Conv2d)."""
    import torch

    if hasattr(model, "conv_head"):
        return model.conv_head
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    return convs[-1]


def overlay_cam(base: np.ndarray, cam: np.ndarray, image_weight: float = 0.6) -> np.ndarray:
    """A [0, 1] map over a float RGB [0, 1] image, as pytorch-grad-cam's show_cam_on_image
    draws it (JET colours), without importing torch."""
    import cv2

    heat = cv2.applyColorMap(np.uint8(255 * cam), cv2.COLORMAP_JET)
    heat = cv2.cvtColor(heat, cv2.COLOR_BGR2RGB).astype(np.float32) / 255
    out = (1 - image_weight) * heat + image_weight * base
    return np.uint8(255 * out / np.max(out))


def onnx_saliency_maps(predictor, crops: list[np.ndarray]) -> list[np.ndarray]:
    """CAM from the exported graph's `cam` output, scaled like Grad-CAM (min-max, then resized)."""
    import cv2

    from pipeline.data.transforms import base_resize

    if not crops or "cam" not in predictor.meta.get("outputs", []):
        return [base_resize(c, predictor.meta["image_size"]) for c in crops]
    size = predictor.meta["image_size"]
    target = predictor.labels.index(predictor.positive_labels[0])
    out = []
    for start in range(0, len(crops), predictor.batch_size):
        chunk = crops[start:start + predictor.batch_size]
        maps = predictor.cams(predictor.preprocess_array(chunk), target)
        for crop, m in zip(chunk, maps):
            m = m - m.min()
            m = cv2.resize(m / (1e-7 + m.max()), (size, size))
            out.append(overlay_cam(base_resize(crop, size).astype(np.float32) / 255.0, m))
    return out


def saliency_maps(predictor, crops: list[np.ndarray]) -> list[np.ndarray]:
    """Saliency for the malignant output, overlaid on each model-input crop: Grad-CAM
    (pytorch-grad-cam) on a torch model, the graph's CAM on an exported ONNX one."""
    if getattr(predictor, "backend", "torch") == "onnx":
        return onnx_saliency_maps(predictor, crops)
    import torch
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.image import show_cam_on_image
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    from pipeline.data.transforms import base_resize

    if not crops:
        return []
    size = predictor.meta["image_size"]
    target = predictor.labels.index(predictor.positive_labels[0])
    model = predictor.model
    batch = torch.stack([predictor.preprocess(c) for c in crops])
    with GradCAM(model=model, target_layers=[_cam_layer(model)]) as cam:
        maps = cam(input_tensor=batch, targets=[ClassifierOutputTarget(target)] * len(crops))
    model.eval()
    out = []
    for crop, m in zip(crops, maps):
        base = base_resize(crop, size).astype(np.float32) / 255.0
        out.append(show_cam_on_image(base, m, use_rgb=True, image_weight=0.6))
    return out


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

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#222;max-width:1200px}
h1{font-size:1.5em;margin-bottom:4px;overflow-wrap:anywhere}
h2{font-size:1.15em;margin-top:28px;border-bottom:1px solid #ddd}
.disclaimer{background:#fff4e5;border:1px solid #f0a020;padding:10px 14px;border-radius:6px;font-weight:600}
.ood-banner{background:#fde2e2;border:2px solid #b91c1c;color:#7f1d1d;padding:12px 16px;border-radius:6px;
font-weight:700;font-size:1.1em}
.call{font-size:1.3em;font-weight:700;padding:6px 12px;border-radius:6px;display:inline-block}
.positive{background:#fde2e2;color:#9b1c1c}.negative{background:#e3f6e8;color:#1e6b34}.none{background:#eee}
table{border-collapse:collapse;margin:8px 0}th,td{text-align:left;padding:3px 10px;border-bottom:1px solid #eee}
td{overflow-wrap:anywhere}
.gallery{display:grid;grid-template-columns:repeat(auto-fill,minmax(250px,1fr));gap:14px}
.cell{border:1px solid #ddd;border-radius:6px;padding:8px;font-size:.9em}.cell[hidden]{display:none}
.cell.ood{border:3px dashed #b45309;background:#fffbeb}
.badge{display:inline-block;background:#b45309;color:#fff;border-radius:4px;padding:1px 6px;font-size:.85em;
font-weight:700}
.cell img{width:118px;height:118px;image-rendering:auto}.pair{display:flex;gap:6px}
.malignant{color:#9b1c1c;font-weight:700}.indeterminate{color:#8a5a00;font-weight:700}.benign{color:#1e6b34}
.out-of-domain{color:#b45309;font-weight:700}
.thumb{max-width:100%;border:1px solid #ccc}
.labels{display:flex;flex-wrap:wrap;gap:4px;margin-top:6px}
.labels button,.pager button,.review button{font:inherit;font-size:.85em;padding:3px 8px;border:1px solid #888;
border-radius:4px;background:#f7f7f7;cursor:pointer}
.labels button:focus-visible,.pager button:focus-visible,.review button:focus-visible{outline:3px solid #2563eb;
outline-offset:1px}
.labels button[aria-pressed=true]{background:#1d4ed8;color:#fff;border-color:#1d4ed8;font-weight:700}
.labels button.clear{border-style:dashed}.labels button:disabled{opacity:.4;cursor:default}
.cell.labelled{box-shadow:0 0 0 2px #1d4ed8}
.review{display:flex;flex-wrap:wrap;gap:12px;align-items:center;background:#f3f6fb;padding:8px 12px;
border-radius:6px;margin:8px 0}
.pager{display:flex;flex-wrap:wrap;gap:4px;align-items:center;margin:10px 0}
.pager button[aria-current=page]{background:#333;color:#fff}
.notice{color:#9b1c1c}
"""

# Inline so the report stays one file. Labels live in localStorage under a key per slide and
# model, so two reports opened from file:// (one origin) never share labels.
JS = r"""
(function () {
  "use strict";
  var gallery = document.getElementById("gallery");
  if (!gallery) return;
  var slide = gallery.dataset.slide, model = gallery.dataset.model;
  var KEY = "cytopipe-labels:" + slide + ":" + model;
  var NAMES = {malignant: 1, benign: 1, unsure: 1, not_a_cell: 1};
  var cards = Array.prototype.slice.call(gallery.querySelectorAll(".cell"));
  var reviewer = document.getElementById("reviewer");
  var count = document.getElementById("label-count");
  var notice = document.getElementById("storage-notice");
  var state = {labels: {}, reviewer: ""};
  var persistent = true;

  function load() {
    try {
      var raw = window.localStorage.getItem(KEY);
      if (raw) {
        var got = JSON.parse(raw);
        if (got && typeof got === "object") {
          state.reviewer = typeof got.reviewer === "string" ? got.reviewer : "";
          var labels = got.labels || {};
          Object.keys(labels).forEach(function (id) {  // ignore anything hand-edited into an odd shape
            var l = labels[id];
            if (l && NAMES[l.label] === 1) state.labels[id] = l;
          });
        }
      }
    } catch (e) { persistent = false; }
  }
  function save() {
    try { window.localStorage.setItem(KEY, JSON.stringify(state)); }
    catch (e) { persistent = false; }
    if (!persistent) notice.textContent = "This browser does not let the page store labels: export them before closing it.";
  }
  function paint(card) {
    var l = state.labels[card.dataset.cellId];
    card.classList.toggle("labelled", !!l);
    card.querySelectorAll("button[data-label]").forEach(function (b) {
      b.setAttribute("aria-pressed", l && l.label === b.dataset.label ? "true" : "false");
    });
    card.querySelector("button.clear").disabled = !l;
  }
  function tally() {
    var n = 0, by = {};
    cards.forEach(function (c) {
      var l = state.labels[c.dataset.cellId];
      if (l) { n += 1; by[l.label] = (by[l.label] || 0) + 1; }
    });
    var parts = Object.keys(NAMES).filter(function (k) { return by[k]; }).map(function (k) {
      return k.replace(/_/g, " ") + " " + by[k];
    });
    count.textContent = n + " of " + cards.length + " cells labelled" + (parts.length ? " (" + parts.join(", ") + ")" : "");
  }
  function setLabel(card, label) {
    var id = card.dataset.cellId;
    var old = state.labels[id];
    if (label === null || (old && old.label === label)) delete state.labels[id];  // pressing the chosen one clears it
    else state.labels[id] = {label: label, timestamp: new Date().toISOString(), reviewer: reviewer.value.trim()};
    save(); paint(card); tally();
  }
  gallery.addEventListener("click", function (ev) {
    var b = ev.target.closest("button");
    if (!b) return;
    var card = b.closest(".cell");
    if (b.classList.contains("clear")) {
      setLabel(card, null);
      card.querySelector("button[data-label]").focus();  // the clear button is now disabled; keep keyboard focus
    }
    else if (b.dataset.label) setLabel(card, b.dataset.label);
  });
  reviewer.addEventListener("input", function () { state.reviewer = reviewer.value; save(); });

  function csvField(v) {
    v = v === undefined || v === null ? "" : String(v);
    return /[",\r\n]/.test(v) ? '"' + v.replace(/"/g, '""') + '"' : v;
  }
  document.getElementById("export-labels").addEventListener("click", function () {
    var now = reviewer.value.trim();
    var lines = ["cell_id,x,y,label,reviewer,timestamp,slide,model"];
    cards.forEach(function (c) {
      var l = state.labels[c.dataset.cellId];
      if (!l) return;
      // The initials typed when the label was set; the current ones if none were typed then.
      lines.push([c.dataset.cellId, c.dataset.x, c.dataset.y, l.label, l.reviewer || now, l.timestamp, slide, model]
        .map(csvField).join(","));
    });
    var blob = new Blob([lines.join("\r\n") + "\r\n"], {type: "text/csv;charset=utf-8"});
    var a = document.createElement("a");
    a.href = URL.createObjectURL(blob);
    a.download = gallery.dataset.stem + "-labels.csv";
    document.body.appendChild(a); a.click(); a.remove();
    setTimeout(function () { URL.revokeObjectURL(a.href); }, 10000);
  });

  // Pagination: only the shown page's images get a src, so 500 cells do not decode 1000 images at once.
  var size = parseInt(gallery.dataset.pageSize, 10) || cards.length || 1;
  var pages = Math.max(1, Math.ceil(cards.length / size));
  var pagers = Array.prototype.slice.call(document.querySelectorAll(".pager"));
  var current = 0;
  function show(p) {
    current = Math.min(Math.max(p, 0), pages - 1);
    cards.forEach(function (c, i) {
      var on = Math.floor(i / size) === current;
      c.hidden = !on;
      if (on) c.querySelectorAll("img[data-src]").forEach(function (img) {
        img.src = img.dataset.src; img.removeAttribute("data-src");
      });
    });
    pagers.forEach(function (nav) {
      nav.querySelectorAll("button[data-page]").forEach(function (b) {
        if (+b.dataset.page === current) b.setAttribute("aria-current", "page"); else b.removeAttribute("aria-current");
      });
      nav.querySelector(".prev").disabled = current === 0;
      nav.querySelector(".next").disabled = current === pages - 1;
      nav.querySelector(".page-info").textContent = "Page " + (current + 1) + " of " + pages + " (cells " +
        (current * size + 1) + "-" + Math.min(cards.length, (current + 1) * size) + ")";
    });
  }
  pagers.forEach(function (nav) {
    nav.addEventListener("click", function (ev) {
      var b = ev.target.closest("button");
      if (!b) return;
      if (b.classList.contains("prev")) show(current - 1);
      else if (b.classList.contains("next")) show(current + 1);
      else if (b.dataset.page !== undefined) show(+b.dataset.page);
      if (nav.classList.contains("bottom")) gallery.scrollIntoView();
    });
  });

  load();
  reviewer.value = state.reviewer;
  cards.forEach(paint);
  tally();
  if (pages > 1) show(0);
  gallery.dataset.ready = "1";
})();
"""


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
    text = (f"{_pct(frac)} of cells" if frac is not None else "Too many cells")
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
    imgs = (f"<img {attr}='{_esc(g['crop_uri'])}' alt='cell {cid}' decoding='async' width='118' height='118'>"
            f"<img {attr}='{_esc(g['cam_uri'])}' alt='saliency of cell {cid}' decoding='async' width='118' "
            f"height='118'>")
    badge = ""
    if ood:
        score = f" (score {float(g['ood_score']):.3f})" if g.get("ood_score") is not None else ""
        badge = (f"<div><span class='badge' title='{_esc('model call: ' + raw_call)}'>out of domain</span>"
                 f"{_esc(score)} <small>model call {_esc(raw_call)}, not reliable</small></div>")
    elif g.get("ood_score") is not None:
        badge = f"<div><small>OOD score {float(g['ood_score']):.3f}</small></div>"
    buttons = "".join(f"<button type='button' data-label='{v}' aria-pressed='false'>{_esc(t)}</button>"
                      for v, t in LABELS)
    hidden = " hidden" if index >= PAGE_SIZE else ""
    return (f"<div class='cell{' ood' if ood else ''}' data-cell-id='{cid}' data-x='{_esc(g['x'])}' "
            f"data-y='{_esc(g['y'])}'{hidden}><div class='pair'>{imgs}</div>"
            f"<div>#{_esc(g['rank'])} · cell {cid} · <span class='{call_class}'>{_esc(call)}</span></div>{badge}"
            f"<div>score {float(g['p_malignant']):.3f} · {float(g['diameter_um']):.1f} µm</div>"
            f"<div>level-0 x={_esc(g['x'])}, y={_esc(g['y'])}</div>"
            f"<div class='labels' role='group' aria-label='your label for cell {cid}'>{buttons}"
            f"<button type='button' class='clear' aria-label='clear the label of cell {cid}' disabled>clear"
            f"</button></div></div>")


def _pager(n: int, where: str) -> str:
    pages = -(-n // PAGE_SIZE)
    if pages <= 1:
        return ""
    nums = "".join(f"<button type='button' data-page='{p}' aria-label='page {p + 1}'>{p + 1}</button>"
                   for p in range(pages))
    return (f"<nav class='pager {where}' aria-label='gallery pages ({where})'>"
            f"<button type='button' class='prev'>&larr; previous</button>{nums}"
            f"<button type='button' class='next'>next &rarr;</button><span class='page-info' aria-live='polite'>"
            f"</span></nav>")


def _card_rows(model: dict) -> list[tuple[str, str]]:
    """Key facts of the model's card (model_card.md beside its weights): evidence and domain."""
    card = model.get("card") or {}
    if not card:
        return [("Model card", "none (a model made before model cards)")]
    low, high = card.get("heldout_auc_ci") or [None, None]
    fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    return [("Held-out AUC", f"{fmt(card.get('heldout_auc'))} [{fmt(low)}, {fmt(high)}] "
                             f"({card.get('heldout_source')}, {card.get('heldout_n')} cells)"),
            ("Validated on", str(card.get("validated_domain"))),
            ("Promotion", f"{card.get('promotion')} (model_card.md in the model folder)")]


def render_html(summary: dict, heatmap_uri: str | None, gallery: list[dict]) -> str:
    """The report page. `gallery` items: rank, cell_id, x, y, diameter_um, p_malignant, call, crop_uri,
    cam_uri, and optionally in_domain, ood_score (the out-of-domain guard's; absent in older summaries)."""
    call = summary["slide_call"]
    css_class = {"positive": "positive", "negative": "negative"}.get(call, "none")
    model = summary["model"]
    slide = str(summary["slide"])
    details = _table([
        ("Slide", slide), ("Dimensions (level 0)", f"{summary['width']} x {summary['height']} px"),
        ("Resolution", f"{summary['mpp']:.4f} µm/px ({summary['mpp_source']})"),
        ("Cells scored", str(summary["n_cells"])), ("Called malignant", f"{summary['n_malignant']} "
                                                                         f"({summary['fraction_malignant']:.1%})"),
        ("Indeterminate", str(summary["n_indeterminate"])),
        (f"Mean score of top {summary['top_k']}", f"{summary['top_k_mean']:.3f}" if summary["n_cells"] else "n/a"),
        ("Slide rule", summary["rule"]), *_ood_rows(summary),
    ])
    model_rows = _table([
        ("Model", str(model.get("uri"))), ("Registered version", str(model.get("version"))), *_card_rows(model),
        ("Threshold", f"{summary['threshold']:.4f}"),
        ("Indeterminate band", f"[{summary['band'][0]:.4f}, {summary['band'][1]:.4f})"),
        ("Temperature", f"{summary['temperature']:.3f}"), ("Test-time augmentation", str(summary["tta"])),
        ("Runtime", ", ".join(f"{k} {v:.1f}s" for k, v in summary["seconds"].items())),
    ])
    script = ""
    if gallery:
        cards = "".join(_card(g, i) for i, g in enumerate(gallery))
        saliency = summary.get("saliency") or "Grad-CAM for the malignant output"
        model_key = f"{model.get('uri')}@{model.get('version')}"
        review = ("<div class='review'><label>Reviewer initials <input id='reviewer' size='6' maxlength='40' "
                  "autocomplete='off'></label><button type='button' id='export-labels'>Export labels (CSV)</button>"
                  "<span id='label-count' aria-live='polite'></span><span id='storage-notice' class='notice' "
                  "role='status'></span></div>")
        gallery_html = (f"<p>The {len(gallery)} most suspicious cells, highest score first. Left: the crop the "
                        f"model saw; right: where the model looked ({_esc(saliency)}). Label cells with the "
                        f"buttons under each one (press a chosen label again, or clear, to remove it); labels are "
                        f"kept in this browser for this slide and model until you export them.</p>{review}"
                        f"{_pager(len(gallery), 'top')}"
                        f"<div class='gallery' id='gallery' data-slide='{_esc(slide)}' data-model='{_esc(model_key)}' "
                        f"data-stem='{_esc(_file_stem(slide))}' data-page-size='{PAGE_SIZE}'>{cards}</div>"
                        f"{_pager(len(gallery), 'bottom')}")
        script = f"<script>{JS}</script>"
    else:
        gallery_html = "<p><strong>No cells found.</strong> Nothing was scored on this slide.</p>"
    heat = (f"<img class='thumb' src='{_esc(heatmap_uri)}' alt='slide thumbnail with heat map'>"
            "<p>Colour: highest cell score in each area (dark = low, bright = high). Circled numbers: gallery rank.</p>"
            if heatmap_uri else "")
    headline = "no cells found" if summary["n_cells"] == 0 else call
    return (f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>cytopipe slide report: "
            f"{_esc(slide)}</title><style>{CSS}</style></head><body>"
            f"{_ood_banner(summary)}"
            f"<h1>Slide report: {_esc(slide)}</h1>"
            f"<p class='disclaimer'>{_esc(DISCLAIMER)}</p>"
            f"<p>Slide call: <span class='call {css_class}'>{_esc(headline)}</span></p>"
            f"<h2>Summary</h2>{details}<h2>Heat map</h2>{heat}<h2>Most suspicious cells</h2>{gallery_html}"
            f"<h2>Model and thresholds</h2>{model_rows}"
            f"<p><small>Generated by cytopipe. {_esc(DISCLAIMER)}</small></p>{script}</body></html>")
