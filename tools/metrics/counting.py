"""Counting metrics: functions of the weighted confusion matrix of the argmax decision."""

from __future__ import annotations

import math

import numpy as np

from ._classes import positive_class_of
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
    ``extra['absent_classes']``. This is the convention of scikit-learn's
    ``balanced_accuracy_score``. torchmetrics counts an absent class as recall 0, and Metrics
    Reloaded returns NaN.
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


def _cost_matrix(cost_matrix, k: int, matrix: np.ndarray) -> np.ndarray | None:
    """Return the (K, K) cost matrix indexed [true class, predicted class].

    None means 0-1 costs. "prior" means Metrics Reloaded's default 1/(K · prevalence of the
    true class) off the diagonal. The result is None when "prior" meets an absent class,
    because that cost is then undefined.
    """
    if cost_matrix is None:
        return 1.0 - np.eye(k)
    if isinstance(cost_matrix, str):
        if cost_matrix != "prior":
            raise MetricError(f"cost_matrix must be a (K, K) array, None or 'prior', got {cost_matrix!r}")
        prevalence = matrix.sum(axis=1) / matrix.sum()
        if (prevalence <= 0).any():
            return None
        return (1.0 - np.eye(k)) / (k * prevalence[:, None])
    costs = np.asarray(cost_matrix, dtype=np.float64)
    if costs.shape != (k, k):
        raise MetricError(f"cost_matrix must have shape ({k}, {k}), got {costs.shape}")
    if not np.isfinite(costs).all() or (costs < 0).any():
        raise MetricError("cost_matrix must contain finite non-negative costs")
    return costs


@register(
    "expected_cost",
    display="EC",
    family="counting",
    higher_is_better=False,
    needs={"cost_matrix"},
    reading="Average cost per patient of the model's decisions, with each kind of error charged what the cost matrix says it costs.",
    cost_matrix=None,
    normalised=False,
)
def expected_cost(inputs: MetricInputs, weights: np.ndarray, cost_matrix=None, normalised: bool = False) -> MetricResult:
    """Expected cost EC = Σ_ij c_ij C_ij / n (Ferrer 2022) of the argmax decision.

    ``cost_matrix`` is indexed [true class, predicted class] (Metrics Reloaded indexes it
    [predicted, true]); None gives 0-1 costs (EC = error rate) and "prior" gives Metrics
    Reloaded's default c_ij = 1/(K · P_i), which makes EC = 1 − balanced accuracy. With
    ``normalised`` the cost is divided by that of the best constant decision
    min_j Σ_i P_i c_ij. NaN when "prior" costs meet a class absent from the labels.
    """
    matrix = confusion(inputs, weights)
    total = matrix.sum()
    costs = _cost_matrix(cost_matrix, inputs.n_classes, matrix)
    if costs is None:
        return nan_result("prior-based costs are undefined because a class is absent from the labels")
    value = float((costs * matrix).sum() / total)
    if not normalised:
        return MetricResult(value)

    prevalence = matrix.sum(axis=1) / total
    naive = float((prevalence @ costs).min())
    if naive <= 0:
        return nan_result("normalised expected cost is undefined because a constant decision costs 0")
    return MetricResult(value / naive, extra={"naive_cost": naive})


def _decision(inputs: MetricInputs, k: int, threshold: float | None) -> np.ndarray:
    """Rows predicted positive for class k: argmax == k, or P_ik >= threshold when given."""
    if threshold is None:
        return inputs.cached(("argmax_is", k), lambda: inputs.predicted == k)
    if not 0 <= threshold <= 1:
        raise MetricError(f"threshold must be in [0, 1], got {threshold!r}")
    return inputs.cached(("score_at_least", k, threshold), lambda: inputs.probs[:, k] >= threshold)


