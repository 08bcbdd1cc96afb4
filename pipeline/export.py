"""Export stage: the calibrated torch model -> an ONNX model folder that needs no torch to run.

The folder holds `model.onnx` (dynamic batch axis; outputs `logits`, `cam`, the class
activation maps behind the report's saliency, and `features`, the pooled penultimate layer that
the OOD guard scores), `ood.npz` (the guard, listed with its sha256) and `metadata.json`: preprocessing, labels,
calibration (temperature, threshold, indeterminate band), the source MLflow model version and
the sha256 of every ONNX file, checked on every load. Before anything is written, ONNX Runtime's
probabilities must match torch's within `export.tolerance` on real images; otherwise the stage
fails. With `export.quantize`, an int8 copy (`model.int8.onnx`, ONNX Runtime static QDQ
quantization calibrated on train images) is made too; it is served (`onnx_file` in the
metadata) only if its test AUC is within `export.max_auc_drop` of the float model's. The folder
is then logged to MLflow as a pyfunc over ONNX Runtime, registered, and takes over the source
version's aliases, so `models:/cytology-classifier@champion` resolves to it.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

from pipeline import atomic, ood, tracking
from pipeline.card_markdown import CARD_FILE
from pipeline.config import ExportConfig, Params
from pipeline.data.images import ImageError, load_rgb
from pipeline.data.manifest import SPLIT_COLUMNS, read_table
from pipeline.errors import CytopipeError
from pipeline.inference.predictor import OnnxPredictor, TorchPredictor
from pipeline.morphometry import model_files
from pipeline.model_card import INT8_FILE, ONNX_FILE, WEIGHTS_FILE, ModelCard, OnnxExport, file_sha256
from pipeline.tracking import input_example

INPUT_NAME = "input"
OUTPUTS = ("logits", "cam", "features")  # features: the pooled penultimate layer the OOD guard scores
OOD_RTOL = 1e-3  # max |OOD score (ONNX) - OOD score (torch)|, relative to the guard's threshold
# The served ONNX model's own needs: no torch, timm or albumentations.
ONNX_REQUIREMENTS = ("onnxruntime", "mlflow", "numpy", "pandas", "pillow", "opencv-python-headless")
PREPROCESSING = {
    "color": "RGB, uint8",
    "resize": "long side to image_size, bicubic (OpenCV INTER_CUBIC); aspect kept",
    "pad": "centred to image_size x image_size, edge pixels replicated",
    "scale": "x / 255",
    "normalize": "(x - mean) / std, per channel",
    "layout": "NCHW float32",
}


class ExportError(CytopipeError, RuntimeError):
    """The export could not be made or did not match the torch model."""


def _graph(model):
    """The module to trace: logits, plus class activation maps when the backbone allows them.

    For a global-average-pooled linear head, the CAM (classifier weights applied to the last
    feature map, ReLU) equals Grad-CAM at that layer, and needs no gradients: ONNX can serve it.
    """
    import torch
    import torch.nn.functional as F

    class WithCam(torch.nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x):
            features = self.net.forward_features(x)
            pooled = self.net.forward_head(features, pre_logits=True)
            logits = self.net.get_classifier()(pooled)
            weight = self.net.get_classifier().weight
            cam = F.relu(F.conv2d(features, weight[:, :, None, None]))
            return logits, cam, pooled

    has_cam = all(hasattr(model, a) for a in ("forward_features", "forward_head", "get_classifier")) and isinstance(
        getattr(model, "get_classifier")(), torch.nn.Linear
    )
    return (WithCam(model) if has_cam else model).eval(), has_cam


def static_same_padding(model, image_size: int):
    """A copy of `model` whose TF-style 'same' convolutions pad by fixed amounts for this input
    size. timm computes that padding from the input's shape at run time; traced with a dynamic
    batch axis it becomes shape arithmetic that ONNX Runtime cannot fold, which cost about a
    quarter of the throughput here. Same arithmetic, so outputs are identical."""
    import copy

    import torch
    from timm.layers.conv2d_same import Conv2dSame
    from timm.layers.padding import pad_same_arg

    model = copy.deepcopy(model).eval()
    sizes: dict[str, list[int]] = {}
    hooks = [
        m.register_forward_pre_hook(lambda _m, inp, name=name: sizes.__setitem__(name, list(inp[0].shape[-2:])))
        for name, m in model.named_modules()
        if isinstance(m, Conv2dSame)
    ]
    with torch.no_grad():
        model(torch.zeros(1, 3, image_size, image_size))
    for hook in hooks:
        hook.remove()
    for name, size in sizes.items():
        same = model.get_submodule(name)
        conv = torch.nn.Conv2d(
            same.in_channels,
            same.out_channels,
            same.kernel_size,
            same.stride,
            0,
            same.dilation,
            same.groups,
            bias=same.bias is not None,
        )
        conv.load_state_dict(same.state_dict())
        pad = pad_same_arg(size, list(same.kernel_size), list(same.stride), list(same.dilation))
        parent, _, child = name.rpartition(".")
        setattr(
            model.get_submodule(parent) if parent else model, child, torch.nn.Sequential(torch.nn.ZeroPad2d(pad), conv)
        )
    return model


def export_onnx(model, path: Path, image_size: int, opset: int) -> list[str]:
    """Trace `model` to ONNX at `path` with a dynamic batch axis; returns the output names."""
    import warnings

    import torch

    graph, has_cam = _graph(static_same_padding(model, image_size))
    outputs = list(OUTPUTS if has_cam else OUTPUTS[:1])
    dummy = torch.zeros(2, 3, image_size, image_size)
    with warnings.catch_warnings():
        # The TorchScript exporter is the one that needs no onnxscript; its deprecation notice is noise here.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            graph,
            dummy,
            str(path),
            input_names=[INPUT_NAME],
            output_names=outputs,
            dynamic_axes={name: {0: "batch"} for name in [INPUT_NAME, *outputs]},
            opset_version=opset,
            dynamo=False,
        )
    return outputs


def compare(torch_predictor, onnx_predictor, images: list[np.ndarray]) -> float:
    """Max |P_onnx - P_torch| over the images' calibrated class probabilities (single view)."""
    p_torch = torch_predictor.score(images, tta=False).probs
    p_onnx = onnx_predictor.score(images, tta=False).probs
    return float(np.abs(p_onnx - p_torch).max())


