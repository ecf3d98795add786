"""Population shifts from metadata: subgroups, prevalence resampling and covariate reweighting."""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd

from tools.shifts.base import ShiftError

# Edges of the default age bands in years: [0, 30), [30, 45), [45, 60), [60, 75), [75, 200).
# An upper edge of float("inf") is allowed and labels its band "75+".
AGE_BANDS = [0, 30, 45, 60, 75, 200]

# Name of the group of rows whose value is missing (NaN, None or an empty string).
MISSING = "missing"
# Name of the group of numeric values outside the outermost band edges.
OUT_OF_RANGE = "out of range"


def _column(metadata: pd.DataFrame, column: str) -> pd.Series:
    if column not in metadata.columns:
        known = ", ".join(str(c) for c in metadata.columns)
        raise ShiftError(f"metadata has no column {column!r}; columns: {known}")
    return metadata[column]


def _check_bands(bands: list[float], column: str) -> np.ndarray:
    edges = np.asarray(bands, dtype=np.float64)
    if edges.ndim != 1 or len(edges) < 2 or not np.all(np.isfinite(edges[:-1])) \
            or np.isnan(edges[-1]) or edges[-1] == -np.inf:
        raise ShiftError(f"bands for column {column!r} must be at least two edges, all finite "
                         f"except a last edge of inf, got {bands!r}")
    if np.any(np.diff(edges) <= 0):
        raise ShiftError(f"bands for column {column!r} must be strictly increasing, got {bands!r}")
    return edges


def _band_labels(edges: np.ndarray, integral: bool) -> list[str]:
    """Label half-open bands [lo, hi): "30-44" for whole numbers, "30-<44.5" otherwise."""
    labels = []
    for lo, hi in itertools.pairwise(edges):
        if np.isinf(hi):
            labels.append(f"{lo:g}+")
        elif integral and float(lo).is_integer() and float(hi).is_integer():
            labels.append(f"{int(lo)}-{int(hi) - 1}")
        else:
            labels.append(f"{lo:g}-<{hi:g}")
    return labels


def _missing(values: pd.Series) -> np.ndarray:
    as_text = values.astype("string").str.strip()
    return (values.isna() | (as_text == "")).to_numpy(dtype=bool)


def group_labels(metadata: pd.DataFrame, column: str,
                 bands: list[float] | None = None) -> np.ndarray:
    """Return the group name of every row (object array of str): the value itself, or its band.

    Missing values go to the group "missing"; with bands, values outside the outermost edges go
    to "out of range".
    """
    values = _column(metadata, column)
    missing = _missing(values)
    labels = np.empty(len(values), dtype=object)
    labels[missing] = MISSING

    if bands is None:
        labels[~missing] = [str(v) for v in values[~missing]]
        return labels

    edges = _check_bands(bands, column)
    numbers = pd.to_numeric(values[~missing], errors="coerce")
    if numbers.isna().any():
        first = values[~missing][numbers.isna()].iloc[0]
        raise ShiftError(f"column {column!r} must be numeric to cut into bands, got {first!r}")
    numbers = numbers.to_numpy(dtype=np.float64)

    integral = bool(np.all(np.mod(numbers, 1) == 0))
    names = np.array(_band_labels(edges, integral), dtype=object)
    band = np.searchsorted(edges, numbers, side="right") - 1
    inside = (band >= 0) & (band < len(names))
    present = labels[~missing]
    present[inside] = names[band[inside]]
    present[~inside] = OUT_OF_RANGE
    labels[~missing] = present
    return labels


def subgroup_masks(metadata: pd.DataFrame, column: str,
                   bands: list[float] | None = None) -> dict[str, np.ndarray]:
    """Split the rows of metadata into subgroups along one column.

    Without bands, each distinct value is a subgroup, sorted by name. With bands, a numeric
    column is cut into half-open bands [lo, hi) named like "45-59", in band order. Rows with a
    missing value form the subgroup "missing", present only when such rows exist.

    Returns {subgroup name: bool array (n,)}; the masks are disjoint and cover every row.
    Raises ShiftError naming the column when it does not exist or cannot be cut into bands.
    """
    labels = group_labels(metadata, column, bands)
    if bands is None:
        order = sorted(set(labels) - {MISSING})
    else:
        edges = _check_bands(bands, column)
        numbers = pd.to_numeric(metadata[column], errors="coerce").dropna().to_numpy()
        integral = bool(np.all(np.mod(numbers, 1) == 0))
        order = [name for name in _band_labels(edges, integral) if name in set(labels)]
        if OUT_OF_RANGE in set(labels):
            order.append(OUT_OF_RANGE)
    if MISSING in set(labels):
        order.append(MISSING)
    return {name: labels == name for name in order}


