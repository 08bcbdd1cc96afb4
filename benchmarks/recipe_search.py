"""The recipe-search table: out-of-fold evidence of each DVC experiment of the cv stage, in one table.

    python benchmarks/recipe_search.py --runs DIR [--ensemble a+b ...] [--out reports/recipe_search.md]

DIR holds, per experiment NAME (made with `dvc exp run cv -n NAME -S ...`), its `NAME.oof.csv`
and `NAME.metrics.json` (copies of reports/cv/oof.csv and metrics.json) and one line in
`runs.csv` (columns: name, command, seconds, arch, image_size). For every run the table gives the
pooled OOF AUC with its group-bootstrap 95% CI, single view and with 8-view TTA, the specificity
at the 0.95-sensitivity threshold, the mean ± sd of the per-fold AUC, training minutes, and the
eager-torch inference speed of its architecture and input size (batch 32, every core, measured
here in one run). `--ensemble a+b` adds the OOF evidence of the mean P(malignant) of runs a and b (their
fold models saw the same folds, so the average is still out of fold). Mean ± sd over seeds
comes from runs named `<recipe>-seed<N>` (with the run named `<recipe>` itself, at the default seed).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

BENIGN_CLASSES = ("normal_superficiel", "normal_intermediate", "normal_columnar")  # Herlev's own grouping


def labels_of(oof) -> list[str]:
    return [c.removeprefix("logit_") for c in oof.columns if c.startswith("logit_")]


def oof_evidence(oof, view: str, n_boot: int = 1000) -> dict:
    """AUC [CI] and specificity at the sensitivity-0.95 threshold of one view's logits; binary
    truth from Herlev's grouping of the original classes, so binary and 7-class runs compare."""
    from pipeline.calibration import choose_threshold, malignant_probability
    from pipeline.measurement import logit_columns
    from pipeline.metrics import metrics_with_ci

    labels = labels_of(oof)
    positive = ["malignant"] if labels == ["benign", "malignant"] else [x for x in labels if x not in BENIGN_CLASSES]
    y = (~oof["original_class"].isin(BENIGN_CLASSES)).to_numpy().astype(int)
    p = malignant_probability(oof[logit_columns(labels, view)].to_numpy(float), labels, positive)
    t = choose_threshold(y, p, "sensitivity", 0.95)["threshold"]
    m = metrics_with_ci(y, p, oof["group"].astype(str).to_numpy(), t, n_boot=n_boot, seed=42)
    return {
        "auc": m["roc_auc"]["value"],
        "low": m["roc_auc"]["ci_low"],
        "high": m["roc_auc"]["ci_high"],
        "spec": m["specificity"]["value"],
        "p": p,
    }


def inference_speed(arch: str, size: int, batches: int = 5, rounds: int = 5) -> float:
    """Eager-torch img/s at batch 32 on every core: the median of `rounds` timings of `batches` batches
    (one round of 3 batches ranked lite2 above lite0 at 128 px: noise)."""
    import statistics

    import torch

    from pipeline.models.backbones import build_model

    model = build_model(arch, 2, None).eval().to(memory_format=torch.channels_last)
    x = torch.randn(32, 3, size, size).contiguous(memory_format=torch.channels_last)
    rates = []
    with torch.inference_mode():
        model(x)
        for _ in range(rounds):
            t = time.perf_counter()
            for _ in range(batches):
                model(x)
            rates.append(32 * batches / (time.perf_counter() - t))
    return statistics.median(rates)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", required=True, type=Path)
    ap.add_argument("--ensemble", nargs="*", default=[])
    ap.add_argument("--out", type=Path, default=Path("reports/recipe_search.md"))
    ap.add_argument(
        "--no-speed",
        action="store_true",
        help="skip the inference-speed column (a busy machine measures nothing useful)",
    )
    args = ap.parse_args()

    import numpy as np
    import pandas as pd

    from pipeline import atomic

    runs = pd.read_csv(args.runs / "runs.csv")
    oofs = {r.name: pd.read_csv(args.runs / f"{r.name}.oof.csv", dtype={"group": str}) for r in runs.itertuples()}
    speeds = {}
    lines = [
        "| run | OOF AUC [95% CI] | with TTA | specificity at sens. 0.95 | fold AUC mean ± sd | train min | "
        "infer img/s (torch) | command |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in runs.itertuples():
        metrics = json.loads((args.runs / f"{r.name}.metrics.json").read_text())
        single, tta = oof_evidence(oofs[r.name], "logit_"), oof_evidence(oofs[r.name], "tta_logit_")
        key = (r.arch, int(r.image_size))
        if not args.no_speed:
            speeds.setdefault(key, inference_speed(*key))
        speed = f"{speeds[key]:.0f}" if key in speeds else "not measured"
        lines.append(
            f"| {r.name} | {single['auc']:.4f} [{single['low']:.4f}, {single['high']:.4f}] | "
            f"{tta['auc']:.4f} [{tta['low']:.4f}, {tta['high']:.4f}] | {single['spec']:.3f} | "
            f"{metrics['auc_mean']:.4f} ± {metrics['auc_sd']:.4f} | {r.seconds / 60:.1f} | "
            f"{speed} | `{r.command}` |"
        )
    for combo in args.ensemble:
        # mean P(malignant) in logit space (2-class logits), so binary and 7-class runs can be averaged
        names = combo.split("+")
        base = oofs[names[0]].set_index("path")[["group", "original_class", "label"]]
        frame = base.copy()
        for view in ("logit_", "tta_logit_"):
            p = sum(
                pd.Series(oof_evidence(oofs[n], view, n_boot=1)["p"], index=oofs[n]["path"]).loc[base.index]
                for n in names
            ) / len(names)
            frame[f"{view}benign"] = 0.0
            frame[f"{view}malignant"] = np.log(p.clip(1e-6, 1 - 1e-6) / (1 - p.clip(1e-6, 1 - 1e-6)))
        frame = frame.reset_index()
        e, et = oof_evidence(frame, "logit_"), oof_evidence(frame, "tta_logit_")
        lines.append(
            f"| ensemble {' + '.join(names)} | {e['auc']:.4f} [{e['low']:.4f}, {e['high']:.4f}] | "
            f"{et['auc']:.4f} [{et['low']:.4f}, {et['high']:.4f}] | {e['spec']:.3f} | | | "
            f"(÷{len(names)}) | mean P(malignant) |"
        )
    seeds = {}
    for r in runs.itertuples():
        m = re.fullmatch(r"(.+)-seed\d+", r.name)
        if m:
            if m.group(1) in oofs and m.group(1) not in seeds:  # the recipe's own run: the default seed
                seeds[m.group(1)] = [oof_evidence(oofs[m.group(1)], "logit_")["auc"]]
            seeds.setdefault(m.group(1), []).append(oof_evidence(oofs[r.name], "logit_")["auc"])
    text = "\n".join(lines)
    for recipe, aucs in seeds.items():
        s = pd.Series(aucs)
        text += f"\n\n{recipe}: OOF AUC {s.mean():.4f} ± {s.std():.4f} over {len(aucs)} seeds ({', '.join(f'{a:.4f}' for a in aucs)})"
    atomic.write_text(args.out, text + "\n")
    print(text)


if __name__ == "__main__":
    main()
