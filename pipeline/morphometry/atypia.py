"""Two atypia scores from the nuclear features, both in [0, 1]:

- `criteria_score`: the criteria cytopathologists use, with fixed weights (nothing fitted, so nothing
  learnt from one specimen's quirks): a high nuclear-to-cytoplasmic ratio (the Paris System's main
  criterion), hyperchromasia (nuclear OD over the cell's own cytoplasm), an irregular nuclear outline,
  and, where the scale is known, an enlarged nucleus. The shipped default.
- `LogisticAtypia`: a logistic regression on the standardised scale-free features, fitted on the train
  split; its coefficients travel with the model as JSON (no pickle), sha256-checked by the model card.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline import atomic
from pipeline.errors import CytopipeError
from pipeline.model_card import ATYPIA_FILE  # noqa: F401 - the file name lives with the card
from pipeline.morphometry.features import SCALE_FREE

ATYPIA_METHODS = ("criteria", "logistic")


class AtypiaModelError(CytopipeError):
    """An atypia model file is missing, malformed or fails its checksum."""


# As the Paris System reads a cell: the N/C ratio is the major criterion, and hyperchromasia and an
# irregular nuclear outline raise the suspicion of a cell that meets it (a dark nucleus in a cell with
# little N/C is pyknosis, a benign change). Each criterion maps a feature onto [0, 1] between a `normal`
# and an `atypical` anchor from the cytology literature, not fitted: N/C about 0.2 in intermediate
# squamous or mesothelial cells, >= 0.7 the Paris System's high-grade threshold; a nucleus 1.5x as dark
# as its cytoplasm is ordinary, 3x hyperchromatic; a convex outline (irregularity 0) against one 15%
# longer than its hull (notched, lobed); lymphocyte nuclei are ~7 um, carcinoma nuclei usually >= 12 um.
MAJOR = ("nc_ratio", 0.2, 0.7)
MINOR = {"hyperchromasia": (1.5, 3.0), "contour_irregularity": (0.0, 0.15)}
ENLARGEMENT_UM = (7.0, 12.0)


def _ramp(values, normal: float, atypical: float) -> np.ndarray:
    return np.clip((np.asarray(values, float) - normal) / (atypical - normal), 0.0, 1.0)


def criteria_score(features: pd.DataFrame) -> np.ndarray:
    """N/C x (1/2 + the mean of the minor criteria / 2), in [0, 1]; NaN where the nucleus was not measured.

    Where the nuclear diameter in µm is known, enlargement gates the score too: a high N/C ratio in a
    small dark nucleus is a lymphocyte, not atypia (on the CSF slide, most cells are lymphocytes)."""
    name, lo, hi = MAJOR
    minor = sum(_ramp(features[k], *anchors) for k, anchors in MINOR.items()) / len(MINOR)
    score = _ramp(features[name], lo, hi) * (0.5 + 0.5 * minor)
    missing = features[[name, *MINOR]].isna().any(axis=1).to_numpy()
    if "nucleus_diameter_um" in features:
        diameter = features["nucleus_diameter_um"].to_numpy(float)
        known = np.isfinite(diameter)
        score = np.where(known, score * _ramp(np.where(known, diameter, 0.0), *ENLARGEMENT_UM), score)
    return np.where(missing, np.nan, score)


@dataclass(frozen=True)
class LogisticAtypia:
    """P(atypical) = sigmoid(intercept + coef . (x - mean) / scale) over `features` (scale-free)."""

    features: tuple[str, ...]
    mean: tuple[float, ...]
    scale: tuple[float, ...]
    coef: tuple[float, ...]
    intercept: float
    fitted_on: str = ""

    @classmethod
    def fit(cls, features: pd.DataFrame, atypical: np.ndarray, fitted_on: str, c: float = 1.0) -> LogisticAtypia:
        """Fit on the rows with every feature measured (L2, C=`c`, balanced classes)."""
        from sklearn.linear_model import LogisticRegression

        x = features[list(SCALE_FREE)].to_numpy(float)
        ok = np.isfinite(x).all(axis=1)
        if ok.sum() < 10 or len(set(np.asarray(atypical)[ok].tolist())) < 2:
            raise AtypiaModelError(f"too few measured cells of both classes to fit ({int(ok.sum())} measured)")
        mean, scale = x[ok].mean(axis=0), x[ok].std(axis=0)
        scale[scale == 0] = 1.0
        model = LogisticRegression(C=c, class_weight="balanced", max_iter=1000)
        model.fit((x[ok] - mean) / scale, np.asarray(atypical)[ok].astype(int))
        return cls(
            tuple(SCALE_FREE),
            tuple(map(float, mean)),
            tuple(map(float, scale)),
            tuple(map(float, model.coef_[0])),
            float(model.intercept_[0]),
            fitted_on,
        )

    def score(self, features: pd.DataFrame) -> np.ndarray:
        x = (features[list(self.features)].to_numpy(float) - np.array(self.mean)) / np.array(self.scale)
        z = x @ np.array(self.coef) + self.intercept
        return 1.0 / (1.0 + np.exp(-z))  # NaN features give NaN

    def to_dict(self) -> dict:
        return {"method": "logistic", **asdict(self)}

    def write(self, path: Path) -> None:
        atomic.write_json(Path(path), self.to_dict())

    @classmethod
    def read(cls, path: Path) -> LogisticAtypia:
        """Read a model written by `write` (JSON only; the caller checks its sha256 against the card)."""
        path = Path(path)
        try:
            data = json.loads(path.read_text())
            fields = {k: data[k] for k in ("features", "mean", "scale", "coef", "intercept")}
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise AtypiaModelError(f"{path}: not an atypia model file ({exc})") from None
        lengths = {len(fields[k]) for k in ("features", "mean", "scale", "coef")}
        if len(lengths) != 1 or not set(fields["features"]) <= set(SCALE_FREE):
            raise AtypiaModelError(f"{path}: features, mean, scale and coef disagree or name unknown features")
        values = [*fields["mean"], *fields["scale"], *fields["coef"], fields["intercept"]]
        if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
            raise AtypiaModelError(f"{path}: coefficients must be finite numbers")
        return cls(
            tuple(fields["features"]),
            tuple(map(float, fields["mean"])),
            tuple(map(float, fields["scale"])),
            tuple(map(float, fields["coef"])),
            float(fields["intercept"]),
            str(data.get("fitted_on", "")),
        )
