"""params.yaml and label maps: valid files load, bad ones fail with a message naming file and key."""

from __future__ import annotations

import shutil
from dataclasses import dataclass

import pytest
import yaml

from pipeline.config import ConfigError, GroupRule, LabelMap, Params, TrainConfig, load_params, read_yaml
from pipeline.typed_yaml import Section, load_section, plain, setting
from tests.conftest import ROOT


def test_project_params_load():
    params = load_params(ROOT / "params.yaml")
    assert params.data.source == "../shared/data/herlev"
    assert abs(sum(params.split.fractions.values()) - 1) < 1e-9
    assert params.split.folds >= 2


def test_herlev_label_maps_cover_all_seven_classes():
    binary = LabelMap.load(ROOT / "configs/labels/herlev_binary.yaml")
    seven = LabelMap.load(ROOT / "configs/labels/herlev_7class.yaml")
    assert set(binary.classes) == set(seven.classes) and len(seven.classes) == 7
    assert binary.labels == ("benign", "malignant")
    assert sorted(binary.classes.values()).count("benign") == 3  # the three normal classes
    assert binary.classes["normal_columnar"] == "benign"
    assert binary.classes["carcinoma_in_situ"] == "malignant"
    assert len(seven.labels) == 7


def test_missing_class_error_names_it(binary_map):
    lm = LabelMap.load(binary_map)
    with pytest.raises(ConfigError, match="'mystery'"):
        lm.label_of("mystery")