def compare_ood(torch_predictor, onnx_predictor, images: list[np.ndarray]) -> dict:
    """How far ONNX Runtime's OOD scores are from torch's (single view), relative to the threshold."""
    torch_scores, onnx_scores = torch_predictor.score(images, tta=False), onnx_predictor.score(images, tta=False)
    s_torch, in_torch, s_onnx, in_onnx = (
        torch_scores.ood_score,
        torch_scores.in_domain,
        onnx_scores.ood_score,
        onnx_scores.in_domain,
    )
    scale = max(abs(float(torch_predictor.ood["threshold"])), 1e-6)
    return {
        "method": ood.method_of(torch_predictor.ood),
        "max_abs_diff": float(np.abs(s_onnx - s_torch).max()),
        "max_rel_diff": float(np.abs(s_onnx - s_torch).max() / scale),
        "rtol": OOD_RTOL,
        "in_domain_agreement": float((in_torch == in_onnx).mean()),
    }


def export_card(
    source: ModelCard, outputs: list[str], opset: int, onnx_sha: str, n_images: int, cfg: ExportConfig
) -> ModelCard:
    """The exported folder's card: the source's, plus the ONNX facts; its files and registration are its own."""
    pre, origin = source.preprocessing, source.mlflow or {}
    export = OnnxExport(
        onnx_file=ONNX_FILE,
        opset=opset,
        input_name=INPUT_NAME,
        outputs=tuple(outputs),
        preprocessing={**PREPROCESSING, "image_size": pre.image_size, "mean": list(pre.mean), "std": list(pre.std)},
        source={
            "registered_model": origin.get("registered_model"),
            "version": origin.get("version"),
            "run_id": origin.get("run_id"),
            "model_uri": origin.get("model_uri"),
            "weights_sha256": source.sha256_of(WEIGHTS_FILE),
        },
        validation={"images": n_images, "max_abs_diff": float("nan"), "tolerance": cfg.tolerance},
    )
    return dataclasses.replace(
        source, export=export, sha256={ONNX_FILE: onnx_sha}, mlflow=None, registered_version=None
    )


def _with_export(card: ModelCard, **changes) -> ModelCard:
    return dataclasses.replace(card, export=dataclasses.replace(card.export, **changes))


