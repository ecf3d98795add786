"""Multi-threshold metrics: AUROC and average precision, exact and weighted."""

from __future__ import annotations

import numpy as np

from ._classes import classes_to_average
from ._inputs import MetricError, MetricInputs
from .registry import MetricResult, nan_result, register


def _sorted_scores(inputs: MetricInputs, column: int):
    """Descending sort order of one score column, its targets, and the last index of each tie run."""

    def build():
        scores = inputs.probs[:, column]
        # Tied scores form one threshold, so the order within a tie does not matter.
        order = np.argsort(-scores)
        ordered = scores[order]
        run_ends = np.append(np.flatnonzero(np.diff(ordered) != 0), inputs.n - 1)
        target = (inputs.labels[order] == column).astype(np.float64)
        return order, target, run_ends

    return inputs.cached(("sorted_scores", column), build)


def weighted_roc_points(scores_order, target, run_ends, weights):
    """Cumulative true- and false-positive weight at every distinct threshold, from the top.

    Tied scores form one threshold, so a tie run moves the ROC curve diagonally. This is the
    grouping that scikit-learn's ``roc_curve`` applies.
    """
    ordered_weights = weights[scores_order]
    tp = np.cumsum(ordered_weights * target)[run_ends]
    fp = np.cumsum(ordered_weights)[run_ends] - tp
    return tp, fp


def _roc_points(inputs: MetricInputs, column: int, weights: np.ndarray, uniform: bool):
    """Return the ROC points of one column, cached when all weights are equal.

    AUROC and AP do not change when every weight is scaled, so equal weights act as ones.
    """
    order, target, run_ends = _sorted_scores(inputs, column)
    if uniform:
        return inputs.cached(("unit_roc_points", column), lambda: _unit_roc_points(target, run_ends))
    return weighted_roc_points(order, target, run_ends, weights)


def _unit_roc_points(target, run_ends):
    """Return ``weighted_roc_points`` for unit weights, where row counts replace weight sums."""
    tp = np.cumsum(target)[run_ends]
    return tp, (run_ends + 1.0) - tp


def binary_auroc(tp: np.ndarray, fp: np.ndarray) -> float:
    """Trapezoid area under the ROC points (tp, fp) that start implicitly at (0, 0)."""
    positives, negatives = tp[-1], fp[-1]
    tp0 = np.concatenate(([0.0], tp))
    fp0 = np.concatenate(([0.0], fp))
    area = np.sum(np.diff(fp0) * (tp0[1:] + tp0[:-1])) / 2.0
    return float(area / (positives * negatives))


def binary_average_precision(tp: np.ndarray, fp: np.ndarray) -> float:
    """Step-rule average precision Σ_k (R_k − R_{k−1}) P_k over the distinct thresholds."""
    positives = tp[-1]
    predicted = tp + fp
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall_steps = np.diff(np.concatenate(([0.0], tp))) / positives
    return float(np.sum(recall_steps * precision))


def _one_vs_rest(inputs, weights, positive_class, average, metric_id, compute, needs_negatives):
    classes = classes_to_average(inputs, positive_class, metric_id)
    if average not in ("macro", "micro"):
        raise MetricError(f"{metric_id} average must be 'macro' or 'micro', got {average!r}")

    if classes is None and average == "micro":
        return _micro(inputs, weights, metric_id, compute, needs_negatives)

    targets = classes if classes is not None else list(range(inputs.n_classes))
    uniform = bool(np.all(weights == weights[0]))
    class_weight = np.bincount(inputs.labels, weights=weights, minlength=inputs.n_classes)
    total = weights.sum()
    values = {}
    skipped = []
    for k in targets:
        has_negatives = total - class_weight[k] > 0
        if class_weight[k] <= 0 or (needs_negatives and not has_negatives):
            skipped.append(int(k))
            values[int(k)] = float("nan")
            continue
        tp, fp = _roc_points(inputs, k, weights, uniform)
        values[int(k)] = compute(tp, fp)

    defined = [v for v in values.values() if not np.isnan(v)]
    extra = {"per_class": values, "absent_classes": skipped, "average": "binary" if classes else average}
    if not defined:
        what = "both positives and negatives" if needs_negatives else "positives"
        return nan_result(f"{metric_id} needs {what} of the class in the labels", **extra)
    return MetricResult(float(np.mean(defined)), extra=extra)


def _micro(inputs, weights, metric_id, compute, needs_negatives):
    def build():
        scores = inputs.probs.ravel()
        order = np.argsort(-scores)
        ordered = scores[order]
        run_ends = np.append(np.flatnonzero(np.diff(ordered) != 0), scores.size - 1)
        return order, inputs.onehot.ravel()[order], run_ends

    order, target, run_ends = inputs.cached("micro_sorted", build)
    flat_weights = np.repeat(weights, inputs.n_classes)
    tp, fp = weighted_roc_points(order, target, run_ends, flat_weights)
    return MetricResult(compute(tp, fp), extra={"average": "micro"})


@register(
    "auroc",
    display="AUROC",
    family="multi_threshold",
    higher_is_better=True,
    reading="Chance that a randomly chosen patient with the diagnosis gets a higher score for it than one without; 0.5 is guessing, 1 is perfect ranking.",
    positive_class=None,
    average="macro",
)
def auroc(inputs: MetricInputs, weights: np.ndarray, positive_class: int | None = None, average: str = "macro") -> MetricResult:
    """Area under the ROC curve, exact (trapezoid over every distinct threshold, ties grouped).

    Binary input scores column ``positive_class`` (default 1), as scikit-learn ``roc_auc_score``
    and torchmetrics ``binary_auroc`` do. Multiclass input gives the one-vs-rest macro average
    over the classes present in the labels (scikit-learn ``multi_class='ovr'``, which returns
    NaN instead when a class is absent), or the micro average of the flattened one-hot matrix
    with ``average='micro'``. NaN when no class has both positives and negatives.
    """
    return _one_vs_rest(inputs, weights, positive_class, average, "auroc", binary_auroc, True)


@register(
    "average_precision",
    display="AP",
    family="multi_threshold",
    higher_is_better=True,
    reading="Average share of true cases among the patients flagged, taken over every threshold at which another true case is found.",
    positive_class=None,
    average="macro",
)
def average_precision(inputs: MetricInputs, weights: np.ndarray, positive_class: int | None = None, average: str = "macro") -> MetricResult:
    """Average precision by the step rule AP = Σ_k (R_k − R_{k−1}) P_k (no interpolation).

    Matches scikit-learn ``average_precision_score`` and torchmetrics; Metrics Reloaded's
    trapezoid rule gives other values. Multiclass: one-vs-rest macro over classes present.
    NaN when there are no positives (scikit-learn returns 0 with a warning).
    """
    return _one_vs_rest(inputs, weights, positive_class, average, "average_precision", binary_average_precision, False)
