"""Metric engine behaviour: input checks, sample weights, NaN reasons and the bootstrap."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score, brier_score_loss, log_loss, roc_auc_score

from tools.metrics import (
    REGISTRY,
    Difference,
    Estimate,
    MetricError,
    bootstrap_metrics,
    compute_metric,
    paired_bootstrap,
    reliability_bins,
    unpaired_bootstrap,
)


def _data(n=300, k=4, seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, k, n)
    logits = rng.normal(size=(n, k))
    logits[np.arange(n), labels] += 1.2
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return probs, labels


# --- Input checks ---------------------------------------------------------------------------


def test_nan_probability_names_first_bad_row():
    probs, labels = _data()
    probs[7, 1] = np.nan
    probs[9, 1] = np.nan

    with pytest.raises(MetricError, match="probs row 7 contains NaN"):
        compute_metric("accuracy", probs, labels)


def test_negative_probability_names_row():
    probs, labels = _data()
    probs[4] = [1.2, -0.2, 0.0, 0.0]

    with pytest.raises(MetricError, match="probs row 4 contains a negative value"):
        compute_metric("brier", probs, labels)


def test_rows_not_summing_to_one_raise_unless_renormalised():
    probs, labels = _data()
    logits = np.log(probs) + 3.0

    with pytest.raises(MetricError, match="row 0 sums to"):
        compute_metric("nll", np.exp(logits), labels)
    renormalised = compute_metric("nll", np.exp(logits), labels, renormalise=True)
    assert renormalised.value == pytest.approx(compute_metric("nll", probs, labels).value)


def _large_tied_data():
    """Build enough rows for the torch row reductions, every fifth a tie between classes 1 and 3."""
    from tools.metrics._inputs import TORCH_ROW_SIZE

    probs, labels = _data(n=TORCH_ROW_SIZE // 4 + 100, k=4, seed=5)
    probs[::5] = [0.1, 0.35, 0.2, 0.35]
    return probs, labels


def test_large_input_tie_goes_first():
    from tools.metrics._inputs import MetricInputs

    probs, labels = _large_tied_data()

    inputs = MetricInputs.from_raw(probs, labels)

    assert np.array_equal(inputs.predicted, np.argmax(probs, axis=1))
    assert np.array_equal(inputs.confidence, probs.max(axis=1))
    assert (inputs.predicted[::5] == 1).all()


def test_large_read_only_and_strided_inputs():
    probs, labels = _large_tied_data()
    expected = float(np.mean(np.argmax(probs, axis=1) == labels))
    read_only = probs.copy()
    read_only.setflags(write=False)
    reversed_rows = probs[::-1]

    assert compute_metric("accuracy", read_only, labels).value == pytest.approx(expected, abs=1e-15)
    assert compute_metric("accuracy", reversed_rows, labels[::-1]).value == pytest.approx(expected, abs=1e-15)


def test_large_input_bad_values_name_row():
    probs, labels = _large_tied_data()
    with_nan = probs.copy()
    with_nan[30_000, 2] = np.nan
    off = probs.copy()
    off[30_001] *= 1.01

    with pytest.raises(MetricError, match="probs row 30000 contains NaN"):
        compute_metric("ece_top_label", with_nan, labels)
    with pytest.raises(MetricError, match="probs row 30001 sums to"):
        compute_metric("ece_top_label", off, labels)


def test_logits_are_not_softmaxed():
    probs, labels = _data()

    with pytest.raises(MetricError):
        compute_metric("accuracy", np.log(probs), labels)


def test_labels_out_of_range_are_counted():
    probs, labels = _data(k=4)
    labels[[3, 8, 11]] = [4, 9, -1]

    with pytest.raises(MetricError, match=r"labels has 3 values outside 0..3 \(first at row 3: 4\)"):
        compute_metric("accuracy", probs, labels)


def test_label_shape_mismatch_is_rejected():
    probs, labels = _data()

    with pytest.raises(MetricError, match="labels must have shape"):
        compute_metric("accuracy", probs, labels[:-1])


def test_negative_weight_is_rejected():
    probs, labels = _data()
    weights = np.ones(len(labels))
    weights[5] = -1

    with pytest.raises(MetricError, match="weights row 5"):
        compute_metric("accuracy", probs, labels, weights)


def test_unknown_metric_and_parameter_are_rejected():
    probs, labels = _data()

    with pytest.raises(MetricError, match="unknown metric id 'ece'"):
        compute_metric("ece", probs, labels)
    with pytest.raises(MetricError, match="unknown parameter 'bins'"):
        compute_metric("ece_top_label", probs, labels, bins=10)


def test_binary_metric_needs_positive_class_for_multiclass():
    probs, labels = _data(k=4)

    with pytest.raises(MetricError, match="needs binary probabilities"):
        compute_metric("brier_binary", probs, labels)
    value = compute_metric("brier_binary", probs, labels, positive_class=2).value
    assert value == pytest.approx(brier_score_loss(labels == 2, probs[:, 2]))


def test_one_column_binary_input_equals_two_columns():
    rng = np.random.default_rng(1)
    p = rng.uniform(size=100)
    labels = (rng.uniform(size=100) < p).astype(int)

    for metric in ("auroc", "brier", "ece_top_label", "sensitivity"):
        one = compute_metric(metric, p, labels).value
        two = compute_metric(metric, np.stack([1 - p, p], axis=1), labels).value
        assert one == two, metric


# --- Values and reasons ---------------------------------------------------------------------


def test_weighted_metrics_match_scikit_learn():
    probs, labels = _data()
    weights = np.random.default_rng(2).uniform(0.1, 3.0, len(labels))

    assert compute_metric("auroc", probs, labels, weights).value == pytest.approx(
        roc_auc_score(labels, probs, multi_class="ovr", sample_weight=weights)
    )
    assert compute_metric("nll", probs, labels, weights).value == pytest.approx(
        log_loss(labels, probs, sample_weight=weights)
    )
    assert compute_metric("balanced_accuracy", probs, labels, weights).value == pytest.approx(
        balanced_accuracy_score(labels, probs.argmax(axis=1), sample_weight=weights)
    )


# The O(n²) metrics weight pairs by w_i w_j, which is not the same as repeating rows.
PAIRWISE = {"kce", "ece_kde"}


@pytest.mark.parametrize("metric", sorted(set(REGISTRY) - PAIRWISE))
def test_count_weights_equal_repeated_rows(metric):
    probs, labels = _data(n=120)
    counts = np.random.default_rng(4).integers(0, 4, len(labels))
    params = {"positive_class": 1} if "binary" in REGISTRY[metric].needs else {}

    weighted = compute_metric(metric, probs, labels, counts, **params)
    repeated = compute_metric(metric, np.repeat(probs, counts, axis=0), np.repeat(labels, counts), **params)

    assert weighted.value == pytest.approx(repeated.value, abs=1e-10, nan_ok=True)


def test_auroc_with_one_class_is_nan_with_reason():
    probs, _ = _data()

    result = compute_metric("auroc", probs, np.zeros(len(probs), dtype=int))

    assert math.isnan(result.value)
    assert "both positives and negatives" in result.reason


def test_nll_of_zero_probability_is_infinite():
    probs = np.array([[1.0, 0.0], [0.5, 0.5]])

    result = compute_metric("nll", probs, np.array([1, 0]))

    assert result.value == math.inf
    assert result.extra["zero_probability_count"] == 1
    clipped = compute_metric("nll", probs, np.array([1, 0]), eps=1e-15).value
    assert clipped == pytest.approx(-(math.log(1e-15) + math.log(0.5)) / 2)


def test_mcc_single_class_is_nan_with_reason():
    probs, _ = _data()

    result = compute_metric("mcc", probs, np.zeros(len(probs), dtype=int))

    assert math.isnan(result.value)
    assert "single class" in result.reason


def test_equal_mass_bins_never_split_ties():
    scores = np.repeat([0.55, 0.7, 0.9], [10, 25, 5])
    probs = np.stack([scores, 1 - scores], axis=1)
    labels = np.zeros(len(scores), dtype=int)

    result = compute_metric("ece_top_label", probs, labels, n_bins=10, binning="equal_mass")

    # Each tie block is one bin, so ECE is the weighted gap of the three blocks.
    assert result.value == pytest.approx((10 * 0.45 + 25 * 0.3 + 5 * 0.1) / 40)


def test_kce_reports_median_heuristic_bandwidth():
    probs, labels = _data(n=80)
    distances = np.sqrt(((probs[:, None, :] - probs[None, :, :]) ** 2).sum(axis=2))
    median = np.median(distances[np.triu_indices(80, k=1)])

    result = compute_metric("kce", probs, labels)

    assert result.extra["bandwidth"] == pytest.approx(median)


def test_kce_pair_subsample_is_close_to_full_sum():
    probs, labels = _data(n=1500, k=3)

    full = compute_metric("kce", probs, labels).value
    sampled = compute_metric("kce", probs, labels, exact_max_n=1000, max_pairs=200_000).value

    assert sampled == pytest.approx(full, abs=0.01)


def test_reliability_bins_by_hand():
    probs = np.array([[0.95, 0.05], [0.85, 0.15], [0.6, 0.4], [0.55, 0.45]])
    labels = np.array([0, 1, 0, 0])

    bins = reliability_bins(probs, labels, n_bins=2)

    assert bins[0] == {"lower": 0.0, "upper": 0.5, "count": 0.0, "confidence": None, "accuracy": None}
    assert bins[1]["count"] == 4.0
    assert bins[1]["confidence"] == pytest.approx(0.7375)
    assert bins[1]["accuracy"] == pytest.approx(0.75)


def test_registry_entries_are_complete():
    families = {"counting", "multi_threshold", "calibration", "proper_score", "failure_detection"}
    for metric_id, info in REGISTRY.items():
        assert info.id == metric_id
        assert info.family in families, metric_id
        assert info.reading.endswith("."), metric_id
        assert info.fn.__doc__, metric_id


# --- Bootstrap ------------------------------------------------------------------------------


SIX = ["accuracy", "balanced_accuracy", "brier", "nll", "ece_top_label", "auroc"]


def test_bootstrap_is_seeded_and_brackets_estimate():
    probs, labels = _data()

    first = bootstrap_metrics(SIX, probs, labels, n_boot=200, seed=5)
    second = bootstrap_metrics(SIX, probs, labels, n_boot=200, seed=5)

    assert first == second
    for key, estimate in first.items():
        assert isinstance(estimate, Estimate)
        assert estimate.low <= estimate.value <= estimate.high, key
        assert estimate.value == compute_metric(key, probs, labels).value


def test_bootstrap_interval_covers_accuracy_binomial_width():
    probs, labels = _data(n=2000)
    accuracy = compute_metric("accuracy", probs, labels).value
    half_width = 1.96 * math.sqrt(accuracy * (1 - accuracy) / 2000)

    estimate = bootstrap_metrics(["accuracy"], probs, labels, n_boot=1000, seed=0)["accuracy"]

    assert estimate.high - estimate.low == pytest.approx(2 * half_width, rel=0.15)


def test_bootstrap_keys_carry_params():
    probs, labels = _data()

    estimates = bootstrap_metrics([("ece_top_label", {"n_bins": 10}), "ece_top_label"], probs, labels, n_boot=20)

    assert set(estimates) == {"ece_top_label@n_bins=10", "ece_top_label"}


def test_stratified_bootstrap_keeps_class_counts():
    probs, labels = _data()

    estimate = bootstrap_metrics(["accuracy"], probs, labels, n_boot=50, stratified=True)["accuracy"]

    assert estimate.low <= estimate.value <= estimate.high


def test_bootstrap_counts_undefined_replicates():
    probs, labels = _data(n=40)
    labels[:] = 0
    labels[0] = 1  # class 1 appears once, so many resamples lose it

    estimate = bootstrap_metrics([("sensitivity", {"positive_class": 1})], probs, labels, n_boot=100)

    key = "sensitivity@positive_class=1"
    assert estimate[key].extra["n_boot_undefined"] > 0


def test_paired_bootstrap_detects_degradation():
    probs, labels = _data(n=500)
    noisy = 0.5 * probs + 0.5 / probs.shape[1]

    differences = paired_bootstrap(["accuracy", "nll"], probs, noisy, labels, n_boot=300)

    nll = differences["nll"]
    assert isinstance(nll, Difference)
    assert nll.delta == pytest.approx(nll.condition - nll.reference)
    assert nll.low > 0
    assert nll.p_value < 0.01


def test_bootstrap_p_value_normal_approximation_by_hand():
    from scipy.stats import norm

    from tools.metrics import bootstrap_p_value

    replicates = np.array([-0.30, -0.25, -0.20, -0.28, -0.22])
    spread = np.sqrt(np.sum((replicates - replicates.mean()) ** 2) / 4)

    assert bootstrap_p_value(replicates, -0.25) == pytest.approx(2 * norm.sf(0.25 / spread), rel=1e-12)
    assert bootstrap_p_value(np.zeros(50), 0.0) == 1.0
    # Constant non-zero replicates have no spread, so the share of replicates gives 2 / (B + 1).
    assert bootstrap_p_value(np.full(99, 0.1), 0.1) == pytest.approx(2 / 100)
    assert math.isnan(bootstrap_p_value(np.array([np.nan, np.nan]), 0.1))


def test_paired_p_value_below_replicate_floor():
    # With 100 replicates the share-of-replicates p-value cannot go below 2/101 = 0.0198, which
    # cannot pass Benjamini-Hochberg among a hundred comparisons; the normal approximation can.
    probs, labels = _data(n=500)
    flat = 0.2 * probs + 0.8 / probs.shape[1]

    accuracy = paired_bootstrap(["balanced_accuracy"], probs, flat[:, ::-1].copy(), labels,
                                n_boot=100)["balanced_accuracy"]

    assert accuracy.high < 0
    assert accuracy.p_value < 1e-6


def test_paired_identical_conditions_p_value_one():
    probs, labels = _data()

    difference = paired_bootstrap(["auroc"], probs, probs, labels, n_boot=100)["auroc"]

    assert difference.delta == 0.0
    assert difference.p_value == 1.0


def test_unpaired_bootstrap_subgroup_against_rest():
    probs, labels = _data(n=600)
    worse = 0.3 * probs[:200] + 0.7 / probs.shape[1]

    # The rest of the test set is the reference (a), the worse subgroup the condition (b).
    differences = unpaired_bootstrap(["brier"], probs[200:], labels[200:], worse, labels[:200], n_boot=300)

    brier = differences["brier"]
    assert brier.reference == pytest.approx(compute_metric("brier", probs[200:], labels[200:]).value)
    assert brier.condition == pytest.approx(compute_metric("brier", worse, labels[:200]).value)
    assert brier.low > 0


def test_bootstrap_progress_callback():
    probs, labels = _data()
    calls = []

    bootstrap_metrics(["accuracy"], probs, labels, n_boot=5, progress=lambda done, total: calls.append((done, total)))

    assert calls == [(i, 5) for i in range(1, 6)]


def test_bootstrap_of_kernel_metrics_states_subsample():
    probs, labels = _data(n=300, k=3)
    metrics = [("kce", {"max_pairs": 5000}), ("ece_kde", {"bandwidth": 0.1, "resample_max_n": 100})]

    estimates = bootstrap_metrics(metrics, probs, labels, n_boot=100)

    kce = estimates["kce@max_pairs=5000"]
    kde = estimates["ece_kde@bandwidth=0.1,resample_max_n=100"]
    assert kce.extra["interval_pairs"] == 5000
    assert kde.extra["interval_rows"] == 100
    assert kce.low <= kce.value <= kce.high
    assert kde.low <= kde.value <= kde.high
