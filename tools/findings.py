"""Failure-mode detection from stored differences, with Benjamini–Hochberg control.

A candidate is a change against the reference (the clean test set for shifts, paired on the same
images; the rest of the test set for subgroups, unpaired) whose point estimate, in the metric's
bad direction, is at least `min_relevant_difference`. Every candidate of the audit enters one
Benjamini–Hochberg procedure at level `fdr`; a candidate becomes a finding when it is rejected
there and its 95 % bootstrap interval of the change excludes zero. The traffic light is amber for
an effect below twice the minimum and red above.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

# Metric families for the finding's kind; unknown metrics count as performance.
_FAMILY_KIND = {
    "calibration": "calibration",
    "proper_score": "calibration",
    "failure_detection": "failure_detection",
}


def _describe_condition(condition: dict[str, Any]) -> str:
    kind = condition["kind"]
    params = condition.get("params", {})
    if kind == "shift":
        return f"{condition['name'].replace('_', ' ')} at severity {params.get('severity')}"
    if kind in ("subgroup", "site"):
        return f"{params.get('column')} = {params.get('value')}"
    if kind == "prevalence":
        return f"the class mix {condition['name'].replace('_', ' ')}"
    name = str(condition.get("name") or condition["key"]).replace("_", " ")
    if kind == "reweight" and params.get("column"):
        return f"the test set re-weighted by {params['column']} ({name})"
    if kind == "external":
        return f"the external test set {condition['name']}"
    return name


def _fmt(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.3f}"


def detect_findings(
    differences: list[dict[str, Any]],
    conditions: dict[str, dict[str, Any]],
    metric_info: Callable[[str], tuple[str, str, bool]],
    min_relevant_difference: float = 0.05,
    fdr: float = 0.05,
    extra_candidates: list[dict[str, Any]] = (),
) -> list[dict[str, Any]]:
    """Select findings among the stored differences of one audit.

    Parameters
    ----------
    differences : rows with condition, metric, delta (condition − reference), low, high,
        p_value, paired, reference_value, condition_value.
    conditions : condition key -> {key, kind, name, params, too_small}.
    metric_info : metric id -> (display name, family, higher_is_better).

    extra_candidates : candidate findings formed elsewhere (recalibration, referral), each with
        kind, condition, metric, effect, low, high, p_value, summary, evidence and an interval
        that already excludes zero. They enter the same Benjamini–Hochberg procedure.

    Returns the findings as dicts (id, kind, condition, metric, effect, low, high, p_value,
    q_value, light, summary, evidence), the largest effect first.
    """
    from scipy.stats import false_discovery_control

    candidates = []
    for row in differences:
        condition = conditions.get(row["condition"])
        if condition is None or condition.get("too_small"):
            continue
        delta, p_value = row.get("delta"), row.get("p_value")
        if delta is None or p_value is None or not np.isfinite(delta) or not np.isfinite(p_value):
            continue
        display, family, higher_is_better = metric_info(row["metric"])
        # The effect is measured in the direction that makes the model worse.
        sign = -1.0 if higher_is_better else 1.0
        effect = sign * delta
        if effect < min_relevant_difference:
            continue
        low, high = row.get("low"), row.get("high")
        bad_low, bad_high = sorted((sign * low, sign * high)) if low is not None and high is not None else (None, None)
        candidates.append((row, condition, display, family, effect, bad_low, bad_high, p_value))

    extra = [c for c in extra_candidates
             if c.get("p_value") is not None and np.isfinite(c["p_value"])
             and c.get("effect") is not None and c["effect"] >= min_relevant_difference]
    if not candidates and not extra:
        return []
    p_values = [c[-1] for c in candidates] + [c["p_value"] for c in extra]
    q_values = false_discovery_control(p_values, method="bh")
    extra_q = q_values[len(candidates):]
    q_values = q_values[:len(candidates)]

    findings = []
    for (row, condition, display, family, effect, low, high, p_value), q_value in zip(candidates, q_values):
        interval_clear = low is not None and low > 0
        if q_value > fdr or not interval_clear:
            continue
        light = "red" if effect >= 2 * min_relevant_difference else "amber"
        where = _describe_condition(condition)
        verb = "fell" if row["delta"] < 0 else "rose"
        direction = "lower" if row["delta"] < 0 else "higher"
        if row.get("paired"):
            summary = (
                f"{display} {verb} from {_fmt(row.get('reference_value'))} to "
                f"{_fmt(row.get('condition_value'))} under {where} ({effect:.3f} {direction}, "
                f"95 % interval {low:.3f} to {high:.3f} {direction}; paired on the same images)."
            )
        else:
            # A subgroup is compared with the other images, not with itself before a change.
            reference = ("the clean test images" if row.get("reference") in (None, "", "clean")
                         else "the rest of the test set")
            summary = (
                f"{display} was {_fmt(row.get('condition_value'))} for {where}, against "
                f"{_fmt(row.get('reference_value'))} for {reference} "
                f"({effect:.3f} {direction}, 95 % interval {low:.3f} to {high:.3f} {direction})."
            )
        findings.append({
            "kind": _FAMILY_KIND.get(family, "performance"),
            "condition": row["condition"],
            "metric": row["metric"],
            "effect": float(effect),
            "low": float(low),
            "high": float(high),
            "p_value": float(p_value),
            "q_value": float(q_value),
            "light": light,
            "summary": summary,
            "evidence": {
                "reference": row.get("reference"),
                "reference_value": row.get("reference_value"),
                "condition_value": row.get("condition_value"),
                "delta": row["delta"],
                "delta_low": row.get("low"),
                "delta_high": row.get("high"),
                "paired": bool(row.get("paired")),
                "condition_kind": condition["kind"],
            },
        })

    for candidate, q_value in zip(extra, extra_q):
        if q_value > fdr:
            continue
        light = "red" if candidate["effect"] >= 2 * min_relevant_difference else "amber"
        findings.append({**candidate, "effect": float(candidate["effect"]),
                         "q_value": float(q_value), "light": light,
                         "evidence": candidate.get("evidence", {})})

    findings.sort(key=lambda f: -f["effect"])
    for number, finding in enumerate(findings, start=1):
        finding["id"] = f"F{number:03d}"
    return findings
