"""Nuclear morphometry on synthetic cells whose truth is known (pipeline/morphometry/): areas, N/C ratio and
diameters in µm within 5%, and clear NaN-with-a-reason values for crops that have no usable nucleus."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pipeline.morphometry.atypia import criteria_score
from pipeline.morphometry.cells import measure_images, measure_slide_crops
from pipeline.morphometry.features import COLUMNS, IN_MICROMETRES, SCALE_FREE, measure
from pipeline.morphometry.segmentation import NO_CELL, NO_NUCLEUS, NUCLEUS_CUT

GLASS, CYTOPLASM, NUCLEUS = (236, 232, 238), (196, 176, 205), (92, 70, 140)


def cell_image(size=128, cell_r=40.0, nucleus_r=16.0, centre=None, nucleus_centre=None, rng=None) -> np.ndarray:
    """A round Pap-coloured cell on glass: a disc of cytoplasm with a darker nucleus, plus a little noise."""
    cy, cx = centre or (size / 2, size / 2)
    ny, nx = nucleus_centre or (cy, cx)
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    image = np.empty((size, size, 3), np.int16)
    image[:] = GLASS
    image[np.hypot(yy - cy, xx - cx) <= cell_r] = CYTOPLASM
    image[np.hypot(yy - ny, xx - nx) <= nucleus_r] = NUCLEUS
    rng = rng or np.random.default_rng(0)
    return np.clip(image + rng.integers(-4, 5, image.shape), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("cell_r,nucleus_r", [(40, 16), (50, 30), (30, 9)])
def test_areas_nc_ratio_and_diameter_in_micrometres_within_5_percent(cell_r, nucleus_r):
    um_per_px = 0.4
    features, nuclei = measure(cell_image(cell_r=cell_r, nucleus_r=nucleus_r)[None], um_per_px=um_per_px)
    row = features.iloc[0]
    assert row["morph_reason"] == "" and not row["cell_clipped"]
    assert row["nucleus_area_um2"] == pytest.approx(math.pi * nucleus_r**2 * um_per_px**2, rel=0.05)
    assert row["cell_area_um2"] == pytest.approx(math.pi * cell_r**2 * um_per_px**2, rel=0.05)
    assert row["nc_ratio"] == pytest.approx((nucleus_r / cell_r) ** 2, rel=0.05)
    assert row["nucleus_diameter_um"] == pytest.approx(2 * nucleus_r * um_per_px, rel=0.05)
    assert row["nucleus_eccentricity"] < 0.3 and row["nucleus_solidity"] > 0.9 and row["hyperchromasia"] > 1
    assert nuclei.shape == (1, 128, 128) and nuclei[0].sum() == pytest.approx(math.pi * nucleus_r**2, rel=0.05)


def test_a_plain_image_is_scale_free_and_its_flat_padding_is_not_cell():
    """Herlev's crops were padded to a square with a flat colour: that band must not count as cytoplasm."""
    image = cell_image(size=160, cell_r=70, nucleus_r=28)[10:150]  # the cell fills the crop, cut top and bottom
    padded = np.concatenate([np.full((30, 160, 3), (120, 110, 150), np.uint8), image], axis=0)  # a dark band
    features, _ = measure_images([padded, image], size=128)
    with_band, without = features.iloc[0], features.iloc[1]
    assert with_band["nc_ratio"] == pytest.approx(without["nc_ratio"], rel=0.05)
    assert features[list(IN_MICROMETRES)].isna().all().all()  # no scale: no µm
    assert np.isfinite(features[list(SCALE_FREE)].to_numpy(float)).all()
    assert list(features.columns[: len(COLUMNS)]) == list(COLUMNS)
    assert features["atypia"].equals(features["atypia_criteria"]) and features["atypia_logistic"].isna().all()


def test_slide_crops_take_their_scale_from_the_slide_and_the_crop_box():
    """A crop cut at 200 level-0 px and resized to 128: µm = crop px x 200 / 128 x the slide's µm/px."""
    crop = cell_image(cell_r=40, nucleus_r=16)
    box, cell_box = (1000, 2000, 200, 200), (1000 + 37.5, 2000 + 37.5, 1000 + 162.5, 2000 + 162.5)
    features, _ = measure_slide_crops(crop[None], [box], [cell_box], mpp=0.25, size=128)
    assert features["nucleus_diameter_um"].iloc[0] == pytest.approx(32 * 200 / 128 * 0.25, rel=0.05)


@pytest.mark.parametrize(
    "image,reason",
    [
        (np.full((128, 128, 3), 240, np.uint8), NO_CELL),  # blank glass
        (np.zeros((128, 128, 3), np.uint8), NUCLEUS_CUT),  # all black: one dark object filling the crop
        (cell_image(cell_r=45, nucleus_r=0), NO_NUCLEUS),  # cytoplasm only
        (cell_image(cell_r=60, nucleus_r=24, nucleus_centre=(64, -8)), NUCLEUS_CUT),  # over half the nucleus cut off
    ],
    ids=["blank", "black", "no-nucleus", "nucleus-cut"],
)
def test_crops_without_a_usable_nucleus_get_nan_and_a_reason(image, reason):
    features, nuclei = measure(image[None])
    row = features.iloc[0]
    assert row["morph_reason"] == reason
    nuclear = [c for c in (*SCALE_FREE, "nucleus_diameter_um", "nucleus_area_um2")]
    assert row[nuclear].isna().all() and (reason == NUCLEUS_CUT or not nuclei.any())  # a cut one is drawn
    assert np.isnan(criteria_score(features)[0])


def test_tiny_odd_and_empty_inputs_never_crash():
    features, nuclei = measure_images([np.full((16, 16, 3), 200, np.uint8), np.zeros((3, 400, 3), np.uint8)], 64)
    assert len(features) == 2 and nuclei.shape == (2, 64, 64)
    empty, none = measure(np.zeros((0, 64, 64, 3), np.uint8))
    assert len(empty) == 0 and list(empty.columns) == list(COLUMNS) and none.shape == (0, 64, 64)


def test_a_batch_gives_each_crop_the_values_it_gets_alone():
    rng = np.random.default_rng(3)
    crops = np.stack([cell_image(cell_r=r, nucleus_r=n, rng=rng) for r, n in ((40, 16), (30, 20), (50, 10))])
    together, _ = measure(crops, chunk=2)
    alone = [measure(c[None])[0].iloc[0] for c in crops]
    for i, row in enumerate(alone):
        assert together.iloc[i]["nc_ratio"] == pytest.approx(row["nc_ratio"], rel=1e-9)
