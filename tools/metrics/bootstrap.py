"""Bootstrap intervals and differences for a set of metrics from one set of resamples.

A resample is a vector of counts (how often each row was drawn), used as sample weights, so
the derived arrays of every metric (sort orders, bin indices) are computed once per call
rather than once per replicate.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from ._inputs import MetricError, MetricInputs, validate_labels, validate_probs, validate_weights
from .registry import MetricInfo, evaluate, metric_key, resolve_params

MetricSpec = str | tuple[str, dict]
Progress = Callable[[int, int], None] | None

CONFIDENCE_LEVEL = 0.95


@dataclass
class Estimate:
    """Point estimate with a 95 % percentile bootstrap interval."""

    value: float
    low: float
    high: float
    reason: str | None = None
    extra: dict = field(default_factory=dict)


@dataclass
class Difference:
    """Change of a metric from a reference to a condition: delta = condition − reference.

    ``low`` and ``high`` bound delta (95 % percentile interval) and ``p_value`` is the
    two-sided bootstrap p-value of delta = 0 (see ``bootstrap_p_value``).
    """

    reference: float
    condition: float
    delta: float
    low: float
    high: float
    p_value: float
    reason: str | None = None


def _resolve(metrics: list[MetricSpec]) -> list[tuple[str, MetricInfo, dict]]:
    resolved = []
    for spec in metrics:
        if isinstance(spec, str):
            metric_id, params = spec, {}
        elif isinstance(spec, tuple) and len(spec) == 2 and isinstance(spec[1], dict):
            metric_id, params = spec
        else:
            raise MetricError(f"a metric must be an id or an (id, params) tuple, got {spec!r}")
        info, merged = resolve_params(metric_id, params)
        resolved.append((metric_key(metric_id, params), info, merged))
    keys = [key for key, _, _ in resolved]
    if len(set(keys)) != len(keys):
        raise MetricError(f"metrics lists the same metric twice: {keys}")
    return resolved


def _check_n_boot(n_boot) -> None:
    if not isinstance(n_boot, (int, np.integer)) or n_boot < 0:
        raise MetricError(f"n_boot must be a non-negative integer, got {n_boot!r}")


def _count_weights(rng: np.random.Generator, n: int, strata: list[np.ndarray] | None) -> np.ndarray:
    """Counts of a with-replacement resample of n rows, drawn within each stratum if given."""
    if strata is None:
        return np.bincount(rng.integers(0, n, n), minlength=n).astype(np.float64)
    counts = np.zeros(n, dtype=np.float64)
    for rows in strata:
        drawn = rows[rng.integers(0, rows.size, rows.size)]
        counts += np.bincount(drawn, minlength=n)
    return counts


def _strata(labels: np.ndarray, stratified: bool) -> list[np.ndarray] | None:
    if not stratified:
        return None
    return [np.flatnonzero(labels == k) for k in np.unique(labels)]


def _interval(values: np.ndarray, kind: str = "percentile", estimate: float = math.nan) -> tuple[float, float]:
    """95 % percentile interval of the replicates, or for "median_centred" metrics the same
    quantiles minus the replicates' median plus ``estimate``."""
    finite = values[~np.isnan(values)]
    if finite.size == 0:
        return math.nan, math.nan
    tail = (1 - CONFIDENCE_LEVEL) / 2 * 100
    low, high = np.percentile(finite, [tail, 100 - tail])
    if kind == "median_centred":
        shift = estimate - float(np.median(finite))
        low, high = low + shift, high + shift
    return float(low), float(high)


def bootstrap_p_value(replicates: np.ndarray, observed: float) -> float:
    """Return the two-sided p-value of a change of 0 from its bootstrap replicates.

    p = 2·Φ(−|observed| / SE), with SE the standard deviation of the replicates (the normal
    approximation of Efron and Tibshirani's bootstrap test). Unlike the share of replicates on
    the far side of 0, whose smallest value is 2/(B + 1), it does not depend on the number of
    replicates B, so a clear drop can pass a multiple-testing correction over hundreds of
    comparisons even with B = 100. When the replicates are not finite or do not vary, the
    share of replicates is used instead, with one added to numerator and denominator so that
    it is never 0.
    """
    finite = replicates[~np.isnan(replicates)]
    if finite.size == 0 or not math.isfinite(observed):
        return math.nan
    if np.isfinite(finite).all() and np.ptp(finite) > 0:
        spread = float(np.std(finite, ddof=1))
        return math.erfc(abs(observed) / (spread * math.sqrt(2.0)))
    if observed == 0 and np.all(finite == 0):
        return 1.0
    tail = min(np.sum(finite <= 0), np.sum(finite >= 0))
    return float(min(1.0, 2 * (tail + 1) / (finite.size + 1)))


