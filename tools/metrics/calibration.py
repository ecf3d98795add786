"""Binned calibration errors (ECE, MCE, L2, class-wise), O:E ratios and reliability bins."""

from __future__ import annotations

import math

import numpy as np

from ._classes import positive_class_of
from ._inputs import MetricError, MetricInputs, validate_weights
from .binning import bin_sums, check_bins, equal_mass_edges, equal_mass_index, equal_width_index
from .registry import MetricResult, nan_result, register

DEFAULT_BINS = 15


def _bin_index(inputs, key, scores, weights, n_bins, binning):
    if binning == "equal_width":
        return inputs.cached(("equal_width", key, n_bins), lambda: equal_width_index(scores, n_bins))
    if not inputs.resampling:
        return equal_mass_index(scores, weights, n_bins)
    # The edges depend on the weights, but the sort order can be shared by every replicate.
    order = inputs.cached(("score_order", key), lambda: np.argsort(scores, kind="stable"))
    return equal_mass_index(scores, weights, n_bins, order)


def binned(inputs, weights, key, scores, targets, n_bins, binning):
    """Per-bin weight, score sum and target sum of ``scores`` against 0/1 ``targets``."""
    check_bins(n_bins, binning)
    index = _bin_index(inputs, key, scores, weights, n_bins, binning)
    return bin_sums(index, scores, targets, weights, n_bins)


def _top_label(inputs, weights, n_bins, binning):
    return binned(inputs, weights, "top_label", inputs.confidence, inputs.correct, n_bins, binning)


def _l1_error(count, score_sum, target_sum) -> float:
    """Σ_b (n_b/n) |ō_b − s̄_b|, written as Σ_b |Σ targets − Σ scores| / n."""
    return float(np.abs(target_sum - score_sum).sum() / count.sum())


@register(
    "ece_top_label",
    display="ECE",
    family="calibration",
    higher_is_better=False,
    reading="On average, how far the model's stated confidence in its top diagnosis is from how often that diagnosis is right, as a fraction: 0.05 means 5 percentage points.",
    n_bins=DEFAULT_BINS,
    binning="equal_width",
)
def ece_top_label(inputs: MetricInputs, weights: np.ndarray, n_bins: int = DEFAULT_BINS, binning: str = "equal_width") -> MetricResult:
    """Top-label expected calibration error (Guo et al. 2017).

    ECE = Σ_b (n_b/n) |ā_b − c̄_b| over bins of the confidence c_i = max_k P_ik, with ā_b the
    accuracy and c̄_b the mean confidence in bin b; empty bins weigh 0. Equal-width bins are
    [b/B, (b+1)/B) with the last one closed at 1. This is numpy's histogram rule, which netcal
    follows for scores inside (0, 1). torchmetrics instead gives a score of exactly 1 its own
    extra bin and puts scores that equal a decimal edge such as 0.6 into the lower bin. Equal-mass bins lie
    between the B-quantiles of the confidence and never split tied scores (scikit-learn's
    quantile strategy, see ``binning.equal_mass_index``).
    """
    count, score_sum, target_sum = _top_label(inputs, weights, n_bins, binning)
    return MetricResult(_l1_error(count, score_sum, target_sum), extra={"n_bins": n_bins, "binning": binning})


@register(
    "mce_top_label",
    display="MCE",
    family="calibration",
    higher_is_better=False,
    reading="The largest gap, over confidence bins, between the model's stated confidence and how often it is right, as a fraction: 0.2 means 20 percentage points.",
    n_bins=DEFAULT_BINS,
    binning="equal_width",
)
def mce_top_label(inputs: MetricInputs, weights: np.ndarray, n_bins: int = DEFAULT_BINS, binning: str = "equal_width") -> MetricResult:
    """Maximum calibration error max_b |ā_b − c̄_b| over the non-empty top-label bins.

    Same bins as ``ece_top_label``; matches torchmetrics ``norm='max'`` and netcal on scores
    that lie strictly inside a bin.
    """
    count, score_sum, target_sum = _top_label(inputs, weights, n_bins, binning)
    filled = count > 0
    gaps = np.abs(target_sum[filled] - score_sum[filled]) / count[filled]
    return MetricResult(float(gaps.max()), extra={"n_bins": n_bins, "binning": binning})


