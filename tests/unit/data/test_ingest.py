"""Ingest on synthetic folders and CSV manifests: rejects with reasons, duplicates, groups, outputs."""

from __future__ import annotations

import json
import shutil

import pandas as pd
import pytest
import yaml

from pipeline.config import ConfigError, GroupRule, LabelMap
from pipeline.data.images import ImageLimits
from pipeline.data.ingest import IngestError, ingest, resolve_duplicates, run
from pipeline.data.manifest import MANIFEST_COLUMNS
from tests.conftest import make_image, tree_digest

RULE = GroupRule(regex=r"^(\w+?)-")


def _good_dataset(root):
    for i in range(3):
        make_image(root / "normal" / f"fovA-{i}.png", seed=i)
        make_image(root / "cancer" / f"fovB-{i}.jpg", seed=10 + i)
    return root


def _reasons(result) -> dict[str, str]:
    return {r["path"]: r["reason"] for r in result.rejects}


def test_folder_ingest_rows(tmp_path, binary_map):
    src = _good_dataset(tmp_path / "src")
    (src / "README.txt").write_text("top-level files are not in a class and are ignored")
    result = ingest(src, LabelMap.load(binary_map), RULE)
    assert len(result.rows) == 6 and result.rejects == []
    row = next(r for r in result.rows if r["path"] == "normal/fovA-0.png")
    assert set(row) == set(MANIFEST_COLUMNS)
    assert (row["label"], row["original_class"], row["group"]) == ("benign", "normal", "fovA")
    assert (row["width"], row["height"], row["mode"]) == (40, 32, "RGB")
    assert len(row["sha256"]) == 64


def test_every_bad_file_is_rejected_with_a_reason(tmp_path, binary_map):
    src = _good_dataset(tmp_path / "src")
    bad = src / "cancer"
    (bad / "fovC-empty.jpg").write_bytes(b"")
    (bad / "fovC-text.jpg").write_text("not an image")
    good_bytes = (bad / "fovB-0.jpg").read_bytes()
    (bad / "fovC-cut.jpg").write_bytes(good_bytes[:200])
    make_image(bad / "fovC-tiny.png", size=(4, 4))
    make_image(bad / "fovC-huge.png", size=(300, 300), seed=99)
    make_image(bad / "fovC-cmyk.jpg", mode="CMYK", seed=98)  # converted: accepted
    make_image(bad / "fovC-grey.png", mode="L", seed=97)  # lossless: accepted
    make_image(bad / "nogroup.png", seed=96)
    (bad / "fovC-dir.jpg").mkdir()
    (bad / "fovC-link.jpg").symlink_to(tmp_path / "nowhere.jpg")
    before = tree_digest(src)

    result = ingest(src, LabelMap.load(binary_map), RULE, ImageLimits(min_side=16, max_pixels=50_000))
    reasons = _reasons(result)
    assert "0 bytes" in reasons["cancer/fovC-empty.jpg"]
    assert "not an image" in reasons["cancer/fovC-text.jpg"]
    assert "truncated" in reasons["cancer/fovC-cut.jpg"]
    assert "minimum side" in reasons["cancer/fovC-tiny.png"]
    assert "pixel limit" in reasons["cancer/fovC-huge.png"]
    assert "group regex" in reasons["cancer/nogroup.png"]
    assert "directory" in reasons["cancer/fovC-dir.jpg"]
    assert "broken symlink" in reasons["cancer/fovC-link.jpg"]
    accepted = {r["path"]: r for r in result.rows}
    assert accepted["cancer/fovC-grey.png"]["mode"] == "L"
    assert accepted["cancer/fovC-cmyk.jpg"]["mode"] == "CMYK"
    assert len(result.rows) == 8
    assert tree_digest(src) == before  # inputs untouched


def test_missing_class_is_an_error_naming_it(tmp_path, binary_map):
    src = _good_dataset(tmp_path / "src")
    make_image(src / "mystery" / "fovZ-1.png")
    with pytest.raises(ConfigError, match="'mystery'"):
        ingest(src, LabelMap.load(binary_map), RULE)


def test_excluded_class_is_reported_not_ingested(tmp_path, binary_map):
    src = _good_dataset(tmp_path / "src")
    make_image(src / "junk" / "fovZ-1.png", seed=50)
    result = ingest(src, LabelMap.load(binary_map), RULE)
    assert all(r["original_class"] != "junk" for r in result.rows)
    assert "exclude" in _reasons(result)["junk/fovZ-1.png"]


