"""Sample-based uncertainty of LLM answers: kernel entropy, spectral uncertainty and baselines.

Every estimator works on answers that are already sampled and, for the kernel methods, embedded.
N answers with embeddings x_1..x_N give the Gram matrix K, K_ij = k(x_i, x_j). Logarithms are
natural. The RBF kernel is the un-normalised one, k(x, y) = exp(-gamma * ||x - y||^2), as in
scikit-learn's `rbf_kernel`, and `gamma=None` means 1 / dim.

Estimators and their sources:
- kernel score and kernel entropy: Gruber and Buettner, "A Bias-Variance-Covariance Decomposition
  of Kernel Scores for Generative Models", ICML 2024;
- spectral uncertainty (von Neumann entropy of K / N, split into aleatoric and epistemic parts by
  clarifications of the question): Walha, Gruber et al., arXiv 2509.22272;
- semantic entropy (Farquhar et al., Nature 2024), kernel language entropy (Nikitin et al., 2024)
  and input clarification ensembling (Hou et al., 2024) as baselines, driven by any entailment
  function with labels 0 contradiction, 1 neutral, 2 entailment.

The module uses numpy and scipy only, so the image side of the project can import it without the
LLM extras.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import scipy.linalg
import scipy.stats

Kernel = Literal["rbf", "cosine", "linear"]

# Labels an entailment function returns for "premise => hypothesis".
CONTRADICTION, NEUTRAL, ENTAILMENT = 0, 1, 2

Entailment = Callable[[str, str], int]

KLE_HEAT_TIME = 0.4
KLE_DIAGONAL_EPS = 1e-12
KLE_EIGENVALUE_CUTOFF = 1e-8


class UncertaintyError(ValueError):
    """Input that no uncertainty estimate can be computed from. The message names the argument."""


# ---------------------------------------------------------------------------------------------
# Input checks and kernels


def _as_embeddings(embeddings: np.ndarray | Sequence[Sequence[float]], name: str) -> np.ndarray:
    array = np.asarray(embeddings, dtype=np.float64)
    if array.ndim != 2:
        raise UncertaintyError(f"{name} must be a 2-D array (answers, dim), got shape {array.shape}")
    if array.shape[0] == 0:
        raise UncertaintyError(f"{name} is empty: at least one answer embedding is required")
    if array.shape[1] == 0:
        raise UncertaintyError(f"{name} has embedding dimension 0")
    bad_rows = np.flatnonzero(~np.isfinite(array).all(axis=1))
    if bad_rows.size:
        raise UncertaintyError(
            f"{name} has {bad_rows.size} rows with NaN or infinite values (first at row {bad_rows[0]})"
        )
    return array


def _resolve_gamma(gamma: float | None, dim: int) -> float:
    if gamma is None:
        return 1.0 / dim
    if not np.isfinite(gamma) or gamma <= 0:
        raise UncertaintyError(f"gamma must be a positive number or None, got {gamma!r}")
    return float(gamma)


def kernel_matrix(
    x: np.ndarray,
    y: np.ndarray | None = None,
    kernel: Kernel = "rbf",
    gamma: float | None = None,
) -> np.ndarray:
    """Compute the kernel matrix between the rows of `x` (n, d) and of `y` (m, d), shape (n, m).

    Kernels: "rbf" is exp(-gamma * ||x - y||^2), with gamma = 1 / d when None. "cosine" is the
    cosine similarity and rejects zero-norm rows. "linear" is the dot product x . y.
    `y=None` means `y = x`.
    """
    x = _as_embeddings(x, "x")
    y = x if y is None else _as_embeddings(y, "y")
    if x.shape[1] != y.shape[1]:
        raise UncertaintyError(
            f"x and y have different embedding dimensions: {x.shape[1]} and {y.shape[1]}"
        )

    if kernel == "rbf":
        gamma = _resolve_gamma(gamma, x.shape[1])
        squared = (
            np.sum(x * x, axis=1)[:, None] + np.sum(y * y, axis=1)[None, :] - 2.0 * (x @ y.T)
        )
        # Rounding can make the squared distance of a row to itself slightly negative.
        np.maximum(squared, 0.0, out=squared)
        if y is x:
            np.fill_diagonal(squared, 0.0)
        return np.exp(-gamma * squared)

    if kernel == "linear":
        return x @ y.T

    if kernel == "cosine":
        x_norm = np.linalg.norm(x, axis=1)
        y_norm = np.linalg.norm(y, axis=1)
        for name, norms in (("x", x_norm), ("y", y_norm)):
            zero = np.flatnonzero(norms == 0)
            if zero.size:
                raise UncertaintyError(
                    f"{name} has {zero.size} zero-norm rows (first at row {zero[0]}), "
                    "for which cosine similarity is undefined; use the rbf kernel"
                )
        return (x / x_norm[:, None]) @ (y / y_norm[:, None]).T

    raise UncertaintyError(f"kernel must be one of rbf, cosine, linear, got {kernel!r}")


def _mean_off_diagonal(gram: np.ndarray) -> float:
    n = gram.shape[0]
    if n < 2:
        return float("nan")
    return float((gram.sum() - np.trace(gram)) / (n * (n - 1)))


# ---------------------------------------------------------------------------------------------
# Kernel score and kernel entropy


def kernel_entropy(
    embeddings: np.ndarray, kernel: Kernel = "rbf", gamma: float | None = None
) -> float:
    """Estimate the kernel entropy KE(P) = -||P||_k^2 from N sampled answers.

    KE = (tr K - sum_ij K_ij) / (N (N - 1)), the negative mean off-diagonal kernel value, which is
    unbiased. The spectral-uncertainty paper calls it predictive kernel entropy (PKE). With the
    RBF kernel KE lies in [-1, 0]: identical answers give -1 and scattered answers approach 0,
    so a value closer to 0 means more uncertain.

    Parameters
    ----------
    embeddings : (N, d) array of answer embeddings.

    Returns
    -------
    float, NaN when N = 1 because no pair of samples exists.
    """
    gram = kernel_matrix(embeddings, kernel=kernel, gamma=gamma)
    return -_mean_off_diagonal(gram)


def kernel_score(
    samples: np.ndarray,
    targets: np.ndarray,
    kernel: Kernel = "rbf",
    gamma: float | None = None,
) -> float:
    """Estimate the kernel score S_k(P, y) = ||P||_k^2 - 2 E_{Y~P} k(Y, y) (lower is better).

    The estimate is (1 / (N (N - 1))) sum_{i != j} k(x_i, x_j) - 2 mean_{i,l} k(x_i, y_l) over
    N model samples `samples` (N, d) and M observations `targets` (M, d). It is NaN for N = 1.
    """
    samples = _as_embeddings(samples, "samples")
    targets = _as_embeddings(targets, "targets")
    self_similarity = _mean_off_diagonal(kernel_matrix(samples, kernel=kernel, gamma=gamma))
    cross = kernel_matrix(samples, targets, kernel=kernel, gamma=gamma)
    return float(self_similarity - 2.0 * cross.mean())


def squared_mmd(
    samples: np.ndarray,
    targets: np.ndarray,
    kernel: Kernel = "rbf",
    gamma: float | None = None,
) -> float:
    """Estimate the squared maximum mean discrepancy between samples and targets, unbiased.

    It equals `kernel_score(samples, targets) - kernel_entropy(targets)`, can come out negative
    and is NaN unless there are at least two samples and two targets.
    """
    targets = _as_embeddings(targets, "targets")
    score = kernel_score(samples, targets, kernel=kernel, gamma=gamma)
    return float(score - kernel_entropy(targets, kernel=kernel, gamma=gamma))


# ---------------------------------------------------------------------------------------------
# Von Neumann entropy and spectral uncertainty


def _spectrum(matrix: np.ndarray) -> np.ndarray:
    """Eigenvalues of a symmetric matrix, falling back to numpy and then to a small ridge."""
    try:
        return scipy.linalg.eigvalsh(matrix)
    except np.linalg.LinAlgError:
        pass
    try:
        return np.linalg.eigvalsh(matrix)
    except np.linalg.LinAlgError:
        return np.linalg.eigvalsh(matrix + 1e-6 * np.eye(matrix.shape[0]))


def von_neumann_entropy(
    embeddings: np.ndarray, kernel: Kernel = "rbf", gamma: float | None = None
) -> float:
    """Compute the von Neumann entropy of the normalised kernel matrix K / N.

    VNE = -sum_i l_i log l_i over the eigenvalues l of K / N after clipping negatives to 0 and
    renormalising them to sum to 1. With the RBF kernel tr(K / N) = 1 already. One answer gives
    0. Identical answers give a rank-one K whose entropy is about 1e-14, not exactly 0.

    Returns
    -------
    float in [0, log N]; NaN when every eigenvalue is 0 (a linear kernel of zero vectors).
    """
    gram = kernel_matrix(embeddings, kernel=kernel, gamma=gamma)
    eigenvalues = np.clip(_spectrum(gram / gram.shape[0]), 0.0, None)
    total = eigenvalues.sum()
    if total <= 0:
        return float("nan")
    return float(scipy.stats.entropy(eigenvalues / total))


def _as_groups(groups: Sequence[np.ndarray], name: str) -> list[np.ndarray]:
    if len(groups) == 0:
        raise UncertaintyError(f"{name} is empty: at least one clarification is required")
    checked = []
    for index, group in enumerate(groups):
        array = np.asarray(group, dtype=np.float64)
        if array.ndim != 2 or array.shape[0] == 0:
            raise UncertaintyError(
                f"{name}[{index}] must be a non-empty (answers, dim) array, got shape {array.shape}"
            )
        checked.append(_as_embeddings(array, f"{name}[{index}]"))
    dims = {group.shape[1] for group in checked}
    if len(dims) > 1:
        raise UncertaintyError(f"{name} mixes embedding dimensions {sorted(dims)}")
    return checked


@dataclass(frozen=True)
class Decomposition:
    """Total uncertainty split into aleatoric (from the question) and epistemic (from the model).

    For spectral uncertainty: total is the entropy of all answers pooled, epistemic the unweighted
    mean entropy within clarifications, aleatoric = total - epistemic.
    """

    total: float
    aleatoric: float
    epistemic: float


def spectral_uncertainty(
    groups: Sequence[np.ndarray], kernel: Kernel = "rbf", gamma: float | None = None
) -> Decomposition:
    """Split the von Neumann entropy of answers to n clarifications into its two parts.

    Parameters
    ----------
    groups : n arrays of shape (m_i, d), the embedded answers to each clarification.

    Returns
    -------
    Decomposition with total = VNE(all answers pooled), epistemic = mean_i VNE(group i) and
    aleatoric = total - epistemic (the Holevo information). With equal m_i the aleatoric part lies
    in [0, log n]; with unequal m_i the pooled entropy weighs groups by size but the mean does
    not, so aleatoric can come out negative. One clarification forces aleatoric = 0, and one
    answer per clarification gives epistemic = 0.
    """
    checked = _as_groups(groups, "groups")
    total = von_neumann_entropy(np.vstack(checked), kernel=kernel, gamma=gamma)
    epistemic = float(
        np.mean([von_neumann_entropy(group, kernel=kernel, gamma=gamma) for group in checked])
    )
    return Decomposition(total=total, aleatoric=total - epistemic, epistemic=epistemic)


def predictive_kernel_entropy(
    groups: Sequence[np.ndarray], kernel: Kernel = "rbf", gamma: float | None = None
) -> Decomposition:
    """Apply the spectral decomposition to kernel entropy: total over all answers, mean within.

    The aleatoric field contains total - mean ("disagreement"), which can be negative. The mean, and
    so the disagreement, is NaN when any clarification has a single answer.
    """
    checked = _as_groups(groups, "groups")
    total = kernel_entropy(np.vstack(checked), kernel=kernel, gamma=gamma)
    epistemic = float(
        np.mean([kernel_entropy(group, kernel=kernel, gamma=gamma) for group in checked])
    )
    return Decomposition(total=total, aleatoric=total - epistemic, epistemic=epistemic)


def kernel_distance_variance(
    groups: Sequence[np.ndarray], kernel: Kernel = "rbf", gamma: float | None = None
) -> float:
    """Compute the mean kernel value within groups minus the mean kernel value between groups.

    Within-group pairs are the off-diagonal pairs of each group, pooled. The value can be
    negative, and it is NaN for a single group or when no group has two answers.
    """
    checked = _as_groups(groups, "groups")
    if len(checked) < 2:
        return float("nan")
    gram = kernel_matrix(np.vstack(checked), kernel=kernel, gamma=gamma)
    membership = np.repeat(np.arange(len(checked)), [len(group) for group in checked])
    same_group = membership[:, None] == membership[None, :]
    within = same_group & ~np.eye(len(membership), dtype=bool)
    if not within.any():
        return float("nan")
    return float(gram[within].mean() - gram[~same_group].mean())


# ---------------------------------------------------------------------------------------------
# Entailment-based baselines


def _entailment_labels(answers: Sequence[str], entailment: Entailment) -> np.ndarray:
    """Matrix of labels[i, j] = entailment(answers[i], answers[j]) for i != j."""
    n = len(answers)
    labels = np.full((n, n), ENTAILMENT, dtype=np.int64)
    for i in range(n):
        for j in range(n):
            if i == j:
                continue
            label = int(entailment(answers[i], answers[j]))
            if label not in (CONTRADICTION, NEUTRAL, ENTAILMENT):
                raise UncertaintyError(
                    f"entailment returned {label!r} for answers {i} and {j}; expected 0, 1 or 2"
                )
            labels[i, j] = label
    return labels


def _check_answers(answers: Sequence[str], name: str) -> list[str]:
    if isinstance(answers, str):
        raise UncertaintyError(f"{name} must be a sequence of answer strings, got one string")
    answers = list(answers)
    if not answers:
        raise UncertaintyError(f"{name} is empty: at least one answer is required")
    return answers


def semantic_clusters(answers: Sequence[str], entailment: Entailment) -> np.ndarray:
    """Cluster answers that entail each other in both directions; returns (N,) cluster ids.

    Clustering is greedy in answer order: each answer not yet in a cluster opens one and claims
    every later answer equivalent to it, including answers an earlier cluster already claimed.
    This matches the reference implementation of discrete semantic entropy, so the result depends
    on sampling order when the entailment function is not transitive.
    """
    answers = _check_answers(answers, "answers")
    labels = _entailment_labels(answers, entailment)
    equivalent = (labels == ENTAILMENT) & (labels.T == ENTAILMENT)

    cluster = np.full(len(answers), -1, dtype=np.int64)
    next_id = 0
    for i in range(len(answers)):
        if cluster[i] != -1:
            continue
        cluster[i] = next_id
        for j in range(i + 1, len(answers)):
            if equivalent[i, j]:
                cluster[j] = next_id
        next_id += 1
    return cluster


def semantic_entropy(answers: Sequence[str], entailment: Entailment) -> float:
    """Compute discrete semantic entropy: the Shannon entropy of semantic-cluster frequencies."""
    cluster = semantic_clusters(answers, entailment)
    _, counts = np.unique(cluster, return_counts=True)
    return float(scipy.stats.entropy(counts))


def kernel_language_entropy(
    answers: Sequence[str], entailment: Entailment, heat_time: float = KLE_HEAT_TIME
) -> float:
    """Compute kernel language entropy: the von Neumann entropy of a heat kernel on an NLI graph.

    Edges weigh w_ij = [l(i=>j) = 2] + [l(j=>i) = 2] + 0.5 [l(i=>j) = 1] + 0.5 [l(j=>i) = 1].
    The heat kernel K = expm(-t L) of the Laplacian L = D - W is scaled to unit diagonal (with a
    1e-12 guard), divided by N, and the entropy sums -l log l over eigenvalues with |l| > 1e-8,
    without renormalising. A single answer therefore gives about 2e-12 rather than 0.
    """
    answers = _check_answers(answers, "answers")
    if not np.isfinite(heat_time) or heat_time <= 0:
        raise UncertaintyError(f"heat_time must be positive, got {heat_time!r}")
    labels = _entailment_labels(answers, entailment)
    weights = (labels == ENTAILMENT).astype(np.float64) + 0.5 * (labels == NEUTRAL)
    weights = weights + weights.T
    np.fill_diagonal(weights, 0.0)

    laplacian = np.diag(weights.sum(axis=1)) - weights
    heat = scipy.linalg.expm(-heat_time * laplacian)
    scale = np.sqrt(np.diag(heat)) + KLE_DIAGONAL_EPS
    density = heat / np.outer(scale, scale) / len(answers)

    eigenvalues = _spectrum((density + density.T) / 2.0)
    # Negative eigenvalues beyond the cutoff do not occur for heat kernels; they are dropped too.
    kept = eigenvalues[eigenvalues > KLE_EIGENVALUE_CUTOFF]
    return float(-np.sum(kept * np.log(kept)))


def clarification_ensemble_entropy(
    groups: Sequence[Sequence[str]], entailment: Entailment
) -> Decomposition:
    """Compute input clarification ensembling: semantic entropy pooled versus within groups.

    Total is the semantic entropy of all answers clustered together, epistemic the mean semantic
    entropy within clarifications, aleatoric = total - epistemic. Because the pooled set is
    clustered afresh, aleatoric can occasionally be negative.
    """
    if isinstance(groups, str) or len(groups) == 0:
        raise UncertaintyError("groups must be a non-empty sequence of answer lists")
    checked = [_check_answers(group, f"groups[{index}]") for index, group in enumerate(groups)]
    pooled = [answer for group in checked for answer in group]
    total = semantic_entropy(pooled, entailment)
    epistemic = float(np.mean([semantic_entropy(group, entailment) for group in checked]))
    return Decomposition(total=total, aleatoric=total - epistemic, epistemic=epistemic)


# ---------------------------------------------------------------------------------------------
# Ranking metrics for error and ambiguity detection


def _check_binary(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    labels = np.asarray(labels)
    scores = np.asarray(scores, dtype=np.float64)
    if labels.ndim != 1 or scores.shape != labels.shape:
        raise UncertaintyError(
            f"labels and scores must be 1-D of equal length, got {labels.shape} and {scores.shape}"
        )
    outside = np.flatnonzero(~np.isin(labels, (0, 1)))
    if outside.size:
        raise UncertaintyError(
            f"labels has {outside.size} values outside 0/1 (first at row {outside[0]})"
        )
    bad = np.flatnonzero(~np.isfinite(scores))
    if bad.size:
        raise UncertaintyError(
            f"scores has {bad.size} NaN or infinite values (first at row {bad[0]})"
        )
    return labels.astype(np.int64), scores


def auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Compute the area under the ROC curve of `scores` for the positive label 1; ties count half.

    It is the Mann-Whitney statistic on mid-ranks, equal to scikit-learn's `roc_auc_score`, which
    the project does not require at run time. NaN when only one label is present.
    """
    labels, scores = _check_binary(labels, scores)
    return _auroc(labels, scores)


