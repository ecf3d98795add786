"""Failure detection: can the confidence score tell right predictions from wrong ones?

Correctness is that of the argmax decision. Confidence scores come from one interface,
``confidence_scores``; a recalibrated probability is the maximum softmax probability of the
recalibrated probabilities, so callers pass those as ``probs``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.special import digamma

from ._inputs import MetricError, MetricInputs, validate_probs, validate_weights
from .ranking import binary_auroc
from .registry import MetricResult, nan_result, register

CONFIDENCE_KINDS = ("msp", "entropy", "margin")


def _confidence_from_probs(probs: np.ndarray, kind: str) -> np.ndarray:
    if kind == "msp":
        return probs.max(axis=1)
    if kind == "entropy":
        # Negative entropy Σ p log p, so that higher means more confident, as for the others.
        logs = np.log(np.where(probs > 0, probs, 1.0))
        return (probs * logs).sum(axis=1)
    if kind == "margin":
        top_two = np.partition(probs, probs.shape[1] - 2, axis=1)[:, -2:]
        return top_two[:, 1] - top_two[:, 0]
    raise MetricError(f"confidence kind must be one of {CONFIDENCE_KINDS}, got {kind!r}")


def confidence_scores(probs, kind: str = "msp", renormalise: bool = False) -> np.ndarray:
    """Return one confidence score per row, higher meaning more confident.

    Parameters
    ----------
    probs : (n, K) probabilities (or (n,) binary positive-class probabilities).
    kind : "msp" (maximum softmax probability), "entropy" (negative predictive entropy
        Σ_k p_k log p_k, in nats) or "margin" (top probability minus the second).
    """
    if kind not in CONFIDENCE_KINDS:
        raise MetricError(f"confidence kind must be one of {CONFIDENCE_KINDS}, got {kind!r}")
    return _confidence_from_probs(validate_probs(probs, renormalise=renormalise), kind)


def _ranked_groups(confidence: np.ndarray, correct: np.ndarray, weights: np.ndarray):
    """Weight and error weight per tie group of confidence, most confident group first."""
    order = np.argsort(-confidence, kind="stable")
    ordered = confidence[order]
    starts = np.flatnonzero(np.concatenate(([True], np.diff(ordered) != 0)))
    group_weight = np.add.reduceat(weights[order], starts)
    group_errors = np.add.reduceat(weights[order] * (1.0 - correct[order]), starts)
    return ordered[starts], group_weight, group_errors


def _sum_of_expected_risks(group_weight: np.ndarray, group_errors: np.ndarray) -> float:
    """Σ_k E[errors among the k most confident] / k over every accepted count k = 1..W.

    Within a tie group the order is random, so the expected errors grow linearly through the
    group. For a group of weight m after W0 accepted rows and E0 errors,
    Σ_{j=1..m} (E0 + j·e/m) / (W0 + j) = E0·S + (e/m)(m − W0·S), S = ψ(W0 + m + 1) − ψ(W0 + 1),
    which also extends the sum to non-integer weights.
    """
    kept = group_weight > 0
    weight, errors = group_weight[kept], group_errors[kept]
    before = np.concatenate(([0.0], np.cumsum(weight)[:-1]))
    errors_before = np.concatenate(([0.0], np.cumsum(errors)[:-1]))
    harmonic = digamma(before + weight + 1.0) - digamma(before + 1.0)
    return float(np.sum(errors_before * harmonic + errors / weight * (weight - before * harmonic)))


def aurc_value(confidence: np.ndarray, correct: np.ndarray, weights: np.ndarray) -> float:
    _, group_weight, group_errors = _ranked_groups(confidence, correct, weights)
    return _sum_of_expected_risks(group_weight, group_errors) / weights.sum()


def optimal_aurc(correct: np.ndarray, weights: np.ndarray) -> float:
    """AURC of the ranking that accepts every correct prediction before any wrong one."""
    total = weights.sum()
    errors = float(weights @ (1.0 - correct))
    group_weight = np.array([total - errors, errors])
    group_errors = np.array([0.0, errors])
    return _sum_of_expected_risks(group_weight, group_errors) / total


def _confidence(inputs: MetricInputs, kind: str) -> np.ndarray:
    if kind not in CONFIDENCE_KINDS:
        raise MetricError(f"confidence kind must be one of {CONFIDENCE_KINDS}, got {kind!r}")
    return inputs.cached(("confidence", kind), lambda: _confidence_from_probs(inputs.probs, kind))


@register(
    "auroc_f",
    display="AUROC_f",
    family="failure_detection",
    higher_is_better=True,
    reading="Chance that a randomly chosen correct prediction has higher confidence than a randomly chosen wrong one; 0.5 means confidence cannot flag errors.",
    confidence="msp",
)
def auroc_f(inputs: MetricInputs, weights: np.ndarray, confidence: str = "msp") -> MetricResult:
    """AUROC of the confidence score for separating correct (positive) from wrong predictions.

    Exact trapezoid over every distinct confidence, so tied confidences count one half. NaN
    when every prediction is correct or every one is wrong.
    """
    scores = _confidence(inputs, confidence)
    correct_weight = float(weights @ inputs.correct)
    wrong_weight = float(weights.sum()) - correct_weight
    if correct_weight <= 0:
        return nan_result("AUROC_f is undefined because no prediction is correct")
    if wrong_weight <= 0:
        return nan_result("AUROC_f is undefined because every prediction is correct")

    def build():
        order = np.argsort(-scores, kind="stable")
        ordered = scores[order]
        run_ends = np.append(np.flatnonzero(np.diff(ordered) != 0), inputs.n - 1)
        return order, inputs.correct[order], run_ends

    order, target, run_ends = inputs.cached(("failure_sorted", confidence), build)
    ordered_weights = weights[order]
    tp = np.cumsum(ordered_weights * target)[run_ends]
    fp = np.cumsum(ordered_weights * (1.0 - target))[run_ends]
    return MetricResult(binary_auroc(tp, fp))


@register(
    "aurc",
    display="AURC",
    family="failure_detection",
    higher_is_better=False,
    reading="Average error rate among the predictions kept when the least confident ones are set aside, over every share kept, as a fraction: 0.2 means 1 in 5 kept predictions is wrong on average.",
    confidence="msp",
)
def aurc(inputs: MetricInputs, weights: np.ndarray, confidence: str = "msp") -> MetricResult:
    """Area under the risk-coverage curve, AURC = (1/n) Σ_{k=1..n} risk_k (Geifman et al. 2019).

    risk_k is the error rate among the k most confident predictions. Within a tie of
    confidence it is the expectation over a random order of the tied rows. AURC is 0 when
    every prediction is correct and 1 when every one is wrong.
    """
    scores = _confidence(inputs, confidence)
    return MetricResult(aurc_value(scores, inputs.correct, weights))


@register(
    "eaurc",
    display="e-AURC",
    family="failure_detection",
    higher_is_better=False,
    reading="How much worse the confidence ranking is at setting errors aside than a perfect ranking would be, with the same number of errors.",
    confidence="msp",
)
def eaurc(inputs: MetricInputs, weights: np.ndarray, confidence: str = "msp") -> MetricResult:
    """Excess AURC: AURC minus the AURC of the ranking that puts every correct prediction first.

    Both terms use the same discrete sum, so e-AURC is 0 for a perfect ranking, including
    the all-correct and all-wrong cases.
    """
    scores = _confidence(inputs, confidence)
    value = aurc_value(scores, inputs.correct, weights) - optimal_aurc(inputs.correct, weights)
    # Rounding can leave a perfect ranking a hair below 0.
    if -1e-12 < value < 0:
        value = 0.0
    return MetricResult(value)


@register(
    "selective_risk",
    display="Selective risk",
    family="failure_detection",
    higher_is_better=False,
    reading="Error rate among the predictions kept when only the most confident share (the coverage) is accepted.",
    confidence="msp",
    coverage=0.8,
)
def selective_risk(inputs: MetricInputs, weights: np.ndarray, confidence: str = "msp", coverage: float = 0.8) -> MetricResult:
    """Error rate among the ``coverage`` share of predictions with the highest confidence.

    When the coverage boundary falls inside a tie of confidence, the tied rows count in
    proportion (the expectation over a random order).
    """
    if not 0 < coverage <= 1:
        raise MetricError(f"selective_risk coverage must be in (0, 1], got {coverage!r}")
    scores = _confidence(inputs, confidence)
    _, group_weight, group_errors = _ranked_groups(scores, inputs.correct, weights)
    accepted = coverage * weights.sum()
    cumulative = np.cumsum(group_weight)
    g = int(np.searchsorted(cumulative, accepted - 1e-12 * weights.sum(), side="left"))
    g = min(g, group_weight.size - 1)
    before = cumulative[g] - group_weight[g]
    errors_before = float(group_errors[:g].sum())
    share = (accepted - before) / group_weight[g] if group_weight[g] > 0 else 0.0
    errors = errors_before + share * group_errors[g]
    return MetricResult(float(errors / accepted), extra={"coverage": coverage})


@dataclass
class Referral:
    """A referral rule: predictions with confidence below ``threshold`` go to a clinician.

    ``threshold`` is None when no threshold reaches the target. Then every prediction is
    referred and ``reason`` gives the cause.
    """

    threshold: float | None
    target: float
    referred_share: float
    accepted_share: float
    accepted_accuracy: float
    reason: str | None = None


def _check_referral_inputs(confidence, correct, weights):
    scores = np.asarray(confidence, dtype=np.float64)
    if scores.ndim != 1 or scores.size == 0:
        raise MetricError(f"confidence must be a non-empty 1-D array, got shape {scores.shape}")
    if not np.isfinite(scores).all():
        row = int(np.flatnonzero(~np.isfinite(scores))[0])
        raise MetricError(f"confidence row {row} is {scores[row]!r}, not a finite number")
    hits = np.asarray(correct)
    if hits.shape != scores.shape:
        raise MetricError(f"correct must have shape {scores.shape} to match confidence, got {hits.shape}")
    if not np.isin(hits, (0, 1)).all():
        row = int(np.flatnonzero(~np.isin(hits, (0, 1)))[0])
        raise MetricError(f"correct row {row} is {hits[row]!r}; expected 0/1 or bool")
    checked = validate_weights(weights, scores.size)
    if checked.sum() <= 0:
        raise MetricError("weights sum to 0")
    return scores, hits.astype(np.float64), checked


def referral_threshold(confidence, correct, target: float, weights=None) -> Referral:
    """Find the referral rule that keeps accepted predictions at ``target`` accuracy.

    Predictions with confidence >= threshold are accepted and the rest referred. Every
    distinct confidence is tried as the threshold, because accepted accuracy need not be
    monotone in it. Of the thresholds whose accepted predictions reach ``target`` accuracy,
    the one that refers the fewest is returned.

    Parameters
    ----------
    confidence : (n,) scores, higher meaning more confident (see ``confidence_scores``).
    correct : (n,) 0/1 or bool, whether each prediction was right.
    target : required accuracy of the accepted predictions, in (0, 1].
    weights : optional (n,) non-negative sample weights.
    """
    if not 0 < target <= 1:
        raise MetricError(f"target must be in (0, 1], got {target!r}")
    scores, hits, checked = _check_referral_inputs(confidence, correct, weights)
    total = checked.sum()

    thresholds, group_weight, group_errors = _ranked_groups(scores, hits, checked)
    accepted = np.cumsum(group_weight)
    right = accepted - np.cumsum(group_errors)
    with np.errstate(invalid="ignore", divide="ignore"):
        accuracy = np.where(accepted > 0, right / accepted, np.nan)
    # The tolerance keeps a target such as 0.95 reachable when 19/20 rounds just below it.
    feasible = np.flatnonzero(accuracy >= target - 1e-12)
    if feasible.size == 0:
        return Referral(
            threshold=None,
            target=target,
            referred_share=1.0,
            accepted_share=0.0,
            accepted_accuracy=math.nan,
            reason=f"no confidence threshold keeps accepted accuracy at {target:g} or above",
        )
    best = int(feasible[-1])
    return Referral(
        threshold=float(thresholds[best]),
        target=target,
        referred_share=float(1.0 - accepted[best] / total),
        accepted_share=float(accepted[best] / total),
        accepted_accuracy=float(accuracy[best]),
    )


def apply_referral(confidence, correct, threshold: float | None, weights=None) -> Referral:
    """Apply a referral threshold found elsewhere (for example on clean data) to new predictions.

    Returns the share referred and the accuracy of the accepted predictions, NaN when none is
    accepted. ``target`` of the returned Referral is NaN because none was set here.
    """
    scores, hits, checked = _check_referral_inputs(confidence, correct, weights)
    total = checked.sum()
    if threshold is None:
        return Referral(None, math.nan, 1.0, 0.0, math.nan, "no threshold: every prediction is referred")
    keep = scores >= threshold
    accepted = float(checked[keep].sum())
    accuracy = float(checked[keep] @ hits[keep] / accepted) if accepted > 0 else math.nan
    reason = None if accepted > 0 else "no prediction reaches the threshold"
    return Referral(float(threshold), math.nan, 1.0 - accepted / total, accepted / total, accuracy, reason)