def test_duplicates_same_label_keep_one_and_merge_groups(tmp_path, binary_map):
    src = _good_dataset(tmp_path / "src")
    shutil.copy(src / "normal" / "fovA-0.png", src / "normal" / "fovQ-9.png")
    make_image(src / "normal" / "fovQ-1.png", seed=60)  # another cell of fovQ
    result = ingest(src, LabelMap.load(binary_map), RULE)
    paths = [r["path"] for r in result.rows]
    assert "normal/fovA-0.png" in paths and "normal/fovQ-9.png" not in paths
    assert "duplicate of normal/fovA-0.png" in _reasons(result)["normal/fovQ-9.png"]
    groups = {r["path"]: r["group"] for r in result.rows}
    # fovA and fovQ are one group now, so no split can separate the two copies' fields.
    assert groups["normal/fovA-1.png"] == groups["normal/fovQ-1.png"] == "fovA+fovQ"


def test_duplicates_across_labels_are_all_excluded(tmp_path, binary_map):
    src = _good_dataset(tmp_path / "src")
    shutil.copy(src / "normal" / "fovA-0.png", src / "cancer" / "fovB-9.png")
    result = ingest(src, LabelMap.load(binary_map), RULE)
    paths = {r["path"] for r in result.rows}
    assert "normal/fovA-0.png" not in paths and "cancer/fovB-9.png" not in paths
    reasons = _reasons(result)
    assert "conflicting labels" in reasons["normal/fovA-0.png"]
    assert "conflicting labels" in reasons["cancer/fovB-9.png"]


def test_union_of_groups_is_transitive():
    rows = [
        {"path": "a", "sha256": "h1", "label": "x", "original_class": "c", "group": "g1"},
        {"path": "b", "sha256": "h1", "label": "x", "original_class": "c", "group": "g2"},
        {"path": "c", "sha256": "h2", "label": "x", "original_class": "c", "group": "g2"},
        {"path": "d", "sha256": "h2", "label": "x", "original_class": "c", "group": "g3"},
        {"path": "e", "sha256": "h3", "label": "x", "original_class": "c", "group": "g4"},
    ]
    kept, rejects = resolve_duplicates(rows)
    assert [r["path"] for r in kept] == ["a", "c", "e"]
    assert {r["group"] for r in kept} == {"g1+g2+g3", "g4"}
    assert len(rejects) == 2


def test_csv_manifest_source_with_group_column(tmp_path, binary_map):
    src = _good_dataset(tmp_path / "imgs")
    csv = tmp_path / "cases.csv"
    pd.DataFrame(
        {
            "path": ["imgs/normal/fovA-0.png", "imgs/cancer/fovB-0.jpg", str(src / "cancer" / "fovB-1.jpg")],
            "class": ["normal", "cancer", "cancer"],
            "patient": ["p1", "p2", "p2"],
        }
    ).to_csv(csv, index=False)
    result = ingest(csv, LabelMap.load(binary_map), GroupRule(regex=None, column="patient"))
    assert [r["group"] for r in result.rows] == ["p2", "p2", "p1"]
    assert result.rows[-1]["path"] == "imgs/normal/fovA-0.png"  # relative to the CSV's folder


def _harvest_like_csv(folder, n_cells=4):
    """A CSV manifest of one slide's cells, as `cytopipe harvest` writes it: file names cell<i>-x.png, which
    a file-name rule such as RULE would split into one group per cell; the `group` column says slide7."""
    for i in range(n_cells):
        make_image(folder / ("normal" if i % 2 else "cancer") / f"cell{i}-x.png", seed=200 + i)
    pd.DataFrame(
        {
            "path": [f"{'normal' if i % 2 else 'cancer'}/cell{i}-x.png" for i in range(n_cells)],
            "class": ["normal" if i % 2 else "cancer" for i in range(n_cells)],
            "group": ["slide7"] * n_cells,
        }
    ).to_csv(folder / "manifest.csv", index=False)
    return folder / "manifest.csv"


def test_csv_group_column_is_used_unless_a_rule_says_otherwise(tmp_path, binary_map):
    csv = _harvest_like_csv(tmp_path / "harvest")
    lm = LabelMap.load(binary_map)
    assert {r["group"] for r in ingest(csv, lm, None).rows} == {"slide7"}  # no rule: the column
    by_name = ingest(csv, lm, RULE).rows  # a rule given explicitly wins
    assert sorted(r["group"] for r in by_name) == ["cell0", "cell1", "cell2", "cell3"]
    (tmp_path / "plain.csv").write_text("path,class\nharvest/normal/cell1-x.png,normal\n")
    assert ingest(tmp_path / "plain.csv", lm, None).rejects[0]["reason"].startswith("no group: file name")