def _largest_remainder(total: int, shares: np.ndarray) -> np.ndarray:
    """Round total * shares to integers that sum to total (largest remainder method)."""
    exact = total * shares
    counts = np.floor(exact).astype(np.int64)
    leftover = total - int(counts.sum())
    # Ties in the fractional part go to the lower class index, so the result is deterministic.
    order = np.lexsort((np.arange(len(shares)), -(exact - counts)))
    counts[order[:leftover]] += 1
    return counts


def prevalence_indices(labels: np.ndarray, class_mix: dict[int, float], seed: int,
                       n: int | None = None) -> np.ndarray:
    """Resample a labelled set, without replacement, to a target class mix (label shift).

    Parameters
    ----------
    labels : int array (n_rows,) of class indices.
    class_mix : {class index: share}; shares are non-negative and are normalised to sum to 1.
        Classes left out get share 0.
    seed : seed of the draw within each class.
    n : size of the resampled set. None takes the largest size that no class runs out at.

    Returns
    -------
    int64 array of row indices into labels, sorted ascending, with per-class counts equal to
    n * share rounded by the largest remainder method.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ShiftError(f"labels must be a 1-D integer array, got {labels.dtype} {labels.shape}")
    if not class_mix:
        raise ShiftError("class_mix is empty; give at least one class with a positive share")

    classes = np.array(sorted(class_mix), dtype=np.int64)
    shares = np.array([float(class_mix[c]) for c in classes], dtype=np.float64)
    if np.any(classes < 0):
        raise ShiftError(f"class_mix has a negative class index {int(classes.min())}")
    if not np.all(np.isfinite(shares)) or np.any(shares < 0) or shares.sum() <= 0:
        raise ShiftError(f"class_mix shares must be non-negative with a positive sum, "
                         f"got {class_mix!r}")
    shares = shares / shares.sum()

    available = np.array([int(np.sum(labels == c)) for c in classes])
    requested = shares > 0
    empty = classes[requested & (available == 0)]
    if len(empty):
        raise ShiftError(f"class_mix asks for class {int(empty[0])}, which has no rows in labels")

    largest = int(np.floor(np.min(available[requested] / shares[requested]) + 1e-9))
    total = largest if n is None else int(n)
    if total < 1:
        raise ShiftError(f"n must be a positive integer, got {n!r}")
    counts = _largest_remainder(total, shares)
    short = np.flatnonzero(counts > available)
    if len(short):
        c = short[0]
        raise ShiftError(
            f"n={total} needs {counts[c]} rows of class {int(classes[c])} but labels has "
            f"{available[c]}; use n <= {largest} or n=None")

    rng = np.random.default_rng(seed)
    chosen = [rng.choice(np.flatnonzero(labels == c), size=k, replace=False)
              for c, k in zip(classes, counts, strict=True) if k > 0]
    return np.sort(np.concatenate(chosen)).astype(np.int64)


def reweight_weights(metadata: pd.DataFrame, column: str, target: dict[str, float],
                     bands: list[float] | None = None) -> np.ndarray:
    """Importance weights that give the groups of one column a target mix (covariate shift).

    Row i in group g gets weight target[g] / observed[g], where observed[g] is the share of rows
    in g and target shares are normalised to sum to 1, so the weights sum to the number of rows.
    Rows of groups that target leaves out get weight 0. Groups are as in subgroup_masks (values,
    or bands when given, plus "missing").

    Returns float64 array (n,). Raises ShiftError when the column is unknown or target names a
    group with a positive share that has no rows.
    """
    labels = group_labels(metadata, column, bands)
    if not target:
        raise ShiftError(f"target for column {column!r} is empty; give group shares")
    shares = {str(k): float(v) for k, v in target.items()}
    total = sum(shares.values())
    if any(not np.isfinite(v) or v < 0 for v in shares.values()) or total <= 0:
        raise ShiftError(f"target shares for column {column!r} must be non-negative with a "
                         f"positive sum, got {target!r}")

    n_rows = len(labels)
    weights = np.zeros(n_rows, dtype=np.float64)
    for group, share in shares.items():
        in_group = labels == group
        count = int(in_group.sum())
        if count == 0 and share > 0:
            present = ", ".join(sorted(set(labels)))
            raise ShiftError(f"target group {group!r} has no rows in column {column!r}; "
                             f"groups present: {present}")
        if count:
            weights[in_group] = (share / total) / (count / n_rows)
    return weights


def effective_sample_size(weights: np.ndarray) -> float:
    """Kish's effective sample size (sum w)^2 / sum w^2; 0.0 when every weight is zero."""
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1 or not np.all(np.isfinite(w)) or np.any(w < 0):
        raise ShiftError("weights must be a 1-D array of finite non-negative numbers")
    squares = float(np.sum(w**2))
    if squares == 0.0:
        return 0.0
    return float(np.sum(w)) ** 2 / squares