@register(
    "ce_l2_top_label",
    display="CE₂",
    family="calibration",
    higher_is_better=False,
    reading="Root-mean-square gap between the model's confidence in its top diagnosis and how often it is right, corrected for the noise of small bins, as a fraction: 0.05 means 5 percentage points.",
    n_bins=DEFAULT_BINS,
    binning="equal_mass",
    debias=True,
)
def ce_l2_top_label(inputs: MetricInputs, weights: np.ndarray, n_bins: int = DEFAULT_BINS, binning: str = "equal_mass", debias: bool = True) -> MetricResult:
    """Top-label L2 calibration error, root taken (Kumar, Liang and Ma 2019).

    Plug-in: CE₂ = sqrt(Σ_b (n_b/n)(ā_b − c̄_b)²), torchmetrics ``norm='l2'``. Debiased (the
    default): each bin's squared gap loses ā_b(1 − ā_b)/(n_b − 1), bins with n_b < 2 contribute
    0, and the total is floored at 0 before the root; Kumar's ``verified_calibration`` returns
    the same quantity without the root.
    """
    count, score_sum, target_sum = _top_label(inputs, weights, n_bins, binning)
    filled = count > 0
    accuracy = target_sum[filled] / count[filled]
    confidence = score_sum[filled] / count[filled]
    squared = (accuracy - confidence) ** 2
    if debias:
        sizes = count[filled]
        usable = sizes >= 2
        correction = np.zeros_like(squared)
        correction[usable] = accuracy[usable] * (1 - accuracy[usable]) / (sizes[usable] - 1)
        squared = np.where(usable, squared - correction, 0.0)
    total = max(float(count[filled] @ squared / count.sum()), 0.0)
    return MetricResult(math.sqrt(total), extra={"n_bins": n_bins, "binning": binning, "debias": debias})


@register(
    "ece_positive_class",
    display="ECE (positive class)",
    family="calibration",
    higher_is_better=False,
    needs={"binary"},
    reading="On average, how far the predicted risk of the positive diagnosis is from how often it is present, as a fraction: 0.05 means 5 percentage points.",
    n_bins=DEFAULT_BINS,
    binning="equal_width",
    positive_class=None,
)
def ece_positive_class(inputs: MetricInputs, weights: np.ndarray, n_bins: int = DEFAULT_BINS, binning: str = "equal_width", positive_class: int | None = None) -> MetricResult:
    """Binary ECE of the positive-class probability: Σ_b (n_b/n) |ȳ_b − p̄_b| over bins of p.

    This is what torchmetrics ``binary_calibration_error``, scikit-learn ``calibration_curve``
    and Kumar's one-column input compute; it differs from the top-label ECE of the same
    two-column input. Bins as in ``ece_top_label``.
    """
    k = positive_class_of(inputs, positive_class, "ece_positive_class")
    scores = inputs.probs[:, k]
    targets = inputs.cached(("target", k), lambda: (inputs.labels == k).astype(np.float64))
    count, score_sum, target_sum = binned(inputs, weights, ("class", k), scores, targets, n_bins, binning)
    return MetricResult(_l1_error(count, score_sum, target_sum), extra={"n_bins": n_bins, "binning": binning})


@register(
    "cwce",
    display="CWCE",
    family="calibration",
    higher_is_better=False,
    reading="Average over all diagnoses of how far the predicted probability of each diagnosis is from how often it is present, as a fraction: 0.05 means 5 percentage points.",
    n_bins=DEFAULT_BINS,
    binning="equal_width",
)
def cwce(inputs: MetricInputs, weights: np.ndarray, n_bins: int = DEFAULT_BINS, binning: str = "equal_width") -> MetricResult:
    """Class-wise ECE (1/K) Σ_k Σ_b (n_kb/n) |ō_kb − s̄_kb| with bins per class on P_·k.

    All K classes count, including classes absent from the labels. Matches Metrics Reloaded's
    cwECE and torchmetrics' binary ECE averaged over classes on scores inside a bin; Kumar's
    ``marginal`` mode returns the sum over classes instead of the mean. For binary input it
    equals ``ece_positive_class``.
    """
    per_class = {}
    for k in range(inputs.n_classes):
        targets = inputs.cached(("target", k), lambda k=k: (inputs.labels == k).astype(np.float64))
        count, score_sum, target_sum = binned(
            inputs, weights, ("class", k), inputs.probs[:, k], targets, n_bins, binning
        )
        per_class[k] = _l1_error(count, score_sum, target_sum)
    return MetricResult(float(np.mean(list(per_class.values()))), extra={"per_class": per_class})


