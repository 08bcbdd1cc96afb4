"""Do two models (or two ONNX files of one model) pick the same suspicious cells on a slide?

    python benchmarks/slide_agreement.py CELLS_CSV [--model models/exported] [--files model.onnx model.int8.onnx]
        [--other-model DIR] [--slide ../shared/data/slides/csf-breast-carcinoma-pap.tiff] [--top 200]

CELLS_CSV is a `score-slide` cells.csv of the slide (or `benchmarks/slide_throughput.py --save-cells`).
Every cell's crop is cut as score-slide cuts it and scored by both; the script prints the overlap of
the `--top` cells with the highest P(malignant) (issue 14 asks >= 90% for a cheaper model against
the reference one) and the Spearman correlation of the two scores. By default it compares the float
and the int8 graph of one exported folder.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("cells", type=Path)
    ap.add_argument("--model", default=ROOT / "models/exported", type=Path)
    ap.add_argument(
        "--files",
        nargs=2,
        default=["model.onnx", "model.int8.onnx"],
        metavar=("A", "B"),
        help="the two ONNX files of --model to compare (default: float vs int8)",
    )
    ap.add_argument("--other-model", type=Path, help="compare --model's served file with this folder's instead")
    ap.add_argument("--slide", default=ROOT.parent / "shared/data/slides/csf-breast-carcinoma-pap.tiff", type=Path)
    ap.add_argument("--params", default=ROOT / "params.yaml", type=Path)
    ap.add_argument("--top", type=int, default=200)
    ap.add_argument("--save", type=Path, help="write both scores per cell to this CSV")
    args = ap.parse_args()

    import pandas as pd
    from scipy.stats import spearmanr

    from pipeline.config import load_params
    from pipeline.inference.predictor import OnnxPredictor
    from pipeline.inference.slide_scoring import score_cells
    from pipeline.wsi.readers import open_slide

    cfg = load_params(args.params).slide
    cells = pd.read_csv(args.cells)
    if args.other_model:
        pair = [(str(args.model), OnnxPredictor(args.model)), (str(args.other_model), OnnxPredictor(args.other_model))]
    else:
        pair = [(f"{args.model}/{f}", OnnxPredictor(args.model, file=f)) for f in args.files]
    scores = []
    with open_slide(args.slide) as source:
        for name, predictor in pair:
            t = time.perf_counter()
            scores.append(score_cells(predictor, source, cells, cfg, tta=False, progress=False).p_malignant)
            print(f"{name}: {len(cells)} cells scored in {time.perf_counter() - t:.1f} s", file=sys.stderr)
    if args.save:
        cells.assign(score_a=scores[0], score_b=scores[1]).to_csv(args.save, index=False)
    top = [set(pd.Series(s).nlargest(args.top).index) for s in scores]
    rho = spearmanr(scores[0], scores[1]).statistic
    print(f"{pair[0][0]} vs {pair[1][0]} on {len(cells)} cells of {args.slide.name}:")
    print(f"  top-{args.top} overlap: {len(top[0] & top[1]) / args.top:.3f} (target >= 0.90)")
    print(f"  Spearman correlation of P(malignant): {rho:.4f}")
    for (name, _), s in zip(pair, scores):
        print(
            f"  {name}: {int((s >= 0.5).sum())} cells with P >= 0.5, {int((s >= 0.99).sum())} with P >= 0.99, "
            f"score of the {args.top}th cell {float(pd.Series(s).nlargest(args.top).iloc[-1]):.4f}"
        )


if __name__ == "__main__":
    main()