def _prepare(probs, labels, weights, renormalise, name=""):
    checked = validate_probs(probs, name=f"probs{name}", renormalise=renormalise)
    checked_labels = validate_labels(labels, checked.shape[0], checked.shape[1], name=f"labels{name}")
    base = validate_weights(weights, checked.shape[0], name=f"weights{name}")
    return MetricInputs(checked, checked_labels, resampling=True), base


def _point_inputs(inputs: MetricInputs) -> MetricInputs:
    # Point estimates use the full (non-subsampled) form of every metric.
    return MetricInputs(inputs.probs, inputs.labels, resampling=False)


def _replicate_warning(values: np.ndarray) -> dict:
    undefined = int(np.isnan(values).sum())
    return {"n_boot_undefined": undefined} if undefined else {}


def bootstrap_metrics(
    metrics: list[MetricSpec],
    probs,
    labels,
    n_boot: int = 1000,
    seed: int = 0,
    weights=None,
    stratified: bool = False,
    *,
    renormalise: bool = False,
    progress: Progress = None,
) -> dict[str, Estimate]:
    """Compute metrics with 95 % percentile bootstrap intervals from one set of resamples.

    Parameters
    ----------
    metrics : ids, or (id, params) tuples; results are keyed by id, or ``id@k=v,...`` with
        the parameters sorted by name.
    probs, labels, weights, renormalise : as in ``compute_metric``. Sample weights multiply the
        resample counts.
    n_boot : number of replicates; 0 gives NaN intervals.
    seed : seed of ``numpy.random.default_rng``.
    stratified : resample within each class, keeping the class counts fixed.
    progress : optional callback ``(done, total)`` called after each replicate.

    Replicates where a metric is NaN (for example a class missing from a resample) are left
    out of its interval and counted in ``extra['n_boot_undefined']``. The O(n²) metrics use
    their subsampled form in the replicates, and ``extra['interval_pairs']`` or
    ``extra['interval_rows']`` records the size of the subsample.
    """
    _check_n_boot(n_boot)
    resolved = _resolve(metrics)
    inputs, base = _prepare(probs, labels, weights, renormalise)

    point_inputs = _point_inputs(inputs)
    points = {key: evaluate(info, point_inputs, base, params) for key, info, params in resolved}

    rng = np.random.default_rng(seed)
    strata = _strata(inputs.labels, stratified)
    replicates = np.full((len(resolved), n_boot), np.nan)
    subsample_sizes: list[dict] = [{} for _ in resolved]
    for b in range(n_boot):
        counts = base * _count_weights(rng, inputs.n, strata)
        for m, (_, info, params) in enumerate(resolved):
            result = evaluate(info, inputs, counts, params)
            replicates[m, b] = result.value
            if b == 0:
                subsample_sizes[m] = {f"interval_{k}": v for k, v in result.extra.items() if k in ("pairs", "rows")}
        if progress is not None:
            progress(b + 1, n_boot)

    estimates = {}
    for m, (key, info, _) in enumerate(resolved):
        point = points[key]
        low, high = _interval(replicates[m], info.interval, point.value)
        extra = {**point.extra, **subsample_sizes[m], **_replicate_warning(replicates[m])}
        estimates[key] = Estimate(point.value, low, high, point.reason, extra)
    return estimates


def _differences(resolved, refs, conds, delta_replicates) -> dict[str, Difference]:
    out = {}
    for m, (key, _, _) in enumerate(resolved):
        ref, cond = refs[key], conds[key]
        low, high = _interval(delta_replicates[m])
        reason = ref.reason or cond.reason
        if reason is not None:
            reason = f"reference: {ref.reason}" if ref.reason else f"condition: {cond.reason}"
        out[key] = Difference(
            reference=ref.value,
            condition=cond.value,
            delta=cond.value - ref.value,
            low=low,
            high=high,
            p_value=bootstrap_p_value(delta_replicates[m], cond.value - ref.value),
            reason=reason,
        )
    return out