@register(
    "oe_ratio",
    display="O:E",
    family="calibration",
    higher_is_better=True,
    reading="Correct top diagnoses divided by the number the model's confidence implies; below 1 means over-confident.",
)
def oe_ratio(inputs: MetricInputs, weights: np.ndarray) -> MetricResult:
    """Top-label observed-to-expected ratio Σ_i a_i / Σ_i c_i (accuracy over mean confidence).

    The formula itself; no peer library implements it. 1 is ideal, so ``higher_is_better`` is
    only a rough direction: values above 1 mean under-confidence.
    """
    expected = float(weights @ inputs.confidence)
    if expected <= 0:
        return nan_result("O:E is undefined because the expected count is 0")
    return MetricResult(float(weights @ inputs.correct) / expected)


@register(
    "oe_ratio_class",
    display="O:E (class)",
    family="calibration",
    higher_is_better=True,
    needs={"binary"},
    reading="How many patients have the diagnosis, divided by how many the predicted probabilities imply; 0.8 means the model predicts 25 % more cases than occur.",
    positive_class=None,
)
def oe_ratio_class(inputs: MetricInputs, weights: np.ndarray, positive_class: int | None = None) -> MetricResult:
    """Per-class observed-to-expected ratio #{y = k} / Σ_i P_ik (calibration in the large).

    The value is for ``positive_class`` (class 1 of binary input); ``extra['per_class']`` contains
    every class, NaN where the expected count is 0. It is 0 when the class never occurs.
    """
    k = positive_class_of(inputs, positive_class, "oe_ratio_class")
    observed = np.bincount(inputs.labels, weights=weights, minlength=inputs.n_classes)
    expected = weights @ inputs.probs
    ratios = np.divide(observed, expected, out=np.full(inputs.n_classes, np.nan), where=expected > 0)
    extra = {"per_class": {int(j): float(r) for j, r in enumerate(ratios)}}
    if expected[k] <= 0:
        return nan_result(f"O:E of class {k} is undefined because its expected count is 0", **extra)
    return MetricResult(float(ratios[k]), extra=extra)


def reliability_bins(probs, labels, n_bins: int = DEFAULT_BINS, weights=None, renormalise: bool = False) -> list[dict]:
    """Top-label reliability diagram data on equal-width bins [b/B, (b+1)/B).

    Returns one dict per bin with ``lower``, ``upper``, ``count`` (total weight), ``confidence``
    (mean confidence) and ``accuracy``; the last two are None for an empty bin.
    """
    check_bins(n_bins, "equal_width")
    inputs = MetricInputs.from_raw(probs, labels, renormalise=renormalise)
    checked = validate_weights(weights, inputs.n)
    count, score_sum, target_sum = _top_label(inputs, checked, n_bins, "equal_width")
    rows = []
    for b in range(n_bins):
        filled = count[b] > 0
        rows.append(
            {
                "lower": b / n_bins,
                "upper": (b + 1) / n_bins,
                "count": float(count[b]),
                "confidence": float(score_sum[b] / count[b]) if filled else None,
                "accuracy": float(target_sum[b] / count[b]) if filled else None,
            }
        )
    return rows


ECI_BINNINGS = ("equal_width", "equal_mass", "calfram")


def _eci_bins(inputs, weights, k, n_bins, binning):
    """Per-bin weight, score sum and target sum of class k's one-vs-rest scores."""
    scores = inputs.probs[:, k]
    targets = inputs.cached(("target", k), lambda: (inputs.labels == k).astype(np.float64))
    if binning != "calfram":
        return binned(inputs, weights, ("class", k), scores, targets, n_bins, binning)
    index, size = _calfram_index(scores, weights, n_bins)
    return bin_sums(index, scores, targets, weights, size)


def _calfram_index(scores, weights, n_bins):
    """Compute the bin index and bin count of CalFram's integer strategy (CalFram 13f004b).

    With at least B distinct scores the edges are quantiles of the scores at m evenly spaced
    levels, m = min(B + 1, number of distinct scores); with fewer, every distinct score is an
    edge, so each score gets a bin of its own. Edges are padded with 0 below and 1 above when
    the scores do not reach them, and each bin is [l, u) over the inner edges. So the largest
    score sits in a bin of its own unless it is exactly 1, in which case it shares the bin of
    the next score down, as in CalFram. Rows of weight 0 do not count as scores.
    """
    check_bins(n_bins, "equal_mass")
    present = scores[weights > 0]
    distinct = np.unique(present)
    if distinct.size < max(n_bins, 2):
        edges = distinct
    elif np.all(weights == 1.0):
        # np.quantile itself, so that rounding of edges on exact scores matches CalFram.
        edges = np.quantile(scores, np.linspace(0.0, 1.0, min(n_bins + 1, distinct.size)))
    else:
        order = np.argsort(scores, kind="stable")
        edges = equal_mass_edges(scores[order], weights[order], min(n_bins, distinct.size - 1))
    if edges[0] > 0.0:
        edges = np.concatenate(([0.0], edges))
    if edges[-1] < 1.0:
        edges = np.concatenate((edges, [1.0]))
    inner = edges[1:-1]
    return np.searchsorted(inner, scores, side="right"), inner.size + 1


