"""Input checks and the per-call cache of derived arrays that every metric reads."""

from __future__ import annotations

from functools import cached_property

import numpy as np

ROW_SUM_TOLERANCE = 1e-6


class MetricError(ValueError):
    """Invalid input to a metric: bad probabilities, labels, weights, id or parameter."""


def _first_bad_row(mask: np.ndarray) -> int:
    return int(np.flatnonzero(mask)[0])


def _raise_first_bad_row(array: np.ndarray, name: str) -> None:
    finite = np.isfinite(array).all(axis=1)
    negative = (array < 0).any(axis=1)
    row = _first_bad_row(~finite | negative)
    if not finite[row]:
        raise MetricError(f"{name} row {row} contains NaN or inf: {array[row].tolist()}")
    raise MetricError(f"{name} row {row} contains a negative value: {array[row].tolist()}")


def validate_probs(probs, name: str = "probs", renormalise: bool = False) -> np.ndarray:
    """Return ``probs`` as a float64 (n, K) array after checking it.

    A 1-D array (or one column) is read as the positive-class probability of a binary
    problem and becomes the two columns ``[1 - p, p]``. No softmax or sigmoid is applied:
    NaN, infinite or negative entries raise, and so do rows that do not sum to 1 within
    1e-6 unless ``renormalise`` is set, in which case each row is divided by its sum.
    """
    array = np.asarray(probs, dtype=np.float64)
    if array.ndim == 2 and array.shape[1] == 1:
        array = array[:, 0]
    if array.ndim == 1:
        array = np.stack([1.0 - array, array], axis=1)
    if array.ndim != 2:
        raise MetricError(f"{name} must be a 1-D or 2-D array, got shape {array.shape}")
    if array.shape[0] == 0:
        raise MetricError(f"{name} has no rows")

    # The global minimum catches NaN and negative values (NaN >= 0 is False) and the row
    # sums catch inf; both are single fast passes, and the bad row is located only on failure.
    # A matrix-vector product sums short rows much faster than sum(axis=1).
    sums = array @ np.ones(array.shape[1])
    if not array.min() >= 0 or not np.isfinite(sums).all():
        _raise_first_bad_row(array, name)

    off = np.abs(sums - 1.0) > ROW_SUM_TOLERANCE
    if off.any():
        row = _first_bad_row(off)
        if not renormalise:
            raise MetricError(
                f"{name} row {row} sums to {sums[row]!r}, not 1 within {ROW_SUM_TOLERANCE}; "
                "pass probabilities (no softmax is applied) or set renormalise=True"
            )
        if (sums <= 0).any():
            row = _first_bad_row(sums <= 0)
            raise MetricError(f"{name} row {row} sums to 0 and cannot be renormalised")
        array = array / sums[:, None]
    return array


def validate_labels(labels, n: int, n_classes: int, name: str = "labels") -> np.ndarray:
    """Return ``labels`` as an int64 (n,) array of class indices in 0..K-1."""
    raw = np.asarray(labels)
    if raw.ndim != 1 or raw.shape[0] != n:
        raise MetricError(f"{name} must have shape ({n},) to match probs, got {raw.shape}")
    if raw.dtype.kind == "f":
        if not np.isfinite(raw).all():
            row = _first_bad_row(~np.isfinite(raw))
            raise MetricError(f"{name} row {row} is {raw[row]!r}, not a class index")
        if (raw != np.round(raw)).any():
            row = _first_bad_row(raw != np.round(raw))
            raise MetricError(f"{name} row {row} is {raw[row]!r}, not an integer class index")
    elif raw.dtype.kind not in "iub":
        raise MetricError(f"{name} must hold integer class indices, got dtype {raw.dtype}")
    array = raw.astype(np.int64)
    outside = (array < 0) | (array >= n_classes)
    if outside.any():
        row = _first_bad_row(outside)
        raise MetricError(
            f"{name} has {int(outside.sum())} values outside 0..{n_classes - 1} "
            f"(first at row {row}: {array[row]})"
        )
    return array


def validate_weights(weights, n: int, name: str = "weights") -> np.ndarray:
    """Return non-negative finite sample weights as float64 (n,), ones when ``weights`` is None."""
    if weights is None:
        return np.ones(n, dtype=np.float64)
    array = np.asarray(weights, dtype=np.float64)
    if array.ndim != 1 or array.shape[0] != n:
        raise MetricError(f"{name} must have shape ({n},) to match probs, got {array.shape}")
    bad = ~np.isfinite(array) | (array < 0)
    if bad.any():
        row = _first_bad_row(bad)
        raise MetricError(f"{name} row {row} is {array[row]!r}; weights must be finite and >= 0")
    return array


class MetricInputs:
    """Validated probabilities and labels plus derived arrays, computed once and cached.

    The bootstrap evaluates every metric many times on the same rows with different count
    weights, so anything that does not depend on the weights (argmax, confidence, sort
    orders, bin indices, kernel matrices) is computed here once.
    """

    def __init__(self, probs: np.ndarray, labels: np.ndarray, resampling: bool = False):
        self.probs = probs
        self.labels = labels
        self.n, self.n_classes = probs.shape
        # True inside the bootstrap: the O(n^2) metrics then switch to their subsampled form.
        self.resampling = resampling
        self.cache: dict = {}

    @classmethod
    def from_raw(cls, probs, labels, renormalise: bool = False) -> MetricInputs:
        checked = validate_probs(probs, renormalise=renormalise)
        return cls(checked, validate_labels(labels, checked.shape[0], checked.shape[1]))

    @cached_property
    def predicted(self) -> np.ndarray:
        """Argmax class per row; ties go to the first index."""
        return np.argmax(self.probs, axis=1)

    @cached_property
    def confidence(self) -> np.ndarray:
        """Maximum probability per row."""
        return self.probs[np.arange(self.n), self.predicted]

    @cached_property
    def correct(self) -> np.ndarray:
        """1.0 where the argmax class equals the label, else 0.0."""
        return (self.predicted == self.labels).astype(np.float64)

    @cached_property
    def true_class_prob(self) -> np.ndarray:
        return self.probs[np.arange(self.n), self.labels]

    @cached_property
    def onehot(self) -> np.ndarray:
        out = np.zeros_like(self.probs)
        out[np.arange(self.n), self.labels] = 1.0
        return out

    def cached(self, key, build):
        """Return ``self.cache[key]``, building it with ``build()`` the first time."""
        if key not in self.cache:
            self.cache[key] = build()
        return self.cache[key]
