"""Metric engine against reference values from scikit-learn, torchmetrics, netcal and others.

Each reference case names a metric as its library calls it (``ECE_top_label``, ``BS``,
``LR+``) and the parameters of that library's convention. ``CONVENTIONS`` maps the cases of
the convention the engine adopts to a registry id and parameters; cases of other
conventions are not compared. Cases where the engine deliberately differs from its adopted
library are listed in ``EXCEPTIONS`` and checked by hand further down.
"""

from __future__ import annotations

import json
import math
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from tools.metrics import REGISTRY, compute_metric

REFERENCE_DIR = Path(__file__).parents[2] / "shared" / "reference"
CASES_FILE = REFERENCE_DIR / "metrics_cases.json"

pytestmark = pytest.mark.skipif(
    not CASES_FILE.exists(), reason=f"reference cases not found at {CASES_FILE}"
)

EPS64 = float(np.finfo(np.float64).eps)


def _always(params: dict) -> bool:
    return True


def _param_is(key: str, *values):
    return lambda params: params.get(key) in values


def _kumar_bins_coincide(params: dict, n: int) -> bool:
    return params.get("debias") is True and n % params["bins"] == 0


def _kce_params(params: dict, estimator: str) -> dict:
    kernel = "gaussian" if params["kernel"].startswith("gaussian") else "laplacian"
    bandwidth = params.get("bandwidth", params.get("length_scale"))
    return {"estimator": estimator, "kernel": kernel, "bandwidth": bandwidth}


def _binning(params: dict) -> dict:
    return {"n_bins": params["bins"], "binning": params["binning"]}