def test_cli_source_csv_keeps_its_groups_whatever_the_params_rule(tmp_path, binary_map):
    """The reported bug: `ingest --source manifest.csv --label-map ...` applied params.yaml's group regex
    (Herlev's: every harvested cell rejected; another project's: one group per cell, a slide leaked)."""
    from pipeline.cli import main

    csv = _harvest_like_csv(tmp_path / "harvest")
    params = tmp_path / "params.yaml"
    for rule in (r"(\d+)-\d+-\d+", r"^(\w+?)-"):  # Herlev's, and one that splits the slide's cells
        params.write_text(
            yaml.safe_dump(
                {
                    "data": {
                        "sources": {
                            "first": {
                                "path": str(tmp_path / "elsewhere"),
                                "label_map": str(binary_map),
                                "group": {"regex": rule},
                            }
                        }
                    }
                }
            )
        )
        assert (
            main(
                [
                    "ingest",
                    "--params",
                    str(params),
                    "--source",
                    str(csv),
                    "--label-map",
                    str(binary_map),
                    "--out",
                    str(tmp_path / "out"),
                ]
            )
            == 0
        )
        manifest = pd.read_csv(tmp_path / "out/manifest.csv", dtype=str)
        assert len(manifest) == 4 and set(manifest["group"]) == {"slide7"}, rule
    assert (
        main(
            [
                "ingest",
                "--params",
                str(params),
                "--source",
                str(csv),
                "--label-map",
                str(binary_map),
                "--group-regex",
                r"^(\w+?)-",
                "--out",
                str(tmp_path / "out"),
            ]
        )
        == 0
    )  # the flag says otherwise
    assert pd.read_csv(tmp_path / "out/manifest.csv", dtype=str)["group"].nunique() == 4


def test_a_second_source_does_not_take_the_first_sources_group_rule(tmp_path, binary_map):
    from pipeline.config import load_params
    from pipeline.data.ingest import ingest_sources

    src = _good_dataset(tmp_path / "src")
    csv = _harvest_like_csv(tmp_path / "harvest")
    params = tmp_path / "params.yaml"
    params.write_text(
        yaml.safe_dump(
            {
                "data": {
                    "sources": {
                        "first": {"path": str(src), "label_map": str(binary_map), "group": {"regex": RULE.regex}},
                        "second": {"path": str(csv), "label_map": str(binary_map)},
                    }
                }
            }
        )
    )
    sources = load_params(params).data.sources
    assert sources["first"].group == RULE and sources["second"].group is None  # its own: none written
    rows = ingest_sources(tuple(sources.values()), progress=False).rows
    assert {r["group"] for r in rows} == {"first:fovA", "first:fovB", "second:slide7"}


def test_csv_manifest_missing_column(tmp_path, binary_map):
    csv = tmp_path / "cases.csv"
    csv.write_text("file,class\na.png,normal\n")
    with pytest.raises(IngestError, match="missing column.*path"):
        ingest(csv, LabelMap.load(binary_map), RULE)


def test_column_rule_needs_csv(tmp_path, binary_map):
    src = _good_dataset(tmp_path / "src")
    with pytest.raises(ConfigError, match="needs a CSV"):
        ingest(src, LabelMap.load(binary_map), GroupRule(regex=None, column="patient"))


def test_run_writes_outputs_and_summary(tmp_path, binary_map, capsys):
    src = _good_dataset(tmp_path / "src")
    (src / "cancer" / "fovB-bad.jpg").write_text("nope")
    out = tmp_path / "out"
    summary = run(str(src), str(binary_map), RULE, ImageLimits(), str(out))
    manifest = pd.read_csv(out / "manifest.csv", dtype=str)
    assert list(manifest.columns) == list(MANIFEST_COLUMNS) and len(manifest) == 6
    rejects = pd.read_csv(out / "rejects.csv")
    assert rejects["path"].tolist() == ["cancer/fovB-bad.jpg"]
    assert json.loads((out / "summary.json").read_text()) == summary
    assert summary["labels"] == {"benign": 3, "malignant": 3} and summary["n_rejected"] == 1
    assert "rejected: cancer/fovB-bad.jpg: not an image" in capsys.readouterr().err
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_run_fails_clearly_when_nothing_is_usable(tmp_path, binary_map):
    src = tmp_path / "src"
    (src / "normal").mkdir(parents=True)
    (src / "normal" / "fovA-1.jpg").write_text("nope")
    out = tmp_path / "out"
    with pytest.raises(IngestError, match="no usable images"):
        run(str(src), str(binary_map), RULE, ImageLimits(), str(out))
    assert (out / "rejects.csv").is_file() and not (out / "manifest.csv").exists()


def test_source_errors(tmp_path, binary_map):
    lm = LabelMap.load(binary_map)
    with pytest.raises(IngestError, match="not found"):
        ingest(tmp_path / "nope", lm, RULE)
    (tmp_path / "empty").mkdir()
    with pytest.raises(IngestError, match="no class subfolders"):
        ingest(tmp_path / "empty", lm, RULE)


def test_outputs_get_normal_permissions(tmp_path):
    import os

    from pipeline import atomic

    atomic.write_text(tmp_path / "x.txt", "hello")
    mask = os.umask(0)
    os.umask(mask)
    assert (tmp_path / "x.txt").stat().st_mode & 0o777 == 0o666 & ~mask
    assert (tmp_path / "x.txt").read_text() == "hello"
