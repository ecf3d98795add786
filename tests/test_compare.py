"""compare_audits on a store written by hand: reweight conditions must be compared with their
stored importance weights, and prevalence conditions on the rows they selected."""

from __future__ import annotations

import numpy as np
import pytest

from tools.compare import compare_audits
from tools.store import Condition, Store

N_CLASSES = 3
N_IMAGES = 240
N_BOOT = 200
PLAN = {"metrics": [{"id": "accuracy"}, {"id": "balanced_accuracy"}],
        "primary_metric": "accuracy"}


def _probs(rng: np.random.Generator, labels: np.ndarray, skill: float) -> np.ndarray:
    """Draw random probabilities with `skill` added to the logit of the true class."""
    logits = rng.normal(size=(len(labels), N_CLASSES))
    logits[np.arange(len(labels)), labels] += skill
    exp = np.exp(logits - logits.max(axis=1, keepdims=True))
    return exp / exp.sum(axis=1, keepdims=True)


def _weighted_accuracy(probs, labels, weights) -> float:
    correct = probs.argmax(axis=1) == labels
    return float((weights * correct).sum() / weights.sum())


def _weighted_balanced_accuracy(probs, labels, weights) -> float:
    correct = probs.argmax(axis=1) == labels
    recalls = [(weights * correct)[labels == k].sum() / weights[labels == k].sum()
               for k in range(N_CLASSES)]
    return float(np.mean(recalls))


@pytest.fixture
def two_audits(tmp_path):
    """Two audits of the same test images: model A and a better model B, each with a clean, a
    reweight and a prevalence condition stored as the runner stores them."""
    rng = np.random.default_rng(3)
    ids = [f"img{i:03d}" for i in range(N_IMAGES)]
    labels = rng.integers(0, N_CLASSES, N_IMAGES)
    # Model A is more accurate in one metadata group, so reweighting the groups changes its
    # metrics.
    group = rng.random(N_IMAGES) < 0.3
    probs = {"a": _probs(rng, labels, 0.8), "b": _probs(rng, labels, 1.6)}
    probs["a"][group] = _probs(rng, labels[group], 3.0)
    # Importance weights for a 50/50 target mix of the two groups, each target share divided by
    # the observed share.
    weights = np.where(group, 0.5 / group.mean(), 0.5 / (1 - group.mean()))
    # A prevalence condition keeps the rows of classes 0 and 1 only.
    selected = np.flatnonzero(labels < 2)

    store = Store(tmp_path / "audits.duckdb")
    audit_ids = {}
    for name in ("a", "b"):
        audit_id = store.create_audit("image", {}, PLAN)
        model_probs = probs[name]
        store.save_condition(audit_id, Condition("clean", "clean", "clean", n=N_IMAGES),
                             ids, labels, model_probs, [])
        store.save_condition(audit_id, Condition("reweight:equal_group", "reweight",
                                                 "equal_group", n=N_IMAGES),
                             ids, labels, model_probs, [], weights=weights)
        store.save_condition(audit_id, Condition("prevalence:no_class_2", "prevalence",
                                                 "no_class_2", n=len(selected)),
                             [ids[i] for i in selected], labels[selected],
                             model_probs[selected], [])
        audit_ids[name] = audit_id
    yield {"store": store, "ids": audit_ids, "labels": labels, "probs": probs,
           "weights": weights, "selected": selected}
    store.close()


def _row(rows, condition, metric):
    return next(r for r in rows if r["condition"] == condition and r["metric"] == metric)


def test_compare_reweight_uses_stored_weights(two_audits):
    labels, weights = two_audits["labels"], two_audits["weights"]
    probs_a, probs_b = two_audits["probs"]["a"], two_audits["probs"]["b"]
    rows = compare_audits(two_audits["store"], two_audits["ids"]["a"], two_audits["ids"]["b"],
                          n_boot=N_BOOT)

    weighted_a = _weighted_accuracy(probs_a, labels, weights)
    weighted_b = _weighted_accuracy(probs_b, labels, weights)
    unweighted_a = _weighted_accuracy(probs_a, labels, np.ones(N_IMAGES))
    # The fixture only tests something if reweighting moves the value.
    assert abs(weighted_a - unweighted_a) > 0.02

    accuracy = _row(rows, "reweight:equal_group", "accuracy")
    assert accuracy["paired"]
    assert accuracy["a"] == pytest.approx(weighted_a, abs=1e-12)
    assert accuracy["b"] == pytest.approx(weighted_b, abs=1e-12)
    assert accuracy["delta"] == pytest.approx(weighted_b - weighted_a, abs=1e-12)
    clean = _row(rows, "clean", "accuracy")
    assert clean["a"] == pytest.approx(unweighted_a, abs=1e-12)

    balanced = _row(rows, "reweight:equal_group", "balanced_accuracy")
    assert balanced["a"] == pytest.approx(
        _weighted_balanced_accuracy(probs_a, labels, weights), abs=1e-12)
    assert balanced["b"] == pytest.approx(
        _weighted_balanced_accuracy(probs_b, labels, weights), abs=1e-12)