def one_vs_rest_counts(inputs: MetricInputs, weights: np.ndarray, k: int, threshold: float | None):
    """Weighted TP, FP, FN, TN of class k against the rest."""
    predicted = _decision(inputs, k, threshold)
    actual = inputs.cached(("label_is", k), lambda: inputs.labels == k)
    tp = float(weights[predicted & actual].sum())
    fp = float(weights[predicted & ~actual].sum())
    fn = float(weights[~predicted & actual].sum())
    tn = float(weights.sum()) - tp - fp - fn
    return tp, fp, fn, tn


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator > 0 else math.nan


def _sensitivity(tp, fp, fn, tn):
    return _ratio(tp, tp + fn)


def _specificity(tp, fp, fn, tn):
    return _ratio(tn, tn + fp)


def _ppv(tp, fp, fn, tn):
    # Metrics Reloaded: 0 when nothing is predicted positive although positives exist.
    if tp + fp == 0:
        return 0.0 if tp + fn > 0 else math.nan
    return tp / (tp + fp)


def _npv(tp, fp, fn, tn):
    if tn + fn == 0:
        return 0.0 if tn + fp > 0 else math.nan
    return tn / (tn + fn)


def _lr_plus(tp, fp, fn, tn):
    sensitivity = _sensitivity(tp, fp, fn, tn)
    specificity = _specificity(tp, fp, fn, tn)
    return _ratio(sensitivity, 1.0 - specificity)


def _f_beta(beta):
    if not beta > 0:
        raise MetricError(f"f_beta beta must be positive, got {beta!r}")

    def compute(tp, fp, fn, tn):
        b2 = beta * beta
        return _ratio((1 + b2) * tp, (1 + b2) * tp + b2 * fn + fp)

    return compute


def _per_class_statistic(inputs, weights, statistic, positive_class, threshold, name):
    """Statistic of one class against the rest, or its macro mean over classes where it is defined."""
    if positive_class is not None or inputs.n_classes == 2:
        k = positive_class_of(inputs, positive_class, name)
        tp, fp, fn, tn = one_vs_rest_counts(inputs, weights, k, threshold)
        value = statistic(tp, fp, fn, tn)
        extra = {"positive_class": k, "counts": {"tp": tp, "fp": fp, "fn": fn, "tn": tn}}
        if math.isnan(value):
            return nan_result(_undefined_reason(name, tp, fp, fn, tn), **extra)
        return MetricResult(value, extra=extra)

    per_class = {k: statistic(*one_vs_rest_counts(inputs, weights, k, threshold)) for k in range(inputs.n_classes)}
    undefined = [k for k, v in per_class.items() if math.isnan(v)]
    support = np.bincount(inputs.labels, weights=weights, minlength=inputs.n_classes)
    extra = {
        "per_class": per_class,
        "absent_classes": _absent_list(support > 0),
        "undefined_classes": undefined,
        "average": "macro",
    }
    if len(undefined) == inputs.n_classes:
        return nan_result(f"{name} is undefined for every class", **extra)
    return MetricResult(float(np.nanmean(list(per_class.values()))), extra=extra)


def _undefined_reason(name, tp, fp, fn, tn) -> str:
    if tp + fn == 0:
        return f"{name} is undefined because the labels contain no positives"
    if tn + fp == 0:
        return f"{name} is undefined because the labels contain no negatives"
    return f"{name} is undefined on these counts (tp={tp:g}, fp={fp:g}, fn={fn:g}, tn={tn:g})"


_DECISION_DOC = """
    Decision: argmax (ties to the first class, so a binary p = 0.5 is negative), or
    P[:, class] >= ``threshold`` when a threshold is given. Binary input scores class 1 (or
    ``positive_class``). Multiclass input without a positive class gives the one-vs-rest
    macro mean over the classes where the value is defined; ``extra`` lists the classes left
    out. Metrics Reloaded instead returns NaN when any class is undefined.
"""


