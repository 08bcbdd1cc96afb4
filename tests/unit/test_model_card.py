"""pipeline/model_card.py: the model folder's card reads and writes every key it was given, types
what the code reads, and refuses missing, changed or unlisted files with one line."""

from __future__ import annotations

import dataclasses
import json

import pytest

from pipeline.model_card import (
    META_FILE,
    ONNX_META_FILE,
    WEIGHTS_FILE,
    Calibration,
    ModelCard,
    ModelDirError,
    OodGuard,
    file_sha256,
)

TRAINED = {
    "arch": "timm/tf_efficientnet_lite0",
    "labels": ["benign", "malignant"],
    "positive_label": "malignant",
    "image_size": 128,
    "mean": [0.485, 0.456, 0.406],
    "std": [0.229, 0.224, 0.225],
    "interpolation": "bicubic",
    "resize": "long side to image_size, pad square by repeating the edge",
    "label_map": "configs/x.yaml",
    "label_map_classes": {"a": "benign"},
    "best_epoch": 8,
    "fit_on": "train+val",
    "keep": "last",
    "val_metrics": {"val_auc": None},
    "config_hash": "abc",
    "split_sha256": "def",
    "init_from": None,
    "training": {"world_size": 1},
    "sha256": {"model.pt": "00"},
    "mlflow": {"run_id": "r", "version": "3", "registered_model": "cytology-classifier"},
}
CALIBRATED = {
    **TRAINED,
    "calibration": {
        "temperature": 1.3,
        "tta": False,
        "positive_labels": ["malignant"],
        "threshold": 0.41,
        "threshold_rule": "sensitivity",
        "target_sensitivity": 0.95,
        "band_width": 0.1,
        "band": [0.36, 0.46],
        "validation": {"n": 613},
    },
    "test_metrics": {"roc_auc": 0.96},
    "card": {"promotion": "not promoted"},
    "ood": {
        "file": "ood.npz",
        "method": "mahalanobis",
        "threshold": 12.5,
        "pass_rate": 0.95,
        "val_pass_rate": 0.95,
        "feature_dim": 1280,
        "shrinkage": 0.1,
        "test_pass_rate": 0.9,
    },
}


def test_a_calibrated_card_survives_a_round_trip_key_for_key():
    card = ModelCard.from_dict(CALIBRATED)
    assert card.to_dict() == CALIBRATED
    assert card.image_size == 128 and card.calibration.threshold == 0.41 and card.ood.settings == {"shrinkage": 0.1}
    assert card.version == "3" and card.positive_labels() == ("malignant",) and card.outputs == ()


def test_unknown_keys_are_kept_and_defaults_fill_an_old_card():
    old = {k: v for k, v in TRAINED.items() if k not in ("interpolation", "resize", "fit_on", "positive_label")}
    card = ModelCard.from_dict({**old, "from_a_newer_version": [1, 2]})
    assert card.unknown == {"from_a_newer_version": [1, 2]}
    assert card.to_dict()["from_a_newer_version"] == [1, 2]
    assert card.fit_on == "train" and card.calibration is None and card.positive_labels() == ()
    # the one fallback for a model that was never calibrated
    assert card.calibration_or_default == Calibration() and Calibration().threshold == 0.5


def test_an_exported_card_carries_its_onnx_facts(tmp_path):
    exported = {
        **CALIBRATED,
        "format": "onnx",
        "onnx_file": "model.onnx",
        "opset": 17,
        "input_name": "input",
        "outputs": ["logits", "cam", "features"],
        "preprocessing": {"layout": "NCHW"},
        "temperature": 1.3,
        "threshold": 0.41,
        "indeterminate_band": [0.36, 0.46],
        "source": {"version": "3"},
        "validation": {"max_abs_diff": 1e-6},
        "quantization": None,
        "registered_version": "4",
        "registered_model": "cytology-classifier",
    }
    exported.pop("mlflow")
    (tmp_path / ONNX_META_FILE).write_text(json.dumps(exported))
    card = ModelCard.read(tmp_path)
    assert card.export.outputs == ("logits", "cam", "features") and card.version == "4"
    assert card.to_dict() == exported
    assert card.write(tmp_path).name == ONNX_META_FILE


def test_reading_refuses_what_is_not_a_card(tmp_path):
    with pytest.raises(ModelDirError, match="not a model folder"):
        ModelCard.read(tmp_path)
    (tmp_path / META_FILE).write_text("{broken")
    with pytest.raises(ModelDirError, match=f"{META_FILE}: invalid JSON"):
        ModelCard.read(tmp_path)
    (tmp_path / META_FILE).write_text(json.dumps({"labels": ["a"]}))
    with pytest.raises(
        ModelDirError,
        match=rf"{META_FILE}: not a model card this version reads \(missing arch, image_size, mean, std\)",
    ):
        ModelCard.read(tmp_path)


def test_verify_refuses_missing_changed_and_unlisted_files(tmp_path):
    weights = tmp_path / WEIGHTS_FILE
    weights.write_bytes(b"weights")
    card = ModelCard.from_dict({**TRAINED, "sha256": {}}).with_file(WEIGHTS_FILE, file_sha256(weights))
    assert card.verify(tmp_path, WEIGHTS_FILE) == weights
    weights.write_bytes(b"changed")
    with pytest.raises(ModelDirError, match="sha256 does not match model.json"):
        card.verify(tmp_path, WEIGHTS_FILE)
    (tmp_path / "extra.onnx").write_bytes(b"x")
    with pytest.raises(ModelDirError, match="sha256 does not match"):  # a file the card does not list
        card.verify(tmp_path, "extra.onnx")
    with pytest.raises(ModelDirError, match="gone.pt missing"):
        card.verify(tmp_path, "gone.pt")
    with pytest.raises(ModelDirError, match="missing"):  # never a path outside the folder
        card.verify(tmp_path, "../" + tmp_path.name + "/" + WEIGHTS_FILE)


def test_a_stage_changes_a_card_by_replacing_it(tmp_path):
    card = ModelCard.from_dict(TRAINED)
    guard = OodGuard.from_summary(
        {"method": "mahalanobis", "threshold": 3.0, "pass_rate": 0.95, "val_pass_rate": 0.94, "feature_dim": 8},
        test_pass_rate=0.9,
    )
    calibrated = dataclasses.replace(
        card.with_file("ood.npz", "11"), ood=guard, calibration=Calibration.from_dict(CALIBRATED["calibration"])
    )
    calibrated.write(tmp_path)
    again = ModelCard.read(tmp_path)
    assert again == calibrated and again.sha256 == {"model.pt": "00", "ood.npz": "11"}
    assert again.to_dict()["ood"]["test_pass_rate"] == 0.9 and card.ood is None  # the original is untouched