def test_compare_reweight_interval_is_weighted_bootstrap(two_audits):
    """The paired interval follows the weighted accuracy over resampled rows, recomputed here
    with numpy: each replicate draws N rows with replacement (numpy's
    default_rng(seed).integers) and weights each row by weight × times drawn. The p-value is
    the metric engine's for the same weighted inputs, and differs from the unweighted one."""
    from tools.metrics import paired_bootstrap

    labels, weights = two_audits["labels"], two_audits["weights"]
    correct_a = two_audits["probs"]["a"].argmax(axis=1) == labels
    correct_b = two_audits["probs"]["b"].argmax(axis=1) == labels
    rng = np.random.default_rng(0)
    deltas = []
    for _ in range(N_BOOT):
        counts = np.bincount(rng.integers(0, N_IMAGES, N_IMAGES), minlength=N_IMAGES)
        resample_weights = weights * counts
        total = resample_weights.sum()
        deltas.append(((resample_weights * correct_b).sum()
                       - (resample_weights * correct_a).sum()) / total)
    deltas = np.array(deltas)
    low, high = np.percentile(deltas, [2.5, 97.5])
    probs_a, probs_b = two_audits["probs"]["a"], two_audits["probs"]["b"]
    engine = {name: paired_bootstrap(["accuracy"], probs_a, probs_b, labels, n_boot=N_BOOT,
                                     seed=0, weights=w)["accuracy"]
              for name, w in (("weighted", weights), ("unweighted", None))}
    assert engine["weighted"].p_value != engine["unweighted"].p_value

    rows = compare_audits(two_audits["store"], two_audits["ids"]["a"], two_audits["ids"]["b"],
                          n_boot=N_BOOT, seed=0)
    accuracy = _row(rows, "reweight:equal_group", "accuracy")
    assert accuracy["low"] == pytest.approx(low, abs=1e-12)
    assert accuracy["high"] == pytest.approx(high, abs=1e-12)
    assert accuracy["p_value"] == pytest.approx(engine["weighted"].p_value, abs=1e-12)


def test_compare_prevalence_uses_selected_rows(two_audits):
    labels, selected = two_audits["labels"], two_audits["selected"]
    ones = np.ones(len(selected))
    rows = compare_audits(two_audits["store"], two_audits["ids"]["a"], two_audits["ids"]["b"],
                          n_boot=N_BOOT)

    accuracy = _row(rows, "prevalence:no_class_2", "accuracy")
    assert accuracy["paired"]
    assert accuracy["a"] == pytest.approx(
        _weighted_accuracy(two_audits["probs"]["a"][selected], labels[selected], ones), abs=1e-12)
    assert accuracy["b"] == pytest.approx(
        _weighted_accuracy(two_audits["probs"]["b"][selected], labels[selected], ones), abs=1e-12)
    # Two classes are left, so balanced accuracy averages two recalls.
    balanced = _row(rows, "prevalence:no_class_2", "balanced_accuracy")
    recalls = [np.mean(two_audits["probs"]["a"][selected][labels[selected] == k].argmax(axis=1)
                       == k) for k in (0, 1)]
    assert balanced["a"] == pytest.approx(np.mean(recalls), abs=1e-12)


def test_compare_unpairs_reweight_with_other_weights(two_audits):
    """An audit B that reweighted to another target is compared unpaired, each side with its
    own weights."""
    store, labels = two_audits["store"], two_audits["labels"]
    other_weights = np.linspace(0.5, 1.5, N_IMAGES)
    audit_c = store.create_audit("image", {}, PLAN)
    ids = [f"img{i:03d}" for i in range(N_IMAGES)]
    store.save_condition(audit_c, Condition("reweight:equal_group", "reweight", "equal_group",
                                            n=N_IMAGES),
                         ids, labels, two_audits["probs"]["b"], [], weights=other_weights)

    rows = compare_audits(store, two_audits["ids"]["a"], audit_c, n_boot=N_BOOT)
    accuracy = _row(rows, "reweight:equal_group", "accuracy")
    assert not accuracy["paired"]
    assert accuracy["a"] == pytest.approx(
        _weighted_accuracy(two_audits["probs"]["a"], labels, two_audits["weights"]), abs=1e-12)
    assert accuracy["b"] == pytest.approx(
        _weighted_accuracy(two_audits["probs"]["b"], labels, other_weights), abs=1e-12)
