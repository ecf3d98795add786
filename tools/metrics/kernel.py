"""Kernel calibration errors: SKCE (Widmann et al. 2019) and ECE-KDE (Popordanoska et al. 2022).

Both are O(n²K) and are computed in row blocks so memory stays O(block · n). Inside the
bootstrap they switch to a stated cheaper form: SKCE to a fixed seeded set of pairs, ECE-KDE
to a fixed seeded subsample of rows, with the kernel computed once for all replicates.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.special import gammaln

from ._inputs import MetricError, MetricInputs
from .registry import MetricResult, nan_result, register

BLOCK_ROWS = 512
KERNELS = ("laplacian", "gaussian")
ESTIMATORS = ("unbiased", "biased", "linear")


def _pair_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Euclidean distances between the rows of a and b, via ‖a‖² + ‖b‖² − 2ab, in place."""
    distances = a @ b.T
    distances *= -2.0
    distances += (a * a).sum(axis=1)[:, None]
    distances += (b * b).sum(axis=1)[None, :]
    np.maximum(distances, 0.0, out=distances)
    return np.sqrt(distances, out=distances)


def _kernel(distances: np.ndarray, kernel: str, bandwidth: float) -> np.ndarray:
    """κ applied to a distance matrix, overwriting it."""
    if kernel == "laplacian":
        distances /= -bandwidth
    else:
        np.square(distances, out=distances)
        distances /= -2.0 * bandwidth**2
    return np.exp(distances, out=distances)


def median_heuristic(probs: np.ndarray, max_rows: int = 2000, seed: int = 0) -> float:
    """Median Euclidean distance between the probability vectors of distinct pairs of rows.

    Above ``max_rows`` rows the median is taken over the pairs of a seeded subsample of
    ``max_rows`` rows. Metrics Reloaded takes the median of the full n × n matrix including
    its zero diagonal, which gives a slightly smaller bandwidth.
    """
    rows = probs
    if probs.shape[0] > max_rows:
        rows = probs[np.random.default_rng(seed).choice(probs.shape[0], max_rows, replace=False)]
    upper = np.triu_indices(rows.shape[0], k=1)
    return float(np.median(_pair_distances(rows, rows)[upper]))


def _pair_terms(probs, residuals, first, second, kernel, bandwidth) -> np.ndarray:
    distances = np.sqrt(((probs[first] - probs[second]) ** 2).sum(axis=1))
    return _kernel(distances, kernel, bandwidth) * (residuals[first] * residuals[second]).sum(axis=1)


def _full_sum(probs, residuals, weights, kernel, bandwidth) -> tuple[float, float]:
    """Σ_{i≠j} w_i w_j h_ij and Σ_i w_i² h_ii over all pairs, in row blocks.

    h is symmetric, so each block of rows is paired only with itself and the rows after it,
    and the pairs with later rows count twice.
    """
    n = probs.shape[0]
    total = 0.0
    for start in range(0, n, BLOCK_ROWS):
        stop = min(start + BLOCK_ROWS, n)
        gram = _kernel(_pair_distances(probs[start:stop], probs[start:]), kernel, bandwidth)
        gram *= residuals[start:stop] @ residuals[start:].T
        block_weights = weights[start:stop]
        size = stop - start
        total += float(block_weights @ gram[:, :size] @ block_weights)
        total += 2.0 * float(block_weights @ gram[:, size:] @ weights[stop:])
    diagonal = float((weights**2) @ (residuals * residuals).sum(axis=1))
    return total - diagonal, diagonal


