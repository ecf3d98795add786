"""Bin assignment for the binned calibration errors: equal width and equal mass."""

from __future__ import annotations

import numpy as np

from ._inputs import MetricError

BINNINGS = ("equal_width", "equal_mass")


def check_bins(n_bins, binning: str) -> None:
    if not isinstance(n_bins, (int, np.integer)) or isinstance(n_bins, bool) or n_bins < 1:
        raise MetricError(f"n_bins must be a positive integer, got {n_bins!r}")
    if binning not in BINNINGS:
        raise MetricError(f"binning must be one of {BINNINGS}, got {binning!r}")


def equal_width_index(scores: np.ndarray, n_bins: int) -> np.ndarray:
    """Bin index min(floor(s·B), B−1): bins [b/B, (b+1)/B), the last one closed at 1.

    The product s·B is used rather than comparisons with ``linspace`` edges, so a score written
    as a decimal edge such as 0.6 opens its bin [0.6, 0.7) even though 0.6 is not exact in
    binary floating point.
    """
    return np.minimum(np.floor(scores * n_bins).astype(np.int64), n_bins - 1)


def equal_mass_index(scores: np.ndarray, weights: np.ndarray, n_bins: int) -> np.ndarray:
    """Bin index that puts about the same total weight into each of ``n_bins`` bins.

    Rows are sorted by score; row i (in that order) goes to bin floor(B · m_i / W), where m_i
    is the weight before the middle of row i and W the total weight. With unit weights and B
    dividing n this is n/B rows per bin. All rows with the same score then take the bin of the
    first row of their tie run, so tied scores are never split and a bin can end up empty.
    """
    order = np.argsort(scores, kind="stable")
    ordered = scores[order]
    ordered_weights = weights[order]
    total = ordered_weights.sum()
    cumulative = np.cumsum(ordered_weights)
    middle = cumulative - ordered_weights / 2.0
    index_sorted = np.minimum(np.floor(n_bins * middle / total).astype(np.int64), n_bins - 1)

    run_starts = np.concatenate(([True], np.diff(ordered) != 0))
    run_id = np.cumsum(run_starts) - 1
    index_sorted = index_sorted[np.flatnonzero(run_starts)][run_id]

    index = np.empty_like(index_sorted)
    index[order] = index_sorted
    return index


def bin_sums(index: np.ndarray, scores: np.ndarray, targets: np.ndarray, weights: np.ndarray, n_bins: int):
    """Per-bin total weight, weighted score sum and weighted target sum."""
    count = np.bincount(index, weights=weights, minlength=n_bins)
    score_sum = np.bincount(index, weights=weights * scores, minlength=n_bins)
    target_sum = np.bincount(index, weights=weights * targets, minlength=n_bins)
    return count, score_sum, target_sum
