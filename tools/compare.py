"""Compare two audits of a model: which whole-set metrics got better or worse, per condition.

Both audits' per-image predictions are in the store, so the change gets a bootstrap interval.
It is paired when the two conditions contain the same images in the same order with the same
weights (a mitigated model re-audited on the same test set), and unpaired otherwise (a later
monitoring batch).

Every metric is evaluated with the per-image weights stored with the predictions. They are 1
except in reweight conditions, which store the clean predictions with importance weights, so
without them a reweight row would repeat the clean row instead of the value the audit stored.
Prevalence conditions store only the rows they selected, so their predictions need no weights.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from tools.store import Store


def compare_audits(store: Store, audit_a: str, audit_b: str, n_boot: int = 1000,
                   seed: int = 0, fdr: float = 0.05) -> list[dict[str, Any]]:
    """Return one row per (shared condition, metric): a, b, delta = b − a, interval, p- and
    q-value, verdict.

    A change is "better" or "worse" only when its 95 % interval excludes zero and it survives
    Benjamini–Hochberg at level `fdr` over every row of the comparison. Every other row is
    "no clear change".
    """
    from scipy.stats import false_discovery_control

    from tools.metrics import REGISTRY, paired_bootstrap, unpaired_bootstrap

    store.require_audit(audit_a)
    store.require_audit(audit_b)
    keys_a = {c.key for c in store.conditions(audit_a) if not c.too_small}
    keys_b = {c.key for c in store.conditions(audit_b) if not c.too_small}
    plan = store.audit(audit_a)["plan"] or {}
    metrics = [(m["id"], m.get("params", {})) for m in plan.get("metrics", [])]
    if not metrics:
        metrics = [("balanced_accuracy", {}), ("ece_top_label", {})]

    rows = []
    for key in sorted(keys_a & keys_b, key=lambda k: (k != "clean", k)):
        a = store.predictions(audit_a, key)
        b = store.predictions(audit_b, key)
        if a["probs"].shape[1] != b["probs"].shape[1]:
            continue
        if _same_rows(a, b):
            paired = True
            diffs = paired_bootstrap(metrics, a["probs"], b["probs"], a["labels"], n_boot=n_boot,
                                     seed=seed, weights=a["weights"])
        else:
            paired = False
            diffs = unpaired_bootstrap(metrics, a["probs"], a["labels"], b["probs"], b["labels"],
                                       n_boot=n_boot, seed=seed, weights_a=a["weights"],
                                       weights_b=b["weights"])
        for (metric_id, params), diff in zip(metrics, diffs.values()):
            rows.append({"condition": key, "metric": metric_id, "a": diff.reference,
                         "b": diff.condition, "delta": diff.delta, "low": diff.low,
                         "high": diff.high, "p_value": diff.p_value, "q_value": None,
                         "paired": paired, "verdict": "no clear change"})

    tested = [r for r in rows if r["p_value"] is not None and np.isfinite(r["p_value"])]
    if tested:
        q_values = false_discovery_control([r["p_value"] for r in tested], method="bh")
        for row, q_value in zip(tested, q_values):
            row["q_value"] = float(q_value)
            if q_value > fdr or row["low"] is None or not np.isfinite(row["low"]):
                continue
            higher_is_better = REGISTRY[row["metric"]].higher_is_better
            improved = row["low"] > 0 if higher_is_better else row["high"] < 0
            worsened = row["high"] < 0 if higher_is_better else row["low"] > 0
            if improved:
                row["verdict"] = "better"
            elif worsened:
                row["verdict"] = "worse"
    return rows


def _same_rows(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    """Tell whether two stored conditions have the same images, labels and weights in the same
    order, so that a paired bootstrap with one set of weights applies to both."""
    if len(a["ids"]) != len(b["ids"]):
        return False
    return (bool(np.all(a["ids"] == b["ids"])) and bool(np.all(a["labels"] == b["labels"]))
            and bool(np.allclose(a["weights"], b["weights"], rtol=1e-12, atol=0.0)))
