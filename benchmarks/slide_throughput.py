"""Score the whole CSF slide and print the wall time of each step, cells/s and peak RSS.

    python benchmarks/slide_throughput.py [--model models/exported] [--slide ../shared/data/slides/csf-breast-carcinoma-pap.tiff]

The whole table of issue 6 (bare ONNX Runtime, predict, slide) is benchmarks/inference_throughput.py.

Goal on this 2-core machine: the whole slide in <= 90 s, peak RSS < 4 GiB.
"""
from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="models/exported")
    ap.add_argument("--slide", default="../shared/data/slides/csf-breast-carcinoma-pap.tiff")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None)
    args = ap.parse_args()

    import torch

    from pipeline.config import load_params
    from pipeline.inference.score_slide import score_slide

    params = load_params(args.params)
    torch.set_num_threads(params.train.num_threads or 2)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        summary = score_slide(args.slide, args.model, Path(out), params.slide, tta=args.tta, log=lambda *_: None)
    wall = time.perf_counter() - start
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    n = summary["n_cells"]
    print(f"slide {args.slide}: {summary['width']}x{summary['height']} px, {n} cells, tta={summary['tta']}")
    print(f"{'step':<40}{'seconds':>9}")
    for step, s in summary["seconds"].items():
        print(f"{step:<40}{s:>9.1f}")
    print(f"{'wall (incl. imports)':<40}{wall:>9.1f}")
    info = summary["inference"]
    print(f"backend {info['backend']}, schedule {info['schedule']}, detect workers {info['detect_workers']}; "
          f"{info['seconds_in_model']:.1f}s in the model = {info['cells_per_second'] or 0:.1f} cells/s")
    print(f"peak RSS: {peak_gib:.2f} GiB (target < 4)")


if __name__ == "__main__":
    main()