class _Batches:
    """An onnxruntime CalibrationDataReader over preprocessed image batches."""

    def __init__(self, predictor, images: list[np.ndarray], batch: int = 16):
        self._batches = (predictor.preprocess(images[i : i + batch]) for i in range(0, len(images), batch))
        self._input = INPUT_NAME

    def get_next(self):
        batch = next(self._batches, None)
        return None if batch is None else {self._input: batch}


def quantize_int8(fp32_path: Path, out_path: Path, predictor, images: list[np.ndarray]) -> None:
    """Static int8 quantization (QDQ, per-channel weights) with activation ranges from `images`."""
    import logging

    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(_Batches, CalibrationDataReader):
        pass

    logging.getLogger("root").setLevel(logging.ERROR)  # ORT's quantizer logs advice at WARNING
    with tempfile.TemporaryDirectory() as tmp:
        pre = Path(tmp) / "pre.onnx"
        quant_pre_process(str(fp32_path), str(pre))
        quantize_static(
            str(pre),
            str(out_path),
            Reader(predictor, images),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
        )


def _auc(y: np.ndarray, p: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y, p)) if len(set(y.tolist())) == 2 else float("nan")


def int8_decision(staging: Path, test_images: list[np.ndarray], test_y: np.ndarray, cfg: ExportConfig) -> dict:
    """Compare the int8 model with the float one on the test split: AUC, |dP|, call agreement."""
    fp32, int8 = OnnxPredictor(staging, file=ONNX_FILE), OnnxPredictor(staging, file=INT8_FILE)
    s32, s8 = fp32.score(test_images, tta=False), int8.score(test_images, tta=False)
    p32, p8, in32, in8 = s32.p_malignant, s8.p_malignant, s32.in_domain, s8.in_domain
    auc_fp32, auc_int8 = _auc(test_y, p32), _auc(test_y, p8)
    band = fp32.band
    agree = float((band.call(p32) == band.call(p8)).mean()) if fp32.calibrated else None
    drop = auc_fp32 - auc_int8
    ok = bool(np.isfinite(drop) and drop <= cfg.max_auc_drop)
    return {
        "test_images": len(test_images),
        "test_auc_fp32": auc_fp32,
        "test_auc_int8": auc_int8,
        "auc_drop": drop,
        "max_auc_drop": cfg.max_auc_drop,
        "max_abs_diff_vs_fp32": float(np.abs(p8 - p32).max()),
        "call_agreement": agree,
        "served": ok,
        "ood_in_domain_agreement": float((in32 == in8).mean()),
        "reason": (
            f"int8 served: test AUC drop {drop:.4f} <= {cfg.max_auc_drop}"
            if ok
            else f"float served: int8 test AUC drop {drop:.4f} > {cfg.max_auc_drop}"
        ),
    }


