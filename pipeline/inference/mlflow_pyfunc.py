"""The MLflow pyfunc model, logged as code (no pickle): base64 images in, probabilities out.

Input: a DataFrame with a column `image` holding base64-encoded image file bytes.
Output: a DataFrame with one column `prob_<label>` per label (temperature-scaled once the model
is calibrated), `model_version`, and, for a calibrated model, `p_malignant` and `call` (benign /
malignant / indeterminate, from the model's own threshold and band).

The same file serves both backends: an exported model (model.onnx + metadata.json) runs on
ONNX Runtime without torch; a torch model folder on eager torch. A bad row (not base64, not an
image, empty) fails the request with an MlflowException naming the row, which
`mlflow models serve` answers with HTTP 400 and keeps serving.
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

IMAGE_COLUMN = "image"


def encode_image_file(path) -> str:
    with open(path, "rb") as fh:
        return base64.b64encode(fh.read()).decode("ascii")


def input_example(source: str, split_csv) -> pd.DataFrame:
    """One real validation image, base64-encoded: the input example logged with the model."""
    from pipeline.data.manifest import SPLIT_COLUMNS, read_table, source_root

    split = read_table(split_csv, SPLIT_COLUMNS)
    first = split[split["split"] == "val"]["path"].iloc[0]
    return pd.DataFrame({IMAGE_COLUMN: [encode_image_file(source_root(source) / first)]})


def _bad_input(message: str) -> MlflowException:
    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


def decode_rows(model_input: pd.DataFrame) -> list[np.ndarray]:
    """RGB arrays from the `image` column; MlflowException (HTTP 400) naming the first bad row."""
    from pipeline.data.images import ImageError, decode_rgb

    if not isinstance(model_input, pd.DataFrame) or IMAGE_COLUMN not in model_input.columns:
        raise _bad_input(f"input needs a column '{IMAGE_COLUMN}' of base64-encoded image files")
    if len(model_input) == 0:
        raise _bad_input("input has no rows: send at least one base64-encoded image")
    images = []
    for i, value in enumerate(model_input[IMAGE_COLUMN]):
        if not isinstance(value, (str, bytes)) or not value:
            raise _bad_input(f"row {i}: empty or not a string; expected base64-encoded image bytes")
        try:
            data = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise _bad_input(f"row {i}: not valid base64") from None
        try:
            images.append(np.asarray(decode_rgb(data, f"row {i}")[0]))
        except ImageError as exc:
            raise _bad_input(str(exc)) from None
    return images


def predict_frame(predictor, model_input: pd.DataFrame) -> pd.DataFrame:
    """Score a DataFrame of base64 images with a loaded predictor."""
    probs = predictor.predict_proba(decode_rows(model_input))
    out = pd.DataFrame(probs, columns=[f"prob_{label}" for label in predictor.labels])
    calibration = predictor.calibration
    if calibration:
        from pipeline.calibration import Band

        out["p_malignant"] = predictor.malignant_probability(probs)
        out["call"] = Band(calibration["threshold"], calibration["band_width"]).call(out["p_malignant"].to_numpy())
    from pipeline.inference.loading import UNREGISTERED

    out["model_version"] = predictor.registered_version or UNREGISTERED
    return out


class CytologyModel(PythonModel):
    def load_context(self, context):
        from pipeline.inference.predictor import open_predictor

        self.predictor = open_predictor(context.artifacts["model_dir"])

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        return predict_frame(self.predictor, model_input)


mlflow.models.set_model(CytologyModel())
