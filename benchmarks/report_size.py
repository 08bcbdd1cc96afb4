"""Size of a slide's report.html with its gallery images as PNG and as the format the report uses
(pipeline.report.page.GALLERY_FORMAT), measured in one run, plus the size and fidelity of candidate
encodings of the same images.

    python benchmarks/report_size.py [--model models/exported]
        [--slide ../shared/data/slides/csf-breast-carcinoma-pap.tiff] [--top 500] [--out DIR]

The slide is scored once (`score_slide`, as `cytopipe score-slide --top N` does); every image the report
embeds is kept as it was before encoding. report.html is the page as written; report-png.html is the same
page with each gallery image (and the heat map) re-encoded as PNG, so the two sizes differ only by the
encoding. The candidates table encodes the same gallery images each way:
- size: the base64 of all gallery images and the report.html that would result (heat map as embedded);
- PSNR (dB) against the original pixels, crops and saliency maps apart (min and mean over images);
- outline: the drawn nucleus outline's pixels (pure cyan, 1 px) after decoding: mean RGB distance from
  cyan and the fraction still within 60 of it (the outline stays visible as cyan).

Target (issue 17): report.html for --top 500 <= 15 MB.
"""

from __future__ import annotations

import argparse
import base64
import io
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CYAN = np.array((0, 200, 255), np.float32)  # pipeline.morphometry.cells.nucleus_outline's colour
URI = re.compile(r"data:image/[a-z]+;base64,[A-Za-z0-9+/=]+")
CANDIDATES = [
    ("PNG", None, None),
    *[("JPEG", q, s) for s in (2, 0) for q in (75, 85, 90, 95)],
    *[("WEBP", q, None) for q in (80, 90)],
]


def label(fmt: str, quality, subsampling) -> str:
    chroma = {0: " 4:4:4", 2: " 4:2:0"}.get(subsampling, "")
    return fmt if quality is None else f"{fmt} q{quality}{chroma}"


def decode(uri: str) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))).convert("RGB"))


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float32) - b.astype(np.float32)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def capture(score_slide_module) -> tuple[list[dict], list]:
    """Wrap the report's image encoders in score_slide so each image is recorded with its data URI."""
    records, originals = [], []
    for name in ("gallery_data_uri", "heatmap_data_uri", "png_data_uri"):
        real = getattr(score_slide_module, name, None)
        if real is None:
            continue

        def recording(image, *args, _real=real, **kwargs):
            uri = _real(image, *args, **kwargs)
            records.append({"image": np.asarray(image).copy(), "uri": uri})
            return uri

        originals.append((name, real))
        setattr(score_slide_module, name, recording)
    return records, originals


def classify(records: list[dict], page: str) -> None:
    """Each record's role, read from the img element it ended up in."""
    for rec in records:
        at = page.find(rec["uri"])
        after = page[at + len(rec["uri"]) : at + len(rec["uri"]) + 60]
        if at < 0:
            rec["kind"] = "unused"
        elif "alt='slide thumbnail" in after:
            rec["kind"] = "heat map"
        elif "alt='saliency" in after:
            rec["kind"] = "saliency"
        elif "nucleus outlined'" in after:
            rec["kind"] = "atypia crop"
        else:
            rec["kind"] = "crop"


def outline_stats(images: list[np.ndarray], decoded: list[np.ndarray]) -> tuple[float, float]:
    dist = []
    for img, dec in zip(images, decoded):
        on = np.all(img == CYAN.astype(np.uint8), axis=-1)
        if on.any():
            dist.append(np.linalg.norm(dec[on].astype(np.float32) - CYAN, axis=-1))
    if not dist:
        return float("nan"), float("nan")
    d = np.concatenate(dist)
    return float(d.mean()), float((d <= 60).mean())


