"""Recalibration of classifier logits, and a check of whether it helps or harms under shift.

Three scalers share one interface (`Scaler`): temperature scaling, vector scaling (a scale and a
bias per class) and binary Platt scaling. Each fits on calibration-split logits by minimising the
negative log-likelihood (NLL) with `scipy.optimize`, returns probabilities from `transform`, and
round-trips through `to_dict` / `scaler_from_dict`, so a fitted scaler can be stored in the model
card JSON and applied at prediction time.

`evaluate_recalibration` measures top-label ECE, NLL, Brier score and the signed confidence gap
before and after recalibration on each condition, with paired bootstrap intervals of the change,
and `recalibration_findings` turns those verdicts into candidate findings.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar, Literal, Protocol, runtime_checkable

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr
from scipy import optimize

from tools.metrics import bootstrap_p_value

ArrayLike = Any
Progress = Callable[[int, int], None] | None

#: Search range of the temperature: log T in [log 0.01, log 100].
LOG_TEMPERATURE_BOUNDS = (math.log(0.01), math.log(100.0))

#: Metric ids of the before/after comparison, in report order. The first three are the ids of
#: the metric registry; `confidence_gap` is mean top-label confidence minus accuracy.
RECALIBRATION_METRICS = ("ece_top_label", "nll", "brier", "confidence_gap")

DEFAULT_N_BINS = 15


class CalibrationError(ValueError):
    """Invalid input to a scaler or to the recalibration check."""


# ---------------------------------------------------------------------------------------------
# Input checks


def _check_logits(logits: ArrayLike, name: str = "logits", *, min_classes: int = 2) -> np.ndarray:
    """Return `logits` as a finite float64 (n, K) array or raise CalibrationError naming `name`."""
    try:
        array = np.asarray(logits, dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise CalibrationError(f"{name} is not a numeric (n, K) array: {error}") from None

    if array.ndim != 2:
        raise CalibrationError(f"{name} must be 2-D (n, K); got shape {array.shape}")
    if array.shape[0] == 0:
        raise CalibrationError(f"{name} has no rows; expected at least one")
    if array.shape[1] < min_classes:
        raise CalibrationError(
            f"{name} has {array.shape[1]} column(s); expected at least {min_classes} classes"
        )

    bad_rows = np.flatnonzero(~np.isfinite(array).all(axis=1))
    if bad_rows.size:
        first = int(bad_rows[0])
        raise CalibrationError(
            f"{name} has {bad_rows.size} row(s) with NaN or infinite values "
            f"(first at row {first}: {array[first].tolist()})"
        )
    return array


def _check_labels(labels: ArrayLike, n: int, n_classes: int, name: str = "labels") -> np.ndarray:
    """Return `labels` as an int64 (n,) array of class indices or raise CalibrationError."""
    raw = np.asarray(labels)
    if raw.ndim != 1:
        raise CalibrationError(f"{name} must be 1-D (n,); got shape {raw.shape}")
    if raw.shape[0] != n:
        raise CalibrationError(f"{name} has {raw.shape[0]} values but logits has {n} rows")
    if raw.dtype.kind == "f":
        if not np.isfinite(raw).all() or not np.equal(np.round(raw), raw).all():
            first = int(np.flatnonzero(~np.isfinite(raw) | (np.round(raw) != raw))[0])
            raise CalibrationError(
                f"{name} must be integer class indices; got {raw[first]!r} at row {first}"
            )
    elif raw.dtype.kind not in "iub":
        raise CalibrationError(f"{name} must be integer class indices; got dtype {raw.dtype}")

    array = raw.astype(np.int64)
    outside = np.flatnonzero((array < 0) | (array >= n_classes))
    if outside.size:
        first = int(outside[0])
        raise CalibrationError(
            f"{name} has {outside.size} value(s) outside 0..{n_classes - 1} "
            f"(first at row {first}: {array[first]})"
        )
    return array


def _check_fit_input(
    logits: ArrayLike, labels: ArrayLike, *, min_classes: int = 2
) -> tuple[np.ndarray, np.ndarray]:
    """Check the inputs of a fit, which also needs at least two classes present in `labels`."""
    z = _check_logits(logits, min_classes=min_classes)
    y = _check_labels(labels, z.shape[0], z.shape[1])
    present = np.unique(y)
    if present.size < 2:
        raise CalibrationError(
            f"labels contains only class {int(present[0])}; a scaler needs at least two classes "
            "in the calibration split"
        )
    return z, y


def _check_weights(weights: ArrayLike | None, n: int) -> np.ndarray | None:
    if weights is None:
        return None
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != (n,):
        raise CalibrationError(f"weights must have shape ({n},); got {w.shape}")
    if not np.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
        raise CalibrationError("weights must be finite, non-negative and not all zero")
    return w


# ---------------------------------------------------------------------------------------------
# Softmax and NLL pieces


def log_softmax(scores: np.ndarray) -> np.ndarray:
    """Return log-probabilities of each row of `scores` (n, K), stable for large values."""
    shifted = scores - scores.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def softmax(scores: np.ndarray) -> np.ndarray:
    """Return probabilities (n, K) of each row of `scores`."""
    return np.exp(log_softmax(scores))


def _weighted_mean(values: np.ndarray, weights: np.ndarray | None) -> float:
    if weights is None:
        return float(values.mean())
    return float(values @ weights / weights.sum())


def _nll_and_gradient(
    scores: np.ndarray, labels: np.ndarray, weights: np.ndarray | None
) -> tuple[float, np.ndarray]:
    """Return the mean NLL of softmax(scores) and its gradient with respect to `scores`."""
    log_p = log_softmax(scores)
    rows = np.arange(scores.shape[0])
    losses = -log_p[rows, labels]

    residual = np.exp(log_p)
    residual[rows, labels] -= 1.0
    if weights is None:
        return float(losses.mean()), residual / scores.shape[0]
    share = weights / weights.sum()
    return float(losses @ share), residual * share[:, None]


# ---------------------------------------------------------------------------------------------
# Scalers


@runtime_checkable
class Scaler(Protocol):
    """A recalibration map from logits (n, K) to probabilities (n, K), fitted by NLL."""

    kind: ClassVar[str]

    def fit(self, logits: ArrayLike, labels: ArrayLike, weights: ArrayLike | None = None) -> Scaler:
        """Fit on calibration logits and integer labels; return self."""
        ...

    def log_proba(self, logits: ArrayLike) -> np.ndarray:
        """Return recalibrated log-probabilities (n, K)."""
        ...

    def transform(self, logits: ArrayLike) -> np.ndarray:
        """Return recalibrated probabilities (n, K)."""
        ...

    def to_dict(self) -> dict[str, Any]:
        """Return the fitted parameters as a JSON-serialisable dict with a `kind` key."""
        ...


class _ScalerBase:
    kind: ClassVar[str] = ""
    n_fit: int | None = None

    def _require_fitted(self) -> None:
        if self.n_fit is None:
            raise CalibrationError(
                f"{self.kind} scaler is not fitted; call fit(logits, labels) first"
            )

    def transform(self, logits: ArrayLike) -> np.ndarray:
        return np.exp(self.log_proba(logits))  # type: ignore[attr-defined]


class TemperatureScaler(_ScalerBase):
    """Temperature scaling: probabilities softmax(z / T) with one positive T for all classes.

    T is fitted by bounded 1-D minimisation of the NLL over log T (Brent's method in
    `scipy.optimize.minimize_scalar`), so no learning rate needs tuning. The NLL is convex in
    1/T, hence unimodal in log T. T > 1 means the model was overconfident, T < 1 underconfident.
    """

    kind: ClassVar[str] = "temperature"

    def __init__(self, temperature: float | None = None, n_fit: int | None = None) -> None:
        if temperature is not None and not (math.isfinite(temperature) and temperature > 0):
            raise CalibrationError(f"temperature must be a positive number; got {temperature!r}")
        self.temperature = temperature
        self.n_fit = n_fit if temperature is None else (n_fit or 0)

    def fit(
        self, logits: ArrayLike, labels: ArrayLike, weights: ArrayLike | None = None
    ) -> TemperatureScaler:
        z, y = _check_fit_input(logits, labels)
        w = _check_weights(weights, z.shape[0])
        self.temperature = _fit_temperature_value(z, y, w)
        self.n_fit = int(z.shape[0])
        return self

    def log_proba(self, logits: ArrayLike) -> np.ndarray:
        self._require_fitted()
        z = _check_logits(logits)
        return log_softmax(z / self.temperature)

    def to_dict(self) -> dict[str, Any]:
        self._require_fitted()
        return {"kind": self.kind, "temperature": self.temperature, "n_fit": self.n_fit}

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> TemperatureScaler:
        return cls(temperature=float(raw["temperature"]), n_fit=int(raw.get("n_fit", 0)))


def _fit_temperature_value(z: np.ndarray, y: np.ndarray, weights: np.ndarray | None) -> float:
    """Return the T that minimises the (weighted) NLL of softmax(z / T)."""
    true_logit = z[np.arange(z.shape[0]), y]
    row_max = z.max(axis=1)

    def nll(log_t: float) -> float:
        inverse_t = math.exp(-log_t)
        shifted = (z - row_max[:, None]) * inverse_t
        losses = np.log(np.exp(shifted).sum(axis=1)) - (true_logit - row_max) * inverse_t
        return _weighted_mean(losses, weights)

    result = optimize.minimize_scalar(
        nll, bounds=LOG_TEMPERATURE_BOUNDS, method="bounded", options={"xatol": 1e-6}
    )
    # NOTE: when the split is perfectly separable the NLL keeps falling as T -> 0, and the fit
    # returns the lower bound T = 0.01 rather than raising.
    return float(math.exp(result.x))


class VectorScaler(_ScalerBase):
    """Vector scaling: probabilities softmax(z * a + b) with a scale a_k and bias b_k per class.

    Fitted with L-BFGS-B on the NLL and its analytic gradient, starting from a = 1, b = 0. The
    softmax does not change when the same constant is added to every bias, so the fitted bias is
    centred to sum to zero.
    """

    kind: ClassVar[str] = "vector"

    def __init__(
        self,
        scale: Sequence[float] | None = None,
        bias: Sequence[float] | None = None,
        n_fit: int | None = None,
    ) -> None:
        if (scale is None) != (bias is None):
            raise CalibrationError("vector scaler needs both scale and bias, or neither")
        self.scale = None if scale is None else np.asarray(scale, dtype=np.float64)
        self.bias = None if bias is None else np.asarray(bias, dtype=np.float64)
        if self.scale is not None and self.scale.shape != self.bias.shape:
            raise CalibrationError(
                f"scale has {self.scale.size} values but bias has {self.bias.size}"
            )
        self.n_fit = n_fit if scale is None else (n_fit or 0)

    def fit(
        self, logits: ArrayLike, labels: ArrayLike, weights: ArrayLike | None = None
    ) -> VectorScaler:
        z, y = _check_fit_input(logits, labels)
        w = _check_weights(weights, z.shape[0])
        k = z.shape[1]

        def objective(params: np.ndarray) -> tuple[float, np.ndarray]:
            scale, bias = params[:k], params[k:]
            loss, d_scores = _nll_and_gradient(z * scale + bias, y, w)
            gradient = np.concatenate([(d_scores * z).sum(axis=0), d_scores.sum(axis=0)])
            return loss, gradient

        start = np.concatenate([np.ones(k), np.zeros(k)])
        result = optimize.minimize(objective, start, jac=True, method="L-BFGS-B")
        self.scale = result.x[:k].copy()
        self.bias = result.x[k:] - result.x[k:].mean()
        self.n_fit = int(z.shape[0])
        return self

    def log_proba(self, logits: ArrayLike) -> np.ndarray:
        self._require_fitted()
        z = _check_logits(logits)
        if z.shape[1] != self.scale.size:
            raise CalibrationError(
                f"logits has {z.shape[1]} columns but the scaler was fitted on {self.scale.size}"
            )
        return log_softmax(z * self.scale + self.bias)

    def to_dict(self) -> dict[str, Any]:
        self._require_fitted()
        return {
            "kind": self.kind,
            "scale": self.scale.tolist(),
            "bias": self.bias.tolist(),
            "n_fit": self.n_fit,
        }

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> VectorScaler:
        return cls(scale=raw["scale"], bias=raw["bias"], n_fit=int(raw.get("n_fit", 0)))


class PlattScaler(_ScalerBase):
    """Binary Platt scaling: P(class 1) = sigmoid(a * s + b) with s = z_1 - z_0.

    For a model with one output logit z the classifier returns [0, z], so s = z. Fitted by
    maximum likelihood on the 0/1 labels with L-BFGS-B and the analytic gradient.
    NOTE: Platt's original method smooths the targets to (N+ + 1) / (N+ + 2) and 1 / (N- + 2).
    This fit uses the 0/1 labels as they are.
    """

    kind: ClassVar[str] = "platt"

    def __init__(
        self, slope: float | None = None, intercept: float | None = None, n_fit: int | None = None
    ) -> None:
        if (slope is None) != (intercept is None):
            raise CalibrationError("Platt scaler needs both slope and intercept, or neither")
        self.slope = slope
        self.intercept = intercept
        self.n_fit = n_fit if slope is None else (n_fit or 0)

    @staticmethod
    def _score(logits: ArrayLike) -> np.ndarray:
        z = _check_logits(logits)
        if z.shape[1] != 2:
            raise CalibrationError(
                f"logits has {z.shape[1]} columns; Platt scaling needs a binary model (2 columns)"
            )
        return z[:, 1] - z[:, 0]

    def fit(
        self, logits: ArrayLike, labels: ArrayLike, weights: ArrayLike | None = None
    ) -> PlattScaler:
        score = self._score(logits)
        _, y = _check_fit_input(logits, labels)
        w = _check_weights(weights, score.size)
        share = np.full(score.size, 1.0 / score.size) if w is None else w / w.sum()
        target = y.astype(np.float64)

        def objective(params: np.ndarray) -> tuple[float, np.ndarray]:
            t = params[0] * score + params[1]
            loss = float((np.logaddexp(0.0, t) - target * t) @ share)
            residual = (_sigmoid(t) - target) * share
            return loss, np.array([residual @ score, residual.sum()])

        result = optimize.minimize(objective, np.array([1.0, 0.0]), jac=True, method="L-BFGS-B")
        self.slope, self.intercept = float(result.x[0]), float(result.x[1])
        self.n_fit = int(score.size)
        return self

    def log_proba(self, logits: ArrayLike) -> np.ndarray:
        self._require_fitted()
        t = self.slope * self._score(logits) + self.intercept
        return np.column_stack([-np.logaddexp(0.0, t), -np.logaddexp(0.0, -t)])

    def to_dict(self) -> dict[str, Any]:
        self._require_fitted()
        return {
            "kind": self.kind,
            "slope": self.slope,
            "intercept": self.intercept,
            "n_fit": self.n_fit,
        }

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> PlattScaler:
        return cls(
            slope=float(raw["slope"]),
            intercept=float(raw["intercept"]),
            n_fit=int(raw.get("n_fit", 0)),
        )


def _sigmoid(t: np.ndarray) -> np.ndarray:
    return np.exp(-np.logaddexp(0.0, -t))


#: Scaler classes by `kind`, the value stored in the model card.
SCALERS: dict[str, type[_ScalerBase]] = {
    TemperatureScaler.kind: TemperatureScaler,
    VectorScaler.kind: VectorScaler,
    PlattScaler.kind: PlattScaler,
}


def make_scaler(kind: str) -> Scaler:
    """Return an unfitted scaler of `kind` ("temperature", "vector" or "platt")."""
    if kind not in SCALERS:
        raise CalibrationError(f"unknown scaler kind {kind!r}; expected one of {sorted(SCALERS)}")
    return SCALERS[kind]()  # type: ignore[return-value]


def scaler_from_dict(raw: Mapping[str, Any]) -> Scaler:
    """Rebuild a fitted scaler from `Scaler.to_dict()` output, e.g. the model card's entry."""
    kind = raw.get("kind") if isinstance(raw, Mapping) else None
    if kind not in SCALERS:
        raise CalibrationError(
            f"scaler kind {kind!r} is unknown; expected one of {sorted(SCALERS)}"
        )
    try:
        return SCALERS[kind].from_dict(raw)  # type: ignore[attr-defined,return-value]
    except (KeyError, TypeError) as error:
        raise CalibrationError(
            f"{kind} scaler entry is missing or has a bad field: {error}"
        ) from None


