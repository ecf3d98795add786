"""Pass/fail gates over an audit's stored results, for CI pipelines and monitoring jobs.

A gate names a metric and a condition selector: `clean`, `any_shift`, `any_subgroup`,
`any_site`, `any` (every condition but clean), or one condition key such as
`shift:jpeg:5`. `min_value` fails when the metric is worse than the bound (below it for a metric
where higher is better, above it otherwise); `max_drop` fails when the change against the
reference, in the metric's bad direction, exceeds the bound.
"""

from __future__ import annotations

import math
from typing import Any

from tools.spec import Gate

_SELECTORS = {"any_shift": "shift", "any_subgroup": "subgroup", "any_site": "site"}


def _selected(selector: str, condition_key: str) -> bool:
    kind = condition_key.split(":", 1)[0]
    if selector == "any":
        return condition_key != "clean"
    if selector in _SELECTORS:
        return kind == _SELECTORS[selector]
    return condition_key == selector


def evaluate_gates(gates: list[Gate], results: list[dict[str, Any]],
                   differences: list[dict[str, Any]], higher_is_better: dict[str, bool]
                   ) -> list[dict[str, Any]]:
    """Return one row per gate check that failed: gate, condition, value, bound, message."""
    failures = []
    for gate in gates:
        better_high = higher_is_better.get(gate.metric, True)
        matched = False
        if gate.min_value is not None:
            for row in results:
                if row["metric"] != gate.metric or row["class"] is not None:
                    continue
                if not _selected(gate.condition, row["condition"]):
                    continue
                matched = True
                value = row["value"]
                if value is None or (isinstance(value, float) and math.isnan(value)):
                    continue
                worse = value < gate.min_value if better_high else value > gate.min_value
                if worse:
                    failures.append({
                        "gate": gate.model_dump(), "condition": row["condition"], "value": value,
                        "message": f"{gate.metric} = {value:.3f} on {row['condition']} "
                                   f"({'below' if better_high else 'above'} {gate.min_value})"})
        if gate.max_drop is not None:
            for row in differences:
                if row["metric"] != gate.metric or not _selected(gate.condition, row["condition"]):
                    continue
                matched = True
                delta = row["delta"]
                if delta is None or math.isnan(delta):
                    continue
                drop = -delta if better_high else delta
                if drop > gate.max_drop:
                    failures.append({
                        "gate": gate.model_dump(), "condition": row["condition"], "value": drop,
                        "message": f"{gate.metric} worsened by {drop:.3f} on {row['condition']} "
                                   f"against {row['reference']} (allowed {gate.max_drop})"})
        if not matched:
            failures.append({"gate": gate.model_dump(), "condition": gate.condition, "value": None,
                             "message": f"no result of {gate.metric} matches condition "
                                        f"{gate.condition!r}; the gate cannot pass unchecked"})
    return failures
