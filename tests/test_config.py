"""params.yaml and label maps: valid files load, bad ones fail with a message naming file and key."""
from __future__ import annotations

import pytest

from pipeline.config import ConfigError, GroupRule, LabelMap, load_params
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


@pytest.mark.parametrize("text, message", [
    ("split:\n  fractions: {train: 0.8, val: 0.1, test: 0.2}\n", "sum to 1"),
    ("split:\n  fractions: {train: 0.9, test: 0.1}\n", "need exactly"),
    ("split:\n  folds: 1\n", "folds"),
    ("split:\n  seed: abc\n", "split.seed"),
    ("data:\n  sourse: x\n", "unknown key"),
])
def test_bad_params(tmp_path, text, message):
    p = tmp_path / "params.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError, match=message) as info:
        load_params(p)
    assert str(info.value).startswith(str(p))