def test_label_map_rejects_unknown_label(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("labels: [benign, malignant]\nclasses:\n  a: benign\n  b: cancerous\n")
    with pytest.raises(ConfigError, match="class 'b' maps to 'cancerous'"):
        LabelMap.load(p)


def test_label_map_invalid_yaml_names_file(tmp_path):
    p = tmp_path / "broken.yaml"
    p.write_text("labels: [benign\n")
    with pytest.raises(ConfigError, match="broken.yaml: invalid YAML"):
        LabelMap.load(p)


def test_group_rule_herlev_names():
    rule = GroupRule()
    assert rule.group_of("149143370-149143378-002.jpg") == "149143370"
    assert rule.group_of("rotated_0_149143370-149143378-001.jpg") == "149143370"
    assert rule.group_of("no_id_here.jpg") is None


def test_group_rule_needs_exactly_one_source_and_a_capture():
    with pytest.raises(ConfigError, match="exactly one"):
        GroupRule(regex=None, column=None)
    with pytest.raises(ConfigError, match="capture group"):
        GroupRule(regex=r"\d+")


@pytest.mark.parametrize(
    "text, message",
    [
        ("split:\n  fractions: {train: 0.8, val: 0.1, test: 0.2}\n", "sum to 1"),
        ("split:\n  fractions: {train: 0.9, test: 0.1}\n", "need exactly"),
        ("split:\n  folds: 1\n", "folds"),
        ("split:\n  seed: abc\n", "split.seed"),
        ("data:\n  sourse: x\n", "unknown key"),
        ("train:\n  epochs: two\n", r"train\.epochs: expected int, got 'two'"),
        ("train:\n  epochs: 0\n", r"train\.epochs: must be >= 1, got 0"),
        ("train:\n  lr: .nan\n", r"train\.lr: must be > 0, got nan"),
        ("train:\n  channels_last: 1\n", r"train\.channels_last: expected bool, got 1"),
        ("train:\n  seed: 99999999999999999999\n", r"train\.seed: 99999999999999999999 is out of range \(64-bit"),
        ("train:\n  fit_on: train+val\n  keep: best\n", r"train\.fit_on: train\+val leaves no validation"),
        ("evaluate:\n  band_width: 1\n", r"evaluate\.band_width: must be in \[0, 1\), got 1\.0"),
        ("evaluate:\n  positive_labels: [malignant, 3]\n", r"evaluate\.positive_labels\[1\]: expected str, got 3"),
        ("model:\n  weights: 3\n", r"model\.weights: expected str or null, got 3"),
        ("slide:\n  schedule: eager\n", r"slide\.schedule: no longer read; one schedule ships"),
        ("slide: [1]\n", r"slide: expected a mapping, got \[1\]"),
        ("trian:\n  epochs: 1\n", r"unknown section\(s\): trian \(known: data, split, model"),
        ("data:\n  sources: {}\n", r"data\.sources: needs at least one source"),
        ("data:\n  sources: {h: {path: x}}\n", r"data\.sources\.h: missing key\(s\): label_map"),
        ("data:\n  sources: {h: {path: x, label_map: y, grup: {}}}\n", r"unknown key\(s\) in 'data\.sources\.h': grup"),
        ("data:\n  sources: {'a b': {path: x, label_map: y}}\n", r"data\.sources\.a b: a source name is letters"),
        (
            "data:\n  sources: {h: {path: x, label_map: y, group: {regex: '\\d+'}}}\n",
            r"data\.sources\.h\.group\.regex: '\\\\d\+' needs one capture group",
        ),
        ("data:\n  source: x\n", r"data\.source: no longer read; data\.sources replaces data\.source"),
    ],
)
def test_bad_params(tmp_path, text, message):
    p = tmp_path / "params.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError, match=message) as info:
        load_params(p)
    assert str(info.value).startswith(str(p))


# --------------------------------------------------------------------------- one set of defaults

# Fields params.yaml may leave out, and why. Anything else missing from it is a default written in
# only one place (the code), which is how the two drifted apart before.
UNWRITTEN = {
    # A group rule sets one of regex / column (GroupRule.ALTERNATIVES): Herlev sets its regex.
    "data.sources.herlev.group.column",
}


def _leaves(doc: dict, prefix: str = "") -> set[str]:
    out = set()
    for key, value in doc.items():
        at = f"{prefix}{key}"
        # A mapping of names (data.sources, split.fractions) counts its entries as keys too.
        out |= _leaves(value, f"{at}.") if isinstance(value, dict) and value else {at}
    return out


def test_code_defaults_are_params_yaml():
    """params.yaml is what runs; the dataclass defaults (what a file leaves out, an overlay's base
    aside) must be the same values, so that there is one set of defaults."""
    assert Params().to_dict() == load_params(ROOT / "params.yaml").to_dict()
    written = _leaves(read_yaml(ROOT / "params.yaml"))
    fields = _leaves(Params().to_dict())
    assert fields - written == UNWRITTEN  # every field has its key in params.yaml, or a reason above
    assert written <= fields


def test_sections_built_in_code_check_their_values_too():
    with pytest.raises(ConfigError, match=r"^train\.epochs: must be >= 1, got 0$"):
        TrainConfig(epochs=0)
    with pytest.raises(ConfigError, match=r"^group\.regex: invalid regex"):
        GroupRule(regex="(")


# --------------------------------------------------------------------------- overlays (configs/tiny.yaml)

# What configs/tiny.yaml changes in params.yaml, and nothing else.
TINY = {
    "model.image_size": 64,
    "train.epochs": 2,
    "train.batch_size": 8,
    "train.warmup_epochs": 0.5,
    "train.patience": 4,
    "train.fit_on": "train",
    "train.keep": "best",
    "train.min_steps": 0,
    "train.freeze_blocks": 0,
    "train.max_images": 32,
    "evaluate.tta": True,
    "evaluate.bootstrap": 200,
    "cv.epochs": 1,
    "slide.batch_size": 16,
    "export.validation_images": 16,
    "export.quantize": True,
    "export.calibration_images": 16,
    "export.max_auc_drop": 1.0,
}


def _flat(doc: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in doc.items():
        out.update(_flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return out


def test_tiny_config_is_params_yaml_with_a_few_changes():
    base, tiny = (
        _flat(load_params(ROOT / "params.yaml").to_dict()),
        _flat(load_params(ROOT / "configs/tiny.yaml").to_dict()),
    )
    assert {k: v for k, v in tiny.items() if base[k] != v} == TINY and tiny.keys() == base.keys()
    assert load_params(ROOT / "configs/tiny.yaml").path == str(ROOT / "configs/tiny.yaml")


def _write(path, doc) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(doc if isinstance(doc, str) else yaml.safe_dump(doc))
    return str(path)


def test_overlay_moves_with_its_base_and_merges_sections_only(tmp_path):
    """`extends` is relative to the overlay's folder, so a project copy (configs/ beside params.yaml)
    keeps working; sections merge key by key, while a mapping value (data.sources) is replaced whole."""
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    shutil.copy(ROOT / "configs/tiny.yaml", _write(tmp_path / "configs/tiny.yaml", ""))
    assert load_params(tmp_path / "configs/tiny.yaml").to_dict() == load_params(ROOT / "configs/tiny.yaml").to_dict()

    overlay = _write(
        tmp_path / "configs/mine.yaml",
        {
            "extends": "tiny.yaml",
            "train": {"epochs": 3},
            "cv": None,
            "data": {"sources": {"mine": {"path": "data/mine", "label_map": "labels.yaml"}}},
        },
    )
    params = load_params(overlay)
    assert params.train.epochs == 3 and params.train.batch_size == 8  # tiny's, under mine
    assert params.cv.epochs == 1  # an empty section changes nothing
    assert list(params.data.sources) == ["mine"] and params.data.sources["mine"].group is None
    assert params.data.min_side == 16


@pytest.mark.parametrize(
    "base, overlay, message",
    [
        (None, "extends: nowhere.yaml\n", r"over\.yaml: extends: .*nowhere\.yaml: file not found"),
        (None, "extends: [a]\n", r"over\.yaml: extends: expected the path"),
        (
            "train:\n  epochs: x\n",
            "extends: base.yaml\n",
            r"over\.yaml: extends: .*base\.yaml: train\.epochs: expected int",
        ),
        ("extends: over.yaml\n", "extends: base.yaml\n", r"over\.yaml: extends: .*base\.yaml: extends: .*a cycle"),
        (
            "train:\n  epochs: 3\n",
            "extends: base.yaml\ntrain:\n  epochs: 0\n",
            r"^\S*over\.yaml: train\.epochs: must be >= 1",
        ),
    ],
)
def test_overlay_errors_name_the_file_at_fault(tmp_path, base, overlay, message):
    if base is not None:
        _write(tmp_path / "base.yaml", base)
    with pytest.raises(ConfigError, match=message) as info:
        load_params(_write(tmp_path / "over.yaml", overlay))
    assert len(str(info.value).splitlines()) == 1


# --------------------------------------------------------------------------- the generic loader itself


# At module level: type hints are resolved in the module's namespace.
@dataclass(frozen=True)
class Inner(Section):
    KEY = "inner"
    name: str = setting(from_key=True)
    size: int | None = setting(None, ge=1)


@dataclass(frozen=True)
class Outer(Section):
    KEY = "outer"
    shape: tuple[int, ...] = (1, 2)
    scale: float = 1.0
    items: dict[str, Inner] = setting(factory=dict)


def test_loader_reads_any_section_by_its_type_hints():
    got = load_section(Outer, {"shape": [3, 4, 5], "scale": 2, "items": {"a": {"size": 7}, "b": None}}, "f.yaml")
    assert got == Outer((3, 4, 5), 2.0, {"a": Inner("a", 7), "b": Inner("b")}) and isinstance(got.scale, float)
    assert plain(got) == {"shape": [3, 4, 5], "scale": 2.0, "items": {"a": {"size": 7}, "b": {"size": None}}}
    for raw, message in [
        ({"shape": [1, "x"]}, r"^f\.yaml: shape\[1\]: expected int, got 'x'$"),
        ({"shape": 3}, r"^f\.yaml: shape: expected a list of int, got 3$"),
        ({"items": {"a": {"size": 0}}}, r"^f\.yaml: items\.a\.size: must be >= 1, got 0$"),
        ({"items": {"a": {"name": "b"}}}, r"^f\.yaml: unknown key\(s\) in 'items\.a': name"),
    ]:
        with pytest.raises(ConfigError, match=message):
            load_section(Outer, raw, "f.yaml")
