"""The referral rule: below which confidence a prediction goes to a clinician, and whether the
rule learned in distribution still holds under shift.

The threshold is learned on the calibration split (so the test set stays unseen) as the one that
refers the fewest predictions while the accepted ones reach the target accuracy. It is then
applied unchanged to the clean test set and to every shift, subgroup and external set. A
condition where the accepted accuracy's bootstrap 95 % interval lies below the target is a
candidate finding.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from tools.metrics.failure import apply_referral, confidence_scores, referral_threshold

# Points kept on each risk-coverage curve for the report.
CURVE_POINTS = 50
# Conditions whose risk-coverage curves the report draws besides the clean one.
WORST_CURVES = 3


def risk_coverage_curve(confidence: np.ndarray, correct: np.ndarray,
                        points: int = CURVE_POINTS) -> dict[str, list[float]]:
    """Selective risk (error rate of the accepted) against coverage, most confident first."""
    order = np.argsort(-confidence, kind="stable")
    errors = np.cumsum(1.0 - correct[order])
    accepted = np.arange(1, len(order) + 1)
    coverage = accepted / len(order)
    risk = errors / accepted
    keep = np.unique(np.linspace(0, len(order) - 1, min(points, len(order))).astype(int))
    return {"coverage": coverage[keep].round(4).tolist(), "risk": risk[keep].round(4).tolist()}


def _accepted_accuracy_interval(confidence, correct, threshold, n_boot, seed
                                ) -> tuple[float | None, float | None, np.ndarray]:
    """Percentile interval of the accepted accuracy over bootstrap resamples (count weights)."""
    n = len(correct)
    if threshold is None or n_boot == 0:
        return None, None, np.array([])
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(n, np.full(n, 1.0 / n), size=n_boot).astype(np.float64)
    keep = (confidence >= threshold).astype(np.float64)
    accepted = counts @ keep
    right = counts @ (keep * correct)
    with np.errstate(invalid="ignore", divide="ignore"):
        replicates = np.where(accepted > 0, right / accepted, np.nan)
    replicates = replicates[np.isfinite(replicates)]
    if replicates.size == 0:
        return None, None, replicates
    low, high = np.percentile(replicates, [2.5, 97.5])
    return float(low), float(high), replicates


def _describe(key: str) -> str:
    parts = key.split(":")
    if parts[0] == "shift":
        return f"{parts[1].replace('_', ' ')} at severity {parts[2]}"
    if parts[0] in ("subgroup", "site"):
        return f"{parts[1]} = {parts[2]}"
    if parts[0] == "external":
        return f"the external set {parts[1]}"
    return "the clean test set"


def _sentence(target: float, clean: dict[str, Any], worst: dict[str, Any] | None) -> str:
    if clean["threshold"] is None or clean["accepted_value"] is None:
        return (f"No confidence threshold keeps accepted predictions at {target:.0%} accuracy on "
                "the calibration split: every prediction would need review.")
    text = (f"To keep accepted predictions at {target:.0%} accuracy, "
            f"{clean['referred']:.0%} of cases would be referred to a clinician on images like "
            f"the training data (accepted accuracy {clean['accepted_value']:.0%})")
    if worst is not None and worst["accepted_value"] is not None:
        text += (f"; under {_describe(worst['condition'])} accepted predictions drop to "
                 f"{worst['accepted_value']:.0%} with {worst['referred']:.0%} referred")
    return text + "."


def referral_report(calibration_probs: np.ndarray, calibration_labels: np.ndarray,
                    conditions: dict[str, tuple[np.ndarray, np.ndarray]], target: float,
                    score: str = "msp", n_boot: int = 1000, seed: int = 0
                    ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Learn the referral threshold and apply it to every condition.

    Returns the report section (target, threshold, one row per condition, risk-coverage curves,
    a plain sentence) and the candidate findings where the accepted accuracy falls below the
    target (effect = target − accepted accuracy; one-sided bootstrap p-value, doubled).
    """
    cal_confidence = confidence_scores(calibration_probs, score)
    cal_correct = (calibration_probs.argmax(axis=1) == calibration_labels).astype(float)
    rule = referral_threshold(cal_confidence, cal_correct, target)

    rows, candidates, curves = [], [], {}
    for key, (probs, labels) in conditions.items():
        confidence = confidence_scores(probs, score)
        correct = (probs.argmax(axis=1) == labels).astype(float)
        applied = apply_referral(confidence, correct, rule.threshold)
        low, high, replicates = _accepted_accuracy_interval(confidence, correct, rule.threshold,
                                                            n_boot, seed)
        value = None if math.isnan(applied.accepted_accuracy) else applied.accepted_accuracy
        rows.append({"condition": key, "threshold": rule.threshold,
                     "referred": applied.referred_share, "accepted_value": value,
                     "low": low, "high": high, "n": int(len(labels)),
                     "meets_target": None if value is None else bool(value >= target)})
        curves[key] = risk_coverage_curve(confidence, correct)
        if value is not None and high is not None and high < target and key != "clean":
            p_value = min(1.0, 2 * (np.sum(replicates >= target) + 1) / (replicates.size + 1))
            candidates.append({
                "kind": "failure_detection", "condition": key, "metric": "referral_accuracy",
                "effect": float(target - value), "low": float(target - high),
                "high": float(target - low), "p_value": float(p_value),
                "summary": (f"The referral rule learned in distribution (refer below confidence "
                            f"{rule.threshold:.2f}) keeps accepted predictions at only "
                            f"{value:.0%} accuracy under {_describe(key)} (95% CI {low:.0%} to "
                            f"{high:.0%}; target {target:.0%}); {applied.referred_share:.0%} "
                            "referred."),
                "evidence": {"threshold": rule.threshold, "target": target,
                             "accepted_accuracy": value, "referred": applied.referred_share},
            })

    by_key = {row["condition"]: row for row in rows}
    shifted = [r for r in rows if r["condition"] != "clean" and r["accepted_value"] is not None
               and not r["condition"].startswith(("subgroup:", "site:"))]
    worst = sorted(shifted, key=lambda r: r["accepted_value"])
    keep_curves = ["clean"] + [r["condition"] for r in worst[:WORST_CURVES]]
    clean = by_key.get("clean", {"threshold": rule.threshold, "referred": rule.referred_share,
                                 "accepted_value": rule.accepted_accuracy})
    report = {
        "target": target, "target_metric": "accuracy", "score": score,
        "threshold": rule.threshold, "calibration_referred": rule.referred_share,
        "calibration_accepted_accuracy": None if math.isnan(rule.accepted_accuracy)
        else rule.accepted_accuracy,
        "reason": rule.reason,
        "sentence": _sentence(target, clean, worst[0] if worst else None),
        "rows": rows,
        "curves": {k: curves[k] for k in keep_curves if k in curves},
    }
    return report, candidates
