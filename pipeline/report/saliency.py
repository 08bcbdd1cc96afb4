"""Where the model looked and where the suspicious cells are: the slide heat map and per-cell
saliency overlays (Grad-CAM on a torch model, the graph's CAM on an exported ONNX one).
"""

from __future__ import annotations

import numpy as np

from pipeline.data.transforms import base_resize


def heatmap_overlay(
    thumbnail: np.ndarray, downsample: float, cells, scores: np.ndarray, mark: int = 0, bin_px: int = 24
) -> np.ndarray:
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

    size = predictor.card.image_size
    if not crops or "cam" not in predictor.card.outputs:
        return [base_resize(c, size) for c in crops]
    target = predictor.labels.index(predictor.positive_labels[0])
    out = []
    for start in range(0, len(crops), predictor.batch_size):
        chunk = crops[start : start + predictor.batch_size]
        maps = predictor.cams(predictor.preprocess(chunk), target)
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

    if not crops:
        return []
    size = predictor.card.image_size
    target = predictor.labels.index(predictor.positive_labels[0])
    model = predictor.model
    batch = torch.from_numpy(predictor.preprocess(crops))
    with GradCAM(model=model, target_layers=[_cam_layer(model)]) as cam:
        maps = cam(input_tensor=batch, targets=[ClassifierOutputTarget(target)] * len(crops))
    model.eval()
    out = []
    for crop, m in zip(crops, maps):
        base = base_resize(crop, size).astype(np.float32) / 255.0
        out.append(show_cam_on_image(base, m, use_rgb=True, image_weight=0.6))
    return out
