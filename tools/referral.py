"""The referral rule: below which confidence a prediction goes to a clinician, and whether the
rule learned in distribution still reaches its target under shift.

The threshold is learned on the calibration split (so the test set stays unseen) as the one that
refers the fewest predictions while the accepted ones reach the target accuracy. It is then
applied unchanged to the clean test set and to every shift, subgroup and external set. A
condition where the accepted accuracy's bootstrap 95 % interval lies below the target is a
candidate finding.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from tools.metrics.bootstrap import bootstrap_p_value
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


def _hits_and_scope(probs: np.ndarray, labels: np.ndarray, metric: str,
                    positive: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Per row: whether it counts as a hit, and whether it counts at all, for the target metric.

    Accuracy: a hit is a correct prediction, every row counts. Sensitivity: a hit is a positive
    case predicted positive, and only the positive cases count.
    """
    predicted = probs.argmax(axis=1)
    if metric == "sensitivity":
        return (predicted == positive).astype(float), (labels == positive).astype(float)
    return (predicted == labels).astype(float), np.ones(len(labels))


def _accepted_value(confidence, hits, scope, threshold) -> float | None:
    if threshold is None:
        return None
    keep = (confidence >= threshold) * scope
    return float(keep @ hits / keep.sum()) if keep.sum() > 0 else None


def _accepted_interval(confidence, hits, scope, threshold, n_boot, seed
                       ) -> tuple[float | None, float | None, np.ndarray]:
    """Percentile interval of the accepted accuracy (or sensitivity) over bootstrap resamples
    drawn as count weights, and the replicates (NaN where a resample accepts nothing).

    The resamples depend only on the seed and the number of rows, so two conditions on the
    same images (clean and a shift) get the same resamples, and their replicates are paired.
    """
    n = len(hits)
    if threshold is None or n_boot == 0:
        return None, None, np.array([])
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(n, np.full(n, 1.0 / n), size=n_boot).astype(np.float64)
    keep = (confidence >= threshold).astype(np.float64) * scope
    accepted = counts @ keep
    right = counts @ (keep * hits)
    with np.errstate(invalid="ignore", divide="ignore"):
        replicates = np.where(accepted > 0, right / accepted, np.nan)
    finite = replicates[np.isfinite(replicates)]
    if finite.size == 0:
        return None, None, replicates
    low, high = np.percentile(finite, [2.5, 97.5])
    return float(low), float(high), replicates


def _describe(key: str) -> str:
    parts = key.split(":")
    if parts[0] == "shift":
        return f"{parts[1].replace('_', ' ')} at severity {parts[2]}"
    if parts[0] in ("subgroup", "site"):
        return f"{parts[1]} = {parts[2]}"
    if parts[0] == "external":
        return f"the external set {parts[1]}"
    if parts[0] == "prevalence":
        return f"the class mix {parts[-1].replace('_', ' ')}"
    if parts[0] == "reweight":
        return f"the test set re-weighted to {parts[-1].replace('_', ' ')}"
    if key == "clean":
        return "the clean test set"
    return parts[-1].replace("_", " ")


def _percent(share: float) -> str:
    return f"{100 * share:.0f} %"


def _sentence(target: float, clean: dict[str, Any], worst: dict[str, Any] | None,
              what: str = "accuracy") -> str:
    if clean["threshold"] is None or clean["accepted_value"] is None:
        return (f"No confidence threshold keeps accepted predictions at {_percent(target)} {what} on "
                "the calibration split: every prediction would need review.")
    text = (f"To keep accepted predictions at {_percent(target)} {what}, "
            f"{_percent(clean['referred'])} of cases would be referred to a clinician on images like "
            f"the training data (accepted {what} {_percent(clean['accepted_value'])})")
    if worst is not None and worst["accepted_value"] is not None:
        text += (f"; under {_describe(worst['condition'])} accepted predictions drop to "
                 f"{_percent(worst['accepted_value'])} with {_percent(worst['referred'])} referred")
    return text + "."


