"""Gates over stored results: which checks fail, and why."""

from __future__ import annotations

from tools.gates import evaluate_gates
from tools.spec import Gate

HIGHER = {"balanced_accuracy": True, "ece_top_label": False}


def result(condition, metric, value):
    return {"condition": condition, "metric": metric, "class": None, "value": value}


def difference(condition, metric, delta):
    return {"condition": condition, "metric": metric, "delta": delta, "reference": "clean"}


def test_max_drop_checks_every_shift_in_bad_direction():
    gates = [Gate(metric="balanced_accuracy", condition="any_shift", max_drop=0.05),
             Gate(metric="ece_top_label", condition="any_shift", max_drop=0.05)]
    differences = [difference("shift:jpeg:5", "balanced_accuracy", -0.08),
                   difference("shift:jpeg:1", "balanced_accuracy", -0.01),
                   difference("subgroup:sex:male", "balanced_accuracy", -0.30),
                   difference("shift:jpeg:5", "ece_top_label", 0.06),
                   difference("shift:jpeg:1", "ece_top_label", -0.20)]
    failures = evaluate_gates(gates, [], differences, HIGHER)
    assert [(f["condition"], round(f["value"], 3)) for f in failures] == [
        ("shift:jpeg:5", 0.08), ("shift:jpeg:5", 0.06)]


def test_min_value_on_clean_and_lower_is_better():
    gates = [Gate(metric="balanced_accuracy", condition="clean", min_value=0.7),
             Gate(metric="ece_top_label", condition="clean", min_value=0.1)]
    results = [result("clean", "balanced_accuracy", 0.65), result("clean", "ece_top_label", 0.08),
               result("shift:jpeg:5", "balanced_accuracy", 0.1)]
    failures = evaluate_gates(gates, results, [], HIGHER)
    assert len(failures) == 1
    assert "below 0.7" in failures[0]["message"]


def test_gate_matching_nothing_fails():
    failures = evaluate_gates([Gate(metric="auroc", condition="clean", min_value=0.5)], [], [],
                              HIGHER)
    assert len(failures) == 1
    assert "no result of auroc" in failures[0]["message"]


def test_every_accepted_selector_selects_its_conditions():
    from tools.spec import GATE_SELECTORS

    keys = ["clean", "shift:jpeg:5", "subgroup:sex:female", "site:dataset:rosendahl",
            "external:isic2019"]
    results = [result(key, "balanced_accuracy", 0.5) for key in keys]
    expected = {"clean": ["clean"], "any": keys[1:], "any_shift": ["shift:jpeg:5"],
                "any_subgroup": ["subgroup:sex:female"], "any_site": ["site:dataset:rosendahl"]}

    # The spec accepts exactly these selectors, so each must match in evaluate_gates.
    assert sorted(GATE_SELECTORS) == sorted(expected)
    for selector in GATE_SELECTORS:
        gate = Gate(metric="balanced_accuracy", condition=selector, min_value=0.9)
        failures = evaluate_gates([gate], results, [], HIGHER)
        assert [f["condition"] for f in failures] == expected[selector], selector
