"""Population shifts: subgroup masks, prevalence resampling, reweighting, effective sample size."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tools.shifts import ShiftError
from tools.shifts.population import (
    AGE_BANDS,
    effective_sample_size,
    prevalence_indices,
    reweight_weights,
    subgroup_masks,
)

HAM_METADATA = Path(__file__).parents[2] / "shared" / "data" / "ham10000_subset" / "metadata.csv"
needs_ham = pytest.mark.skipif(
    not HAM_METADATA.exists(),
    reason=f"ham10000_subset metadata not found at {HAM_METADATA}; the real-data checks need it")


@pytest.fixture(scope="module")
def ham() -> pd.DataFrame:
    return pd.read_csv(HAM_METADATA)


def small_table() -> pd.DataFrame:
    return pd.DataFrame({
        "site": ["a", "b", "a", "c", "a", None],
        "age": [12, 30, 44, 45, 80, np.nan],
        "sex": ["f", "m", "f", "m", "", "f"],
    })


def test_subgroup_masks_by_value_with_missing():
    masks = subgroup_masks(small_table(), "site")
    assert list(masks) == ["a", "b", "c", "missing"]
    assert masks["a"].tolist() == [True, False, True, False, True, False]
    assert masks["missing"].tolist() == [False] * 5 + [True]


def test_empty_string_counts_as_missing():
    masks = subgroup_masks(small_table(), "sex")
    assert masks["missing"].tolist() == [False, False, False, False, True, False]


def test_age_bands_are_half_open():
    masks = subgroup_masks(small_table(), "age", AGE_BANDS)
    assert list(masks) == ["0-29", "30-44", "45-59", "75-199", "missing"]
    assert masks["0-29"].tolist() == [True, False, False, False, False, False]
    assert masks["30-44"].tolist() == [False, True, True, False, False, False]
    assert masks["45-59"].tolist() == [False, False, False, True, False, False]


def test_open_top_band_and_out_of_range():
    masks = subgroup_masks(small_table(), "age", [20, 45, float("inf")])
    assert list(masks) == ["20-44", "45+", "out of range", "missing"]
    assert masks["out of range"].tolist() == [True, False, False, False, False, False]


def test_unknown_column_rejected_with_its_name():
    with pytest.raises(ShiftError, match="'ethnicity'"):
        subgroup_masks(small_table(), "ethnicity")
    with pytest.raises(ShiftError, match="'ethnicity'"):
        reweight_weights(small_table(), "ethnicity", {"x": 1.0})


def test_bands_on_text_column_rejected():
    with pytest.raises(ShiftError, match="'site'"):
        subgroup_masks(small_table(), "site", [0, 10])
    with pytest.raises(ShiftError, match="increasing"):
        subgroup_masks(small_table(), "age", [0, 50, 40])


def test_prevalence_balanced_mix_by_hand():
    labels = np.array([0] * 10 + [1] * 4 + [2] * 6)
    indices = prevalence_indices(labels, {0: 1, 1: 1, 2: 1}, seed=0)
    assert np.bincount(labels[indices]).tolist() == [4, 4, 4]
    assert len(np.unique(indices)) == len(indices)
    np.testing.assert_array_equal(indices, prevalence_indices(labels, {0: 1, 1: 1, 2: 1}, 0))


def test_prevalence_rounds_by_largest_remainder():
    labels = np.array([0] * 50 + [1] * 50)
    indices = prevalence_indices(labels, {0: 2, 1: 1}, seed=1, n=10)
    # 10 * 2/3 = 6.67 and 10 * 1/3 = 3.33 round to 7 and 3.
    assert np.bincount(labels[indices]).tolist() == [7, 3]


def test_prevalence_rejects_impossible_requests():
    labels = np.array([0] * 10 + [1] * 4)
    with pytest.raises(ShiftError, match="class 1"):
        prevalence_indices(labels, {0: 1, 1: 1}, seed=0, n=20)
    with pytest.raises(ShiftError, match="class 3"):
        prevalence_indices(labels, {0: 1, 3: 1}, seed=0)
    with pytest.raises(ShiftError, match="non-negative"):
        prevalence_indices(labels, {0: -1, 1: 1}, seed=0)


def test_reweight_by_hand():
    table = pd.DataFrame({"sex": ["f", "f", "f", "m"]})
    weights = reweight_weights(table, "sex", {"f": 0.5, "m": 0.5})
    # f: 0.5 / 0.75, m: 0.5 / 0.25
    np.testing.assert_allclose(weights, [2 / 3, 2 / 3, 2 / 3, 2.0])
    assert effective_sample_size(weights) == pytest.approx(16 / (3 * 4 / 9 + 4))


def test_reweight_rejects_group_without_rows():
    with pytest.raises(ShiftError, match="'x'"):
        reweight_weights(small_table(), "site", {"a": 1.0, "x": 1.0})


def test_effective_sample_size_cases():
    assert effective_sample_size(np.ones(10)) == pytest.approx(10)
    assert effective_sample_size(np.array([1.0, 0.0, 0.0])) == pytest.approx(1)
    assert effective_sample_size(np.zeros(3)) == 0.0
    with pytest.raises(ShiftError):
        effective_sample_size(np.array([1.0, -1.0]))


# Counts below are the ones documented with the ham10000_subset data.

@needs_ham
def test_ham_site_and_sex_counts(ham):
    sites = {name: int(mask.sum()) for name, mask in subgroup_masks(ham, "dataset").items()}
    assert sites == {"vidir_molemax": 3159, "vidir_modern": 1346, "rosendahl": 1259,
                     "vienna_dias": 220}
    sexes = {name: int(mask.sum()) for name, mask in subgroup_masks(ham, "sex").items()}
    assert sexes == {"male": 3211, "female": 2737, "unknown": 36}


@needs_ham
def test_ham_age_bands_cover_rows_and_missing(ham):
    masks = subgroup_masks(ham, "age", AGE_BANDS)
    assert int(masks["missing"].sum()) == 36
    assert sum(int(mask.sum()) for mask in masks.values()) == 5984
    # Cross-check the band counts against pandas' own cut.
    expected = pd.cut(ham["age"], AGE_BANDS, right=False).value_counts(sort=False)
    assert [int(masks[name].sum()) for name in ["0-29", "30-44", "45-59", "60-74", "75-199"]] \
        == expected.tolist()


@needs_ham
def test_ham_localization_counts(ham):
    masks = subgroup_masks(ham, "localization")
    assert len(masks) == 15
    assert int(masks["lower extremity"].sum()) == 1273
    assert int(masks["back"].sum()) == 1215
    assert int(masks["unknown"].sum()) == 160


@needs_ham
def test_ham_balanced_prevalence_takes_every_df_image(ham):
    classes = sorted(ham["dx"].unique())
    labels = np.array([classes.index(dx) for dx in ham["dx"]])
    indices = prevalence_indices(labels, {k: 1.0 for k in range(len(classes))}, seed=0)
    # df, the rarest class, has 60 images, so a balanced set contains 60 of each of the 7 classes.
    assert np.bincount(labels[indices]).tolist() == [60] * 7

    nv, mel = classes.index("nv"), classes.index("mel")
    indices = prevalence_indices(labels, {nv: 0.5, mel: 0.5}, seed=0)
    counts = np.bincount(labels[indices], minlength=len(classes))
    assert counts[mel] == 491
    assert counts[nv] == 491


@needs_ham
def test_ham_reweight_sex_effective_sample_size(ham):
    weights = reweight_weights(ham, "sex", {"male": 0.5, "female": 0.5})
    assert weights.sum() == pytest.approx(5984)
    assert np.all(weights[(ham["sex"] == "unknown").to_numpy()] == 0)
    # Kish ESS from the documented counts: each half of the weight mass spread over its group.
    assert effective_sample_size(weights) == pytest.approx(4 / (1 / 3211 + 1 / 2737))
