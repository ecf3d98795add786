"""The metric registry: one entry per metric id, and `compute_metric` to evaluate one."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ._inputs import MetricError, MetricInputs, validate_weights

FAMILIES = ("counting", "multi_threshold", "calibration", "proper_score", "failure_detection")


@dataclass
class MetricResult:
    """Value of one metric, with ``reason`` giving the cause of a NaN and ``extra`` the details."""

    value: float
    reason: str | None = None
    extra: dict = field(default_factory=dict)


@dataclass(frozen=True)
class MetricInfo:
    """Registry entry of a metric.

    ``fn(inputs: MetricInputs, weights: np.ndarray, **params) -> MetricResult`` does the
    computation, and ``default_params`` lists every parameter the metric accepts.
    ``interval`` is "percentile" (the 95 % percentile bootstrap interval) or "median_centred"
    for metrics whose bootstrap replicates are biased: the spread of the replicates around
    their median, placed around the estimate.
    """

    id: str
    display: str
    family: str
    higher_is_better: bool
    needs: frozenset[str]
    reading: str
    default_params: dict
    fn: Callable[..., MetricResult]
    interval: str = "percentile"


REGISTRY: dict[str, MetricInfo] = {}


def register(
    id: str,
    display: str,
    family: str,
    higher_is_better: bool,
    reading: str,
    needs: frozenset[str] | set[str] = frozenset(),
    interval: str = "percentile",
    **default_params: Any,
) -> Callable:
    """Add the decorated function to REGISTRY under ``id``."""
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")

    def decorate(fn: Callable[..., MetricResult]) -> Callable[..., MetricResult]:
        REGISTRY[id] = MetricInfo(
            id=id,
            display=display,
            family=family,
            higher_is_better=higher_is_better,
            needs=frozenset(needs),
            reading=reading,
            default_params=dict(default_params),
            fn=fn,
            interval=interval,
        )
        return fn

    return decorate


def nan_result(reason: str, **extra: Any) -> MetricResult:
    return MetricResult(math.nan, reason, dict(extra))


def resolve_params(metric_id: str, params: dict) -> tuple[MetricInfo, dict]:
    """Look up ``metric_id`` and merge ``params`` over its defaults, rejecting unknown names."""
    info = REGISTRY.get(metric_id)
    if info is None:
        raise MetricError(f"unknown metric id {metric_id!r}; known ids: {', '.join(sorted(REGISTRY))}")
    unknown = sorted(set(params) - set(info.default_params))
    if unknown:
        accepted = ", ".join(sorted(info.default_params)) or "none"
        raise MetricError(
            f"metric {metric_id!r} got unknown parameter {unknown[0]!r}; it accepts: {accepted}"
        )
    return info, {**info.default_params, **params}


def evaluate(info: MetricInfo, inputs: MetricInputs, weights: np.ndarray, params: dict) -> MetricResult:
    """Run one registered metric on prepared inputs and normalise its result."""
    if weights.sum() <= 0:
        return nan_result("all sample weights are zero")
    result = info.fn(inputs, weights, **params)
    if not isinstance(result, MetricResult):
        result = MetricResult(float(result))
    result.value = float(result.value)
    if math.isnan(result.value) and result.reason is None:
        result.reason = f"{info.id} is undefined on these data"
    return result


def compute_metric(
    metric_id: str,
    probs,
    labels,
    weights=None,
    *,
    renormalise: bool = False,
    **params: Any,
) -> MetricResult:
    """Compute one registered metric.

    Parameters
    ----------
    metric_id : a key of REGISTRY.
    probs : (n, K) probabilities whose rows sum to 1, or (n,) positive-class probabilities of
        a binary problem. No softmax or sigmoid is applied.
    labels : (n,) integer class indices in 0..K-1.
    weights : optional (n,) non-negative sample weights (bootstrap counts, reweighting).
    renormalise : divide each row by its sum instead of raising when rows do not sum to 1.
    **params : metric parameters; see ``REGISTRY[metric_id].default_params``.

    Raises MetricError on invalid input; returns NaN with a reason when the metric is undefined
    on valid data (for example AUROC with one class present).
    """
    info, merged = resolve_params(metric_id, params)
    inputs = MetricInputs.from_raw(probs, labels, renormalise=renormalise)
    checked_weights = validate_weights(weights, inputs.n)
    return evaluate(info, inputs, checked_weights, merged)


def metric_key(metric_id: str, params: dict | None) -> str:
    """Return the result key: the id alone, or ``id@k=v,...`` with the parameters sorted by name."""
    if not params:
        return metric_id
    return metric_id + "@" + ",".join(f"{k}={params[k]}" for k in sorted(params))
