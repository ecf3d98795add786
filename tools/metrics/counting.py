"""Counting metrics: functions of the weighted confusion matrix of the argmax decision."""

from __future__ import annotations

import math

import numpy as np

from ._inputs import MetricError, MetricInputs
from .registry import MetricResult, nan_result, register


def confusion(inputs: MetricInputs, weights: np.ndarray) -> np.ndarray:
    """Weighted (K, K) confusion matrix C[true class, predicted class] of the argmax decision."""
    k = inputs.n_classes
    flat = inputs.cached("confusion_index", lambda: inputs.labels * k + inputs.predicted)
    return np.bincount(flat, weights=weights, minlength=k * k).reshape(k, k)


def _present(counts: np.ndarray) -> np.ndarray:
    return counts > 0


def _absent_list(present: np.ndarray) -> list[int]:
    return [int(k) for k in np.flatnonzero(~present)]


@register(
    "accuracy",
    display="Accuracy",
    family="counting",
    higher_is_better=True,
    reading="Share of images whose top predicted class is the true class.",
)
def accuracy(inputs: MetricInputs, weights: np.ndarray) -> MetricResult:
    """Weighted share of rows whose argmax equals the label: Σ w_i 1[ŷ_i = y_i] / Σ w_i.

    Matches scikit-learn ``accuracy_score`` and torchmetrics ``multiclass_accuracy(average='micro')``.
    """
    return MetricResult(float(weights @ inputs.correct / weights.sum()))


@register(
    "balanced_accuracy",
    display="BA",
    family="counting",
    higher_is_better=True,
    reading="Average, over the diagnoses that occur, of the share of cases of that diagnosis the model gets right.",
)
def balanced_accuracy(inputs: MetricInputs, weights: np.ndarray) -> MetricResult:
    """Mean recall over the classes present in the labels: (1/|S|) Σ_{k∈S} C_kk / Σ_j C_kj.

    Classes absent from the labels are left out of the mean and listed in
    ``extra['absent_classes']``; this is scikit-learn's ``balanced_accuracy_score`` convention
    (torchmetrics counts an absent class as recall 0, Metrics Reloaded returns NaN).
    """
    matrix = confusion(inputs, weights)
    support = matrix.sum(axis=1)
    present = _present(support)
    recall = np.full(inputs.n_classes, np.nan)
    recall[present] = np.diag(matrix)[present] / support[present]
    return MetricResult(
        float(recall[present].mean()),
        extra={"per_class": _per_class(recall), "absent_classes": _absent_list(present)},
    )


def _per_class(values: np.ndarray) -> dict[int, float]:
    return {int(k): float(v) for k, v in enumerate(values)}


@register(
    "mcc",
    display="MCC",
    family="counting",
    higher_is_better=True,
    reading="Correlation between predicted and true diagnoses, from -1 (always wrong) through 0 (chance) to 1 (perfect), robust to class imbalance.",
)
def mcc(inputs: MetricInputs, weights: np.ndarray) -> MetricResult:
    """Matthews correlation coefficient, Gorodkin's multiclass form (scikit-learn's).

    MCC = (c·s − Σ_k p_k t_k) / sqrt((s² − Σ_k p_k²)(s² − Σ_k t_k²)) with c the correct weight,
    s the total weight, t_k the true and p_k the predicted weight of class k. For K=2 this is
    the binary formula. Returns NaN when a factor of the denominator is 0 (one class in the
    labels or in the predictions), where scikit-learn returns 0.
    """
    matrix = confusion(inputs, weights)
    true_totals = matrix.sum(axis=1)
    pred_totals = matrix.sum(axis=0)
    total = matrix.sum()
    correct = np.trace(matrix)
    covariance = correct * total - pred_totals @ true_totals
    pred_var = total**2 - pred_totals @ pred_totals
    true_var = total**2 - true_totals @ true_totals
    if pred_var <= 0 or true_var <= 0:
        which = "labels" if true_var <= 0 else "predictions"
        return nan_result(f"MCC is undefined because the {which} contain a single class")
    return MetricResult(float(covariance / math.sqrt(pred_var * true_var)))


KAPPA_WEIGHTS = ("none", "linear", "quadratic")


@register(
    "cohen_kappa",
    display="κ",
    family="counting",
    higher_is_better=True,
    reading="Agreement between predicted and true diagnoses beyond what chance would give; weighted forms count near misses between ordered grades as partly right.",
    weighting="none",
)
def cohen_kappa(inputs: MetricInputs, weights: np.ndarray, weighting: str = "none") -> MetricResult:
    """Cohen's kappa, unweighted or with linear |i−j| or quadratic (i−j)² disagreement weights.

    κ_w = 1 − Σ_ij w_ij O_ij / Σ_ij w_ij E_ij with O the confusion matrix and E the outer
    product of its marginals divided by the total. Agrees with scikit-learn, torchmetrics and
    Metrics Reloaded. Linear and quadratic weighting only make sense for ordered classes.
    """
    if weighting not in KAPPA_WEIGHTS:
        raise MetricError(f"cohen_kappa weighting must be one of {KAPPA_WEIGHTS}, got {weighting!r}")
    matrix = confusion(inputs, weights)
    total = matrix.sum()
    expected = np.outer(matrix.sum(axis=1), matrix.sum(axis=0)) / total
    index = np.arange(inputs.n_classes)
    distance = np.abs(index[:, None] - index[None, :]).astype(np.float64)
    if weighting == "none":
        disagreement = (distance > 0).astype(np.float64)
    elif weighting == "linear":
        disagreement = distance
    else:
        disagreement = distance**2

    chance = float((disagreement * expected).sum())
    if chance <= 0:
        return nan_result("kappa is undefined because chance disagreement is 0 (one class in labels and predictions)")
    return MetricResult(1.0 - float((disagreement * matrix).sum()) / chance)
