"""The MLflow pyfunc model, logged as code (no pickle): base64 images in, probabilities out.

Input: a DataFrame with a column `image` holding base64-encoded image file bytes.
Output: a DataFrame with one column `prob_<label>` per label (temperature-scaled once the model
is calibrated), `model_version`, `error`, and, for a calibrated model, `p_malignant` and `call`
(benign / malignant / indeterminate, from the model's own threshold and band; "out of domain"
for a cell the OOD guard rejects), `in_domain` and `ood_score` (higher = further from the
training domain; None for a model without a guard), then the cell's scale-free nuclear features
(N/C ratio, nuclear optical density, hyperchromasia, shape), `morph_reason` (why a nucleus was not
measured, else "") and the atypia scores (`atypia` is the one the model ships; docs/morphometry.md).

The same file serves both backends: an exported model (model.onnx + metadata.json) runs on
ONNX Runtime without torch; a torch model folder on eager torch.

A bad row (not base64, not an image, empty, truncated, too small...) does not fail the request:
its `error` is one line naming the row (numbered from 0) and the reason, its probabilities are
None (null in JSON) and its `call` is "error"; good rows are scored and have `error` "". Only a
request that is not a DataFrame with an `image` column and at least one row fails as a whole,
with an MlflowException that `mlflow models serve` answers with HTTP 400.
"""

from __future__ import annotations

import base64
import binascii

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.pyfunc import PythonModel

from pipeline.data.images import ImageError, decode_rgb
from pipeline.inference.predictor import open_predictor
from pipeline.morphometry.cells import IMAGE_COLUMNS
from pipeline.registry import UNREGISTERED

IMAGE_COLUMN = "image"


def encode_image_file(path) -> str:
    with open(path, "rb") as fh:
        return base64.b64encode(fh.read()).decode("ascii")


def _bad_input(message: str) -> MlflowException:
    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


def _decode_row(i: int, value) -> tuple[np.ndarray | None, str]:
    """(RGB array, "") for a good row; (None, "row i: reason") for a bad one."""

    if not isinstance(value, (str, bytes)) or not value:
        return None, f"row {i}: empty or not a string; expected base64-encoded image bytes"
    try:
        data = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        return None, f"row {i}: not valid base64"
    try:
        return np.asarray(decode_rgb(data, f"row {i}")[0]), ""
    except ImageError as exc:
        return None, str(exc)
    except Exception as exc:  # noqa: BLE001 - one odd row must not fail the others
        first = (str(exc).splitlines() or [""])[0]
        return None, f"row {i}: cannot decode: {type(exc).__name__}{': ' + first if first else ''}"


def decode_rows(model_input: pd.DataFrame) -> tuple[list[np.ndarray | None], list[str]]:
    """Per row of the `image` column: the RGB array (None if bad) and its error ("" if good).

    A malformed request as a whole raises MlflowException (HTTP 400)."""
    if not isinstance(model_input, pd.DataFrame) or IMAGE_COLUMN not in model_input.columns:
        raise _bad_input(f"input needs a column '{IMAGE_COLUMN}' of base64-encoded image files")
    if len(model_input) == 0:
        raise _bad_input("input has no rows: send at least one base64-encoded image")
    decoded = [_decode_row(i, value) for i, value in enumerate(model_input[IMAGE_COLUMN])]
    return [image for image, _ in decoded], [error for _, error in decoded]


def predict_frame(predictor, model_input: pd.DataFrame) -> pd.DataFrame:
    """Score a DataFrame of base64 images with a loaded predictor; bad rows get an `error`."""
    images, errors = decode_rows(model_input)
    good = np.array([image is not None for image in images])
    probs = np.full((len(images), len(predictor.labels)), np.nan)
    p = np.full(len(images), np.nan)
    calls = np.full(len(images), "error", dtype=object)
    ood_score = np.full(len(images), np.nan)
    in_domain = np.ones(len(images), dtype=bool)
    if good.any():
        scores = predictor.score([image for image in images if image is not None])
        probs[good], p[good], calls[good] = scores.probs, scores.p_malignant, scores.call
        ood_score[good], in_domain[good] = scores.ood_score, scores.in_domain
    out = pd.DataFrame(probs, columns=[f"prob_{label}" for label in predictor.labels])
    if predictor.calibrated:  # an uncalibrated model (the training run's) answers probabilities only
        out["p_malignant"] = p
        out["call"] = calls
    out["in_domain"] = in_domain.astype(object)
    # None, not NaN: the server writes NaN as a bare token that strict JSON parsers reject.
    out["ood_score"] = pd.Series(ood_score).astype(object).where(np.isfinite(ood_score), None)
    out = pd.concat([out, _morphometry(predictor, images, good)], axis=1)
    if not good.all():
        for column in out.columns.drop("call", errors="ignore"):
            out[column] = out[column].astype(object).where(good, None)
    out["model_version"] = predictor.registered_version or UNREGISTERED
    out["error"] = errors
    return out


def _morphometry(predictor, images, good) -> pd.DataFrame:
    """The scale-free nuclear features and atypia scores of the good rows (None where not measured)."""
    frame = pd.DataFrame(index=range(len(images)), columns=list(IMAGE_COLUMNS), dtype=object)
    if good.any():
        measured = predictor.measure([image for image in images if image is not None])[list(IMAGE_COLUMNS)]
        frame.loc[good] = measured.astype(object).where(measured.notna(), None).to_numpy()
    return frame


class CytologyModel(PythonModel):
    def load_context(self, context):

        self.predictor = open_predictor(context.artifacts["model_dir"])

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        return predict_frame(self.predictor, model_input)


mlflow.models.set_model(CytologyModel())
