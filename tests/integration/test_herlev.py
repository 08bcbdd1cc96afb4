"""Integration on the real Herlev cells in ../shared/data/herlev (fails if the data is missing)."""

from __future__ import annotations

from pipeline.config import GroupRule, LabelMap, load_params
from pipeline.data.ingest import ingest
from pipeline.data.split import split_frame
from tests.conftest import ROOT


def test_herlev_ingest_and_split(herlev_dir):
    import pandas as pd

    params = load_params(ROOT / "params.yaml")
    label_map = LabelMap.load(ROOT / params.data.label_map)
    result = ingest(herlev_dir, label_map, params.data.group)
    assert len(result.rows) == 722 and result.rejects == []
    manifest = pd.DataFrame(result.rows)
    assert manifest["label"].value_counts().to_dict() == {"malignant": 533, "benign": 189}
    assert manifest["original_class"].value_counts()["normal_columnar"] == 77
    # Groups are fields of view, the first field of the Herlev cell id, prefix or not.
    official = pd.read_csv(herlev_dir / "MANIFEST.csv", dtype=str)
    expected = dict(zip(official["file"], official["herlev_cell_id"].str.split("-").str[0]))
    assert dict(zip(manifest["path"], manifest["group"])) == expected
    assert manifest["group"].nunique() == 247

    frame = split_frame(manifest, params.split)
    assert (frame.groupby("group")["split"].nunique() == 1).all()
    for part in ("train", "val", "test"):
        sub = frame[frame["split"] == part]
        assert set(sub["label"]) == {"benign", "malignant"}
        assert (sub["original_class"] == "normal_columnar").any()


def test_herlev_group_rule_default_matches_params():
    assert load_params(ROOT / "params.yaml").data.group == GroupRule()