# (file metric, library, which of its cases, registry id, engine parameters from case parameters)
CONVENTIONS = [
    ("accuracy", "scikit-learn", _always, "accuracy", lambda p: {}),
    ("balanced_accuracy", "scikit-learn", _always, "balanced_accuracy", lambda p: {}),
    ("MCC", "MetricsReloaded", _always, "mcc", lambda p: {}),
    ("cohen_kappa", "scikit-learn", _always, "cohen_kappa", lambda p: {"weighting": p["weights"]}),
    ("expected_cost", "MetricsReloaded", lambda p: p["costs"].startswith("0-1"), "expected_cost", lambda p: {}),
    ("expected_cost", "MetricsReloaded", lambda p: p["costs"].startswith("default"), "expected_cost",
     lambda p: {"cost_matrix": "prior"}),
    ("expected_cost_normalised", "MetricsReloaded", _always, "expected_cost",
     lambda p: {"cost_matrix": "prior", "normalised": True}),
    ("sensitivity", "MetricsReloaded", _always, "sensitivity", lambda p: {}),
    ("specificity", "MetricsReloaded", _always, "specificity", lambda p: {}),
    ("PPV", "MetricsReloaded", _always, "ppv", lambda p: {}),
    ("NPV", "MetricsReloaded", _always, "npv", lambda p: {}),
    ("LR+", "MetricsReloaded", _always, "lr_plus", lambda p: {}),
    ("F_beta", "scikit-learn", _always, "f_beta", lambda p: {"beta": float(p["beta"])}),
    ("net_benefit", "formula", _always, "net_benefit", lambda p: {"threshold": p["threshold"]}),
    ("AUROC", "scikit-learn", lambda p: p.get("average", "macro") == "macro" and p.get("multi_class", "ovr") == "ovr",
     "auroc", lambda p: {}),
    ("AUROC", "scikit-learn", lambda p: str(p.get("average", "")).startswith("micro"), "auroc",
     lambda p: {"average": "micro"}),
    ("AP", "scikit-learn", _always, "average_precision", lambda p: {}),
    ("BS", "MetricsReloaded", _always, "brier", lambda p: {}),
    ("BS", "scikit-learn", _param_is("input_form", "one_column"), "brier_binary", lambda p: {}),
    ("RBS", "MetricsReloaded", _always, "rbs", lambda p: {}),
    ("NLL", "torch", _always, "nll", lambda p: {}),
    ("NLL", "scikit-learn", _always, "nll", lambda p: {"eps": EPS64}),
    ("ECE_top_label", "scikit-learn", _always, "ece_top_label", _binning),
    ("ECE_binary_positive_class", "scikit-learn", _always, "ece_positive_class", _binning),
    ("MCE_top_label", "torchmetrics", _always, "mce_top_label", lambda p: {"n_bins": p["bins"]}),
    ("CE_top_label_L2", "torchmetrics", _always, "ce_l2_top_label",
     lambda p: {"n_bins": p["bins"], "binning": p["binning"], "debias": False}),
    # Kumar's equal-mass bins are chunks of ceil(n/B) sorted rows. They equal the engine's
    # quantile bins only when B divides n. His estimator returns the square, without the root.
    ("CE_top_label_L2", "better_uncertainty_calibration", _kumar_bins_coincide, "ce_l2_top_label",
     lambda p: {"n_bins": p["bins"], "binning": p["binning"], "debias": True}),
    ("CWCE", "MetricsReloaded", _always, "cwce", lambda p: {"n_bins": p["bins"]}),
    ("OE_ratio", "formula", _always, "oe_ratio_class", lambda p: {}),
    ("OE_ratio_class", "formula", _always, "oe_ratio_class", lambda p: {"positive_class": p["cls"]}),
    ("OE_ratio_top_label", "formula", _always, "oe_ratio", lambda p: {}),
    ("SKCE_unbiased", "formula", _always, "kce", lambda p: _kce_params(p, "unbiased")),
    ("SKCE_unbiased", "Py_KCE", _always, "kce", lambda p: _kce_params(p, "unbiased")),
    ("SKCE_biased", "formula", _always, "kce", lambda p: _kce_params(p, "biased")),
    ("SKCE_linear", "formula", _always, "kce", lambda p: _kce_params(p, "linear")),
    ("ECE_KDE_canonical", "ece-kde", _always, "ece_kde", lambda p: {"p": p["p"], "bandwidth": p["bandwidth"]}),
    ("ECI_global", "formula", _always, "eci", lambda p: {"binning": "calfram", "n_bins": p["bins"]}),
    ("ECI_global", "CalFram", _param_is("reduce", "nanmean over one-vs-rest classes, unrounded"), "eci",
     lambda p: {"binning": "calfram", "n_bins": p["bins"]}),
    ("ECI_balance", "CalFram", _always, "eci_balance", lambda p: {"binning": "calfram", "n_bins": p["bins"]}),
]

# Cases where the engine differs from its adopted library on purpose, grouped by reason;
# each group is checked by hand in its own test below.
ON_BIN_EDGE = "scores on a bin edge: the engine's documented bin rule differs from the library's"
CLASS_LEFT_OUT = "macro mean over the classes where the metric is defined, where the library gives NaN or 0"
DEFINED_WITH_ABSENT_CLASS = "value defined with a class absent from the labels, where the library gives NaN or raises"
FEWER_SCORES_THAN_BINS = (
    "fewer distinct scores than bins: the engine follows CalFram (a bin per score), "
    "where the study's formula puts quantile edges on tied scores"
)

