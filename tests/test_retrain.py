"""recovery_table and policy_from_audit on audits written into a store by hand, with expected
values worked out by hand from the numbers below."""

from __future__ import annotations

import pytest

from tools.retrain import policy_from_audit, recovery_table
from tools.store import Condition, DifferenceRow, ResultRow, Store


def _store_audit(store: Store, metric: str, values: dict[str, float],
                 intervals: dict[str, tuple[float, float]] | None = None,
                 findings: list[tuple[str, str]] = ()) -> str:
    """Store one audit with a whole-set value of `metric` per condition, the paired interval
    of delta = condition − clean per shift, and findings as (condition, metric) pairs."""
    plan = {"metrics": [{"id": metric}], "primary_metric": metric}
    audit_id = store.create_audit("image", {"audit": {"min_relevant_difference": 0.05}}, plan)
    for key, value in values.items():
        kind = "clean" if key == "clean" else "shift"
        differences = []
        if intervals and key in intervals:
            low, high = intervals[key]
            differences = [DifferenceRow(metric, "clean", value - values["clean"], low, high,
                                         0.01, True, values["clean"], value)]
        store.save_condition(audit_id, Condition(key, kind, key), None, None, None,
                             [ResultRow(metric, value)], differences)
    store.save_findings(audit_id, [
        {"id": f"F{i}", "kind": "performance", "condition": condition, "metric": finding_metric,
         "effect": 0.1, "light": "red", "summary": ""}
        for i, (condition, finding_metric) in enumerate(findings)])
    return audit_id


@pytest.fixture
def store(tmp_path):
    with Store(tmp_path / "audits.duckdb") as opened:
        yield opened


def test_recovery_labels_falls_after_retraining(store):
    before = _store_audit(
        store, "balanced_accuracy",
        {"clean": 0.600, "shift:blur:5": 0.400, "shift:brightness:3": 0.500,
         "shift:noise:5": 0.300, "shift:white_balance:3": 0.560, "shift:contrast:1": 0.590},
        intervals={"shift:blur:5": (-0.28, -0.12), "shift:brightness:3": (-0.25, 0.02),
                   "shift:noise:5": (-0.40, -0.20), "shift:white_balance:3": (-0.10, 0.02),
                   "shift:contrast:1": (-0.05, 0.03)},
        findings=[("shift:white_balance:3", "ece_top_label"),
                  ("shift:blur:5", "balanced_accuracy")])
    after = _store_audit(
        store, "balanced_accuracy",
        {"clean": 0.590, "shift:blur:5": 0.550, "shift:brightness:3": 0.450,
         "shift:noise:5": 0.250, "shift:white_balance:3": 0.580, "shift:contrast:1": 0.600})

    rows, overall, clean_before, clean_after = recovery_table(store, before, after,
                                                              "balanced_accuracy")
    by_key = {row.condition: row for row in rows}

    assert clean_before == pytest.approx(0.600)
    assert clean_after == pytest.approx(0.590)
    assert sorted(by_key) == ["shift:blur:5", "shift:brightness:3", "shift:contrast:1",
                              "shift:noise:5", "shift:white_balance:3"]
    # Clear loss of 0.2, 0.15 of it back.
    assert by_key["shift:blur:5"].recovered_fraction == pytest.approx(0.75)
    assert by_key["shift:blur:5"].note == ""
    assert by_key["shift:blur:5"].drop_low == pytest.approx(0.12)
    assert by_key["shift:blur:5"].drop_high == pytest.approx(0.28)
    # Clear loss of 0.3, and 0.05 more lost after retraining.
    assert by_key["shift:noise:5"].recovered_fraction == pytest.approx(-0.05 / 0.3)
    assert by_key["shift:noise:5"].note == "worse after retraining"
    # No clear loss, but worse after retraining.
    assert by_key["shift:brightness:3"].recovered_fraction is None
    assert by_key["shift:brightness:3"].note == "worse after retraining"
    # No clear loss in the metric, but the audit found a calibration failure there.
    assert by_key["shift:white_balance:3"].recovered_fraction is None
    assert by_key["shift:white_balance:3"].note == (
        "no clear loss in balanced_accuracy; audit findings on ece_top_label")
    assert by_key["shift:contrast:1"].recovered_fraction is None
    assert by_key["shift:contrast:1"].note == "nothing to recover"
    # Overall: (0.15 − 0.05 on the clear losses − 0.05 on brightness) / (0.2 + 0.3). The gain on
    # white_balance and contrast adds nothing, because nothing clear was lost there.
    assert overall == pytest.approx(0.05 / 0.5)


def test_recovery_overall_negative_when_all_worse(store):
    before = _store_audit(store, "balanced_accuracy",
                          {"clean": 0.313, "shift:brightness:3": 0.214},
                          intervals={"shift:brightness:3": (-0.15, -0.05)})
    after = _store_audit(store, "balanced_accuracy",
                         {"clean": 0.300, "shift:brightness:3": 0.180})

    rows, overall, _, _ = recovery_table(store, before, after, "balanced_accuracy")

    assert rows[0].note == "worse after retraining"
    assert rows[0].recovered_fraction == pytest.approx((0.180 - 0.214) / (0.313 - 0.214))
    assert overall == pytest.approx((0.180 - 0.214) / (0.313 - 0.214))
    assert overall < 0


def test_recovery_orients_lower_is_better_metric(store):
    # Brier score: lower is better, so a drop in performance is a rise of the score.
    before = _store_audit(store, "brier",
                          {"clean": 0.30, "shift:noise:5": 0.50, "shift:blur:1": 0.35},
                          intervals={"shift:noise:5": (0.10, 0.30),
                                     "shift:blur:1": (-0.05, 0.15)})
    after = _store_audit(store, "brier",
                         {"clean": 0.29, "shift:noise:5": 0.40, "shift:blur:1": 0.33})

    rows, overall, _, _ = recovery_table(store, before, after, "brier")
    by_key = {row.condition: row for row in rows}

    assert by_key["shift:noise:5"].drop_low == pytest.approx(0.10)
    assert by_key["shift:noise:5"].drop_high == pytest.approx(0.30)
    assert by_key["shift:noise:5"].recovered_fraction == pytest.approx(0.10 / 0.20)
    # The interval of the rise reaches below zero, so the loss is not clear.
    assert by_key["shift:blur:1"].drop_low == pytest.approx(-0.05)
    assert by_key["shift:blur:1"].recovered_fraction is None
    assert by_key["shift:blur:1"].note == "nothing to recover"
    assert overall == pytest.approx(0.5)


def test_policy_skips_shift_without_delta(store):
    audit_id = _store_audit(
        store, "balanced_accuracy",
        {"clean": 0.60, "shift:noise:5": 0.40, "shift:blur:5": 0.50},
        intervals={"shift:noise:5": (-0.3, -0.1), "shift:blur:5": (-0.2, 0.0)})
    # A condition whose metric was undefined has no delta.
    store.save_condition(audit_id, Condition("shift:contrast:5", "shift", "contrast"), None,
                         None, None, [ResultRow("balanced_accuracy", float("nan"))],
                         [DifferenceRow("balanced_accuracy", "clean", None, None, None, None,
                                        True)])

    policy = policy_from_audit(store, audit_id)

    assert [step.shift for step in policy.steps] == ["noise", "blur"]
    # Shares 0.6 · 0.2 / 0.3 and 0.6 · 0.1 / 0.3.
    assert [step.probability for step in policy.steps] == pytest.approx([0.4, 0.2])
    assert policy.steps[0].severities == [1, 2, 3, 4, 5]