def average_precision(labels: np.ndarray, scores: np.ndarray) -> float:
    """Compute average precision, sum_t (R_t - R_{t-1}) P_t over distinct score thresholds.

    This is scikit-learn's `average_precision_score` (not the trapezoid area under the PR curve).
    NaN when no label is positive.
    """
    labels, scores = _check_binary(labels, scores)
    return _average_precision(labels, scores)


def _auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    n_positive = int(labels.sum())
    n_negative = labels.size - n_positive
    if n_positive == 0 or n_negative == 0:
        return float("nan")
    ranks = scipy.stats.rankdata(scores)
    rank_sum = ranks[labels == 1].sum()
    return float((rank_sum - n_positive * (n_positive + 1) / 2.0) / (n_positive * n_negative))


def _average_precision(labels: np.ndarray, scores: np.ndarray) -> float:
    n_positive = int(labels.sum())
    if n_positive == 0:
        return float("nan")

    order = np.argsort(-scores, kind="mergesort")
    sorted_scores = scores[order]
    true_positives = np.cumsum(labels[order])
    # One operating point per distinct score: the last index of each run of tied scores.
    last_of_run = np.r_[np.flatnonzero(np.diff(sorted_scores)), sorted_scores.size - 1]
    tp = true_positives[last_of_run]
    precision = tp / (last_of_run + 1)
    recall = tp / n_positive
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def detection_with_intervals(labels: np.ndarray, scores: np.ndarray, n_boot: int = 1000,
                             seed: int = 0) -> dict[str, float | int | str | None]:
    """Compute AUROC and average precision of `scores` for `labels`, with 95 % bootstrap intervals.

    Items with an undefined (NaN) score are left out and counted in `n_undefined`. Intervals are
    percentile intervals over `n_boot` resamples of the items. Resamples with a single label are
    skipped, and the intervals stay NaN when over half of them are. `reason` gives the cause
    when a value is NaN.

    Returns
    -------
    dict with n, n_positive, n_undefined, auroc, auroc_low, auroc_high, aupr, aupr_low,
    aupr_high and reason.
    """
    scores = np.asarray(scores, dtype=np.float64)
    finite = np.isfinite(scores)
    labels, kept = _check_binary(np.asarray(labels)[finite], scores[finite])
    if n_boot < 0:
        raise UncertaintyError(f"n_boot must be 0 or more, got {n_boot!r}")

    nan = float("nan")
    result: dict[str, float | int | str | None] = {
        "n": int(labels.size), "n_positive": int(labels.sum()), "n_undefined": int((~finite).sum()),
        "auroc": nan, "auroc_low": nan, "auroc_high": nan,
        "aupr": nan, "aupr_low": nan, "aupr_high": nan, "reason": None,
    }
    if labels.size == 0 or labels.min() == labels.max():
        result["reason"] = "needs both positive and negative items with a defined score"
        return result

    result["auroc"] = _auroc(labels, kept)
    result["aupr"] = _average_precision(labels, kept)
    if n_boot == 0:
        return result

    rng = np.random.default_rng(seed)
    aurocs, auprs = [], []
    for _ in range(n_boot):
        index = rng.integers(0, labels.size, labels.size)
        resampled = labels[index]
        if resampled.min() == resampled.max():
            continue
        aurocs.append(_auroc(resampled, kept[index]))
        auprs.append(_average_precision(resampled, kept[index]))
    if len(aurocs) < n_boot / 2:
        result["reason"] = f"only {len(aurocs)} of {n_boot} bootstrap resamples had both labels"
        return result

    result["auroc_low"], result["auroc_high"] = (float(v) for v in np.percentile(aurocs, [2.5, 97.5]))
    result["aupr_low"], result["aupr_high"] = (float(v) for v in np.percentile(auprs, [2.5, 97.5]))
    return result
