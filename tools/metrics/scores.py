"""Proper scores: Brier score (two forms), root Brier score and negative log-likelihood."""

from __future__ import annotations

import math

import numpy as np

from ._classes import positive_class_of
from ._inputs import MetricError, MetricInputs
from .registry import MetricResult, register


def _brier_terms(inputs: MetricInputs) -> np.ndarray:
    # Σ_k (P_ik − e_ik)² = Σ_k P_ik² − 2 P_{i,y_i} + 1, without building the one-hot matrix.
    return inputs.cached(
        "brier_terms",
        lambda: np.einsum("ij,ij->i", inputs.probs, inputs.probs) - 2.0 * inputs.true_class_prob + 1.0,
    )


@register(
    "brier",
    display="BS",
    family="proper_score",
    higher_is_better=False,
    reading="Mean squared distance between the predicted probabilities and what happened, summed over diagnoses; 0 is perfect, 2 the worst.",
)
def brier(inputs: MetricInputs, weights: np.ndarray) -> MetricResult:
    """Brier score summed over classes: (1/n) Σ_i Σ_k (P_ik − 1[y_i = k])², range [0, 2].

    Metrics Reloaded's and scikit-learn's multiclass convention; for binary input this is
    twice the one-column score, which has its own id ``brier_binary``.
    """
    return MetricResult(float(weights @ _brier_terms(inputs) / weights.sum()))


@register(
    "brier_binary",
    display="BS (binary)",
    family="proper_score",
    higher_is_better=False,
    needs={"binary"},
    reading="Mean squared difference between the predicted probability of the positive diagnosis and whether it was present; 0 is perfect, 0.25 is always saying 50 %.",
    positive_class=None,
)
def brier_binary(inputs: MetricInputs, weights: np.ndarray, positive_class: int | None = None) -> MetricResult:
    """One-column Brier score (1/n) Σ_i (p_i − y_i)² of the positive class, range [0, 1].

    scikit-learn ``brier_score_loss`` on a one-column binary input.
    """
    k = positive_class_of(inputs, positive_class, "brier_binary")
    terms = (inputs.probs[:, k] - (inputs.labels == k)) ** 2
    return MetricResult(float(weights @ terms / weights.sum()))


@register(
    "rbs",
    display="RBS",
    family="proper_score",
    higher_is_better=False,
    reading="Typical distance, on the probability scale, between the predicted probabilities and what happened (square root of the Brier score).",
)
def root_brier(inputs: MetricInputs, weights: np.ndarray) -> MetricResult:
    """Root Brier score sqrt(BS), BS summed over classes (Gruber and Buettner; Metrics Reloaded).

    A plug-in estimate: the square root of the Brier score is biased low.
    """
    return MetricResult(math.sqrt(weights @ _brier_terms(inputs) / weights.sum()))


@register(
    "nll",
    display="NLL",
    family="proper_score",
    higher_is_better=False,
    reading="Average surprise at the true diagnosis; it punishes confident mistakes without bound.",
    eps=None,
)
def nll(inputs: MetricInputs, weights: np.ndarray, eps: float | None = None) -> MetricResult:
    """Negative log-likelihood −(1/n) Σ_i log P_{i,y_i}.

    No clipping by default, as torch ``nll_loss`` and Metrics Reloaded: a true class given
    probability exactly 0 makes the value +inf, and ``extra['zero_probability_count']`` counts
    such rows. With ``eps`` the probabilities are clipped to [eps, 1 − eps] first, which with
    eps = float64 machine epsilon reproduces scikit-learn ``log_loss``.
    """
    p = inputs.true_class_prob
    if eps is not None:
        if not 0 < eps < 0.5:
            raise MetricError(f"nll eps must be in (0, 0.5), got {eps!r}")
        p = np.clip(p, eps, 1 - eps)
    zero = (p <= 0) & (weights > 0)
    if zero.any():
        return MetricResult(math.inf, extra={"zero_probability_count": float(weights[zero].sum())})
    # Rows with probability 0 and weight 0 contribute 0 instead of 0 * inf = NaN.
    log_terms = inputs.cached(("log_true_prob", eps), lambda: -np.log(np.where(p > 0, p, 1.0)))
    return MetricResult(float(weights @ log_terms / weights.sum()), extra={"zero_probability_count": 0.0})
