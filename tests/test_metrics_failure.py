"""Failure-detection metrics and the referral rule, against values worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tools.metrics import MetricError, bootstrap_metrics, compute_metric
from tools.metrics.failure import apply_referral, confidence_scores, referral_threshold


def _binary(confidences, correct):
    """Binary probabilities whose argmax is class 0 with the given confidence, and labels
    that make each prediction right or wrong as asked."""
    confidences = np.asarray(confidences, dtype=float)
    probs = np.stack([confidences, 1.0 - confidences], axis=1)
    labels = np.where(np.asarray(correct, dtype=bool), 0, 1)
    return probs, labels


# Confidences 0.9, 0.8, 0.7, 0.6 with right, wrong, right, wrong:
# risk at coverage 1..4 = 0, 1/2, 1/3, 2/4, so AURC = (0 + 1/2 + 1/3 + 1/2) / 4 = 1/3.
# Best order (right ones first): 0, 0, 1/3, 2/4, so the optimum is 5/24 and e-AURC = 1/8.
# Correct-vs-wrong pairs ranked right: (0.9, 0.8), (0.9, 0.6), (0.7, 0.6) of 4, AUROC_f = 3/4.
SIMPLE = _binary([0.9, 0.8, 0.7, 0.6], [1, 0, 1, 0])


def test_aurc_by_hand():
    assert compute_metric("aurc", *SIMPLE).value == pytest.approx(1 / 3)


def test_eaurc_by_hand():
    assert compute_metric("eaurc", *SIMPLE).value == pytest.approx(1 / 3 - 5 / 24)


def test_auroc_f_by_hand():
    assert compute_metric("auroc_f", *SIMPLE).value == pytest.approx(0.75)


def test_selective_risk_by_hand():
    assert compute_metric("selective_risk", *SIMPLE, coverage=0.5).value == pytest.approx(0.5)
    assert compute_metric("selective_risk", *SIMPLE, coverage=0.25).value == pytest.approx(0.0)
    assert compute_metric("selective_risk", *SIMPLE, coverage=1.0).value == pytest.approx(0.5)


# Confidences 0.8, 0.8, 0.6 with right, wrong, right. The tied pair comes first in random
# order, so the expected errors among the top 1 and top 2 are 0.5 and 1:
# AURC = (0.5/1 + 1/2 + 1/3) / 3 = 4/9. AUROC_f: (0.8 vs 0.8) counts 1/2, (0.6 vs 0.8) 0,
# so 1/4. The best order (both right rows first) has risks 0, 0, 1/3, so the optimum is 1/9.
TIED = _binary([0.8, 0.8, 0.6], [1, 0, 1])


def test_aurc_with_tied_confidence():
    assert compute_metric("aurc", *TIED).value == pytest.approx(4 / 9)


def test_eaurc_with_tied_confidence():
    assert compute_metric("eaurc", *TIED).value == pytest.approx(4 / 9 - 1 / 9)


def test_auroc_f_with_tied_confidence():
    assert compute_metric("auroc_f", *TIED).value == pytest.approx(0.25)


def test_selective_risk_inside_a_tie():
    # Coverage 1/3 accepts one of the two tied rows: expected error 1/2.
    assert compute_metric("selective_risk", *TIED, coverage=1 / 3).value == pytest.approx(0.5)


def test_aurc_does_not_depend_on_order_within_ties():
    probs, labels = TIED
    swapped = compute_metric("aurc", probs[[1, 0, 2]], labels[[1, 0, 2]]).value

    assert swapped == pytest.approx(4 / 9)


def test_failure_metrics_all_correct():
    probs, labels = _binary([0.9, 0.7, 0.6], [1, 1, 1])

    assert compute_metric("aurc", probs, labels).value == 0.0
    assert compute_metric("eaurc", probs, labels).value == 0.0
    result = compute_metric("auroc_f", probs, labels)
    assert math.isnan(result.value)
    assert "every prediction is correct" in result.reason


def test_failure_metrics_all_wrong():
    probs, labels = _binary([0.9, 0.7, 0.6], [0, 0, 0])

    assert compute_metric("aurc", probs, labels).value == pytest.approx(1.0)
    assert compute_metric("eaurc", probs, labels).value == pytest.approx(0.0)
    result = compute_metric("auroc_f", probs, labels)
    assert math.isnan(result.value)
    assert "no prediction is correct" in result.reason


def test_aurc_count_weights_equal_repeated_rows():
    rng = np.random.default_rng(3)
    probs = rng.dirichlet(np.ones(4), 60)
    probs[10:20] = probs[0]  # ties in confidence
    labels = rng.integers(0, 4, 60)
    counts = rng.integers(0, 4, 60)

    for metric in ("aurc", "eaurc", "auroc_f", "selective_risk"):
        weighted = compute_metric(metric, probs, labels, weights=counts).value
        repeated = compute_metric(metric, np.repeat(probs, counts, axis=0), np.repeat(labels, counts)).value
        assert weighted == pytest.approx(repeated, abs=1e-12), metric


def test_confidence_scores_by_hand():
    probs = np.array([[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]])

    assert confidence_scores(probs, "msp") == pytest.approx([0.5, 0.8])
    assert confidence_scores(probs, "margin") == pytest.approx([0.2, 0.7])
    entropy = [-(0.5 * math.log(0.5) + 0.3 * math.log(0.3) + 0.2 * math.log(0.2)),
               -(2 * 0.1 * math.log(0.1) + 0.8 * math.log(0.8))]
    assert confidence_scores(probs, "entropy") == pytest.approx([-e for e in entropy])


def test_confidence_scores_reject_unknown_kind():
    with pytest.raises(MetricError, match="confidence kind"):
        confidence_scores(np.array([[0.5, 0.5]]), "energy")


def test_failure_metrics_use_chosen_confidence():
    # Top probabilities 0.50, 0.46, 0.40 but margins 0.02, 0.00, 0.10, so the two orders differ.
    probs = np.array([[0.50, 0.48, 0.02], [0.46, 0.08, 0.46], [0.40, 0.30, 0.30]])
    labels = np.array([1, 0, 0])

    by_msp = compute_metric("aurc", probs, labels, confidence="msp").value
    by_margin = compute_metric("aurc", probs, labels, confidence="margin").value

    # msp order 0, 1, 2 (wrong first): risks 1, 1/2, 1/3 -> 11/18.
    # margin order 2 (0.10), 0 (0.02), 1 (0.00): right, wrong, right -> 0, 1/2, 1/3 -> 5/18.
    assert by_msp == pytest.approx(11 / 18)
    assert by_margin == pytest.approx(5 / 18)


def test_failure_metrics_bootstrap_interval_contains_estimate():
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(3) * 0.7, 400)
    labels = rng.integers(0, 3, 400)

    estimates = bootstrap_metrics(["auroc_f", "aurc", "eaurc", ("selective_risk", {"coverage": 0.5})],
                                  probs, labels, n_boot=200, seed=1)

    for key, estimate in estimates.items():
        assert estimate.low <= estimate.value <= estimate.high, key
    assert "selective_risk@coverage=0.5" in estimates


# --- Referral threshold --------------------------------------------------------------------


def _brute_force_referral(confidence, correct, target, weights):
    """Try every threshold; keep the feasible one that refers the least."""
    best = None
    for threshold in np.unique(confidence):
        accepted = confidence >= threshold
        accepted_weight = weights[accepted].sum()
        if accepted_weight == 0:
            continue
        accuracy = weights[accepted] @ correct[accepted] / accepted_weight
        referred = 1 - accepted_weight / weights.sum()
        if accuracy >= target - 1e-12 and (best is None or referred < best[1]):
            best = (threshold, referred, accuracy)
    return best


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("target", [0.6, 0.8, 0.9, 0.95, 0.99])
def test_referral_threshold_matches_brute_force(seed, target):
    rng = np.random.default_rng(seed)
    n = 150
    # Rounded confidences give ties; correctness loosely follows confidence.
    confidence = np.round(rng.uniform(0.3, 1.0, n), 2)
    correct = (rng.uniform(size=n) < confidence).astype(int)
    weights = rng.integers(1, 4, n).astype(float) if seed % 2 else np.ones(n)

    rule = referral_threshold(confidence, correct, target, weights=weights)
    expected = _brute_force_referral(confidence, correct, target, weights)

    if expected is None:
        assert rule.threshold is None
        assert rule.referred_share == 1.0
        assert rule.reason
    else:
        assert rule.threshold == expected[0]
        assert rule.referred_share == pytest.approx(expected[1])
        assert rule.accepted_accuracy == pytest.approx(expected[2])
        assert rule.accepted_accuracy >= target - 1e-12


def test_referral_with_every_prediction_right_refers_nobody():
    rule = referral_threshold([0.9, 0.6, 0.7], [1, 1, 1], 0.95)

    assert rule.referred_share == 0.0
    assert rule.threshold == 0.6


def test_referral_unreachable_target_refers_everybody():
    rule = referral_threshold([0.9, 0.6, 0.7], [0, 0, 0], 0.5)

    assert rule.threshold is None
    assert rule.referred_share == 1.0
    assert "no confidence threshold" in rule.reason


def test_apply_referral_on_new_data():
    rule = referral_threshold([0.9, 0.8, 0.7, 0.6], [1, 1, 0, 0], 1.0)
    assert rule.threshold == 0.8

    shifted = apply_referral([0.95, 0.85, 0.5, 0.4], [1, 0, 1, 1], rule.threshold)

    assert shifted.referred_share == pytest.approx(0.5)
    assert shifted.accepted_accuracy == pytest.approx(0.5)


def test_referral_rejects_bad_inputs():
    with pytest.raises(MetricError, match="target"):
        referral_threshold([0.5], [1], 1.5)
    with pytest.raises(MetricError, match="correct row 1"):
        referral_threshold([0.5, 0.6], [1, 2], 0.9)
    with pytest.raises(MetricError, match="confidence row 0"):
        referral_threshold([np.nan], [1], 0.9)
