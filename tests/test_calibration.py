"""Tests of tools/calibration.py on synthetic logits whose true calibration is known.

Labels are drawn from a chosen softmax of the logits with a fixed seed, so the parameters each
scaler should recover are known. The metrics are recomputed here with scikit-learn or plain
numpy rather than with the code under test.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.special import expit
from scipy.special import softmax as scipy_softmax
from sklearn.metrics import log_loss

from tools.calibration import (
    RECALIBRATION_METRICS,
    FitTemperatureInput,
    PlattScaler,
    Scaler,
    TemperatureScaler,
    VectorScaler,
    accuracy_near_confidence,
    clinical_sentence,
    evaluate_recalibration,
    fit_temperature,
    fit_temperature_arrays,
    make_scaler,
    recalibration_findings,
    scaler_from_dict,
)


def draw_labels(scores: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Draw one label per row from softmax(scores)."""
    probs = scipy_softmax(scores, axis=1)
    return (rng.random(len(probs))[:, None] > probs.cumsum(axis=1)).sum(axis=1)


def synthetic(n: int, k: int, true_temperature: float, seed: int, spread: float = 3.0):
    """Return logits and labels drawn from softmax(logits / true_temperature)."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0.0, spread, size=(n, k))
    return logits, draw_labels(logits / true_temperature, rng)


def hand_metrics(probs: np.ndarray, labels: np.ndarray, n_bins: int = 15) -> dict[str, float]:
    """Compute the four metrics with scikit-learn and explicit loops, independently of the module."""
    n, k = probs.shape
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == labels

    ece = 0.0
    for b in range(n_bins):
        lower, upper = b / n_bins, (b + 1) / n_bins
        member = (confidence >= lower) & ((confidence < upper) | (b == n_bins - 1))
        if member.any():
            ece += member.sum() / n * abs(confidence[member].mean() - correct[member].mean())

    one_hot = np.eye(k)[labels]
    return {
        "ece_top_label": ece,
        "nll": log_loss(labels, probs, labels=list(range(k))),
        "brier": float(((probs - one_hot) ** 2).sum(axis=1).mean()),
        "confidence_gap": float(confidence.mean() - correct.mean()),
    }


# ---------------------------------------------------------------------------------------------
# Fitting


@pytest.mark.parametrize("true_temperature", [0.6, 1.7])
def test_temperature_fit_recovers_known_temperature(true_temperature):
    logits, labels = synthetic(20_000, 5, true_temperature, seed=1)

    scaler = TemperatureScaler().fit(logits, labels)

    assert abs(scaler.temperature / true_temperature - 1) < 0.02


@pytest.mark.parametrize(
    "true_temperature, direction",
    [(1.7, "overconfident"), (0.6, "underconfident"), (1.0, "well calibrated")],
)
def test_fit_temperature_reports_interval_and_direction(true_temperature, direction):
    logits, labels = synthetic(4_000, 4, true_temperature, seed=21)

    result = fit_temperature_arrays(logits, labels, n_boot=60, seed=0)

    assert result.direction == direction
    assert result.low <= result.temperature <= result.high
    assert result.low <= true_temperature <= result.high
    assert result.nll_before == pytest.approx(log_loss(labels, scipy_softmax(logits, axis=1)))
    expected_after = log_loss(labels, scipy_softmax(logits / result.temperature, axis=1))
    assert result.nll_after == pytest.approx(expected_after)
    assert result.nll_after <= result.nll_before
    assert result.scaler == {
        "kind": "temperature",
        "temperature": result.temperature,
        "n_fit": 4000,
    }


def test_fit_temperature_tool_matches_array_function():
    logits, labels = synthetic(500, 3, 1.5, seed=3)
    request = FitTemperatureInput(logits=logits.tolist(), labels=labels.tolist(), n_boot=30, seed=4)

    from_tool = fit_temperature(request)
    from_arrays = fit_temperature_arrays(logits, labels, n_boot=30, seed=4)

    assert from_tool == from_arrays


def test_fit_temperature_bootstrap_reports_progress():
    logits, labels = synthetic(300, 3, 1.5, seed=5)
    calls = []

    fit_temperature_arrays(
        logits, labels, n_boot=25, progress=lambda done, total: calls.append((done, total))
    )

    assert calls[0] == (1, 25)
    assert calls[-1] == (25, 25)


def test_platt_scaling_recovers_known_slope_and_intercept():
    rng = np.random.default_rng(6)
    score = rng.normal(0.0, 2.0, size=30_000)
    labels = (rng.random(score.size) < expit(0.6 * score - 0.4)).astype(int)
    logits = np.column_stack([np.zeros_like(score), score])

    scaler = PlattScaler().fit(logits, labels)

    assert scaler.slope == pytest.approx(0.6, abs=0.03)
    assert scaler.intercept == pytest.approx(-0.4, abs=0.04)
    expected = expit(scaler.slope * score + scaler.intercept)
    np.testing.assert_allclose(scaler.transform(logits)[:, 1], expected, rtol=1e-12)


def test_vector_scaling_recovers_known_scale_and_bias():
    rng = np.random.default_rng(7)
    logits = rng.normal(0.0, 2.0, size=(30_000, 3))
    scale = np.array([0.5, 1.2, 0.8])
    bias = np.array([0.3, -0.2, -0.1])
    labels = draw_labels(logits * scale + bias, rng)

    scaler = VectorScaler().fit(logits, labels)

    np.testing.assert_allclose(scaler.scale, scale, atol=0.05)
    np.testing.assert_allclose(scaler.bias, bias, atol=0.05)
    assert scaler.bias.sum() == pytest.approx(0.0, abs=1e-12)


def test_vector_scaling_reduces_to_temperature_scaling():
    # Vector scaling with a = 1 / T for every class and b = 0 is temperature scaling, so both
    # fits must reach the same NLL when the data follow a single temperature.
    logits, labels = synthetic(5_000, 4, 1.5, seed=8)

    vector = VectorScaler().fit(logits, labels)
    temperature = TemperatureScaler().fit(logits, labels)

    vector_nll = log_loss(labels, vector.transform(logits))
    temperature_nll = log_loss(labels, temperature.transform(logits))
    assert vector_nll <= temperature_nll + 1e-9
    np.testing.assert_allclose(vector.scale, 1 / temperature.temperature, atol=0.06)


@pytest.mark.parametrize("kind", ["temperature", "vector", "platt"])
def test_scaler_round_trips_through_json(kind):
    k = 2 if kind == "platt" else 4
    logits, labels = synthetic(2_000, k, 1.4, seed=9)
    scaler = make_scaler(kind).fit(logits, labels)

    card = json.loads(json.dumps({"calibration": scaler.to_dict()}))
    restored = scaler_from_dict(card["calibration"])

    assert isinstance(restored, Scaler)
    assert type(restored) is type(scaler)
    assert restored.to_dict() == scaler.to_dict()
    np.testing.assert_allclose(restored.transform(logits), scaler.transform(logits), rtol=1e-12)
    np.testing.assert_allclose(scaler.transform(logits).sum(axis=1), 1.0, rtol=1e-12)


# ---------------------------------------------------------------------------------------------
# Bad input


def test_nan_logits_raise_naming_logits():
    logits, labels = synthetic(50, 3, 1.0, seed=10)
    logits[7, 1] = np.nan

    with pytest.raises(ValueError, match=r"logits .*row 7"):
        TemperatureScaler().fit(logits, labels)


def test_single_class_labels_raise_naming_labels():
    logits, _ = synthetic(50, 3, 1.0, seed=11)

    with pytest.raises(ValueError, match=r"labels contains only class 2"):
        fit_temperature_arrays(logits, np.full(50, 2), n_boot=20)


def test_label_count_mismatch_raises_naming_labels():
    logits, labels = synthetic(50, 3, 1.0, seed=12)

    with pytest.raises(ValueError, match=r"labels has 49 values but logits has 50 rows"):
        VectorScaler().fit(logits, labels[:49])


def test_label_outside_classes_raises_with_row():
    logits, labels = synthetic(50, 3, 1.0, seed=13)
    labels[4] = 3

    with pytest.raises(
        ValueError, match=r"labels has 1 value\(s\) outside 0..2 \(first at row 4: 3\)"
    ):
        TemperatureScaler().fit(logits, labels)


def test_one_dimensional_logits_raise():
    with pytest.raises(ValueError, match=r"logits must be 2-D"):
        TemperatureScaler().fit(np.zeros(10), np.zeros(10, dtype=int))


def test_platt_scaling_rejects_multiclass_logits():
    logits, labels = synthetic(50, 3, 1.0, seed=14)

    with pytest.raises(ValueError, match=r"logits has 3 columns; Platt scaling needs"):
        PlattScaler().fit(logits, labels)


def test_ragged_tool_logits_raise():
    request = FitTemperatureInput(logits=[[0.0, 1.0], [0.5]], labels=[0, 1], n_boot=20)

    with pytest.raises(ValueError, match=r"logits rows have different lengths"):
        fit_temperature(request)


def test_unfitted_scaler_raises_on_transform():
    with pytest.raises(ValueError, match=r"temperature scaler is not fitted"):
        TemperatureScaler().transform(np.zeros((2, 3)))


def test_unknown_scaler_kind_raises():
    with pytest.raises(ValueError, match=r"scaler kind 'isotonic' is unknown"):
        scaler_from_dict({"kind": "isotonic"})


def test_condition_shape_mismatch_raises_naming_condition():
    logits, labels = synthetic(50, 3, 1.0, seed=15)
    scaler = TemperatureScaler(temperature=1.0)

    with pytest.raises(ValueError, match=r"conditions\['shift:blur:2'\] labels has 40 values"):
        evaluate_recalibration(scaler, {"shift:blur:2": (logits, labels[:40])}, n_boot=20)


# ---------------------------------------------------------------------------------------------
# Before and after


@pytest.fixture(scope="module")
def overconfident_audit():
    """A model overconfident by T = 2 on clean data, calibrated on a shift, and a subgroup."""
    rng = np.random.default_rng(16)
    logits = rng.normal(0.0, 3.0, size=(3_000, 5))
    calibration_logits = rng.normal(0.0, 3.0, size=(3_000, 5))
    scaler = TemperatureScaler().fit(calibration_logits, draw_labels(calibration_logits / 2, rng))

    subgroup_logits = rng.normal(0.0, 3.0, size=(1_500, 5))
    conditions = {
        "clean": (logits, draw_labels(logits / 2, rng)),
        "shift:contrast:3": (logits, draw_labels(logits, rng)),
        "subgroup:sex:female": (subgroup_logits, draw_labels(subgroup_logits / 4, rng)),
    }
    verdicts = evaluate_recalibration(scaler, conditions, n_boot=200, seed=0)
    return scaler, conditions, {verdict.condition: verdict for verdict in verdicts}


def test_verdicts_match_independently_computed_metrics(overconfident_audit):
    scaler, conditions, verdicts = overconfident_audit

    for key, (logits, labels) in conditions.items():
        before = hand_metrics(scipy_softmax(logits, axis=1), labels)
        after = hand_metrics(scipy_softmax(logits / scaler.temperature, axis=1), labels)
        for metric in RECALIBRATION_METRICS:
            change = verdicts[key].change(metric)
            assert change.before == pytest.approx(before[metric], rel=1e-9), (key, metric)
            assert change.after == pytest.approx(after[metric], rel=1e-9), (key, metric)
            assert change.delta == pytest.approx(
                after[metric] - before[metric], rel=1e-9, abs=1e-12
            )


def test_verdicts_follow_ece_change_interval(overconfident_audit):
    _, _, verdicts = overconfident_audit

    assert verdicts["clean"].verdict == "helped"
    assert verdicts["shift:contrast:3"].verdict == "harmed"
    for verdict in verdicts.values():
        ece = verdict.change("ece_top_label")
        assert ece.low <= ece.delta <= ece.high
        assert ece.before_low <= ece.before <= ece.before_high
        assert ece.after_low <= ece.after <= ece.after_high


def test_identity_scaler_gives_zero_paired_change():
    # With T = 1 before and after are the same probabilities; paired resamples then give a
    # change of exactly 0 in every replicate.
    logits, labels = synthetic(800, 3, 1.5, seed=17)

    (verdict,) = evaluate_recalibration(
        TemperatureScaler(temperature=1.0), {"clean": (logits, labels)}, n_boot=50
    )

    assert verdict.verdict == "no clear change"
    for change in verdict.changes:
        assert (change.low, change.delta, change.high) == (0.0, 0.0, 0.0)
        assert change.p_value == 1.0


def test_verdict_reliability_bins_cover_every_image(overconfident_audit):
    _, conditions, verdicts = overconfident_audit

    for key, (_, labels) in conditions.items():
        for bins in (verdicts[key].reliability_before, verdicts[key].reliability_after):
            assert len(bins) == 15
            assert sum(b["count"] for b in bins) == labels.size


# ---------------------------------------------------------------------------------------------
# Findings


def test_harm_finding_names_harmed_shift(overconfident_audit):
    _, _, verdicts = overconfident_audit

    findings = recalibration_findings(list(verdicts.values()))
    harms = [f for f in findings if f["kind"] == "recalibration_harms"]

    assert [f["condition"] for f in harms] == ["shift:contrast:3"]
    ece = verdicts["shift:contrast:3"].change("ece_top_label")
    assert harms[0]["effect"] == pytest.approx(ece.delta)
    assert harms[0]["low"] > 0
    assert set(harms[0]) == {
        "kind",
        "condition",
        "metric",
        "effect",
        "low",
        "high",
        "p_value",
        "summary",
        "evidence",
    }


def test_subgroup_finding_when_subgroup_stays_overconfident(overconfident_audit):
    _, _, verdicts = overconfident_audit

    findings = recalibration_findings(list(verdicts.values()))
    subgroup = [f for f in findings if f["kind"] == "subgroup_calibration_differs"]

    assert [f["condition"] for f in subgroup] == ["subgroup:sex:female"]
    assert subgroup[0]["effect"] > 0.05
    assert subgroup[0]["low"] > 0
    assert "overconfident" in subgroup[0]["summary"]


def test_overconfidence_growing_with_severity_is_found():
    # An underconfident model (true temperature 0.5) whose signal fades under the shift: after
    # recalibration (multiplying logits by about 2) it grows more overconfident with severity.
    rng = np.random.default_rng(18)
    logits = rng.normal(0.0, 1.5, size=(3_000, 4))
    calibration_logits = rng.normal(0.0, 1.5, size=(3_000, 4))
    scaler = TemperatureScaler().fit(calibration_logits, draw_labels(calibration_logits * 2, rng))
    conditions = {"clean": (logits, draw_labels(logits * 2, rng))}
    severity_of = {}
    for severity in range(1, 6):
        key = f"shift:gaussian_noise:{severity}"
        conditions[key] = (logits, draw_labels(logits * 2 / (1 + 0.5 * severity), rng))
        severity_of[key] = ("gaussian_noise", severity)

    verdicts = evaluate_recalibration(scaler, conditions, n_boot=200, seed=0)
    findings = recalibration_findings(
        verdicts, severity_of=severity_of, model_direction="underconfident"
    )
    grows = [f for f in findings if f["kind"] == "recalibration_overconfidence_grows"]

    assert len(grows) == 1
    assert grows[0]["condition"] == "shift:gaussian_noise:5"
    curve = grows[0]["evidence"]["curve"]
    assert [point["severity"] for point in curve] == [0, 1, 2, 3, 4, 5]
    gaps = [point["confidence_gap_after"] for point in curve]
    assert gaps == sorted(gaps)
    assert grows[0]["effect"] == pytest.approx(gaps[-1] - gaps[0])
    assert grows[0]["low"] > 0


def test_no_severity_finding_for_overconfident_model(overconfident_audit):
    _, _, verdicts = overconfident_audit

    findings = recalibration_findings(
        list(verdicts.values()),
        severity_of={"shift:contrast:3": ("contrast", 3)},
        model_direction="overconfident",
    )

    assert not [f for f in findings if f["kind"] == "recalibration_overconfidence_grows"]


# ---------------------------------------------------------------------------------------------
# Clinical sentence


def confident_rows(n: int, accuracy: float) -> tuple[np.ndarray, np.ndarray]:
    """Return n binary predictions of confidence 0.9 for class 0, right for `accuracy` of them."""
    probs = np.tile([0.9, 0.1], (n, 1))
    labels = np.zeros(n, dtype=int)
    labels[: round(n * (1 - accuracy))] = 1
    return probs, labels


def test_accuracy_near_confidence_counts_band():
    probs, labels = confident_rows(100, 0.7)

    accuracy, count = accuracy_near_confidence(probs, labels, level=0.9, half_width=0.05)

    assert count == 100
    assert accuracy == pytest.approx(0.7)


def test_clinical_sentence_names_worst_condition():
    conditions = {
        "clean": confident_rows(200, 0.9),
        "external:derm7pt": confident_rows(200, 0.7),
        "shift:blur:1": confident_rows(200, 0.85),
    }

    sentence = clinical_sentence(
        conditions, descriptions={"external:derm7pt": "images from another device"}
    )

    assert sentence == (
        "After recalibration, predicted 90 % means about 90 % on images like the training data, "
        "but about 70 % on images from another device."
    )


def test_clinical_sentence_reports_too_few_images():
    probs = np.tile([0.6, 0.4], (50, 1))

    sentence = clinical_sentence({"clean": (probs, np.zeros(50, dtype=int))})

    assert "too few" in sentence