def _register_rate(metric_id, display, reading, statistic, higher_is_better, doc, **extra_defaults):
    defaults = {"positive_class": None, "threshold": None, **extra_defaults}

    @register(metric_id, display=display, family="counting", higher_is_better=higher_is_better, reading=reading, **defaults)
    def metric(inputs: MetricInputs, weights: np.ndarray, positive_class=None, threshold=None, **params) -> MetricResult:
        # A metric with extra parameters (F-beta) registers a factory that takes them.
        chosen = statistic(**params) if params else statistic
        return _per_class_statistic(inputs, weights, chosen, positive_class, threshold, metric_id)

    metric.__name__ = metric_id
    metric.__doc__ = doc + _DECISION_DOC
    return metric


sensitivity = _register_rate(
    "sensitivity", "Sens",
    "Share of patients with the diagnosis whom the model flags.",
    _sensitivity, True,
    """Sensitivity (recall) TP / (TP + FN); NaN without positives (Metrics Reloaded, and
    scikit-learn with zero_division=NaN).""",
)
specificity = _register_rate(
    "specificity", "Spec",
    "Share of patients without the diagnosis whom the model correctly leaves unflagged.",
    _specificity, True,
    """Specificity TN / (TN + FP); NaN without negatives.""",
)
ppv = _register_rate(
    "ppv", "PPV",
    "Share of flagged patients who really have the diagnosis.",
    _ppv, True,
    """Positive predictive value TP / (TP + FP). As in Metrics Reloaded it is 0 when nothing is
    predicted positive although positives exist, and NaN when there are neither.""",
)
npv = _register_rate(
    "npv", "NPV",
    "Share of unflagged patients who really do not have the diagnosis.",
    _npv, True,
    """Negative predictive value TN / (TN + FN); 0 when nothing is predicted negative although
    negatives exist, NaN when there are neither (Metrics Reloaded).""",
)
lr_plus = _register_rate(
    "lr_plus", "LR+",
    "How many times more often a flag occurs in patients with the diagnosis than in those without.",
    _lr_plus, True,
    """Positive likelihood ratio sensitivity / (1 − specificity); NaN when specificity is 1 or
    either class is missing (Metrics Reloaded; scikit-learn with replace_undefined_by=NaN).""",
)
f_beta = _register_rate(
    "f_beta", "F-β",
    "Combined score of PPV and sensitivity, with sensitivity counting β times as much.",
    lambda beta=1.0: _f_beta(beta), True,
    """F-beta (1 + β²) TP / ((1 + β²) TP + β² FN + FP), the weighted harmonic mean of PPV and
    sensitivity (scikit-learn ``fbeta_score``); NaN when there are no positives and none are
    predicted, where Metrics Reloaded returns 1.""",
    beta=1.0,
)


@register(
    "net_benefit",
    display="NB",
    family="counting",
    higher_is_better=True,
    needs={"binary", "threshold"},
    reading="True positives per patient after charging each false positive at the odds of the treatment threshold; compare with treating everyone and treating no one.",
    threshold=0.5,
    positive_class=None,
)
def net_benefit(inputs: MetricInputs, weights: np.ndarray, threshold: float = 0.5, positive_class: int | None = None) -> MetricResult:
    """Net benefit at threshold t (Vickers and Elkin 2006): NB = TP/n − (FP/n) · t/(1 − t).

    Positive means P[:, positive class] >= t. Metrics Reloaded's BinaryPairwiseMeasures gives
    the same value with exchange rate t/(1 − t); its probabilistic ``net_benefit_treated``
    multiplies the two terms and is wrong. ``extra`` contains the treat-all net benefit.
    """
    if not 0 < threshold < 1:
        raise MetricError(f"net_benefit threshold must be in (0, 1), got {threshold!r}")
    k = positive_class_of(inputs, positive_class, "net_benefit")
    tp, fp, fn, tn = one_vs_rest_counts(inputs, weights, k, threshold)
    total = tp + fp + fn + tn
    odds = threshold / (1 - threshold)
    value = tp / total - fp / total * odds
    treat_all = (tp + fn) / total - (fp + tn) / total * odds
    return MetricResult(value, extra={"treat_all": treat_all, "threshold": threshold})