def candidate_rows(records: list[dict], base_bytes: int) -> list[str]:
    from pipeline.report.page import image_data_uri

    gallery = [r for r in records if r["kind"] in ("crop", "saliency", "atypia crop")]
    heat = [r for r in records if r["kind"] == "heat map"]
    heat_bytes = sum(len(r["uri"]) for r in heat)
    rows = [
        f"{'encoding':<17} {'gallery MB':>10} {'report MB':>9} {'enc s':>6} {'crop PSNR min/mean':>18} "
        f"{'CAM PSNR min/mean':>17} {'outline dist':>12} {'outline ok':>10}"
    ]
    for fmt, quality, sub in CANDIDATES:
        t = time.perf_counter()
        uris = [image_data_uri(r["image"], fmt, quality, sub) for r in gallery]
        enc_s = time.perf_counter() - t
        decoded = [decode(u) for u in uris]
        by_kind = {"crop": [], "saliency": []}
        for r, dec in zip(gallery, decoded):
            by_kind["saliency" if r["kind"] == "saliency" else "crop"].append(psnr(r["image"], dec))
        crops = [(r["image"], d) for r, d in zip(gallery, decoded) if r["kind"] != "saliency"]
        dist, ok = outline_stats([c[0] for c in crops], [c[1] for c in crops])
        gallery_bytes = sum(len(u) for u in uris)
        fmt_psnr = lambda v: "lossless" if not v or np.isinf(min(v)) else f"{min(v):.1f}/{np.mean(v):.1f}"  # noqa: E731
        rows.append(
            f"{label(fmt, quality, sub):<17} {gallery_bytes / 1e6:>10.2f} "
            f"{(base_bytes + heat_bytes + gallery_bytes) / 1e6:>9.2f} {enc_s:>6.2f} "
            f"{fmt_psnr(by_kind['crop']):>18} {fmt_psnr(by_kind['saliency']):>17} {dist:>12.1f} {ok:>10.1%}"
        )
    return rows


def heat_rows(records: list[dict]) -> list[str]:
    from pipeline.report.page import image_data_uri

    rows = []
    for rec in (r for r in records if r["kind"] == "heat map"):
        h, w = rec["image"].shape[:2]
        for fmt, quality, sub in (("PNG", None, None), ("JPEG", 85, 0), ("JPEG", 90, 0), ("WEBP", 90, None)):
            uri = image_data_uri(rec["image"], fmt, quality, sub)
            rows.append(
                f"heat map {w}x{h} {label(fmt, quality, sub):<14} {len(uri) / 1e6:6.2f} MB, "
                f"PSNR {psnr(rec['image'], decode(uri)):.1f} dB"
            )
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=ROOT / "models/exported", type=Path)
    ap.add_argument("--slide", default=ROOT.parent / "shared/data/slides/csf-breast-carcinoma-pap.tiff", type=Path)
    ap.add_argument("--params", default=ROOT / "params.yaml", type=Path)
    ap.add_argument("--top", default=500, type=int)
    ap.add_argument("--out", type=Path, help="keep the report here (default: a temporary folder)")
    args = ap.parse_args(argv)

    from pipeline.config import load_params
    from pipeline.inference import score_slide as module
    from pipeline.report import page as report_page
    from pipeline.report.page import image_data_uri

    cfg = load_params(args.params).slide
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp) / "report"
        records, originals = capture(module)
        t = time.perf_counter()
        try:
            summary = module.score_slide(str(args.slide), str(args.model), out, cfg, top=args.top, log=lambda *_: None)
        finally:
            for name, real in originals:
                setattr(module, name, real)
        score_s = time.perf_counter() - t
        page = (out / "report.html").read_text(encoding="utf-8")
        classify(records, page)
        as_png = {r["uri"]: image_data_uri(r["image"], "PNG") for r in records if r["kind"] != "unused"}
        (out / "report-png.html").write_text(URI.sub(lambda m: as_png.get(m[0], m[0]), page), encoding="utf-8")
        size, png_size = (out / "report.html").stat().st_size, (out / "report-png.html").stat().st_size
        base_bytes = len(page.encode("utf-8")) - sum(len(r["uri"]) for r in records if r["kind"] != "unused")
        kinds = {k: sum(r["kind"] == k for r in records) for k in ("crop", "saliency", "atypia crop", "heat map")}
        gallery_as = label(report_page.GALLERY_FORMAT, report_page.GALLERY_QUALITY, report_page.GALLERY_SUBSAMPLING)
        heat_as = label(report_page.HEATMAP_FORMAT, report_page.HEATMAP_QUALITY, report_page.HEATMAP_SUBSAMPLING)
        print(f"slide {args.slide.name}: {summary['n_cells']} cells, --top {args.top}, scored in {score_s:.1f}s")
        print("images embedded: " + ", ".join(f"{n} {k}" for k, n in kinds.items()))
        print(
            f"report.html as written (gallery {gallery_as}, heat map {heat_as}): {size / 1e6:.2f} MB ({size} bytes; target <= 15 MB)"
        )
        print(f"report-png.html (every image PNG, as before issue 17): {png_size / 1e6:.2f} MB ({png_size} bytes)")
        print(f"page without images: {base_bytes / 1e6:.2f} MB")
        print("\n".join(heat_rows(records)))
        print("\n".join(candidate_rows(records, base_bytes)))
    return 0 if size <= 15e6 else 1


if __name__ == "__main__":
    sys.exit(main())
