"""The MLflow pyfunc model, logged as code (no pickle): base64 images in, probabilities out.

Input: a DataFrame with a column `image` holding base64-encoded image file bytes.
Output: a DataFrame with one column `prob_<label>` per label (temperature-scaled once the model
is calibrated) and, for a calibrated model, `p_malignant` and `call` (benign / malignant /
indeterminate, from the model's own threshold and band).
"""
from __future__ import annotations

import base64

import mlflow
import numpy as np
import pandas as pd
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


def predict_frame(predictor, model_input: pd.DataFrame) -> pd.DataFrame:
    """Score a DataFrame of base64 images with a loaded predictor."""
    from pipeline.data.images import decode_rgb

    images = [np.asarray(decode_rgb(base64.b64decode(b), f"row {i}")[0])
              for i, b in enumerate(model_input[IMAGE_COLUMN])]
    probs = predictor.predict_proba(images)
    out = pd.DataFrame(probs, columns=[f"prob_{label}" for label in predictor.labels])
    calibration = predictor.calibration
    if calibration:
        from pipeline.calibration import Band

        out["p_malignant"] = predictor.malignant_probability(probs)
        out["call"] = Band(calibration["threshold"], calibration["band_width"]).call(out["p_malignant"].to_numpy())
    return out


class CytologyModel(PythonModel):
    def load_context(self, context):
        from pipeline.inference.predictor import TorchPredictor

        self.predictor = TorchPredictor(context.artifacts["model_dir"])

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        return predict_frame(self.predictor, model_input)


mlflow.models.set_model(CytologyModel())
