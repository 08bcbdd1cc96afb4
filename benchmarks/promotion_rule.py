"""How often does the promotion rule refuse a good model, or pass a weak one? A simulation.

    python benchmarks/promotion_rule.py [--params params.yaml] [--oof reports/cv/oof.csv]
                                        [--split data/split/split.csv] [--sims 4000]

Sizes come from the real files: benign/malignant counts of the out-of-fold predictions and of the
test split. Cells of one field of view are correlated, so the OOF AUC's interval is wider than a
cell-level formula says; the design effect (group-bootstrap variance / cell-bootstrap variance of
the OOF AUC, measured on oof.csv) scales it. Printed: the rejection rate of the rule in params.yaml
and of the old rule (test AUC >= 0.97 and test sensitivity >= 0.95 only) for true AUCs 0.93-0.99.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def design_effect(oof_csv: Path, positive_labels: list[str], labels: list[str], n_boot: int = 1000) -> float:
    """Group-bootstrap variance over cell-bootstrap variance of the pooled OOF AUC."""
    import numpy as np
    import pandas as pd

    from pipeline.calibration import malignant_probability
    from pipeline.measurement import logit_columns
    from pipeline.metrics import group_bootstrap_ci

    oof = pd.read_csv(oof_csv, dtype={"group": str})
    y = oof["label"].isin(positive_labels).to_numpy().astype(int)
    p = malignant_probability(oof[logit_columns(labels)].to_numpy(float), labels, positive_labels)

    def width(groups):
        lo, hi = group_bootstrap_ci(y, p, groups, 0.5, n_boot=n_boot, seed=0)["roc_auc"]
        return hi - lo

    return float((width(oof["group"].to_numpy()) / width(np.arange(len(oof)))) ** 2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--oof", default="reports/cv/oof.csv")
    ap.add_argument("--split", default="data/split/split.csv")
    ap.add_argument("--sims", type=int, default=4000)
    args = ap.parse_args()

    import pandas as pd

    from pipeline.config import LabelMap, PromotionConfig, load_params
    from pipeline.promotion import rejection_rates

    params = load_params(args.params)
    positive = params.evaluate.positive_labels
    label_map = LabelMap.load(params.data.label_map)
    labels = list(label_map.labels)
    oof = pd.read_csv(args.oof)
    test = pd.read_csv(args.split).query("split == 'test'")

    def count(frame):  # (benign, malignant) by the label map, whatever labels the file was made with
        malignant = frame["original_class"].map(label_map.classes).isin(positive)
        return int((~malignant).sum()), int(malignant.sum())

    n_oof, n_test = count(oof), count(test)
    deff = design_effect(Path(args.oof), positive, labels)
    rule, old = params.promotion, PromotionConfig(min_oof_auc_ci_low=0.0, min_auc=0.97, min_sensitivity=0.95)
    print(
        f"OOF (benign, malignant) {n_oof}, test {n_test}; design effect {deff:.2f} (from {args.oof}); "
        f"{args.sims} simulated runs each; binormal scores; threshold fitted on the simulated OOF for "
        f"sensitivity {params.evaluate.target_sensitivity}"
    )
    print(
        f"rule: OOF AUC lower bound >= {rule.min_oof_auc_ci_low}, test AUC >= {rule.min_auc}, "
        f"test sensitivity >= {rule.min_sensitivity}"
    )
    print("| true AUC | P(refuse) rule | by OOF bound | by test AUC | by test sensitivity | P(refuse) old rule |")
    print("|---|---|---|---|---|---|")
    for auc in (0.93, 0.95, 0.96, 0.97, 0.98, 0.985, 0.99):
        kw = {
            "n_oof": n_oof,
            "n_test": n_test,
            "target_sensitivity": params.evaluate.target_sensitivity,
            "design_effect": deff,
            "n_sim": args.sims,
        }
        r, o = rejection_rates(auc, rule, **kw), rejection_rates(auc, old, **kw)
        print(
            f"| {auc} | {r['reject']:.3f} | {r['reject_oof_bound']:.3f} | {r['reject_test_auc']:.3f} | "
            f"{r['reject_test_sensitivity']:.3f} | {o['reject']:.3f} |"
        )


if __name__ == "__main__":
    main()