def _eci_distances(count, score_sum, target_sum):
    """Bin weights, normalised gaps d_b = |ȳ_b − x̄_b| / max(x̄_b, 1 − x̄_b), and the sign of ȳ_b − x̄_b."""
    filled = count > 0
    mean_score = score_sum[filled] / count[filled]
    frequency = target_sum[filled] / count[filled]
    distance = np.abs(frequency - mean_score) / np.maximum(mean_score, 1.0 - mean_score)
    return count[filled], distance, np.sign(frequency - mean_score)


def _check_eci_binning(binning):
    if binning not in ECI_BINNINGS:
        raise MetricError(f"eci binning must be one of {ECI_BINNINGS}, got {binning!r}")


@register(
    "eci",
    display="ECI",
    family="calibration",
    higher_is_better=True,
    reading="A 0-1 grade of calibration (1 best) in which a gap counts more when it is large relative to the largest gap possible at that predicted risk.",
    n_bins=10,
    binning="equal_width",
)
def eci(inputs: MetricInputs, weights: np.ndarray, n_bins: int = 10, binning: str = "equal_width") -> MetricResult:
    """Global estimated calibration index (Famiglini, Campagner and Cabitza 2023).

    Per class k, bins of the one-vs-rest score P_·k give points (x̄_b, ȳ_b) and normalised
    gaps d_b = |ȳ_b − x̄_b| / max(x̄_b, 1 − x̄_b); ECI_k = 1 − Σ_b (n_b/n) d_b and ECI is the
    mean over all K classes. This closed form equals CalFram's triangle construction. Binning:
    equal width or equal mass as in ``ece_top_label``, or "calfram" for CalFram's integer
    strategy (quantile edges padded with 0 and 1, left-closed, and a bin per distinct score
    when there are fewer distinct scores than bins; see ``_calfram_index``), which CalFram
    calls equal width. The "calfram" values follow CalFram 13f004b. A plain quantile formula
    differs from them where a class column has fewer distinct scores than bins, because it
    puts edges on the tied scores. CalFram also rounds to 3 decimals; this value is unrounded.
    """
    _check_eci_binning(binning)
    per_class = {}
    for k in range(inputs.n_classes):
        count, distance, _sign = _eci_distances(*_eci_bins(inputs, weights, k, n_bins, binning))
        per_class[k] = float(1.0 - count @ distance / count.sum())
    return MetricResult(float(np.mean(list(per_class.values()))), extra={"per_class": per_class})


@register(
    "eci_balance",
    display="ECI balance",
    family="calibration",
    higher_is_better=False,
    reading="Whether miscalibration leans towards over-confidence (positive, up to 1) or under-confidence (negative, down to -1).",
    n_bins=10,
    binning="equal_width",
)
def eci_balance(inputs: MetricInputs, weights: np.ndarray, n_bins: int = 10, binning: str = "equal_width") -> MetricResult:
    """Direction of miscalibration in [−1, 1], CalFram's ``ec_dir``; positive means over-confident.

    Per class, it is the bin-weighted mean of d_b over bins where the observed frequency is
    below the mean score, minus the same mean over bins where it is above. Each side is
    weighted by its own bin counts, an empty side counts 0, and bins exactly on the diagonal
    belong to neither side. The mean over classes leaves out NaN. Bins and
    d_b as in ``eci``. 0 is balanced, not necessarily calibrated, so ``higher_is_better`` is
    only nominal.
    """
    _check_eci_binning(binning)
    per_class = {}
    for k in range(inputs.n_classes):
        count, distance, sign = _eci_distances(*_eci_bins(inputs, weights, k, n_bins, binning))
        over, under = sign < 0, sign > 0
        over_part = float(count[over] @ distance[over] / count[over].sum()) if over.any() else 0.0
        under_part = float(count[under] @ distance[under] / count[under].sum()) if under.any() else 0.0
        per_class[k] = over_part - under_part
    return MetricResult(float(np.nanmean(list(per_class.values()))), extra={"per_class": per_class})
