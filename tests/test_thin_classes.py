"""A one-class metric is not tested under a condition that has too few rows of that class."""

from __future__ import annotations

import numpy as np

from tools.runner import MIN_CLASS_ROWS, find_and_store_findings, thin_class_conditions
from tools.spec import AuditSettings
from tools.store import Condition, DifferenceRow, ResultRow, Store

PLAN = {"metrics": [{"id": "sensitivity", "params": {"positive_class": 1}},
                    {"id": "accuracy", "params": {}}]}


def rows(labels: list[int], predicted: list[int]):
    """Return ids, labels and one-hot probabilities for the given labels and predictions."""
    ids = [f"img{i}" for i in range(len(labels))]
    return ids, np.array(labels), np.eye(2)[predicted]


def write_audit(store: Store) -> str:
    """Write clean (30 of class 1) and a site with 4 of class 1 whose differences show a large
    sensitivity drop and a clear accuracy drop."""
    audit_id = store.create_audit("image", {}, PLAN)
    clean = rows([1] * 30 + [0] * 30, [1] * 30 + [0] * 30)
    store.save_condition(audit_id, Condition("clean", "clean", "clean", n=60), *clean,
                         [ResultRow("sensitivity", 1.0)])
    site = rows([1] * 4 + [0] * 36, [0] * 4 + [0] * 36)
    drop = [DifferenceRow("sensitivity", "rest", -0.9, -1.0, -0.8, 1e-6, False, 0.9, 0.0),
            DifferenceRow("accuracy", "rest", -0.3, -0.4, -0.2, 1e-6, False, 0.9, 0.6)]
    store.save_condition(audit_id, Condition("site:dataset:x", "site", "x", n=40), *site,
                         [ResultRow("sensitivity", 0.0)], drop)
    return audit_id


def test_thin_class_condition_listed_with_count(tmp_path):
    with Store(tmp_path / "a.duckdb") as store:
        audit_id = write_audit(store)

        thin = thin_class_conditions(store, audit_id, PLAN)

    assert MIN_CLASS_ROWS == 10
    assert thin == [{"condition": "site:dataset:x", "metric": "sensitivity", "positive_class": 1,
                     "rows": 4, "counted": "labels"}]


def test_thin_class_difference_makes_no_finding(tmp_path):
    class Spec:
        audit = AuditSettings(bootstrap=100)

    with Store(tmp_path / "a.duckdb") as store:
        audit_id = write_audit(store)

        found = find_and_store_findings(store, audit_id, Spec())
        listed = store.artifact(audit_id, "thin_class_conditions")

    assert [(f["condition"], f["metric"]) for f in found] == [("site:dataset:x", "accuracy")]
    assert listed[0]["rows"] == 4
