"""The atypia scores (pipeline/morphometry/atypia.py) and the fitted model's life in a model folder: JSON,
no pickle, refused when its sha256 does not match the card."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from pipeline.config import MorphometryConfig
from pipeline.model_card import ATYPIA_FILE, ModelCard, ModelDirError, Preprocessing
from pipeline.morphometry import model_files
from pipeline.morphometry.atypia import AtypiaModelError, LogisticAtypia, criteria_score
from pipeline.morphometry.features import SCALE_FREE
from pipeline.morphometry.slides import atypical, evidence_line, slide_morphometry_summary


def features(nc, hyper=2.0, irregular=0.05, diameter=np.nan) -> pd.DataFrame:
    n = len(np.atleast_1d(nc))
    return pd.DataFrame(
        {
            "nc_ratio": np.atleast_1d(nc),
            "hyperchromasia": np.full(n, hyper),
            "contour_irregularity": np.full(n, irregular),
            "nucleus_diameter_um": np.full(n, diameter),
        }
    )


def test_criteria_rise_with_the_nc_ratio_and_small_nuclei_are_not_atypical():
    rising = criteria_score(features([0.1, 0.3, 0.5, 0.7, 0.9]))
    assert np.all(np.diff(rising) >= 0) and rising[0] == 0 and rising[-1] > 0.5
    assert criteria_score(features(0.6, hyper=3.5))[0] > criteria_score(features(0.6, hyper=1.0))[0]
    # A lymphocyte: high N/C, dark, but a 6 µm nucleus; a carcinoma cell: the same with a 14 µm nucleus.
    assert criteria_score(features(0.8, diameter=6.0))[0] == 0
    assert criteria_score(features(0.8, diameter=14.0))[0] == criteria_score(features(0.8))[0] > 0.5
    assert np.isnan(criteria_score(features(np.nan))[0])


def _fitted() -> LogisticAtypia:
    rng = np.random.default_rng(0)
    x = pd.DataFrame(rng.normal(size=(200, len(SCALE_FREE))), columns=list(SCALE_FREE))
    y = (x["nc_ratio"] + 0.3 * rng.normal(size=200) > 0).astype(int).to_numpy()
    return LogisticAtypia.fit(x, y, "synthetic")


def test_the_logistic_model_round_trips_through_json(tmp_path):
    model = _fitted()
    model.write(tmp_path / ATYPIA_FILE)
    raw = json.loads((tmp_path / ATYPIA_FILE).read_text())  # plain JSON: nothing to unpickle
    assert raw["method"] == "logistic" and raw["features"] == list(SCALE_FREE)
    assert LogisticAtypia.read(tmp_path / ATYPIA_FILE) == model
    assert model.coef[list(SCALE_FREE).index("nc_ratio")] > 0  # it learnt the synthetic rule


@pytest.mark.parametrize(
    "text", ["not json", "[]", '{"features": ["x"], "mean": [0], "scale": [1], "coef": [1], "intercept": 0}']
)
def test_a_malformed_atypia_file_is_one_clear_error(tmp_path, text):
    (tmp_path / ATYPIA_FILE).write_text(text)
    with pytest.raises(AtypiaModelError, match=ATYPIA_FILE):
        LogisticAtypia.read(tmp_path / ATYPIA_FILE)


def test_the_atypia_model_in_a_model_folder_is_refused_when_its_sha256_does_not_match(tmp_path):
    model_dir, stage_dir = tmp_path / "model", tmp_path / "stage"
    model_dir.mkdir(), stage_dir.mkdir()
    ModelCard("timm/x", ("benign", "malignant"), Preprocessing(64, (0.5,) * 3, (0.5,) * 3)).write(model_dir)
    _fitted().write(stage_dir / ATYPIA_FILE)
    card = model_files.attach(model_dir, stage_dir / ATYPIA_FILE, None, MorphometryConfig(atypia="logistic"))
    assert card.sha256_of(ATYPIA_FILE) and model_files.settings_of(ModelCard.read(model_dir)).atypia == "logistic"
    assert model_files.logistic_of(model_dir, ModelCard.read(model_dir)) == _fitted()
    tampered = json.loads((model_dir / ATYPIA_FILE).read_text())
    tampered["intercept"] += 1
    (model_dir / ATYPIA_FILE).write_text(json.dumps(tampered))
    with pytest.raises(ModelDirError, match="sha256 does not match"):
        model_files.logistic_of(model_dir, ModelCard.read(model_dir))


def test_the_slide_summary_counts_the_atypia_burden_out_of_domain_cells_included():
    cfg = MorphometryConfig()
    cells = features([0.2, 0.6, 0.8, 0.9], diameter=12.0)
    cells.loc[3, "nucleus_diameter_um"] = 6.0  # a lymphocyte
    cells = cells.assign(
        morph_reason=["", "", "", ""], atypia=criteria_score(cells), in_domain=[True, True, False, True]
    )
    assert atypical(cells, cfg).tolist() == [False, True, True, False]
    summary = slide_morphometry_summary(cells, cfg, seconds=0.1)
    assert summary["atypia_burden"] == 2 and summary["n_atypical_out_of_domain"] == 1
    assert sum(summary["nucleus_diameter_um"]["counts"]) == 4 and summary["n_measured"] == 4


def test_an_unreliable_slide_call_names_the_evidence_that_remains():
    morph = {"atypia_burden": 312, "nc_threshold": 0.5, "min_nucleus_um": 10.0}
    assert evidence_line({"ood_warning": False, "morphometry": morph}) is None
    assert evidence_line({"ood_warning": True}) is None  # a summary written before morphometry
    line = evidence_line({"ood_warning": True, "morphometry": morph})
    assert line.startswith("312 cells meet the atypia criteria") and "review the atypia gallery" in line
