"""Positive-class choice and one-vs-rest class selection shared by several metric families."""

from __future__ import annotations

from ._inputs import MetricError, MetricInputs


def positive_class_of(inputs: MetricInputs, positive_class: int | None, metric_id: str) -> int:
    """Return the positive class index: ``positive_class`` if given, else 1 for binary input.

    Raises MetricError for K > 2 without an explicit positive class, because a binary metric
    on multiclass output needs the caller to say which class is the event.
    """
    k = inputs.n_classes
    if positive_class is None:
        if k != 2:
            raise MetricError(
                f"{metric_id} needs binary probabilities (K=2) or a positive_class, got K={k}"
            )
        return 1
    if not isinstance(positive_class, int) or not 0 <= positive_class < k:
        raise MetricError(f"positive_class must be a class index in 0..{k - 1}, got {positive_class!r}")
    return positive_class


def classes_to_average(inputs: MetricInputs, positive_class: int | None, metric_id: str) -> list[int] | None:
    """Return ``[positive_class]`` for a one-vs-rest view, or None for a macro average over classes.

    Binary input without a positive class means class 1; multiclass input without one means
    the macro average.
    """
    if positive_class is not None:
        return [positive_class_of(inputs, positive_class, metric_id)]
    if inputs.n_classes == 2:
        return [1]
    return None