# ---------------------------------------------------------------------------------------------
# Temperature fit with a bootstrap interval (the planner's tool)

Direction = Literal["overconfident", "underconfident", "well calibrated"]


class FitTemperatureInput(BaseModel):
    """Arguments of `fit_temperature`: calibration-split logits and labels."""

    model_config = ConfigDict(extra="forbid")

    logits: list[list[float]] = Field(
        description="calibration-split logits, one row per image (n, K)"
    )
    labels: list[int] = Field(description="true class index per image, in 0..K-1")
    n_boot: int = Field(200, ge=20, le=10_000, description="bootstrap refits for the interval of T")
    seed: int = Field(0, description="seed of the bootstrap resampling")


class FitTemperatureOutput(BaseModel):
    """The fitted temperature, its bootstrap interval and the direction of miscalibration."""

    temperature: float = Field(description="T; probabilities are softmax(logits / T)")
    low: float = Field(description="2.5th percentile of T over bootstrap refits")
    high: float = Field(description="97.5th percentile of T over bootstrap refits")
    direction: Direction = Field(
        description="overconfident when T > 1, underconfident when T < 1, well calibrated when "
        "the interval contains 1"
    )
    nll_before: float = Field(description="mean NLL on the calibration split with T = 1")
    nll_after: float = Field(description="mean NLL on the calibration split with the fitted T")
    n: int = Field(description="images in the calibration split")
    n_boot: int
    seed: int
    scaler: dict[str, Any] = Field(description="TemperatureScaler.to_dict(), for the model card")