def referral_report(calibration_probs: np.ndarray, calibration_labels: np.ndarray,
                    conditions: dict[str, tuple[np.ndarray, np.ndarray]], target: float,
                    score: str = "msp", n_boot: int = 1000, seed: int = 0,
                    metric: str = "accuracy", positive: int | None = None,
                    positive_name: str | None = None,
                    ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Learn the referral threshold and apply it to every condition.

    `metric` is what the accepted predictions must reach: "accuracy", or "sensitivity" for the
    class `positive` (the accepted positive cases that the model calls positive).

    Returns the report section (target, threshold, one row per condition, risk-coverage curves,
    a plain sentence) and the candidate findings: conditions where the accepted value is
    clearly below the target and below its value on the clean test images. As for every other
    finding, the effect is the drop from clean (clean accepted value − accepted value), with a
    bootstrap interval (paired for shifts) and the p-value of ``bootstrap_p_value``. When no
    prediction is accepted on the clean test images, the rule already refers every case and
    no candidate is formed.
    """
    if metric not in ("accuracy", "sensitivity"):
        raise ValueError(f"referral metric {metric!r} is invalid: use accuracy or sensitivity")
    if metric == "sensitivity" and positive is None:
        raise ValueError("a sensitivity referral target needs context.positive_class")
    what = "accuracy" if metric == "accuracy" else f"sensitivity for {positive_name or positive}"

    cal_confidence = confidence_scores(calibration_probs, score)
    cal_hits, cal_scope = _hits_and_scope(calibration_probs, calibration_labels, metric, positive)
    # Among the rows that count, the lowest feasible threshold also refers the fewest rows
    # overall, because the share referred only grows with the threshold.
    in_scope = cal_scope > 0
    rule = referral_threshold(cal_confidence[in_scope], cal_hits[in_scope], target)

    rows, candidates, curves, replicates_of = [], [], {}, {}
    for key, (probs, labels) in conditions.items():
        confidence = confidence_scores(probs, score)
        correct = (probs.argmax(axis=1) == labels).astype(float)
        hits, scope = _hits_and_scope(probs, labels, metric, positive)
        applied = apply_referral(confidence, correct, rule.threshold)
        low, high, replicates = _accepted_interval(confidence, hits, scope, rule.threshold,
                                                   n_boot, seed)
        value = _accepted_value(confidence, hits, scope, rule.threshold)
        rows.append({"condition": key, "threshold": rule.threshold,
                     "referred": applied.referred_share, "accepted_value": value,
                     "low": low, "high": high, "n": len(labels),
                     "meets_target": None if value is None else bool(value >= target)})
        curves[key] = risk_coverage_curve(confidence, correct)
        replicates_of[key] = replicates

    by_key = {row["condition"]: row for row in rows}
    clean_row = by_key.get("clean")
    clean_value = clean_row["accepted_value"] if clean_row else None
    for row in rows:
        key, value, high = row["condition"], row["accepted_value"], row["high"]
        # Only shifts are judged: they keep the clean images, so the drop is paired.
        if (clean_value is None or not key.startswith("shift:") or value is None or high is None
                or not high < target):
            continue
        drops = replicates_of["clean"] - replicates_of[key]
        finite = drops[np.isfinite(drops)]
        if finite.size == 0:
            continue
        drop_low, drop_high = (float(v) for v in np.percentile(finite, [2.5, 97.5]))
        if not drop_low > 0:
            continue
        candidates.append({
            "kind": "failure_detection", "condition": key, "metric": f"referral_{metric}",
            "effect": float(clean_value - value), "low": drop_low, "high": drop_high,
            "p_value": bootstrap_p_value(drops, clean_value - value),
            "summary": (f"The referral rule learned in distribution (refer below confidence "
                        f"{rule.threshold:.2f}) keeps accepted predictions at {_percent(value)} "
                        f"{what} under {_describe(key)}, against {_percent(clean_value)} on the "
                        f"clean test images (target {_percent(target)}); "
                        f"{_percent(row['referred'])} referred."),
            "evidence": {"threshold": rule.threshold, "target": target,
                         "target_metric": metric, "accepted_value": value,
                         "referred": row["referred"], "reference": "clean",
                         "reference_value": clean_value, "condition_value": value},
        })

    shifted = [r for r in rows if r["condition"] != "clean" and r["accepted_value"] is not None
               and not r["condition"].startswith(("subgroup:", "site:"))]
    worst = sorted(shifted, key=lambda r: r["accepted_value"])
    keep_curves = ["clean"] + [r["condition"] for r in worst[:WORST_CURVES]]
    calibration_referred = (1.0 if rule.threshold is None
                            else float(np.mean(cal_confidence < rule.threshold)))
    calibration_value = _accepted_value(cal_confidence, cal_hits, cal_scope, rule.threshold)
    clean = by_key.get("clean", {"threshold": rule.threshold, "referred": calibration_referred,
                                 "accepted_value": calibration_value})
    report = {
        "target": target, "target_metric": metric, "positive_class": positive_name,
        "score": score, "threshold": rule.threshold,
        "calibration_referred": calibration_referred,
        "calibration_accepted_value": calibration_value,
        "reason": rule.reason,
        "sentence": _sentence(target, clean, worst[0] if worst else None, what),
        "rows": rows,
        "curves": {k: curves[k] for k in keep_curves if k in curves},
    }
    return report, candidates
