"""Kernel calibration errors: SKCE (Widmann et al. 2019) and ECE-KDE (Popordanoska et al. 2022).

Both are O(n²K) and are computed in row blocks so memory stays O(block · n). Inside the
bootstrap they switch to a stated cheaper form: SKCE to a fixed seeded set of pairs, ECE-KDE
to a fixed seeded subsample of rows, with the kernel computed once for all replicates.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.special import gammaln, logsumexp

from ._inputs import MetricError, MetricInputs
from .registry import MetricResult, nan_result, register

BLOCK_ROWS = 512
KERNELS = ("laplacian", "gaussian")
ESTIMATORS = ("unbiased", "biased", "linear")


def _pair_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    squared = (a * a).sum(axis=1)[:, None] + (b * b).sum(axis=1)[None, :] - 2.0 * (a @ b.T)
    return np.sqrt(np.maximum(squared, 0.0))


def _kernel(distances: np.ndarray, kernel: str, bandwidth: float) -> np.ndarray:
    if kernel == "laplacian":
        return np.exp(-distances / bandwidth)
    return np.exp(-(distances**2) / (2.0 * bandwidth**2))


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
    """Σ_{i≠j} w_i w_j h_ij and Σ_i w_i² h_ii over all pairs, in row blocks."""
    total = 0.0
    for start in range(0, probs.shape[0], BLOCK_ROWS):
        stop = min(start + BLOCK_ROWS, probs.shape[0])
        gram = _kernel(_pair_distances(probs[start:stop], probs), kernel, bandwidth)
        gram *= residuals[start:stop] @ residuals.T
        total += float(weights[start:stop] @ gram @ weights)
    diagonal = float((weights**2) @ (residuals * residuals).sum(axis=1))
    return total - diagonal, diagonal


def _sampled_pairs(n: int, max_pairs: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """All pairs i < j when there are at most ``max_pairs``, else ``max_pairs`` seeded random pairs."""
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


def _dirichlet_log_kernel(probs_at: np.ndarray, log_probs_at: np.ndarray, probs_centres: np.ndarray, bandwidth: float) -> np.ndarray:
    """log Dir(x_j; α_i) with α_i = P_i/h + 1, for rows x_j (first axis) and centres i (second)."""
    alphas = probs_centres / bandwidth + 1.0
    normaliser = gammaln(alphas.sum(axis=1)) - gammaln(alphas).sum(axis=1)
    return normaliser[None, :] + log_probs_at @ (alphas - 1.0).T


def _loo_log_likelihood(probs: np.ndarray, log_probs: np.ndarray, bandwidth: float) -> float:
    n = probs.shape[0]
    total = 0.0
    for start in range(0, n, BLOCK_ROWS):
        stop = min(start + BLOCK_ROWS, n)
        log_kernel = _dirichlet_log_kernel(probs[start:stop], log_probs[start:stop], probs, bandwidth)
        log_kernel[np.arange(stop - start), np.arange(start, stop)] = -np.inf
        # The authors' code divides the density by (n − 1)·h, not only by n − 1.
        total += float(np.sum(logsumexp(log_kernel, axis=1) - math.log((n - 1) * bandwidth)))
    return total


def loo_bandwidth(probs: np.ndarray) -> float | None:
    """Pick the ECE-KDE bandwidth by leave-one-out likelihood, as the ECE-KDE authors' code does.

    The grid is 15 log-spaced values from 1e-5 to 0.1, then 0.2 to 1.0; the criterion is
    Σ_j log( Σ_{i≠j} Dir(P_j; P_i/h + 1) / ((n − 1)·h) ). Returns None when no grid value gives
    a positive criterion, where that code returns −1.
    """
    log_probs = np.log(probs)
    best, best_value = None, 0.0
    for bandwidth in BANDWIDTH_GRID:
        value = _loo_log_likelihood(probs, log_probs, float(bandwidth))
        if value > best_value:
            best, best_value = float(bandwidth), value
    return best


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
        shares = np.exp(log_kernel - logsumexp(log_kernel, axis=1, keepdims=True))
        estimate = shares @ onehot
        errors[start:stop] = (np.abs(estimate - probs[start:stop]) ** p).sum(axis=1)
    return errors


@register(
    "ece_kde",
    display="ECE-KDE",
    family="calibration",
    higher_is_better=False,
    reading="Calibration error of the whole probability vector, estimated with a smooth kernel instead of bins; 0 is perfectly calibrated.",
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
    bandwidth of the full data.
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

    rows = np.arange(inputs.n)
    if inputs.resampling and inputs.n > resample_max_n:
        rows = inputs.cached(
            ("kde_rows", resample_max_n, seed),
            lambda: np.sort(np.random.default_rng(seed).choice(inputs.n, resample_max_n, replace=False)),
        )
        extra["rows"] = int(rows.size)
    probs = inputs.probs[rows]
    row_weights = weights[rows]
    if row_weights.sum() <= 0 or np.count_nonzero(row_weights) < 2:
        return nan_result("ECE-KDE needs at least two rows with positive weight", **extra)

    errors = _kde_errors(probs, np.log(probs), inputs.onehot[rows], row_weights, bandwidth, p)
    return MetricResult(float(row_weights @ errors / row_weights.sum()), extra=extra)
