"""Slide report: heat-map overlay, Grad-CAM saliency, and one self-contained HTML file.

Everything the pathologist reviews is embedded (base64 images, inline CSS), so the report can
be mailed or archived as a single file.
"""
from __future__ import annotations

import base64
import html
import io

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


def _table(rows: list[tuple[str, str]]) -> str:
    return "<table>" + "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in rows) + "</table>"


CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#222;max-width:1200px}
h1{font-size:1.5em;margin-bottom:4px}h2{font-size:1.15em;margin-top:28px;border-bottom:1px solid #ddd}
.disclaimer{background:#fff4e5;border:1px solid #f0a020;padding:10px 14px;border-radius:6px;font-weight:600}
.call{font-size:1.3em;font-weight:700;padding:6px 12px;border-radius:6px;display:inline-block}
.positive{background:#fde2e2;color:#9b1c1c}.negative{background:#e3f6e8;color:#1e6b34}.none{background:#eee}
table{border-collapse:collapse;margin:8px 0}th,td{text-align:left;padding:3px 10px;border-bottom:1px solid #eee}
.gallery{display:grid;grid-template-columns:repeat(auto-fill,minmax(250px,1fr));gap:14px}
.cell{border:1px solid #ddd;border-radius:6px;padding:8px;font-size:.9em}
.cell img{width:118px;height:118px;image-rendering:auto}.pair{display:flex;gap:6px}
.malignant{color:#9b1c1c;font-weight:700}.indeterminate{color:#8a5a00;font-weight:700}.benign{color:#1e6b34}
.thumb{max-width:100%;border:1px solid #ccc}
"""


def render_html(summary: dict, heatmap_uri: str | None, gallery: list[dict]) -> str:
    """The report page. `gallery` items: rank, cell_id, x, y, diameter_um, p_malignant, call, crop_uri, cam_uri."""
    call = summary["slide_call"]
    css_class = {"positive": "positive", "negative": "negative"}.get(call, "none")
    model = summary["model"]
    details = _table([
        ("Slide", summary["slide"]), ("Dimensions (level 0)", f"{summary['width']} x {summary['height']} px"),
        ("Resolution", f"{summary['mpp']:.4f} µm/px ({summary['mpp_source']})"),
        ("Cells scored", str(summary["n_cells"])), ("Called malignant", f"{summary['n_malignant']} "
                                                                         f"({summary['fraction_malignant']:.1%})"),
        ("Indeterminate", str(summary["n_indeterminate"])),
        (f"Mean score of top {summary['top_k']}", f"{summary['top_k_mean']:.3f}" if summary["n_cells"] else "n/a"),
        ("Slide rule", summary["rule"]),
    ])
    model_rows = _table([
        ("Model", str(model.get("uri"))), ("Registered version", str(model.get("version"))),
        ("Threshold", f"{summary['threshold']:.4f}"),
        ("Indeterminate band", f"[{summary['band'][0]:.4f}, {summary['band'][1]:.4f})"),
        ("Temperature", f"{summary['temperature']:.3f}"), ("Test-time augmentation", str(summary["tta"])),
        ("Runtime", ", ".join(f"{k} {v:.1f}s" for k, v in summary["seconds"].items())),
    ])
    if gallery:
        cards = "".join(
            f"<div class='cell'><div class='pair'><img src='{g['crop_uri']}' alt='cell {g['cell_id']}'>"
            f"<img src='{g['cam_uri']}' alt='saliency of cell {g['cell_id']}'></div>"
            f"<div>#{g['rank']} · cell {g['cell_id']} · <span class='{g['call']}'>{html.escape(g['call'])}</span></div>"
            f"<div>score {g['p_malignant']:.3f} · {g['diameter_um']:.1f} µm</div>"
            f"<div>level-0 x={g['x']}, y={g['y']}</div></div>" for g in gallery)
        saliency = summary.get("saliency") or "Grad-CAM for the malignant output"
        gallery_html = (f"<p>The {len(gallery)} most suspicious cells, highest score first. Left: the crop the "
                        f"model saw; right: where the model looked ({html.escape(saliency)}).</p>"
                        f"<div class='gallery'>{cards}</div>")
    else:
        gallery_html = "<p><strong>No cells found.</strong> Nothing was scored on this slide.</p>"
    heat = (f"<img class='thumb' src='{heatmap_uri}' alt='slide thumbnail with heat map'>"
            "<p>Colour: highest cell score in each area (dark = low, bright = high). Circled numbers: gallery rank.</p>"
            if heatmap_uri else "")
    headline = "no cells found" if summary["n_cells"] == 0 else call
    return (f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>cytopipe slide report: "
            f"{html.escape(summary['slide'])}</title><style>{CSS}</style></head><body>"
            f"<h1>Slide report: {html.escape(summary['slide'])}</h1>"
            f"<p class='disclaimer'>{html.escape(DISCLAIMER)}</p>"
            f"<p>Slide call: <span class='call {css_class}'>{html.escape(headline)}</span></p>"
            f"<h2>Summary</h2>{details}<h2>Heat map</h2>{heat}<h2>Most suspicious cells</h2>{gallery_html}"
            f"<h2>Model and thresholds</h2>{model_rows}"
            f"<p><small>Generated by cytopipe. {html.escape(DISCLAIMER)}</small></p></body></html>")