def paired_bootstrap(
    metrics: list[MetricSpec],
    probs_ref,
    probs_cond,
    labels,
    n_boot: int = 1000,
    seed: int = 0,
    *,
    weights=None,
    stratified: bool = False,
    renormalise: bool = False,
    progress: Progress = None,
) -> dict[str, Difference]:
    """Bootstrap the change of each metric between two conditions on the same images.

    Row i of ``probs_ref`` and ``probs_cond`` is the same image (for example clean and
    shifted), so every replicate draws the same rows for both and delta = condition − reference
    is computed replicate by replicate.
    """
    _check_n_boot(n_boot)
    resolved = _resolve(metrics)
    ref_inputs, base = _prepare(probs_ref, labels, weights, renormalise, "_ref")
    cond_inputs, _ = _prepare(probs_cond, labels, weights, renormalise, "_cond")
    if ref_inputs.probs.shape != cond_inputs.probs.shape:
        raise MetricError(
            f"probs_ref has shape {ref_inputs.probs.shape} but probs_cond has shape "
            f"{cond_inputs.probs.shape}; paired rows must be the same images"
        )

    ref_points = {key: evaluate(info, _point_inputs(ref_inputs), base, p) for key, info, p in resolved}
    cond_points = {key: evaluate(info, _point_inputs(cond_inputs), base, p) for key, info, p in resolved}

    rng = np.random.default_rng(seed)
    strata = _strata(ref_inputs.labels, stratified)
    deltas = np.full((len(resolved), n_boot), np.nan)
    for b in range(n_boot):
        counts = base * _count_weights(rng, ref_inputs.n, strata)
        for m, (_, info, params) in enumerate(resolved):
            deltas[m, b] = (
                evaluate(info, cond_inputs, counts, params).value
                - evaluate(info, ref_inputs, counts, params).value
            )
        if progress is not None:
            progress(b + 1, n_boot)
    return _differences(resolved, ref_points, cond_points, deltas)


def unpaired_bootstrap(
    metrics: list[MetricSpec],
    probs_a,
    labels_a,
    probs_b,
    labels_b,
    n_boot: int = 1000,
    seed: int = 0,
    *,
    weights_a=None,
    weights_b=None,
    stratified: bool = False,
    renormalise: bool = False,
    progress: Progress = None,
) -> dict[str, Difference]:
    """Bootstrap the difference of each metric between two independent sets of images.

    Set a is the reference and set b the condition, in the argument order of
    ``paired_bootstrap``: for a subgroup, a is the rest of the test set and b the subgroup.
    delta = metric(b) − metric(a), and each replicate resamples a and b independently.
    """
    _check_n_boot(n_boot)
    resolved = _resolve(metrics)
    a_inputs, base_a = _prepare(probs_a, labels_a, weights_a, renormalise, "_a")
    b_inputs, base_b = _prepare(probs_b, labels_b, weights_b, renormalise, "_b")
    if a_inputs.n_classes != b_inputs.n_classes:
        raise MetricError(
            f"probs_a has {a_inputs.n_classes} classes but probs_b has {b_inputs.n_classes}"
        )

    a_points = {key: evaluate(info, _point_inputs(a_inputs), base_a, p) for key, info, p in resolved}
    b_points = {key: evaluate(info, _point_inputs(b_inputs), base_b, p) for key, info, p in resolved}

    rng = np.random.default_rng(seed)
    strata_a = _strata(a_inputs.labels, stratified)
    strata_b = _strata(b_inputs.labels, stratified)
    deltas = np.full((len(resolved), n_boot), np.nan)
    for replicate in range(n_boot):
        counts_a = base_a * _count_weights(rng, a_inputs.n, strata_a)
        counts_b = base_b * _count_weights(rng, b_inputs.n, strata_b)
        for m, (_, info, params) in enumerate(resolved):
            deltas[m, replicate] = (
                evaluate(info, b_inputs, counts_b, params).value
                - evaluate(info, a_inputs, counts_a, params).value
            )
        if progress is not None:
            progress(replicate + 1, n_boot)
    return _differences(resolved, a_points, b_points, deltas)