def _sampled_pairs(n: int, max_pairs: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Return all pairs i < j when there are at most ``max_pairs``, else that many seeded random pairs."""
    if n * (n - 1) // 2 <= max_pairs:
        return np.triu_indices(n, k=1)
    rng = np.random.default_rng(seed)
    first = rng.integers(0, n, max_pairs)
    second = (first + rng.integers(1, n, max_pairs)) % n
    return first, second


@register(
    "kce",
    display="SKCE",
    family="calibration",
    higher_is_better=False,
    reading="Kernel calibration error: near 0 (or below) means no detectable miscalibration of the whole probability vector at this sample size.",
    estimator="unbiased",
    kernel="laplacian",
    bandwidth=None,
    max_pairs=1_000_000,
    exact_max_n=20_000,
    seed=0,
)
def kce(
    inputs: MetricInputs,
    weights: np.ndarray,
    estimator: str = "unbiased",
    kernel: str = "laplacian",
    bandwidth: float | None = None,
    max_pairs: int = 1_000_000,
    exact_max_n: int = 20_000,
    seed: int = 0,
) -> MetricResult:
    """Squared kernel calibration error SKCE with matrix kernel κ(p, q)·I_K.

    With residuals r_i = e_{y_i} − P_i and h_ij = κ(P_i, P_j)⟨r_i, r_j⟩:
    unbiased SKCE_uq = Σ_{i≠j} h_ij / (n(n−1)) (may be negative; Metrics Reloaded and Py_KCE),
    biased SKCE_b = Σ_{i,j} h_ij / n², linear SKCE_ul = mean of h over pairs (0,1), (2,3), ...
    κ is Laplacian exp(−‖p−q‖/ν) or Gaussian exp(−‖p−q‖²/(2ν²)); ν defaults to the median
    distance over distinct pairs (Widmann's median heuristic) and is reported in
    ``extra['bandwidth']``. The unbiased estimator sums all pairs for n <= ``exact_max_n``,
    otherwise ``max_pairs`` seeded random pairs; inside the bootstrap it always uses at most
    ``max_pairs`` pairs. Sample weights weight pair (i, j) by w_i w_j. The square root is not
    taken, because the estimate can be negative.
    """
    if estimator not in ESTIMATORS:
        raise MetricError(f"kce estimator must be one of {ESTIMATORS}, got {estimator!r}")
    if kernel not in KERNELS:
        raise MetricError(f"kce kernel must be one of {KERNELS}, got {kernel!r}")
    if bandwidth is None:
        bandwidth = inputs.cached(("median_heuristic", seed), lambda: median_heuristic(inputs.probs, seed=seed))
    if not bandwidth > 0:
        return nan_result(f"kce bandwidth must be positive, got {bandwidth!r} (all probability vectors equal?)")

    residuals = inputs.cached("residuals", lambda: inputs.onehot - inputs.probs)
    extra = {"bandwidth": float(bandwidth), "kernel": kernel, "estimator": estimator}

    if estimator == "linear":
        half = inputs.n // 2
        if half == 0:
            return nan_result("linear SKCE needs at least two rows", **extra)
        first, second = np.arange(0, 2 * half, 2), np.arange(1, 2 * half, 2)
        terms = inputs.cached(
            ("kce_linear", kernel, bandwidth),
            lambda: _pair_terms(inputs.probs, residuals, first, second, kernel, bandwidth),
        )
        pair_weights = weights[first] * weights[second]
        if pair_weights.sum() <= 0:
            return nan_result("linear SKCE has no pair with positive weight", **extra)
        return MetricResult(float(pair_weights @ terms / pair_weights.sum()), extra=extra)

    subsample = inputs.resampling or inputs.n > exact_max_n
    if estimator == "unbiased" and subsample:
        first, second = inputs.cached(("kce_pairs", max_pairs, seed), lambda: _sampled_pairs(inputs.n, max_pairs, seed))
        terms = inputs.cached(
            ("kce_pair_terms", kernel, bandwidth, max_pairs, seed),
            lambda: _pair_terms(inputs.probs, residuals, first, second, kernel, bandwidth),
        )
        pair_weights = weights[first] * weights[second]
        if pair_weights.sum() <= 0:
            return nan_result("unbiased SKCE has no pair with positive weight", **extra)
        extra["pairs"] = int(first.size)
        return MetricResult(float(pair_weights @ terms / pair_weights.sum()), extra=extra)

    off_diagonal, diagonal = _full_sum(inputs.probs, residuals, weights, kernel, bandwidth)
    total_weight = weights.sum()
    if estimator == "biased":
        return MetricResult((off_diagonal + diagonal) / total_weight**2, extra=extra)
    pair_weight = total_weight**2 - float(weights @ weights)
    if pair_weight <= 0:
        return nan_result("unbiased SKCE needs at least two rows with positive weight", **extra)
    return MetricResult(off_diagonal / pair_weight, extra=extra)


BANDWIDTH_GRID = np.concatenate((np.logspace(-5, -1, 15), np.linspace(0.2, 1.0, 5)))


def _row_logsumexp(values: np.ndarray) -> np.ndarray:
    """log Σ_j exp(values[:, j]) per row; rows that are all −inf give −inf.

    Written out because scipy's ``logsumexp`` has a large per-call overhead at these sizes.
    """
    top = values.max(axis=1)
    safe_top = np.where(np.isfinite(top), top, 0.0)
    with np.errstate(divide="ignore"):
        return np.log(np.exp(values - safe_top[:, None]).sum(axis=1)) + safe_top


def _dirichlet_normaliser(probs_centres: np.ndarray, bandwidth: float) -> np.ndarray:
    alphas = probs_centres / bandwidth + 1.0
    return gammaln(alphas.sum(axis=1)) - gammaln(alphas).sum(axis=1)


def _dirichlet_log_kernel(probs_at: np.ndarray, log_probs_at: np.ndarray, probs_centres: np.ndarray, bandwidth: float) -> np.ndarray:
    """log Dir(x_j; α_i) with α_i = P_i/h + 1, for rows x_j (first axis) and centres i (second).

    Since α_i − 1 = P_i/h, the log density is normaliser_i + (log x_j · P_i)/h.
    """
    log_kernel = log_probs_at @ probs_centres.T
    log_kernel /= bandwidth
    log_kernel += _dirichlet_normaliser(probs_centres, bandwidth)[None, :]
    return log_kernel


def _loo_log_likelihoods(probs: np.ndarray, log_probs: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """Leave-one-out criterion of every bandwidth in ``grid``, sharing log x_j · P_i across them."""
    n = probs.shape[0]
    totals = np.zeros(grid.size)
    normalisers = [_dirichlet_normaliser(probs, float(h)) for h in grid]
    for start in range(0, n, BLOCK_ROWS):
        stop = min(start + BLOCK_ROWS, n)
        cross = log_probs[start:stop] @ probs.T
        diagonal = (np.arange(stop - start), np.arange(start, stop))
        for g, bandwidth in enumerate(grid):
            log_kernel = cross / bandwidth
            log_kernel += normalisers[g][None, :]
            log_kernel[diagonal] = -np.inf
            # The authors' code divides the density by (n − 1)·h, not only by n − 1.
            totals[g] += float(np.sum(_row_logsumexp(log_kernel) - math.log((n - 1) * bandwidth)))
    return totals


def loo_bandwidth(probs: np.ndarray) -> float | None:
    """Pick the ECE-KDE bandwidth by leave-one-out likelihood, as the ECE-KDE authors' code does.

    The grid is 15 log-spaced values from 1e-5 to 0.1, then 0.2 to 1.0; the criterion is
    Σ_j log( Σ_{i≠j} Dir(P_j; P_i/h + 1) / ((n − 1)·h) ). Returns None when no grid value gives
    a positive criterion, where that code returns −1.
    """
    totals = _loo_log_likelihoods(probs, np.log(probs), BANDWIDTH_GRID)
    best = int(np.argmax(totals))
    # The first maximum wins ties, as in a loop that keeps a value only when it is larger.
    if not totals[best] > 0:
        return None
    return float(BANDWIDTH_GRID[best])


def _kde_errors(probs, log_probs, onehot, weights, bandwidth, p) -> np.ndarray:
    """‖r_j − P_j‖_p^p per row j, with r_j the leave-one-out kernel estimate of E[e_Y | P_j]."""
    n = probs.shape[0]
    errors = np.empty(n)
    log_weights = np.log(np.where(weights > 0, weights, 1.0))
    log_weights[weights <= 0] = -np.inf
    for start in range(0, n, BLOCK_ROWS):
        stop = min(start + BLOCK_ROWS, n)
        log_kernel = _dirichlet_log_kernel(probs[start:stop], log_probs[start:stop], probs, bandwidth)
        log_kernel += log_weights[None, :]
        log_kernel[np.arange(stop - start), np.arange(start, stop)] = -np.inf
        shares = np.exp(log_kernel - _row_logsumexp(log_kernel)[:, None])
        estimate = shares @ onehot
        errors[start:stop] = (np.abs(estimate - probs[start:stop]) ** p).sum(axis=1)
    return errors


@register(
    "ece_kde",
    display="ECE-KDE",
    family="calibration",
    higher_is_better=False,
    reading="Calibration error of the whole probability vector, estimated with a smooth kernel instead of bins; 0 is perfectly calibrated.",
    interval="median_centred",
    p=1,
    bandwidth=None,
    resample_max_n=1000,
    seed=0,
)
def ece_kde(
    inputs: MetricInputs,
    weights: np.ndarray,
    p: int = 1,
    bandwidth: float | None = None,
    resample_max_n: int = 1000,
    seed: int = 0,
) -> MetricResult:
    """Canonical ECE-KDE_p = (1/n) Σ_j ‖r_j − P_j‖_p^p (Popordanoska, Sayer and Blaschko 2022).

    r_j = Σ_{i≠j} k(P_j; P_i) e_{y_i} / Σ_{i≠j} k(P_j; P_i), with k the Dirichlet density of
    parameter P_i/h + 1; no p-th root is taken, as in the authors' code. The bandwidth h comes
    from ``loo_bandwidth`` unless given and is reported in ``extra['bandwidth']``. Returns NaN
    with a reason when a probability is exactly 0 (the authors' code returns NaN) or when no
    bandwidth has positive leave-one-out likelihood (their code returns −1). Inside the
    bootstrap, replicates use a seeded subsample of ``resample_max_n`` rows and the
    bandwidth of the full data. Resampled rows lose distinct neighbours, which biases the
    replicates upward, so the interval is their spread around their median placed around the
    estimate. Its width is that of ``resample_max_n`` rows, which overstates the uncertainty
    for larger n.

    NOTE: the bandwidth search evaluates 20 bandwidths over all n² pairs, about 15 s for
    n = 5,000 and K = 5 on a loaded 2-core machine; pass ``bandwidth`` to skip it.
    """
    if p not in (1, 2):
        raise MetricError(f"ece_kde p must be 1 or 2, got {p!r}")
    if (inputs.probs <= 0).any():
        row = int(np.flatnonzero((inputs.probs <= 0).any(axis=1))[0])
        return nan_result(f"ECE-KDE is undefined with a probability of exactly 0 (first at row {row})")
    if bandwidth is None:
        bandwidth = inputs.cached("kde_bandwidth", lambda: loo_bandwidth(inputs.probs))
        if bandwidth is None:
            return nan_result("no bandwidth on the grid gives a positive leave-one-out likelihood")
    if not bandwidth > 0:
        raise MetricError(f"ece_kde bandwidth must be positive, got {bandwidth!r}")
    extra = {"bandwidth": float(bandwidth), "p": p}

    if inputs.resampling:
        return _ece_kde_replicate(inputs, weights, bandwidth, p, resample_max_n, seed, extra)
    if np.count_nonzero(weights) < 2:
        return nan_result("ECE-KDE needs at least two rows with positive weight", **extra)
    errors = _kde_errors(inputs.probs, np.log(inputs.probs), inputs.onehot, weights, bandwidth, p)
    return MetricResult(float(weights @ errors / weights.sum()), extra=extra)


def _ece_kde_replicate(inputs, weights, bandwidth, p, max_rows, seed, extra) -> MetricResult:
    """ECE-KDE of one bootstrap replicate, on a fixed subsample of at most ``max_rows`` rows.

    The kernel matrix of the subsample is computed once, scaled per row so that its largest
    entry is 1, and reused by every replicate. A row whose remaining kernel weight underflows
    to 0 (its only close neighbours were not drawn) is recomputed in log space.
    """

    def build():
        rows = np.arange(inputs.n)
        if inputs.n > max_rows:
            rows = np.sort(np.random.default_rng(seed).choice(inputs.n, max_rows, replace=False))
        probs = inputs.probs[rows]
        log_kernel = _dirichlet_log_kernel(probs, np.log(probs), probs, bandwidth)
        np.fill_diagonal(log_kernel, -np.inf)
        scaled = np.exp(log_kernel - log_kernel.max(axis=1, keepdims=True))
        return rows, probs, log_kernel, scaled

    rows, probs, log_kernel, scaled = inputs.cached(("kde_replicate", bandwidth, max_rows, seed), build)
    if rows.size < inputs.n:
        extra = {**extra, "rows": int(rows.size)}
    row_weights = weights[rows]
    if np.count_nonzero(row_weights) < 2:
        return nan_result("ECE-KDE needs at least two rows with positive weight", **extra)

    onehot = inputs.onehot[rows]
    numerator = scaled @ (row_weights[:, None] * onehot)
    denominator = scaled @ row_weights
    lost = denominator <= 1e-300
    if lost.any():
        log_weights = np.where(row_weights > 0, np.log(np.where(row_weights > 0, row_weights, 1.0)), -np.inf)
        log_rows = log_kernel[lost] + log_weights[None, :]
        shares = np.exp(log_rows - _row_logsumexp(log_rows)[:, None])
        numerator[lost] = shares @ onehot
        denominator[lost] = 1.0
    estimate = numerator / denominator[:, None]
    errors = (np.abs(estimate - probs) ** p).sum(axis=1)
    return MetricResult(float(row_weights @ errors / row_weights.sum()), extra=extra)
