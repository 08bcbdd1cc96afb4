"""Compare OOD scores (pipeline/ood.py) by AUROC, in-domain Herlev test cells vs two out-of-domain sets.

    python benchmarks/ood_comparison.py [--model models/calibrated] [--n-slide 2000]

- in: Herlev test cells (data/split/split.csv, split == test);
- out 1: cells detected on the CSF body-fluid slide (metastatic breast carcinoma, Pap), a fixed
  random sample cropped like score-slide does;
- out 2: natural photographs shipped with scikit-image (skimage/data), whole and as random crops.

Every method is fitted on the train split's penultimate features (single view) and thresholded
at the `ood.pass_rate` quantile of the validation scores; the table shows AUROC (higher score =
out of domain) and the fraction of each set flagged at that threshold.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CANDIDATES = [  # (label, method, options)
    ("mahalanobis", "mahalanobis", {"shrinkage": 0.1}),
    ("mahalanobis++ (L2 norm)", "mahalanobis", {"shrinkage": 0.1, "normalize": True}),
    ("mahalanobis shrink 0.5", "mahalanobis", {"shrinkage": 0.5}),
    ("mahalanobis PCA 64", "mahalanobis", {"shrinkage": 0.1, "pca_dim": 64}),
    ("knn k=1", "knn", {"k": 1}),
    ("knn k=5", "knn", {"k": 5}),
    ("knn k=20", "knn", {"k": 20}),
    ("energy", "energy", {}),
]


def natural_images(n_crops: int, seed: int) -> list[np.ndarray]:
    """skimage's sample photographs (RGB), each whole and as `n_crops` random square crops."""
    import skimage
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for path in sorted((Path(skimage.__file__).parent / "data").glob("*")):
        if path.suffix.lower() not in (".png", ".jpg"):
            continue
        im = np.asarray(Image.open(path).convert("RGB"))
        out.append(im)
        h, w = im.shape[:2]
        for _ in range(n_crops):
            side = int(rng.integers(min(h, w) // 4, min(h, w) + 1))
            y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
            out.append(im[y : y + side, x : x + side])
    return out


def synthetic_images(seed: int) -> list[np.ndarray]:
    """Random noise, flat colours and stripes (as in tests/test_ood.py)."""
    rng = np.random.default_rng(seed)
    noise = [rng.integers(0, 256, (224, 224, 3), dtype=np.uint8) for _ in range(8)]
    flat = [np.full((224, 224, 3), rng.integers(0, 256, 3), np.uint8) for _ in range(8)]
    stripes = []
    for period in (2, 4, 8, 16, 32):
        row = ((np.arange(224) // period) % 2 * 255).astype(np.uint8)
        stripes.append(np.repeat(np.repeat(row[None, :, None], 224, 0), 3, 2))
    return noise + flat + stripes


def slide_cells(slide: str, cfg, n: int, seed: int) -> list[np.ndarray]:
    from pipeline.wsi.crops import read_crops
    from pipeline.wsi.detection import detect_slide
    from pipeline.wsi.readers import open_slide

    with open_slide(slide) as source:
        cells = detect_slide(source, cfg, progress=False)
        pick = np.sort(np.random.default_rng(seed).choice(len(cells), size=min(n, len(cells)), replace=False))
        print(f"slide: {len(cells)} cells detected, {len(pick)} sampled", file=sys.stderr)
        return read_crops(source, cells.iloc[pick], cfg.crop_margin)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="models/calibrated")
    ap.add_argument("--split", default="data/split/split.csv")
    ap.add_argument("--slide", default="../shared/data/slides/csf-breast-carcinoma-pap.tiff")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--n-slide", type=int, default=2000)
    ap.add_argument("--crops", type=int, default=8, help="random crops per natural image")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache", help="npz of the extracted logits/features: written once, then reused")
    args = ap.parse_args()

    import torch
    from sklearn.metrics import roc_auc_score

    from pipeline import ood
    from pipeline.config import load_params
    from pipeline.data.manifest import SPLIT_COLUMNS, read_table, source_root
    from pipeline.inference.predictor import TorchPredictor
    from pipeline.measurement import load_images

    params = load_params(args.params)
    torch.set_num_threads(params.train.num_threads or 2)
    predictor = TorchPredictor(args.model)
    split = read_table(args.split, SPLIT_COLUMNS)
    root = source_root(params.data.source)
    t0 = time.perf_counter()
    sets, labels = {}, {}
    for name in ("train", "val", "test"):
        rows = split[split["split"] == name]
        images, _ = load_images([root / p for p in rows["path"]])
        sets[name] = images
        labels[name] = np.array([predictor.labels.index(x) for x in rows["label"]])
    if args.cache and Path(args.cache).is_file():
        with np.load(args.cache, allow_pickle=False) as data:
            outputs = {
                name: (data[f"{name}/logits"], data[f"{name}/features"])
                for name in {k.split("/")[0] for k in data.files}
            }
    else:
        sets["csf slide"] = slide_cells(args.slide, params.slide, args.n_slide, args.seed)
        sets["natural photos"] = natural_images(args.crops, args.seed)
        sets["synthetic"] = synthetic_images(args.seed)
        outputs = {name: predictor.image_outputs(images, tta=False) for name, images in sets.items()}
        print(
            f"features: {', '.join(f'{k} {len(v)}' for k, v in sets.items())} in {time.perf_counter() - t0:.0f}s",
            file=sys.stderr,
        )
        if args.cache:
            np.savez(
                args.cache,
                **{f"{k}/{part}": v for k, (z, f) in outputs.items() for part, v in (("logits", z), ("features", f))},
            )

    pass_rate = params.ood.pass_rate if hasattr(params, "ood") else 0.95
    head = (
        f"{'method':<24}{'AUROC csf':>10}{'AUROC photos':>13}{'AUROC synth':>12}{'test pass':>10}"
        f"{'csf flagged':>12}{'photos flagged':>15}{'synth flagged':>14}"
    )
    n = {k: len(v[0]) for k, v in outputs.items()}
    print(
        f"in: Herlev test ({n['test']}), out: CSF slide cells ({n['csf slide']}) | natural photos "
        f"({n['natural photos']}) | synthetic noise/flat/stripes ({n['synthetic']}); threshold: {pass_rate:.0%} "
        "of val passes"
    )
    print(head)
    print("-" * len(head))
    for label, method, options in CANDIDATES:
        z, f = outputs["train"]
        params_ = ood.fit(f, labels["train"], method, **options)
        params_ = ood.set_threshold(params_, ood.score(params_, *reversed(outputs["val"])), pass_rate)
        s = {name: ood.score(params_, f_, z_) for name, (z_, f_) in outputs.items()}
        cells = [label]
        for out in ("csf slide", "natural photos", "synthetic"):
            y = np.r_[np.zeros(len(s["test"])), np.ones(len(s[out]))]
            cells.append(roc_auc_score(y, np.r_[s["test"], s[out]]))
        flagged = {name: float((~ood.in_domain(params_, v)).mean()) for name, v in s.items()}
        print(
            f"{cells[0]:<24}{cells[1]:>10.3f}{cells[2]:>13.3f}{cells[3]:>12.3f}{1 - flagged['test']:>10.3f}"
            f"{flagged['csf slide']:>12.3f}{flagged['natural photos']:>15.3f}{flagged['synthetic']:>14.3f}"
        )


if __name__ == "__main__":
    main()