def export_model(
    model_dir: Path,
    out_dir: Path,
    images: list[np.ndarray],
    cfg: ExportConfig,
    model=None,
    calibration_images: list[np.ndarray] | None = None,
    test_set: tuple[list[np.ndarray], np.ndarray] | None = None,
) -> dict:
    """Export the torch model folder `model_dir` to `out_dir`, validated on `images`.

    `model` overrides the network that is traced (tests pass a different one to prove that
    validation catches a mismatch). With `cfg.quantize`, `calibration_images` set the int8
    ranges and `test_set` (images, 0/1 labels) decides whether int8 is served. Nothing is
    written unless validation passes; the folder then appears whole. Returns the metadata."""
    if not images:
        raise ExportError("no validation images: export needs real images to compare ONNX Runtime with torch")
    torch_predictor = TorchPredictor(model_dir)
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        onnx_path = staging / ONNX_FILE
        net = torch_predictor.model if model is None else model
        outputs = export_onnx(net, onnx_path, torch_predictor.card.image_size, cfg.opset)
        # Each ONNX file is listed in the card before OnnxPredictor loads it, as any load checks.
        card = carry_guard(
            torch_predictor,
            staging,
            export_card(torch_predictor.card, outputs, cfg.opset, file_sha256(onnx_path), len(images), cfg),
            outputs,
        )
        card = model_files.copy_into(torch_predictor.model_dir, torch_predictor.card, staging, card)
        markdown = Path(model_dir) / CARD_FILE
        if markdown.is_file():  # the same model, so the same card (its version is filled in when registered)
            shutil.copyfile(markdown, staging / CARD_FILE)
        card.write(staging)
        onnx_predictor = OnnxPredictor(staging)
        max_diff = compare(torch_predictor, onnx_predictor, images)
        if not max_diff <= cfg.tolerance:
            raise ExportError(
                f"{model_dir}: ONNX Runtime does not match torch on {len(images)} images: "
                f"max |dP| = {max_diff:.3g} > tolerance {cfg.tolerance:g}; nothing exported"
            )
        validation = {**card.export.validation, "max_abs_diff": max_diff}
        if onnx_predictor.ood is not None:
            validation["ood"] = check = compare_ood(torch_predictor, onnx_predictor, images)
            if not check["max_rel_diff"] <= OOD_RTOL:
                raise ExportError(
                    f"{model_dir}: ONNX Runtime's OOD scores do not match torch's on {len(images)} "
                    f"images: max relative diff {check['max_rel_diff']:.3g} > {OOD_RTOL:g}; "
                    "nothing exported"
                )
        card = _with_export(card, validation=validation)
        if cfg.quantize:
            card = add_int8(card, staging, torch_predictor, calibration_images, test_set, cfg)
        card.write(staging)
        os.chmod(staging, 0o755)
        _replace_dir(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return card


def add_int8(
    card: ModelCard, staging: Path, torch_predictor, calibration_images, test_set, cfg: ExportConfig
) -> ModelCard:
    """Quantize the staged ONNX model and serve the int8 copy when its test AUC holds up."""
    if not calibration_images or not test_set:
        raise ExportError("export.quantize needs calibration images and a labelled test set")
    quantize_int8(staging / ONNX_FILE, staging / INT8_FILE, torch_predictor, calibration_images)
    card = card.with_file(INT8_FILE, file_sha256(staging / INT8_FILE))
    card.write(staging)
    decision = int8_decision(staging, *test_set, cfg)
    quantization = {
        "method": "ONNX Runtime static QDQ, per-channel int8 weights, uint8 activations",
        "file": INT8_FILE,
        "calibration_images": len(calibration_images),
        **decision,
    }
    return _with_export(card, quantization=quantization, **({"onnx_file": INT8_FILE} if decision["served"] else {}))


def carry_guard(torch_predictor, staging: Path, card: ModelCard, outputs: list[str]) -> ModelCard:
    """Copy the calibrated model's ood.npz (already checked against its sha256 on load) into the
    export, listed with its sha256; a graph without features cannot feed a feature-based guard."""
    guard, source = torch_predictor.ood, torch_predictor.card.ood
    card = dataclasses.replace(card, ood=None)
    if guard is None:
        print(f"warning: {torch_predictor.model_dir} has no OOD guard; the export has none either", file=sys.stderr)
        return card
    if ood.needs_features(guard) and "features" not in outputs:
        print(
            f"warning: the ONNX graph has no features output; its {ood.method_of(guard)} OOD guard is dropped",
            file=sys.stderr,
        )
        return card
    shutil.copyfile(torch_predictor.model_dir / source.file, staging / source.file)
    return dataclasses.replace(card.with_file(source.file, file_sha256(staging / source.file)), ood=source)


def _replace_dir(new: Path, target: Path) -> None:
    """Move `new` to `target`, replacing an old folder in two renames, never leaving half of one."""
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
    os.replace(new, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def split_images(
    params: Params,
    split_csv: Path,
    parts: tuple[str, ...],
    n: int | None = None,
) -> tuple[list[np.ndarray], list[str]]:
    """Up to `n` readable images of the given split parts, in that order (real data, fixed order),
    and their labels."""
    split = read_table(split_csv, SPLIT_COLUMNS)
    root = params.data.root
    ordered = [
        (p, lab)
        for part in parts
        for p, lab in split.loc[split["split"] == part, ["path", "label"]].itertuples(index=False)
    ]
    images, labels = [], []
    for rel, label in ordered:
        if n is not None and len(images) >= n:
            break
        try:
            images.append(np.asarray(load_rgb(root / rel)))
            labels.append(label)
        except ImageError as exc:
            print(f"skipped: {exc}", file=sys.stderr)
    return images, labels


def validation_images(params: Params, split_csv: Path, n: int) -> tuple[list[np.ndarray], list[str]]:
    """The first `n` readable test images, then val and train if test has fewer."""
    return split_images(params, split_csv, ("test", "val", "train"), n)


def register(params: Params, out_dir: Path, source_card: ModelCard, input_example) -> dict:
    """Log the exported folder as an ONNX-backed pyfunc, register it, and move the source
    version's aliases (candidate, and champion when it held it) to the new version."""
    from mlflow import MlflowClient

    name = params.mlflow.registered_model
    source = source_card.mlflow or {}
    source_version = str(source.get("version") or "")
    with tracking.attached_run(params.mlflow, source.get("run_id"), "export") as run:
        card = ModelCard.read(out_dir)
        model_uri, version = run.log_model(
            out_dir,
            input_example,
            name="onnx_model",
            alias=params.mlflow.alias,
            model_metadata={
                "format": "onnx",
                "source_version": source_version,
                "calibration": card.calibration.to_dict() if card.calibration else None,
                "ood": card.ood.to_dict() if card.ood else None,
            },
            requirements=ONNX_REQUIREMENTS,
        )
        client = MlflowClient()
        served = card.export.onnx_file
        tags = {
            "format": "onnx",
            "onnx.file": served,
            "source_version": source_version,
            "onnx.sha256": card.sha256_of(served),
            "validation.max_abs_diff": str(card.export.validation["max_abs_diff"]),
        }
        if source_version:
            for key, value in client.get_model_version(name, source_version).tags.items():
                if key.startswith(("calibration.", "promotion.", "ood.")):
                    tags[key] = value
        for key, value in tags.items():
            client.set_model_version_tag(name, version, key, value)
        moved = [params.mlflow.alias]
        champion = params.promotion.alias
        try:
            holder = str(client.get_model_version_by_alias(name, champion).version)
        except Exception:  # noqa: BLE001 - no champion yet
            holder = None
        if source_version and holder == source_version:
            client.set_registered_model_alias(name, champion, version)
            moved.append(champion)
        run.set_tags({"export.model_version": version, "export.source_version": source_version})
    return {
        "model_uri": model_uri,
        "version": version,
        "source_version": source_version,
        "aliases": moved,
        "run_id": run.run_id,
    }


def run(params: Params, model_dir: Path, split_csv: Path, out_dir: Path, reports_dir: Path) -> dict:
    """The stage: export + validate, register in MLflow, record the registered version on disk."""
    import time

    cfg = params.export
    images, _ = validation_images(params, split_csv, cfg.validation_images)
    source_card = ModelCard.read(model_dir)
    calibration, test_set = None, None
    if cfg.quantize:
        calibration, _ = split_images(params, split_csv, ("train",), cfg.calibration_images)
        test_images, test_labels = split_images(params, split_csv, ("test",))
        positive = source_card.calibration_or_default.positive_labels or params.evaluate.positive_labels
        test_set = (test_images, np.array([label in positive for label in test_labels], dtype=int))
    t = time.perf_counter()
    card = export_model(Path(model_dir), Path(out_dir), images, cfg, calibration_images=calibration, test_set=test_set)
    seconds = time.perf_counter() - t
    logged = register(params, Path(out_dir), source_card, input_example(params.data.root, split_csv))
    card = dataclasses.replace(
        card, registered_version=logged["version"], registered_model=params.mlflow.registered_model
    )
    card.write(out_dir)
    quantization = card.export.quantization
    metrics = {
        "validation_images": len(images),
        "max_abs_diff": card.export.validation["max_abs_diff"],
        "tolerance": cfg.tolerance,
        "onnx_mb": round((Path(out_dir) / ONNX_FILE).stat().st_size / 2**20, 2),
        "served_file": card.export.onnx_file,
        **{
            f"int8_{k}": v
            for k, v in (quantization or {}).items()
            if k in ("test_auc_fp32", "test_auc_int8", "auc_drop", "max_abs_diff_vs_fp32", "call_agreement")
        },
        "export_seconds": round(seconds, 1),
        "model_version": logged["version"],
        "source_version": logged["source_version"],
        "aliases": logged["aliases"],
    }
    atomic.write_json(Path(reports_dir) / "metrics.json", metrics)
    if quantization:
        q = quantization
        print(f"export: int8 test AUC {q['test_auc_int8']:.4f} vs float {q['test_auc_fp32']:.4f}; {q['reason']}")
    print(
        f"export: {out_dir}/{ONNX_FILE} matches torch on {len(images)} images (max |dP| "
        f"{metrics['max_abs_diff']:.2e} <= {cfg.tolerance:g}); registered {params.mlflow.registered_model} "
        f"v{logged['version']} (from v{logged['source_version']}) @{' @'.join(logged['aliases'])}"
    )
    return {**metrics, "mlflow": logged}