def _bootstrap_count_weights(n: int, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """Return (n_boot, n) resample counts: row b counts how often each image is drawn."""
    return rng.multinomial(n, np.full(n, 1.0 / n), size=n_boot).astype(np.float64)


def fit_temperature_arrays(
    logits: ArrayLike,
    labels: ArrayLike,
    n_boot: int = 200,
    seed: int = 0,
    progress: Progress = None,
) -> FitTemperatureOutput:
    """Fit temperature scaling on calibration logits (n, K) and labels (n,) already in memory.

    The 95 % interval is the percentile interval of T refitted on `n_boot` bootstrap resamples,
    drawn as count weights so no array is copied. `direction` reads "well calibrated" whenever
    the interval contains 1, whatever the point estimate.
    """
    z, y = _check_fit_input(logits, labels)
    if not isinstance(n_boot, (int, np.integer)) or n_boot < 20:
        raise CalibrationError(f"n_boot must be an integer of at least 20; got {n_boot!r}")

    scaler = TemperatureScaler().fit(z, y)
    temperature = scaler.temperature

    rng = np.random.default_rng(seed)
    refits = np.empty(n_boot)
    for b in range(n_boot):
        counts = _bootstrap_count_weights(z.shape[0], 1, rng)[0]
        drawn = counts > 0
        refits[b] = _fit_temperature_value(z[drawn], y[drawn], counts[drawn])
        if progress is not None:
            progress(b + 1, n_boot)
    low, high = (float(v) for v in np.percentile(refits, [2.5, 97.5]))

    if low <= 1.0 <= high:
        direction: Direction = "well calibrated"
    elif temperature > 1.0:
        direction = "overconfident"
    else:
        direction = "underconfident"

    rows = np.arange(z.shape[0])
    nll_before = float(-log_softmax(z)[rows, y].mean())
    nll_after = float(-scaler.log_proba(z)[rows, y].mean())

    return FitTemperatureOutput(
        temperature=temperature,
        low=low,
        high=high,
        direction=direction,
        nll_before=nll_before,
        nll_after=nll_after,
        n=int(z.shape[0]),
        n_boot=int(n_boot),
        seed=int(seed),
        scaler=scaler.to_dict(),
    )


def fit_temperature(
    request: FitTemperatureInput, progress: Progress = None
) -> FitTemperatureOutput:
    """Fit temperature scaling from JSON arguments; see `fit_temperature_arrays`."""
    widths = {len(row) for row in request.logits}
    if len(widths) > 1:
        first = next(
            i for i, row in enumerate(request.logits) if len(row) != len(request.logits[0])
        )
        raise CalibrationError(
            f"logits rows have different lengths {sorted(widths)} (first differing row {first})"
        )
    return fit_temperature_arrays(
        np.asarray(request.logits, dtype=np.float64),
        np.asarray(request.labels, dtype=np.int64),
        n_boot=request.n_boot,
        seed=request.seed,
        progress=progress,
    )


# ---------------------------------------------------------------------------------------------
# Metrics before and after recalibration
#
# ECE, NLL and Brier score come from the metric registry in tools.metrics. The confidence gap is
# not a registry metric, so it is computed here, on resamples drawn the way tools.metrics draws
# them (counts of n indices drawn uniformly from the seeded generator).

REGISTRY_METRICS = ("ece_top_label", "nll", "brier")


class MetricChange(BaseModel):
    """One metric before and after recalibration on one condition, with 95 % intervals."""

    metric: str
    before: float
    before_low: float
    before_high: float
    after: float
    after_low: float
    after_high: float
    delta: float = Field(description="after - before")
    low: float = Field(description="2.5th percentile of the paired bootstrap change")
    high: float = Field(description="97.5th percentile of the paired bootstrap change")
    p_value: float = Field(description="two-sided bootstrap p-value of a change of 0")
    reason: str | None = Field(None, description="why a value is NaN, from the metric registry")


Verdict = Literal["helped", "harmed", "no clear change"]


class RecalibrationVerdict(BaseModel):
    """Whether recalibration helped or harmed top-label ECE on one condition."""

    condition: str
    n: int
    verdict: Verdict = Field(
        description="helped when the ECE change interval lies below 0, harmed when above 0"
    )
    changes: list[MetricChange]
    reliability_before: list[dict[str, float | None]]
    reliability_after: list[dict[str, float | None]]

    # Bootstrap draws of the confidence gap (before, after), each (n_boot,), which
    # `recalibration_findings` compares between conditions. Not serialised.
    _gap_draws: tuple[np.ndarray, np.ndarray] = PrivateAttr()

    def change(self, metric: str) -> MetricChange:
        """Return the entry of `metric` (one of RECALIBRATION_METRICS)."""
        for entry in self.changes:
            if entry.metric == metric:
                return entry
        raise KeyError(
            f"metric {metric!r} is not in this verdict; expected one of {RECALIBRATION_METRICS}"
        )


def _percentile_interval(draws: np.ndarray) -> tuple[float, float]:
    low, high = np.percentile(draws, [2.5, 97.5])
    return float(low), float(high)


def _registry_changes(
    probs_before: np.ndarray,
    probs_after: np.ndarray,
    labels: np.ndarray,
    n_boot: int,
    seed: int,
    n_bins: int,
) -> list[MetricChange]:
    """Return ECE, NLL and Brier score before and after, with registry bootstrap intervals."""
    from tools.metrics import bootstrap_metrics, paired_bootstrap

    specs: list[str | tuple[str, dict]] = [("ece_top_label", {"n_bins": n_bins}), "nll", "brier"]
    keys = [f"ece_top_label@n_bins={n_bins}", "nll", "brier"]
    before = bootstrap_metrics(specs, probs_before, labels, n_boot=n_boot, seed=seed)
    after = bootstrap_metrics(specs, probs_after, labels, n_boot=n_boot, seed=seed)
    difference = paired_bootstrap(
        specs, probs_before, probs_after, labels, n_boot=n_boot, seed=seed
    )

    changes = []
    for metric, key in zip(REGISTRY_METRICS, keys, strict=True):
        changes.append(
            MetricChange(
                metric=metric,
                before=before[key].value,
                before_low=before[key].low,
                before_high=before[key].high,
                after=after[key].value,
                after_low=after[key].low,
                after_high=after[key].high,
                delta=difference[key].delta,
                low=difference[key].low,
                high=difference[key].high,
                p_value=difference[key].p_value,
                reason=difference[key].reason,
            )
        )
    return changes


def _confidence_gap_terms(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Return per-image top-label confidence minus correctness (1 right, 0 wrong)."""
    correct = probs.argmax(axis=1) == labels
    return probs.max(axis=1) - correct


def _confidence_gap_change(
    probs_before: np.ndarray, probs_after: np.ndarray, labels: np.ndarray, n_boot: int, seed: int
) -> tuple[MetricChange, tuple[np.ndarray, np.ndarray]]:
    """Return the confidence gap before and after, and its draws, on shared resamples."""
    terms_before = _confidence_gap_terms(probs_before, labels)
    terms_after = _confidence_gap_terms(probs_after, labels)
    n = labels.size

    rng = np.random.default_rng(seed)
    draws_before = np.empty(n_boot)
    draws_after = np.empty(n_boot)
    for b in range(n_boot):
        counts = np.bincount(rng.integers(0, n, n), minlength=n)
        draws_before[b] = counts @ terms_before / n
        draws_after[b] = counts @ terms_after / n

    delta_draws = draws_after - draws_before
    before_low, before_high = _percentile_interval(draws_before)
    after_low, after_high = _percentile_interval(draws_after)
    low, high = _percentile_interval(delta_draws)
    change = MetricChange(
        metric="confidence_gap",
        before=float(terms_before.mean()),
        before_low=before_low,
        before_high=before_high,
        after=float(terms_after.mean()),
        after_low=after_low,
        after_high=after_high,
        delta=float(terms_after.mean() - terms_before.mean()),
        low=low,
        high=high,
        p_value=bootstrap_p_value(delta_draws, float(terms_after.mean() - terms_before.mean())),
    )
    return change, (draws_before, draws_after)


def verdict_from_interval(low: float, high: float) -> Verdict:
    """Judge a change of a lower-is-better metric from its 95 % interval."""
    if high < 0:
        return "helped"
    if low > 0:
        return "harmed"
    return "no clear change"


def evaluate_recalibration(
    scaler: Scaler,
    conditions: Mapping[str, tuple[ArrayLike, ArrayLike]],
    n_boot: int = 1000,
    seed: int = 0,
    n_bins: int = DEFAULT_N_BINS,
    progress: Progress = None,
) -> list[RecalibrationVerdict]:
    """Compare calibration before and after `scaler` on each condition.

    `conditions` maps a condition key (e.g. "clean", "shift:gaussian_noise:3") to its logits
    (n, K) and labels (n,). Four metrics are computed on softmax(logits) and on the scaler's
    output: top-label ECE with `n_bins` equal-width bins, NLL, Brier score (summed over classes)
    and the confidence gap (mean top-label confidence minus accuracy). Their 95 % percentile
    intervals come from `n_boot` resamples shared by before and after.

    Every condition is resampled from the same `seed`. Conditions that list the same images in
    the same order (the clean test set and its shifts) therefore get the same resamples, and
    their draws can be compared pairwise.
    """
    if not isinstance(n_boot, (int, np.integer)) or n_boot < 20:
        raise CalibrationError(f"n_boot must be an integer of at least 20; got {n_boot!r}")
    if not isinstance(n_bins, (int, np.integer)) or n_bins < 1:
        raise CalibrationError(f"n_bins must be a positive integer; got {n_bins!r}")
    if not conditions:
        raise CalibrationError("conditions is empty; expected at least one condition key")

    from tools.metrics import reliability_bins

    verdicts = []
    for done, (key, pair) in enumerate(conditions.items(), start=1):
        try:
            logits, labels = pair
        except (TypeError, ValueError):
            raise CalibrationError(f"conditions[{key!r}] must be a (logits, labels) pair") from None
        z = _check_logits(logits, name=f"conditions[{key!r}] logits")
        y = _check_labels(labels, z.shape[0], z.shape[1], name=f"conditions[{key!r}] labels")

        probs_before = softmax(z)
        probs_after = scaler.transform(z)
        changes = _registry_changes(probs_before, probs_after, y, n_boot, seed, n_bins)
        gap_change, gap_draws = _confidence_gap_change(probs_before, probs_after, y, n_boot, seed)
        changes.append(gap_change)

        verdict = RecalibrationVerdict(
            condition=key,
            n=int(z.shape[0]),
            verdict=verdict_from_interval(changes[0].low, changes[0].high),
            changes=changes,
            reliability_before=reliability_bins(probs_before, y, n_bins),
            reliability_after=reliability_bins(probs_after, y, n_bins),
        )
        verdict._gap_draws = gap_draws
        verdicts.append(verdict)
        if progress is not None:
            progress(done, len(conditions))
    return verdicts


# ---------------------------------------------------------------------------------------------
# Findings

FindingKind = Literal[
    "recalibration_harms", "recalibration_overconfidence_grows", "subgroup_calibration_differs"
]


def _difference_summary(draws: np.ndarray, observed: float) -> tuple[float, float, float]:
    low, high = _percentile_interval(draws)
    return low, high, bootstrap_p_value(draws, observed)


def _finding(
    kind: FindingKind,
    condition: str,
    metric: str,
    effect: float,
    draws_or_interval: np.ndarray | tuple[float, float, float],
    summary: str,
    evidence: Any,
) -> dict[str, Any]:
    if isinstance(draws_or_interval, np.ndarray):
        low, high, p_value = _difference_summary(draws_or_interval, effect)
    else:
        low, high, p_value = draws_or_interval
    return {
        "kind": kind,
        "condition": condition,
        "metric": metric,
        "effect": float(effect),
        "low": low,
        "high": high,
        "p_value": p_value,
        "summary": summary,
        "evidence": evidence,
    }


def _harm_findings(
    verdicts: Sequence[RecalibrationVerdict], min_effect: float
) -> list[dict[str, Any]]:
    findings = []
    for verdict in verdicts:
        ece = verdict.change("ece_top_label")
        if verdict.verdict != "harmed" or ece.delta < min_effect:
            continue
        gap = verdict.change("confidence_gap")
        summary = (
            f"Recalibration raised the ECE on {describe_condition(verdict.condition)} from "
            f"{ece.before:.3f} to {ece.after:.3f} ({ece.delta:.3f} higher, 95 % interval "
            f"{ece.low:.3f} to {ece.high:.3f} higher)."
        )
        evidence = {
            "n": verdict.n,
            "changes": [change.model_dump() for change in verdict.changes],
            "confidence_gap_before": gap.before,
            "confidence_gap_after": gap.after,
        }
        findings.append(
            _finding(
                "recalibration_harms",
                verdict.condition,
                "ece_top_label",
                ece.delta,
                (ece.low, ece.high, ece.p_value),
                summary,
                evidence,
            )
        )
    return findings


def _is_underconfident(reference: RecalibrationVerdict, model_direction: str | None) -> bool:
    if model_direction is not None:
        return model_direction == "underconfident"
    return reference.change("confidence_gap").before_high < 0


def _severity_findings(
    by_key: Mapping[str, RecalibrationVerdict],
    reference: RecalibrationVerdict,
    severity_of: Mapping[str, tuple[str, int]],
    min_effect: float,
) -> list[dict[str, Any]]:
    """Find shifts under which the recalibrated model's overconfidence grows with severity."""
    curves: dict[str, list[tuple[int, RecalibrationVerdict]]] = {}
    for key, (shift, severity) in severity_of.items():
        if key in by_key:
            curves.setdefault(shift, []).append((int(severity), by_key[key]))

    reference_gap = reference._gap_draws[1]
    findings = []
    for shift, points in sorted(curves.items()):
        points.sort(key=lambda point: point[0])
        severities = [0] + [severity for severity, _ in points]
        gaps_after = [reference.change("confidence_gap").after] + [
            verdict.change("confidence_gap").after for _, verdict in points
        ]
        top_severity, top = points[-1]
        top_gap = top.change("confidence_gap")

        # Overconfident at the highest severity, rising along the curve, and more than on the
        # reference by at least min_effect.
        rank_correlation = _spearman(np.array(severities, float), np.array(gaps_after))
        effect = top_gap.after - gaps_after[0]
        if top_gap.after_low <= 0 or rank_correlation < 0.8 or effect < min_effect:
            continue

        # Paired when the shift lists the reference's images in the same order, because both
        # conditions then share their resamples (see evaluate_recalibration).
        difference = top._gap_draws[1] - reference_gap
        evidence = {
            "shift": shift,
            "spearman": rank_correlation,
            "curve": [
                _curve_point(0, reference),
                *(_curve_point(severity, verdict) for severity, verdict in points),
            ],
        }
        summary = (
            f"The model was underconfident; after recalibration its confidence exceeds its "
            f"accuracy by {top_gap.after:.3f} under {shift.replace('_', ' ')} at severity "
            f"{top_severity}, against {gaps_after[0]:+.3f} on "
            f"{describe_condition(reference.condition)}, and the gap grows with severity."
        )
        findings.append(
            _finding(
                "recalibration_overconfidence_grows",
                top.condition,
                "confidence_gap",
                effect,
                difference
                if difference is not None
                else (top_gap.after_low, top_gap.after_high, math.nan),
                summary,
                evidence,
            )
        )
    return findings


def _curve_point(severity: int, verdict: RecalibrationVerdict) -> dict[str, Any]:
    gap = verdict.change("confidence_gap")
    ece = verdict.change("ece_top_label")
    return {
        "severity": severity,
        "condition": verdict.condition,
        "confidence_gap_before": gap.before,
        "confidence_gap_after": gap.after,
        "confidence_gap_after_low": gap.after_low,
        "confidence_gap_after_high": gap.after_high,
        "ece_before": ece.before,
        "ece_after": ece.after,
    }


def _spearman(x: np.ndarray, y: np.ndarray) -> float:
    from scipy.stats import spearmanr

    if x.size < 3 or np.ptp(y) == 0:
        return math.nan
    return float(spearmanr(x, y).statistic)


def _subgroup_findings(
    verdicts: Sequence[RecalibrationVerdict],
    reference: RecalibrationVerdict,
    subgroup_prefix: str,
    min_effect: float,
) -> list[dict[str, Any]]:
    """Find subgroups whose recalibrated confidence gap differs from the reference set's.

    The signed gap is compared, not the binned ECE, because the ECE of a small subgroup is
    biased upward by binning noise alone.
    NOTE: the subgroup's and the reference's resamples are drawn independently, although the
    subgroup is part of the reference set. Ignoring that positive covariance makes the
    interval wider than it needs to be, not narrower.
    """
    reference_gap = reference.change("confidence_gap")
    reference_draws = reference._gap_draws[1]
    findings = []
    for verdict in verdicts:
        if not verdict.condition.startswith(subgroup_prefix):
            continue
        gap = verdict.change("confidence_gap")
        difference = verdict._gap_draws[1] - reference_draws
        effect = gap.after - reference_gap.after
        low, high, p_value = _difference_summary(difference, effect)
        if (low <= 0 <= high) or abs(effect) < min_effect:
            continue

        side = "overconfident" if gap.after > 0 else "underconfident"
        summary = (
            f"After recalibration, the model is {side} on "
            f"{describe_condition(verdict.condition)} (confidence minus accuracy "
            f"{gap.after:+.3f}) against {reference_gap.after:+.3f} on "
            f"{describe_condition(reference.condition)}."
        )
        evidence = {
            "n": verdict.n,
            "reference": reference.condition,
            "confidence_gap_after": gap.after,
            "reference_confidence_gap_after": reference_gap.after,
            "ece_after": verdict.change("ece_top_label").after,
            "reference_ece_after": reference.change("ece_top_label").after,
        }
        findings.append(
            _finding(
                "subgroup_calibration_differs",
                verdict.condition,
                "confidence_gap",
                effect,
                (low, high, p_value),
                summary,
                evidence,
            )
        )
    return findings


def recalibration_findings(
    verdicts: Sequence[RecalibrationVerdict],
    severity_of: Mapping[str, tuple[str, int]] | None = None,
    reference: str = "clean",
    model_direction: str | None = None,
    subgroup_prefix: str = "subgroup:",
    min_effect: float = 0.0,
) -> list[dict[str, Any]]:
    """Return candidate findings from the verdicts of `evaluate_recalibration`.

    Three kinds, each a dict {kind, condition, metric, effect, low, high, p_value, summary,
    evidence}:

    - "recalibration_harms": a condition whose ECE interval of change lies above 0.
    - "recalibration_overconfidence_grows": for an underconfident model (`model_direction`
      from `fit_temperature`, else the reference's confidence gap before recalibration having
      an interval below 0), a shift whose recalibrated confidence gap is above 0 at its highest
      severity and rises with severity (Spearman rho >= 0.8 over the reference and each
      severity). `severity_of` maps condition keys to (shift name, severity). The effect is the
      rise over the reference, and the evidence holds the severity curve.
    - "subgroup_calibration_differs": a condition whose key starts with `subgroup_prefix` and
      whose recalibrated confidence gap differs from the reference's (interval excludes 0).

    Effects below `min_effect` are dropped. Multiple-testing control is left to the caller,
    which pools the p-values with the audit's other candidate findings.
    """
    by_key = {verdict.condition: verdict for verdict in verdicts}
    if len(by_key) != len(verdicts):
        raise CalibrationError("verdicts contains the same condition more than once")

    findings = _harm_findings(verdicts, min_effect)
    if reference not in by_key:
        return findings

    reference_verdict = by_key[reference]
    if severity_of and _is_underconfident(reference_verdict, model_direction):
        findings += _severity_findings(by_key, reference_verdict, severity_of, min_effect)
    findings += _subgroup_findings(verdicts, reference_verdict, subgroup_prefix, min_effect)
    return findings


# ---------------------------------------------------------------------------------------------
# A sentence for clinicians


def accuracy_near_confidence(
    probs: ArrayLike, labels: ArrayLike, level: float = 0.9, half_width: float = 0.05
) -> tuple[float, int]:
    """Return the accuracy and count of images whose top-label confidence is within
    `half_width` of `level`. The accuracy is NaN when the count is 0."""
    p = _check_logits(probs, name="probs")
    y = _check_labels(labels, p.shape[0], p.shape[1])
    confidence = p.max(axis=1)
    near = np.abs(confidence - level) <= half_width
    count = int(near.sum())
    if count == 0:
        return math.nan, 0
    return float((p[near].argmax(axis=1) == y[near]).mean()), count


def describe_condition(key: str) -> str:
    """Return a plain phrase for a condition key, e.g. "images with blur at severity 3"."""
    parts = key.split(":")
    if parts[0] == "clean":
        return "images like the training data"
    if parts[0] == "shift" and len(parts) == 3:
        return f"images with {parts[1].replace('_', ' ')} at severity {parts[2]}"
    if parts[0] in ("subgroup", "site") and len(parts) == 3:
        return f"images where {parts[1]} is {parts[2]}"
    if parts[0] == "external" and len(parts) == 2:
        return f"images from {parts[1]}"
    if parts[0] == "prevalence":
        return f"images re-sampled to the class mix {parts[-1].replace('_', ' ')}"
    if parts[0] == "reweight":
        return f"images re-weighted to {parts[-1].replace('_', ' ')}"
    return f"images under {parts[-1].replace('_', ' ')}"


def clinical_sentence(
    conditions: Mapping[str, tuple[ArrayLike, ArrayLike]],
    reference: str = "clean",
    level: float = 0.9,
    half_width: float = 0.05,
    min_count: int = 20,
    descriptions: Mapping[str, str] | None = None,
) -> str:
    """Write what a recalibrated confidence of `level` means on the reference and elsewhere.

    `conditions` maps condition keys to recalibrated probabilities (n, K) and labels (n,). Each
    condition's accuracy is taken over the images whose top-label confidence lies within
    `half_width` of `level`, which is one reliability bin centred on the level. The sentence
    names the reference and the condition whose accuracy there differs most from it, e.g.
    "After recalibration, predicted 90 % means about 90 % on images like the training data, but
    about 70 % on images from another device." Conditions with fewer than `min_count` such
    images are left out; `descriptions` overrides the phrase of `describe_condition`.
    """
    if reference not in conditions:
        raise CalibrationError(f"reference {reference!r} is not a key of conditions")
    if not 0.0 < level < 1.0:
        raise CalibrationError(f"level must lie in (0, 1); got {level!r}")
    phrases = dict(descriptions or {})

    def phrase(key: str) -> str:
        return phrases.get(key) or describe_condition(key)

    accuracy = {}
    for key, (probs, labels) in conditions.items():
        value, count = accuracy_near_confidence(probs, labels, level, half_width)
        if count >= min_count:
            accuracy[key] = value

    stated = f"{round(level * 100)} %"
    if reference not in accuracy:
        return (
            f"After recalibration, too few {phrase(reference)} receive a confidence near "
            f"{stated} (fewer than {min_count}) to say what it means."
        )

    opening = (
        f"After recalibration, predicted {stated} means about {round(accuracy[reference] * 100)} %"
    )
    others = {key: value for key, value in accuracy.items() if key != reference}
    if not others:
        return f"{opening} on {phrase(reference)}."

    worst = max(others, key=lambda key: abs(others[key] - accuracy[reference]))
    linking = "but" if abs(others[worst] - accuracy[reference]) >= 0.05 else "and"
    return (
        f"{opening} on {phrase(reference)}, {linking} about {round(others[worst] * 100)} % "
        f"on {phrase(worst)}."
    )
