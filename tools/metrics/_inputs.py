"""Input checks and the per-call cache of derived arrays that every metric reads."""

from __future__ import annotations

import warnings
from functools import cached_property

import numpy as np

ROW_SUM_TOLERANCE = 1e-6
# From this many entries the minimum, row sums and row maximum run in torch, which vectorises
# short rows and uses its thread pool, where numpy reduces one short row at a time.
TORCH_ROW_SIZE = 1 << 17


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


def _as_tensor(array: np.ndarray):
    """Return a torch view of a float64 array, copying only arrays torch cannot view."""
    import torch

    if not array.flags.c_contiguous:
        array = np.ascontiguousarray(array)
    with warnings.catch_warnings():
        # The tensor is only read, so torch's warning about writing to a read-only array does not apply.
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(array)


def _min_and_row_sums(array: np.ndarray) -> tuple[float, np.ndarray]:
    """Return the smallest entry (NaN if any entry is NaN) and the sum of each row."""
    if array.size >= TORCH_ROW_SIZE:
        tensor = _as_tensor(array)
        return float(tensor.min()), tensor.sum(dim=1).numpy()
    # einsum sums short rows several times faster than sum(axis=1).
    return float(array.min()), np.einsum("ij->i", array)


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
    # sums catch inf. These are single fast passes, and the bad row is located only on failure.
    smallest, sums = _min_and_row_sums(array)
    largest_sum = sums.max()
    if not smallest >= 0 or not np.isfinite(largest_sum):
        _raise_first_bad_row(array, name)

    if not (sums.min() >= 1.0 - ROW_SUM_TOLERANCE and largest_sum <= 1.0 + ROW_SUM_TOLERANCE):
        off = np.abs(sums - 1.0) > ROW_SUM_TOLERANCE
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
    array = raw.astype(np.int64, copy=False)
    if array.min() < 0 or array.max() >= n_classes:
        outside = (array < 0) | (array >= n_classes)
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
    def _row_max(self) -> tuple[np.ndarray, np.ndarray]:
        """Return the maximum probability of each row and the first column that reaches it."""
        if self.probs.size < TORCH_ROW_SIZE:
            predicted = np.argmax(self.probs, axis=1)
            return self.probs[np.arange(self.n), predicted], predicted
        # Both numpy and torch return the first index of a tied maximum.
        values, indices = _as_tensor(self.probs).max(dim=1)
        return values.numpy(), indices.numpy()

    @property
    def predicted(self) -> np.ndarray:
        """Argmax class per row; ties go to the first index."""
        return self._row_max[1]

    @property
    def confidence(self) -> np.ndarray:
        """Maximum probability per row."""
        return self._row_max[0]

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
