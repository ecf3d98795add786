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


EDGE_TOLERANCE = 1e-9


def equal_width_index(scores: np.ndarray, n_bins: int) -> np.ndarray:
    """Bin index min(floor(s·B), B−1): bins [b/B, (b+1)/B), the last one closed at 1.

    A score whose s·B lies within 1e-9 of an integer counts as lying on that edge, so a
    score written as a decimal edge such as 0.6 or 0.29 (B = 100) opens the bin above it even
    though its binary floating-point value may be a little below the edge.
    """
    # floor(s·B + tol) is the edge rule above in one pass: it moves only scores within tol
    # below an integer up to it. Scores are non-negative, so truncation is the floor.
    index = (scores * n_bins + EDGE_TOLERANCE).astype(np.int64)
    return np.minimum(index, n_bins - 1, out=index)


def equal_mass_edges(ordered: np.ndarray, ordered_weights: np.ndarray, n_bins: int) -> np.ndarray:
    """Compute the quantiles at 0, 1/B, ..., 1 of sorted scores with count weights (numpy's linear rule).

    A row of weight w counts as w copies, so with integer weights this equals
    ``np.quantile(np.repeat(ordered, weights), np.linspace(0, 1, B + 1))``: quantile b sits at
    position h = (N − 1)·b/B of the N copies and is interpolated between copies floor(h) and
    floor(h) + 1. Non-integer weights (for example reweighting to another population) are
    first scaled to sum to the number of rows with positive weight, then used the same way.
    """
    kept = ordered_weights > 0
    values = ordered[kept]
    kept_weights = ordered_weights[kept]
    if not np.all(kept_weights == np.round(kept_weights)):
        kept_weights = kept_weights * (kept_weights.size / kept_weights.sum())
    cumulative = np.cumsum(kept_weights)
    # (N − 1)·b is formed before dividing by B so that integer positions stay exact.
    position = (cumulative[-1] - 1.0) * np.arange(n_bins + 1) / n_bins
    below = np.floor(position)
    fraction = position - below
    # Copy j (0-based) belongs to the first row whose cumulative weight exceeds j.
    last = values.size - 1
    lower = values[np.minimum(np.searchsorted(cumulative, below, side="right"), last)]
    upper = values[np.minimum(np.searchsorted(cumulative, below + 1, side="right"), last)]
    return lower + fraction * (upper - lower)


def equal_mass_index(scores: np.ndarray, weights: np.ndarray, n_bins: int, order: np.ndarray | None = None) -> np.ndarray:
    """Bin index for bins between the weighted B-quantiles of the scores, each bin (l, u].

    Edges are the quantiles at 0, 1/B, ..., 1 (numpy's linear rule), and a score equal to an
    interior edge goes to the lower bin. This is the rule of scikit-learn's
    ``calibration_curve(strategy='quantile')``. Bins are defined on score values, so tied
    scores always share a bin. When ties make two edges equal, the bin between them is empty
    and weighs 0.
    """
    if order is None:
        order = np.argsort(scores, kind="stable")
    ordered = scores[order]
    edges = equal_mass_edges(ordered, weights[order], n_bins)
    return np.searchsorted(edges[1:-1], scores, side="left")


def bin_sums(index: np.ndarray, scores: np.ndarray, targets: np.ndarray, weights: np.ndarray, n_bins: int):
    """Per-bin total weight, weighted score sum and weighted target sum."""
    if (weights == 1.0).all():
        count = np.bincount(index, minlength=n_bins).astype(np.float64)
        score_sum = np.bincount(index, weights=scores, minlength=n_bins)
        target_sum = np.bincount(index, weights=targets, minlength=n_bins)
        return count, score_sum, target_sum
    count = np.bincount(index, weights=weights, minlength=n_bins)
    score_sum = np.bincount(index, weights=weights * scores, minlength=n_bins)
    target_sum = np.bincount(index, weights=weights * targets, minlength=n_bins)
    return count, score_sum, target_sum