# Case name -> reason. Every adopted case that the engine does not match is listed here.
EXCEPTIONS = {
    'mc_calibrated/ECE_top_label/scikit-learn/bins=15,binning=equal_mass,norm=l1': ON_BIN_EDGE,
    'bin_calibrated/ECE_top_label/scikit-learn/input_form=two_column [1-p, p] built from the stored positive-class column,bins=15,binning=equal_mass,norm=l1': ON_BIN_EDGE,
    'bin_calibrated/ECE_binary_positive_class/scikit-learn/input_form=one_column,bins=15,binning=equal_mass,norm=l1': ON_BIN_EDGE,
    'bin_edges_exact/ECE_top_label/scikit-learn/input_form=two_column [1-p, p] built from the stored positive-class column,bins=10,binning=equal_width,norm=l1': ON_BIN_EDGE,
    'bin_edges_exact/MCE_top_label/torchmetrics/input_form=two_column [1-p, p] built from the stored positive-class column,bins=10,norm=max': ON_BIN_EDGE,
    'bin_edges_exact/ECE_binary_positive_class/scikit-learn/input_form=one_column,bins=10,binning=equal_width,norm=l1': ON_BIN_EDGE,
    'bin_edges_exact/CWCE/MetricsReloaded/input_form=two_column [1-p, p] built from the stored positive-class column,bins=10,binning=equal_width,norm=l1,reduce=mean over classes': ON_BIN_EDGE,
    'bin_single_class/ECE_top_label/scikit-learn/input_form=two_column [1-p, p] built from the stored positive-class column,bins=10,binning=equal_width,norm=l1': ON_BIN_EDGE,
    'mc_single_class/CE_top_label_L2/torchmetrics/bins=15,binning=equal_width,returns=sqrt of weighted mean squared gap': ON_BIN_EDGE,
    'mc_ties_edges/ECE_top_label/scikit-learn/bins=10,binning=equal_width,norm=l1': ON_BIN_EDGE,
    'mc_ties_edges/ECE_top_label/scikit-learn/bins=15,binning=equal_width,norm=l1': ON_BIN_EDGE,
    'mc_ties_edges/CE_top_label_L2/torchmetrics/bins=15,binning=equal_width,returns=sqrt of weighted mean squared gap': ON_BIN_EDGE,
    'mc_ties_edges/CWCE/MetricsReloaded/bins=10,binning=equal_width,norm=l1,reduce=mean over classes': ON_BIN_EDGE,
    'mc_missing_class/CE_top_label_L2/torchmetrics/bins=15,binning=equal_width,returns=sqrt of weighted mean squared gap': ON_BIN_EDGE,
    'mc_missing_class/CWCE/MetricsReloaded/bins=10,binning=equal_width,norm=l1,reduce=mean over classes': ON_BIN_EDGE,
    'bin_single_class/ECI_global/CalFram/input_form=two_column [1-p, p] built from the stored positive-class column,bins=10,binning=quantile (CalFram integer strategy),reduce=nanmean over one-vs-rest classes, unrounded': DEFINED_WITH_ABSENT_CLASS,
    'bin_single_class/ECI_balance/CalFram/input_form=two_column [1-p, p] built from the stored positive-class column,bins=10,reduce=nanmean over classes, unrounded': DEFINED_WITH_ABSENT_CLASS,
    'bin_single_class/expected_cost/MetricsReloaded/input_form=two_column [1-p, p] built from the stored positive-class column,decision=argmax,costs=0-1 (c_ij=1 off-diagonal) = error rate': DEFINED_WITH_ABSENT_CLASS,
    'mc_single_class/ECI_global/CalFram/bins=10,binning=quantile (CalFram integer strategy),reduce=nanmean over one-vs-rest classes, unrounded': DEFINED_WITH_ABSENT_CLASS,
    'mc_single_class/ECI_balance/CalFram/bins=10,reduce=nanmean over classes, unrounded': DEFINED_WITH_ABSENT_CLASS,
    'mc_single_class/expected_cost/MetricsReloaded/decision=argmax,costs=0-1 (c_ij=1 off-diagonal) = error rate': DEFINED_WITH_ABSENT_CLASS,
    'mc_missing_class/ECI_global/CalFram/bins=10,binning=quantile (CalFram integer strategy),reduce=nanmean over one-vs-rest classes, unrounded': DEFINED_WITH_ABSENT_CLASS,
    'mc_missing_class/ECI_balance/CalFram/bins=10,reduce=nanmean over classes, unrounded': DEFINED_WITH_ABSENT_CLASS,
    'mc_missing_class/expected_cost/MetricsReloaded/decision=argmax,costs=0-1 (c_ij=1 off-diagonal) = error rate': DEFINED_WITH_ABSENT_CLASS,
    'bin_single_class/AP/scikit-learn/input_form=one_column,integration=step (sum (R_k-R_k-1) P_k)': CLASS_LEFT_OUT,
    'mc_single_class/sensitivity/MetricsReloaded/decision=argmax,averaging=macro one-vs-rest over K classes': CLASS_LEFT_OUT,
    'mc_single_class/specificity/MetricsReloaded/decision=argmax,averaging=macro one-vs-rest over K classes': CLASS_LEFT_OUT,
    'mc_single_class/AP/scikit-learn/average=macro': CLASS_LEFT_OUT,
    'mc_ties_edges/LR+/MetricsReloaded/decision=argmax,averaging=macro one-vs-rest over K classes': CLASS_LEFT_OUT,
    'mc_missing_class/sensitivity/MetricsReloaded/decision=argmax,averaging=macro one-vs-rest over K classes': CLASS_LEFT_OUT,
    'mc_missing_class/LR+/MetricsReloaded/decision=argmax,averaging=macro one-vs-rest over K classes': CLASS_LEFT_OUT,
    'mc_missing_class/AUROC/scikit-learn/multi_class=ovr,average=macro': CLASS_LEFT_OUT,
    'mc_missing_class/AP/scikit-learn/average=macro': CLASS_LEFT_OUT,
    'mc_single_class/ECI_global/formula/bins=10,binning=quantile (CalFram integer strategy),reduce=mean over classes': FEWER_SCORES_THAN_BINS,
    'mc_ties_edges/ECI_global/formula/bins=10,binning=quantile (CalFram integer strategy),reduce=mean over classes': FEWER_SCORES_THAN_BINS,
    'mc_missing_class/ECI_global/formula/bins=10,binning=quantile (CalFram integer strategy),reduce=mean over classes': FEWER_SCORES_THAN_BINS,
}


