"""Store schema, transactions and reviews; finding selection with Benjamini–Hochberg."""

from __future__ import annotations

import numpy as np
import pytest

from tools.findings import detect_findings
from tools.store import _SCHEMA_V1, SCHEMA_VERSION, Condition, ResultRow, Store, StoreError


def info(metric_id):
    return {"balanced_accuracy": ("Balanced accuracy", "counting", True),
            "ece_top_label": ("ECE", "calibration", False)}[metric_id]


def shift(key, severity=3):
    return {"key": key, "kind": "shift", "name": key.split(":")[1],
            "params": {"severity": severity}, "too_small": False}


def diff(condition, metric, delta, low, high, p):
    return {"condition": condition, "metric": metric, "delta": delta, "low": low, "high": high,
            "p_value": p, "paired": True, "reference": "clean", "reference_value": 0.7,
            "condition_value": 0.7 + delta}


def test_findings_apply_bh_over_all_candidates():
    conditions = {k: shift(k) for k in ["shift:a:3", "shift:b:3", "shift:c:3", "shift:d:3"]}
    differences = [
        diff("shift:a:3", "balanced_accuracy", -0.20, -0.25, -0.15, 0.001),
        diff("shift:b:3", "balanced_accuracy", -0.06, -0.10, -0.01, 0.04),
        # Too small an effect to be a candidate, whatever its p-value.
        diff("shift:c:3", "balanced_accuracy", -0.01, -0.02, -0.005, 0.001),
        # ECE rising is bad: a candidate in the bad direction.
        diff("shift:d:3", "ece_top_label", 0.08, 0.05, 0.11, 0.002),
    ]
    found = detect_findings(differences, conditions, info, 0.05, 0.05)
    # Candidates a, b, d; BH q-values by hand: sorted p 0.001, 0.002, 0.04 ->
    # q = 0.001*3/1, 0.002*3/2, 0.04*3/3 = 0.003, 0.003, 0.04; all <= 0.05.
    assert [f["condition"] for f in found] == ["shift:a:3", "shift:d:3", "shift:b:3"]
    assert [f["light"] for f in found] == ["red", "amber", "amber"]
    assert found[0]["q_value"] == pytest.approx(0.003)
    assert found[2]["q_value"] == pytest.approx(0.04)
    assert found[1]["kind"] == "calibration"
    assert found[0]["effect"] == pytest.approx(0.20)


def test_findings_reject_when_bh_fails_or_interval_touches_zero():
    conditions = {k: shift(k) for k in ["shift:a:3", "shift:b:3"]}
    differences = [
        diff("shift:a:3", "balanced_accuracy", -0.10, -0.20, 0.01, 0.03),  # interval has 0
        diff("shift:b:3", "balanced_accuracy", -0.10, -0.15, -0.05, 0.04),
    ]
    # q for b: sorted p 0.03, 0.04 -> q = 0.04 (both); with fdr 0.035 neither passes.
    assert detect_findings(differences, conditions, info, 0.05, 0.035) == []
    found = detect_findings(differences, conditions, info, 0.05, 0.05)
    assert [f["condition"] for f in found] == ["shift:b:3"]


def test_store_condition_round_trip(tmp_path):
    with Store(tmp_path / "a.duckdb") as store:
        audit = store.create_audit("image", {"x": 1}, {"metrics": []})
        probs = np.array([[0.2, 0.8], [0.6, 0.4]])
        store.save_condition(audit, Condition("clean", "clean", "clean", n=2), ["i1", "i2"],
                             np.array([1, 0]), probs, [ResultRow("accuracy", 1.0, 0.5, 1.0)])
        back = store.predictions(audit, "clean")
        assert back["probs"].tolist() == probs.tolist()
        assert back["ids"].tolist() == ["i1", "i2"]
        assert store.finished_conditions(audit) == {"clean"}
        assert store.results(audit)[0]["value"] == 1.0


def test_failed_condition_write_leaves_store_unchanged(tmp_path):
    with Store(tmp_path / "a.duckdb") as store:
        audit = store.create_audit("image", {}, {})
        bad = [ResultRow("accuracy", object())]  # not a number: the insert fails
        with pytest.raises(TypeError):
            store.save_condition(audit, Condition("clean", "clean", "clean", n=1), ["i"],
                                 np.array([0]), np.array([[1.0, 0.0]]), bad)
        assert store.finished_conditions(audit) == set()
        assert store.con.execute("SELECT count(*) FROM predictions").fetchone()[0] == 0


