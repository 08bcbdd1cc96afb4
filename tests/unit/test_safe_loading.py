"""Model files are loaded with torch.load(weights_only=True) or as ONNX; nothing unpickles
untrusted content. A static scan of the code, plus real malicious pickles that must be refused."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT

SCANNED = ("pipeline", "benchmarks", "notebooks")
# Calls that unpickle (or run) whatever a file holds.
UNSAFE_TEXT = [
    r"\bpickle\.loads?\(",
    r"\bcloudpickle\.",
    r"\bjoblib\.load\(",
    r"\bdill\.",
    r"\bshelve\.",
    r"allow_pickle\s*=\s*True",
    r"mlflow\.(pytorch|sklearn)\.load_model",
    r"from\s+torch\s+import\s+load\b",
    r"from\s+pickle\s+import",
    r"(?m)^\s*import\s+(cloud)?pickle\b",
    r"\byaml\.load\(",
    r"\byaml\.unsafe_load",
    r"(?<![\w.])eval\(",
    r"(?<![\w.])exec\(",
    r"pd\.read_pickle",
]


def _sources() -> list[tuple[str, str]]:
    """(name, python source) of every module, benchmark and notebook code cell."""
    out = []
    for folder in SCANNED:
        for path in sorted((ROOT / folder).rglob("*.py")):
            out.append((str(path.relative_to(ROOT)), path.read_text()))
        for path in sorted((ROOT / folder).rglob("*.ipynb")):
            cells = json.loads(path.read_text())["cells"]
            for i, cell in enumerate(cells):
                if cell["cell_type"] == "code":
                    code = "".join(cell["source"])
                    code = "\n".join(line for line in code.splitlines() if not line.lstrip().startswith(("%", "!")))
                    out.append((f"{path.relative_to(ROOT)}[cell {i}]", code))
    return out


def _torch_load_calls(tree: ast.AST):
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "load"
            and isinstance(node.func.value, ast.Name)
            and node.func.value.id == "torch"
        ):
            yield node


def test_the_scan_sees_the_code():
    names = [name for name, _ in _sources()]
    assert "pipeline/train.py" in names and "pipeline/inference/predictor.py" in names
    assert any(n.startswith("notebooks/") for n in names)
    assert sum(1 for _, src in _sources() for _ in _torch_load_calls(ast.parse(src))) >= 4


def test_every_torch_load_is_weights_only():
    unsafe = []
    for name, source in _sources():
        for call in _torch_load_calls(ast.parse(source)):
            ok = any(
                k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                for k in call.keywords
            )
            if not ok:
                unsafe.append(f"{name}:{call.lineno}")
        # a torch.load that the AST walk could not see (aliased, or in a string passed to exec)
        assert len(re.findall(r"\btorch\.load\(", source)) == sum(1 for _ in _torch_load_calls(ast.parse(source))), name
    assert unsafe == [], f"torch.load without weights_only=True: {unsafe}"


def test_no_pickle_style_loading_anywhere():
    hits = [
        f"{name}: {pattern}" for name, source in _sources() for pattern in UNSAFE_TEXT if re.search(pattern, source)
    ]
    assert hits == []


class _Payload:
    """Unpickling this runs code: it would create the marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_malicious_model_file_with_a_matching_checksum_is_refused_and_never_runs(tmp_path):
    from pipeline.inference.predictor import TorchPredictor
    from pipeline.model_card import ModelDirError

    marker = tmp_path / "payload-ran"
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    torch.save({"classifier.weight": _Payload(marker)}, model_dir / "model.pt")
    meta = {
        "arch": "timm/tf_efficientnet_lite0",
        "labels": ["benign", "malignant"],
        "image_size": 64,
        "mean": [0.5] * 3,
        "std": [0.5] * 3,
        "sha256": {"model.pt": _sha256(model_dir / "model.pt")},
    }
    (model_dir / "model.json").write_text(json.dumps(meta))
    with pytest.raises(ModelDirError, match=r"model\.pt: not a plain weights file") as err:
        TorchPredictor(model_dir)
    assert "\n" not in str(err.value)
    assert not marker.exists()


def test_a_malicious_checkpoint_is_refused_and_the_previous_one_used(tmp_path):
    from pipeline import checkpoints

    marker = tmp_path / "payload-ran"
    folder = tmp_path / "ck"
    checkpoints.save(folder, {"epoch": 1, "model": {"w": torch.zeros(2)}}, 1)
    checkpoints.save(folder, {"epoch": 2, "model": _Payload(marker)}, 2)
    warnings = []
    state, entry = checkpoints.load_latest(folder, warn=warnings.append)
    assert entry.epoch == 1 and state["epoch"] == 1
    assert "epoch-0002.pt: cannot be loaded" in warnings[0]
    assert not marker.exists()


def test_a_malicious_init_weights_file_is_refused(tmp_path):
    from pipeline.models.backbones import WeightsError, build_model

    marker = tmp_path / "payload-ran"
    torch.save(_Payload(marker), tmp_path / "weights.pth")
    with pytest.raises(WeightsError, match="weights.pth: not a loadable state dict"):
        build_model("timm/tf_efficientnet_lite0", 2, str(tmp_path / "weights.pth"))
    assert not marker.exists()


@pytest.mark.parametrize(
    "bad",
    [
        "pickle.load(f)",
        "pickle.loads(b)",
        "np.load(p, allow_pickle=True)",
        "yaml.load(s)",
        "mlflow.pytorch.load_model(uri)",
        "joblib.load(p)",
        "eval(text)",
        "pd.read_pickle(p)",
        "import pickle",
    ],
)
def test_the_scan_catches_unsafe_code(bad):
    assert any(re.search(p, bad) for p in UNSAFE_TEXT)
    assert not any(re.search(p, "model.eval()\nyaml.safe_load(s)") for p in UNSAFE_TEXT)