def _exception_reason(case: dict) -> str | None:
    return EXCEPTIONS.get(case["name"])


def _load():
    if not CASES_FILE.exists():
        return {}, []
    data = json.loads(CASES_FILE.read_text())
    return data["inputs"], data["cases"]


INPUTS, CASES = _load()


def _accepts(accepts, case: dict) -> bool:
    if accepts is _kumar_bins_coincide:
        return accepts(case["parameters"], len(INPUTS[case["inputs"]]["labels"]))
    return accepts(case["parameters"])


def _convention(case: dict):
    for metric, library, accepts, metric_id, to_params in CONVENTIONS:
        if case["metric"] == metric and case["library"] == library and _accepts(accepts, case):
            return metric_id, to_params(case["parameters"])
    return None


def _expected(case: dict) -> float:
    """The case's expected value as a float; NaN when the library raised or returned NaN."""
    value = case["expected"]
    if value is None:
        return math.nan
    expected = float(value)
    if case["metric"] == "CE_top_label_L2" and case["library"] == "better_uncertainty_calibration":
        return math.sqrt(expected)
    return expected


def _input_arrays(key: str):
    raw = INPUTS[key]
    probs = np.asarray(raw["probs"], dtype=np.float64)
    if probs.ndim == 1:
        probs = np.stack([1.0 - probs, probs], axis=1)
    return probs, np.asarray(raw["labels"], dtype=np.int64)


def _adopted(case: dict) -> bool:
    return _convention(case) is not None


ADOPTED = [c for c in CASES if _adopted(c) and _exception_reason(c) is None]
EXCEPTION_CASES = {
    reason: [c for c in CASES if _adopted(c) and _exception_reason(c) == reason]
    for reason in (ON_BIN_EDGE, CLASS_LEFT_OUT, DEFINED_WITH_ABSENT_CLASS, FEWER_SCORES_THAN_BINS)
}


def _ids(cases):
    return [c["name"] for c in cases]


# Registry metrics with no reference values: failure detection is checked by hand elsewhere.
NO_REFERENCE = {"auroc_f", "aurc", "eaurc", "selective_risk"}


def test_conventions_cover_registry():
    mapped = {_convention(c)[0] for c in CASES if _adopted(c)}

    assert mapped <= set(REGISTRY)
    assert set(REGISTRY) - mapped == NO_REFERENCE