def test_version_one_store_opens_and_migrates(tmp_path):
    import duckdb

    path = tmp_path / "old.duckdb"
    con = duckdb.connect(str(path))
    for statement in _SCHEMA_V1:
        con.execute(statement)
    con.execute("INSERT INTO meta VALUES ('schema_version', '1')")
    con.execute("INSERT INTO audits VALUES ('old-1', now(), now(), 'image', 'finished', "
                "'{}', '{}', '{}')")
    con.close()

    with Store(path) as store:
        assert store.schema_version() == SCHEMA_VERSION
        assert [a["id"] for a in store.list_audits()] == ["old-1"]
        store.add_review("old-1", "Dr A", "approve", "fine")
        assert store.reviews("old-1")[0]["reviewer"] == "Dr A"


def test_newer_store_is_rejected(tmp_path):
    path = tmp_path / "new.duckdb"
    with Store(path) as store:
        store.con.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    with pytest.raises(StoreError, match="schema version 99"):
        Store(path)


def test_delete_removes_everything_of_one_audit(tmp_path):
    with Store(tmp_path / "a.duckdb") as store:
        keep = store.create_audit("image", {}, {})
        drop = store.create_audit("image", {}, {})
        for audit in (keep, drop):
            store.save_condition(audit, Condition("clean", "clean", "clean", n=1), ["i"],
                                 np.array([0]), np.array([[1.0, 0.0]]),
                                 [ResultRow("accuracy", 1.0)])
            store.add_review(audit, "Dr B", "changes", "check site 2")
        store.delete_audit(drop)
        assert [a["id"] for a in store.list_audits()] == [keep]
        for table in ("predictions", "results", "reviews", "conditions"):
            ids = {r[0] for r in store.con.execute(f"SELECT audit_id FROM {table}").fetchall()}
            assert ids == {keep}, table
        with pytest.raises(StoreError, match="not found"):
            store.audit(drop)


def test_review_of_unknown_finding_is_rejected(tmp_path):
    with Store(tmp_path / "a.duckdb") as store:
        audit = store.create_audit("image", {}, {})
        with pytest.raises(StoreError, match="finding F009 not found"):
            store.add_review(audit, "Dr C", "reject", "", finding_id="F009")


def test_finding_summary_states_direction_in_words():
    conditions = {"shift:a:3": shift("shift:a:3")}
    differences = [diff("shift:a:3", "balanced_accuracy", -0.20, -0.25, -0.15, 0.001)]

    found = detect_findings(differences, conditions, info, 0.05, 0.05)

    assert found[0]["summary"] == (
        "Balanced accuracy fell from 0.700 to 0.500 under a at severity 3 (0.200 lower, "
        "95 % interval 0.150 to 0.250 lower; paired on the same images).")


def test_finding_summary_names_reweighted_set_without_key():
    conditions = {"reweight:equal_dataset": {
        "key": "reweight:equal_dataset", "kind": "reweight", "name": "equal_dataset",
        "params": {"column": "dataset", "target": {"a": 0.5, "b": 0.5}}, "too_small": False}}
    row = diff("reweight:equal_dataset", "ece_top_label", 0.08, 0.05, 0.11, 0.002)
    row["paired"] = False

    summary = detect_findings([row], conditions, info, 0.05, 0.05)[0]["summary"]

    assert "reweight:" not in summary
    assert summary == (
        "ECE was 0.780 for the test set re-weighted by dataset (equal dataset), against 0.700 for "
        "the clean test images (0.080 higher, 95 % interval 0.050 to 0.110 higher).")


def test_subgroup_finding_compares_with_the_rest():
    conditions = {"subgroup:sex:male": {"key": "subgroup:sex:male", "kind": "subgroup",
                                        "name": "male", "params": {"column": "sex",
                                                                   "value": "male"},
                                        "too_small": False}}
    row = diff("subgroup:sex:male", "balanced_accuracy", -0.273, -0.35, -0.2, 0.001)
    row.update(paired=False, reference="rest", reference_value=0.495, condition_value=0.222)

    summary = detect_findings([row], conditions, info, 0.05, 0.05)[0]["summary"]

    assert "fell" not in summary
    assert summary.startswith("Balanced accuracy was 0.222 for ")
    assert "against 0.495 for the rest of the test set (0.273 lower" in summary
