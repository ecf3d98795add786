"""Referral rule learned on the calibration split and checked under other conditions."""

from __future__ import annotations

import numpy as np
import pytest

from tools.referral import referral_report, risk_coverage_curve


def two_class(confidence_of_right, confidence_of_wrong):
    """Probabilities whose top class is 0; labels 0 for the right rows, 1 for the wrong ones."""
    conf = np.concatenate([confidence_of_right, confidence_of_wrong])
    probs = np.stack([conf, 1 - conf], axis=1)
    labels = np.concatenate([np.zeros(len(confidence_of_right), int),
                             np.ones(len(confidence_of_wrong), int)])
    return probs, labels


def test_risk_coverage_curve_by_hand():
    confidence = np.array([0.9, 0.8, 0.7, 0.6])
    correct = np.array([1.0, 0.0, 1.0, 0.0])
    curve = risk_coverage_curve(confidence, correct)
    assert curve["coverage"] == [0.25, 0.5, 0.75, 1.0]
    assert curve["risk"] == pytest.approx([0.0, 0.5, 1 / 3, 0.5], abs=1e-4)


def test_rule_that_breaks_under_shift_is_a_candidate():
    # Calibration: right answers are confident (0.9), wrong ones are not (0.6).
    cal_probs, cal_labels = two_class(np.full(90, 0.9), np.full(10, 0.6))
    # Clean test behaves the same; under the shift the wrong answers become confident too.
    clean = two_class(np.full(90, 0.9), np.full(10, 0.6))
    shifted = two_class(np.full(60, 0.9), np.full(40, 0.95))
    report, candidates = referral_report(cal_probs, cal_labels,
                                         {"clean": clean, "shift:blur:5": shifted}, target=0.95,
                                         n_boot=200)
    rows = {r["condition"]: r for r in report["rows"]}
    # The threshold accepts exactly the 0.9-confidence rows: accuracy 1.0, 10 % referred.
    assert report["threshold"] == pytest.approx(0.9)
    assert rows["clean"]["referred"] == pytest.approx(0.10)
    assert rows["clean"]["accepted_value"] == pytest.approx(1.0)
    # Under the shift everything is accepted: 60 right out of 100.
    assert rows["shift:blur:5"]["referred"] == pytest.approx(0.0)
    assert rows["shift:blur:5"]["accepted_value"] == pytest.approx(0.60)
    assert [c["condition"] for c in candidates] == ["shift:blur:5"]
    # The effect is the drop from the clean test images: 1.0 - 0.60.
    assert candidates[0]["effect"] == pytest.approx(0.40)
    assert candidates[0]["evidence"]["reference_value"] == pytest.approx(1.0)
    assert candidates[0]["p_value"] < 1e-6
    assert "60 %" in report["sentence"]
    assert "10 %" in report["sentence"]


def test_unreachable_target_refers_everything():
    cal_probs, cal_labels = two_class(np.full(5, 0.6), np.full(5, 0.9))
    report, candidates = referral_report(cal_probs, cal_labels,
                                         {"clean": (cal_probs, cal_labels)}, target=0.99,
                                         n_boot=50)
    assert report["threshold"] is None
    assert report["rows"][0]["referred"] == 1.0
    assert report["rows"][0]["accepted_value"] is None
    assert candidates == []
    assert "No confidence threshold" in report["sentence"]


def test_sensitivity_target_counts_only_positive_cases():
    # Class 1 is the positive class. Calibration positives: 8 caught with confidence 0.9, 2
    # missed with confidence 0.6 (predicted 0). Negatives: 10 right at confidence 0.55.
    caught = np.tile([0.1, 0.9], (8, 1))
    missed = np.tile([0.6, 0.4], (2, 1))
    negatives = np.tile([0.55, 0.45], (10, 1))
    probs = np.vstack([caught, missed, negatives])
    labels = np.array([1] * 10 + [0] * 10)

    report, _ = referral_report(probs, labels, {"clean": (probs, labels)}, target=1.0,
                                n_boot=50, metric="sensitivity", positive=1,
                                positive_name="mel")
    # Among positives, accepting only confidence >= 0.9 reaches sensitivity 1.0; that also
    # refers every negative (confidence 0.55), so 12 of 20 rows are referred.
    assert report["threshold"] == pytest.approx(0.9)
    row = report["rows"][0]
    assert row["accepted_value"] == pytest.approx(1.0)
    assert row["referred"] == pytest.approx(12 / 20)
    assert report["calibration_referred"] == pytest.approx(12 / 20)
    assert "sensitivity for mel" in report["sentence"]


def test_sensitivity_target_needs_positive_class():
    probs, labels = two_class(np.full(5, 0.9), np.full(5, 0.6))
    with pytest.raises(ValueError, match="positive_class"):
        referral_report(probs, labels, {}, target=0.9, metric="sensitivity")


@pytest.mark.parametrize("key, phrase", [
    ("clean", "the clean test set"),
    ("shift:gaussian_blur:3", "gaussian blur at severity 3"),
    ("site:dataset:rosendahl", "dataset = rosendahl"),
    ("prevalence:nv_mel_even", "the class mix nv mel even"),
    ("reweight:equal_dataset", "the test set re-weighted to equal dataset"),
])
def test_referral_names_every_condition_kind(key, phrase):
    from tools.referral import _describe

    assert _describe(key) == phrase


@pytest.mark.parametrize("key, phrase", [
    ("prevalence:nv_mel_even", "images re-sampled to the class mix nv mel even"),
    ("reweight:equal_dataset", "images re-weighted to equal dataset"),
])
def test_calibration_names_population_conditions(key, phrase):
    from tools.calibration import describe_condition

    assert describe_condition(key) == phrase


def test_no_referral_candidate_when_clean_accepts_nothing():
    # On the calibration split only 5 very confident predictions reach the target, so the rule
    # accepts confidence 0.99 and above. No clean test image is that confident, so all are
    # referred. A shift makes a few wrong predictions that confident, which is not a drop from
    # clean.
    cal_probs, cal_labels = two_class(np.concatenate([np.full(5, 0.99), np.full(45, 0.7)]),
                                      np.full(50, 0.7))
    clean = two_class(np.full(50, 0.7), np.full(50, 0.7))
    shifted = two_class(np.full(50, 0.7), np.concatenate([np.full(6, 0.995), np.full(44, 0.7)]))

    report, candidates = referral_report(cal_probs, cal_labels,
                                         {"clean": clean, "shift:blur:5": shifted}, target=0.95,
                                         n_boot=200)

    rows = {r["condition"]: r for r in report["rows"]}
    assert report["threshold"] == pytest.approx(0.99)
    assert rows["clean"]["accepted_value"] is None
    assert rows["shift:blur:5"]["accepted_value"] == pytest.approx(0.0)
    assert candidates == []