@pytest.mark.parametrize("case", ADOPTED, ids=_ids(ADOPTED))
def test_metric_matches_reference_case(case):
    metric_id, params = _convention(case)
    probs, labels = _input_arrays(case["inputs"])

    result = compute_metric(metric_id, probs, labels, **params)

    expected = _expected(case)
    if math.isnan(expected):
        assert math.isnan(result.value), f"library gave NaN or raised; engine gave {result.value}"
        assert result.reason
    elif math.isinf(expected):
        assert result.value == expected
    else:
        assert result.value == pytest.approx(expected, abs=case["tolerance"])


def test_loo_bandwidth_matches_ece_kde_reference():
    from tools.metrics.kernel import loo_bandwidth

    cases = [c for c in CASES if c["metric"] == "ECE_KDE_bandwidth_LOO"]
    assert cases
    for case in cases:
        probs, _ = _input_arrays(case["inputs"])
        if (probs <= 0).any():
            # The authors' code returns -1 here; the engine's ECE-KDE returns NaN instead.
            assert case["expected"] == -1.0
            continue
        assert loo_bandwidth(probs) == pytest.approx(case["expected"], rel=1e-5), case["name"]


def test_ece_kde_nan_on_zero_probability():
    probs, labels = _input_arrays("bin_edges_exact")

    result = compute_metric("ece_kde", probs, labels)

    assert math.isnan(result.value)
    assert "exactly 0" in result.reason


# --- Hand-computed exceptions -------------------------------------------------------------


def _hand_bin(score: float, n_bins: int) -> int:
    """Equal-width bin of a score read as the decimal it was written as: [b/B, (b+1)/B)."""
    exact = Fraction(score).limit_denominator(10**6)
    return min(int(exact * n_bins), n_bins - 1)


def _hand_rank_bins(scores: np.ndarray, n_bins: int) -> list[int]:
    """Equal-mass bin of each score from its rank r: the bin b with h_b < r <= h_{b+1}, h_b = (n-1)b/B."""
    n = len(scores)
    assert len(set(scores.tolist())) == n, "the rank rule below assumes no tied scores"
    ranks = np.argsort(np.argsort(scores))
    return [max(0, -(-int(r) * n_bins // (n - 1)) - 1) for r in ranks]


def _hand_binned(scores, targets, bins, n_bins, norm):
    gaps, weights = [], []
    for b in range(n_bins):
        members = [i for i in range(len(scores)) if bins[i] == b]
        if not members:
            continue
        mean_score = sum(scores[i] for i in members) / len(members)
        mean_target = sum(targets[i] for i in members) / len(members)
        gaps.append(abs(mean_target - mean_score))
        weights.append(len(members) / len(scores))
    if norm == "max":
        return max(gaps)
    if norm == "l2":
        return math.sqrt(sum(w * g * g for w, g in zip(weights, gaps)))
    return sum(w * g for w, g in zip(weights, gaps))


def _hand_value(case: dict) -> float:
    probs, labels = _input_arrays(case["inputs"])
    params = case["parameters"]
    n_bins = params["bins"]
    norm = {"MCE_top_label": "max", "CE_top_label_L2": "l2"}.get(case["metric"], "l1")
    binning = params.get("binning", "equal_width")

    if case["metric"] == "CWCE":
        columns = [(probs[:, k], (labels == k).astype(float)) for k in range(probs.shape[1])]
    elif case["metric"] == "ECE_binary_positive_class":
        columns = [(probs[:, 1], (labels == 1).astype(float))]
    else:
        predicted = np.argmax(probs, axis=1)
        columns = [(probs.max(axis=1), (predicted == labels).astype(float))]

    values = []
    for scores, targets in columns:
        if binning == "equal_width":
            bins = [_hand_bin(float(s), n_bins) for s in scores]
        else:
            bins = _hand_rank_bins(scores, n_bins)
        values.append(_hand_binned(scores.tolist(), targets.tolist(), bins, n_bins, norm))
    return float(np.mean(values))


def test_top_label_ece_on_exact_edges_by_hand():
    # Confidences 1, 0.9, 0.8, ..., 0.5 on bin_edges_exact, 10 bins, worked out on paper:
    # |4 - 5.8| + |2 - 1.6| + |3 - 2.9| + |1 - 1.2| + |1 - 1.0| = 2.5 over 16 rows.
    probs, labels = _input_arrays("bin_edges_exact")

    result = compute_metric("ece_top_label", probs, labels, n_bins=10)

    assert result.value == pytest.approx(2.5 / 16, abs=1e-12)


@pytest.mark.parametrize("case", EXCEPTION_CASES[ON_BIN_EDGE], ids=_ids(EXCEPTION_CASES[ON_BIN_EDGE]))
def test_binned_error_on_bin_edge_follows_engine_rule(case):
    metric_id, params = _convention(case)
    probs, labels = _input_arrays(case["inputs"])

    result = compute_metric(metric_id, probs, labels, **params)

    assert result.value == pytest.approx(_hand_value(case), abs=1e-9)
    assert result.value != pytest.approx(_expected(case), abs=case["tolerance"])


def _recalls(probs, labels, classes):
    from sklearn.metrics import recall_score

    return recall_score(labels, probs.argmax(axis=1), labels=classes, average=None)


@pytest.mark.parametrize(
    "case", EXCEPTION_CASES[CLASS_LEFT_OUT], ids=_ids(EXCEPTION_CASES[CLASS_LEFT_OUT])
)
def test_macro_mean_leaves_out_undefined_classes(case):
    from sklearn.metrics import average_precision_score, roc_auc_score

    metric_id, params = _convention(case)
    probs, labels = _input_arrays(case["inputs"])
    predicted = probs.argmax(axis=1)
    present = sorted(set(labels.tolist()))
    k_all = range(probs.shape[1])

    result = compute_metric(metric_id, probs, labels, **params)

    if case["metric"] == "AUROC":
        expected = np.mean([roc_auc_score(labels == k, probs[:, k]) for k in present])
    elif case["metric"] == "AP" and probs.shape[1] == 2:
        expected = math.nan  # no positives: AP is undefined, where scikit-learn returns 0
    elif case["metric"] == "AP":
        expected = np.mean([average_precision_score(labels == k, probs[:, k]) for k in present])
    elif case["metric"] == "sensitivity":
        expected = np.mean(_recalls(probs, labels, present))
    else:
        # Specificity and LR+ per class, counted by hand; classes with specificity 1 have no LR+.
        values = []
        for k in k_all:
            tp = np.sum((predicted == k) & (labels == k))
            fn = np.sum((predicted != k) & (labels == k))
            fp = np.sum((predicted == k) & (labels != k))
            tn = np.sum((predicted != k) & (labels != k))
            sensitivity = tp / (tp + fn) if tp + fn else math.nan
            specificity = tn / (tn + fp) if tn + fp else math.nan
            if case["metric"] == "specificity":
                values.append(specificity)
            elif specificity < 1:
                values.append(sensitivity / (1 - specificity))
        expected = np.nanmean(values)

    if math.isnan(expected):
        assert math.isnan(result.value)
        assert result.reason
    else:
        assert result.value == pytest.approx(expected, abs=1e-12)
    assert result.extra.get("absent_classes", []) == [k for k in k_all if k not in present] or probs.shape[1] == 2


@pytest.mark.parametrize(
    "case", EXCEPTION_CASES[DEFINED_WITH_ABSENT_CLASS], ids=_ids(EXCEPTION_CASES[DEFINED_WITH_ABSENT_CLASS])
)
def test_metric_defined_despite_absent_class(case):
    metric_id, params = _convention(case)
    probs, labels = _input_arrays(case["inputs"])

    result = compute_metric(metric_id, probs, labels, **params)

    if metric_id == "expected_cost":
        # 0-1 costs: the expected cost is the error rate whatever classes occur.
        assert result.value == pytest.approx(np.mean(probs.argmax(axis=1) != labels), abs=1e-12)
    else:
        # ECI and its balance are defined for a class that never occurs (observed frequency 0).
        assert math.isfinite(result.value)
        assert set(result.extra["per_class"]) == set(range(probs.shape[1]))
        if metric_id == "eci":
            assert result.value == pytest.approx(_hand_eci(probs, labels, params["n_bins"]), abs=1e-12)


def _hand_calfram_groups(scores: np.ndarray, n_bins: int) -> list[list[int]]:
    """Group rows by CalFram's bins, written as plainly as possible.

    With fewer distinct scores than bins, each distinct score is a group, and the top two
    merge when the largest is exactly 1 because CalFram adds no edge above it. Otherwise the
    edges are quantiles at min(B + 1, distinct) levels, padded with 0 and 1, and bins are
    [l, u) over the inner edges.
    """
    distinct = sorted(set(scores.tolist()))
    if len(distinct) < n_bins:
        groups = [[i for i, s in enumerate(scores) if s == value] for value in distinct]
        if distinct[-1] == 1.0 and len(groups) > 1:
            groups[-2:] = [groups[-2] + groups[-1]]
        return groups
    edges = list(np.quantile(scores, np.linspace(0, 1, min(n_bins + 1, len(distinct)))))
    if edges[0] > 0:
        edges.insert(0, 0.0)
    if edges[-1] < 1:
        edges.append(1.0)
    inner = edges[1:-1]
    position = [sum(1 for e in inner if e <= s) for s in scores]
    return [[i for i in range(len(scores)) if position[i] == b] for b in range(len(inner) + 1)]


def _hand_eci(probs: np.ndarray, labels: np.ndarray, n_bins: int) -> float:
    per_class = []
    for k in range(probs.shape[1]):
        scores = probs[:, k]
        total = 0.0
        for rows in _hand_calfram_groups(scores, n_bins):
            if not rows:
                continue
            x = sum(scores[i] for i in rows) / len(rows)
            y = sum(labels[i] == k for i in rows) / len(rows)
            total += len(rows) / len(scores) * abs(y - x) / max(x, 1 - x)
        per_class.append(1 - total)
    return float(np.mean(per_class))


def test_hand_eci_matches_calfram_on_ties():
    # The hand rule is checked against CalFram itself on the one tied input where CalFram returns a value.
    case = next(
        c for c in CASES
        if c["inputs"] == "mc_ties_edges" and c["metric"] == "ECI_global" and c["library"] == "CalFram"
        and c["parameters"]["reduce"].endswith("unrounded")
    )
    probs, labels = _input_arrays("mc_ties_edges")

    assert _hand_eci(probs, labels, 10) == pytest.approx(case["expected"], abs=1e-9)


@pytest.mark.parametrize(
    "case", EXCEPTION_CASES[FEWER_SCORES_THAN_BINS], ids=_ids(EXCEPTION_CASES[FEWER_SCORES_THAN_BINS])
)
def test_eci_few_distinct_scores(case):
    metric_id, params = _convention(case)
    probs, labels = _input_arrays(case["inputs"])

    result = compute_metric(metric_id, probs, labels, **params)

    assert result.value == pytest.approx(_hand_eci(probs, labels, params["n_bins"]), abs=1e-12)
    assert result.value != pytest.approx(_expected(case), abs=case["tolerance"])


@pytest.mark.parametrize("key", ["mc_random", "mc_ties_edges", "mc_missing_class"])
@pytest.mark.parametrize("metric_id", ["eci", "eci_balance"])
def test_calfram_eci_count_weights(key, metric_id):
    probs, labels = _input_arrays(key)
    counts = np.random.default_rng(3).integers(0, 3, size=labels.size)
    repeated = np.repeat(np.arange(labels.size), counts)
    weighted = compute_metric(metric_id, probs, labels, weights=counts.astype(float), binning="calfram")

    expanded = compute_metric(metric_id, probs[repeated], labels[repeated], binning="calfram")

    assert weighted.value == pytest.approx(expanded.value, abs=1e-12)
