"""Turn the report-data dict into the plain sentences and tables that the templates lay out.

Everything here is pure Python over the dict that `tools/report/data.py` builds. The HTML and
Markdown templates share it, so both formats carry the same words and numbers.
"""

from __future__ import annotations

import json
import math
from typing import Any

LIGHT_ORDER = {"red": 0, "amber": 1, "green": 2}
TOP_FINDINGS = 5

# Plural clinical names of common class labels; other labels read as "<label> cases".
CLASS_PLURALS = {
    "mel": "melanomas",
    "melanoma": "melanomas",
    "bcc": "basal cell carcinomas",
    "akiec": "actinic keratoses and intraepithelial carcinomas",
    "scc": "squamous cell carcinomas",
    "bkl": "benign keratoses",
    "nv": "naevi",
    "df": "dermatofibromas",
    "vasc": "vascular lesions",
    "pneumonia": "pneumonia cases",
    "malignant": "malignant lesions",
    "tumor": "tumour samples",
}

# Abbreviations the report's own text uses, next to the metric ones from the registry.
REPORT_TERMS = {
    "FDR": "False discovery rate: the expected share of false alarms among the findings, "
           "controlled with the Benjamini-Hochberg procedure.",
    "95 % interval": "Bootstrap percentile interval: 95 % of resampled test sets gave a value "
                     "in this range.",
}


class ReportDataError(ValueError):
    """Report data that lacks a key or contains a value the renderers cannot use."""


REQUIRED_KEYS = ("schema_version", "audit", "model", "data", "plan", "conditions", "results",
                 "metrics_info")


def check_report_data(data: Any) -> None:
    """Raise ReportDataError naming the first required key that is missing."""
    if not isinstance(data, dict):
        raise ReportDataError(f"report data must be a dict, got {type(data).__name__}")
    for key in REQUIRED_KEYS:
        if key not in data:
            raise ReportDataError(f"report data is missing the key {key!r}")
    for index, row in enumerate(data["results"]):
        for field in ("condition", "metric", "value"):
            if field not in row:
                raise ReportDataError(f"report data results[{index}] is missing {field!r}")


# ---- numbers and words -------------------------------------------------------------------------

def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def fmt(value: Any, digits: int = 3) -> str:
    """Format a number with `digits` decimals; a missing or NaN value becomes an en dash."""
    if not is_number(value):
        return "–"
    return f"{value:.{digits}f}"


def fmt_interval(low: Any, high: Any, digits: int = 3) -> str:
    if not (is_number(low) and is_number(high)):
        return ""
    return f"{low:.{digits}f} to {high:.{digits}f}"


def fmt_p(value: Any) -> str:
    if not is_number(value):
        return "–"
    if value < 0.0001:
        return "< 0.0001"
    return f"{value:.4f}"


def fmt_percent(value: Any, digits: int = 0) -> str:
    if not is_number(value):
        return "–"
    return f"{100 * value:.{digits}f} %"


def fmt_params(params: dict | None) -> str:
    if not params:
        return ""
    return ", ".join(f"{key}={value}" for key, value in sorted(params.items()))


def natural_frequency(rate: float) -> str:
    """Write a rate in 0..1 as a natural frequency such as "about 1 in 8" or "about 3 in 10".

    The first of "1 in N", "k in 10" and "k in 100" that lies within 10 % of the rate is used,
    so 0.125 reads "about 1 in 8", 0.3 "about 3 in 10" and 0.45 "about 45 in 100".
    """
    if not is_number(rate) or rate < 0 or rate > 1:
        raise ReportDataError(f"natural_frequency needs a rate in 0..1, got {rate!r}")
    if rate == 0:
        return "none"
    if rate < 0.001:
        return "fewer than 1 in 1,000"
    if rate == 1:
        return "all"

    whole = round(1 / rate)
    if whole == 1:
        # "about 1 in 1" reads as a typo, so rates this high are written in tenths.
        return f"about {math.floor(rate * 10 + 0.5)} in 10" if rate < 0.95 else "almost all"
    if abs(1 / whole - rate) <= 0.1 * rate:
        return f"about 1 in {whole:,}"
    for denominator in (10, 100):
        count = math.floor(rate * denominator + 0.5)
        if count > 0 and abs(count / denominator - rate) <= 0.1 * rate:
            return f"about {count} in {denominator}"
    return f"about {math.floor(rate * 1000 + 0.5)} in 1,000"


def class_plural(label: str) -> str:
    return CLASS_PLURALS.get(label.lower(), f"{label} cases")


def pretty_name(name: str) -> str:
    return name.replace("_", " ")


def condition_parts(condition: dict) -> tuple[str, str]:
    """Return (column, value) of a subgroup or site condition, from params or from its key."""
    params = condition.get("params") or {}
    if "column" in params and "value" in params:
        return str(params["column"]), str(params["value"])
    pieces = condition["key"].split(":", 2)
    if len(pieces) == 3:
        return pieces[1], pieces[2]
    return condition.get("kind", ""), condition.get("name", condition["key"])


def shift_name(condition: dict) -> str:
    pieces = condition["key"].split(":")
    if condition.get("name") and condition["name"] != condition["key"]:
        return condition["name"]
    return pieces[1] if len(pieces) > 1 else condition["key"]


def condition_label(condition: dict) -> str:
    """Short label for tables and plots, such as "jpeg compression 4" or "sex = female"."""
    kind = condition.get("kind")
    if kind == "clean":
        return "clean test set"
    if kind == "shift":
        return f"{pretty_name(shift_name(condition))} {condition.get('severity')}"
    if kind in ("subgroup", "site"):
        column, value = condition_parts(condition)
        return f"{column} = {value}"
    if kind in ("recalibrated", "mitigated"):
        of = (condition.get("params") or {}).get("of") or condition.get("name")
        return f"{kind}: {of}"
    return str(condition.get("name") or condition["key"])


def condition_phrase(condition: dict) -> str:
    """Phrase that completes "about 1 in 8 melanomas ... would be missed"."""
    kind = condition.get("kind")
    if kind == "clean":
        return "on the clean test images"
    if kind == "shift":
        return (f"imaged with {pretty_name(shift_name(condition))} at severity "
                f"{condition.get('severity')}")
    if kind == "subgroup":
        column, value = condition_parts(condition)
        return f"in patients with {column} = {value}"
    if kind == "site":
        column, value = condition_parts(condition)
        return f"from the site {value} ({column})"
    if kind == "external":
        return f"in the external test set {condition.get('name')}"
    if kind == "prevalence":
        return f"at the class mix {condition.get('name')}"
    return f"under {condition_label(condition)}"


def slug(text: str) -> str:
    """Letters, digits and single dashes, for HTML ids and figure file names."""
    safe = "".join(ch if ch.isalnum() else "-" for ch in text.lower())
    return "-".join(part for part in safe.split("-") if part)


def anchor(key: str) -> str:
    """HTML id of a condition's row in the metric table."""
    return "cond-" + slug(key)


# ---- lookups -----------------------------------------------------------------------------------

class Lookup:
    """Index of the report data's conditions and results."""

    def __init__(self, data: dict):
        self.data = data
        self.conditions = {c["key"]: c for c in data["conditions"]}
        self.info = data.get("metrics_info") or {}
        self.whole: dict[tuple[str, str, str], dict] = {}
        self.per_class: dict[tuple[str, str, str], dict] = {}
        for row in data["results"]:
            params = json.dumps(row.get("params") or {}, sort_keys=True)
            if row.get("class") is None:
                self.whole[(row["condition"], row["metric"], params)] = row
            else:
                self.per_class[(row["condition"], row["metric"], str(row["class"]))] = row

    def display(self, metric: str) -> str:
        return (self.info.get(metric) or {}).get("display") or metric

    def higher_is_better(self, metric: str) -> bool:
        return bool((self.info.get(metric) or {}).get("higher_is_better", True))

    def metric_columns(self) -> list[tuple[str, dict]]:
        """(metric id, params) of every whole-set result, in plan order, then the rest."""
        seen: dict[tuple[str, str], tuple[str, dict]] = {}
        for choice in self.data["plan"].get("metrics", []):
            for (_, metric, params) in self.whole:
                if metric == choice["id"] and (metric, params) not in seen:
                    seen[(metric, params)] = (metric, json.loads(params))
        for (_, metric, params) in self.whole:
            seen.setdefault((metric, params), (metric, json.loads(params)))
        return list(seen.values())

    def result(self, key: str, metric: str, params: dict | None = None) -> dict | None:
        if params is not None:
            return self.whole.get((key, metric, json.dumps(params, sort_keys=True)))
        for (condition, name, _), row in self.whole.items():
            if condition == key and name == metric:
                return row
        return None

    def column_label(self, metric: str, params: dict) -> str:
        classes = (self.data.get("model") or {}).get("classes") or []
        index = (params or {}).get("positive_class")
        if isinstance(index, int) and 0 <= index < len(classes):
            # Name the class rather than its column index in the model's output.
            params = {**params, "positive_class": classes[index]}
        extra = fmt_params(params)
        return f"{self.display(metric)} ({extra})" if extra else self.display(metric)


# ---- verdict and findings ----------------------------------------------------------------------

def finding_rank(finding: dict, primary: str | None) -> tuple:
    """Sort key: red before amber, the primary metric first, then the larger effect."""
    effect = finding.get("effect")
    return (LIGHT_ORDER.get(finding.get("light"), 3), finding.get("metric") != primary,
            -abs(effect) if is_number(effect) else 0)


def sorted_findings(data: dict) -> list[dict]:
    primary = data["plan"].get("primary_metric")
    findings = list(data.get("findings") or [])
    return sorted(findings, key=lambda finding: finding_rank(finding, primary))


def finding_family(finding: dict, lookup: Lookup) -> str:
    """Findings of one shift (any severity) or one condition form a family."""
    condition = lookup.conditions.get(finding.get("condition"), {})
    if condition.get("kind") == "shift":
        return "shift:" + shift_name(condition)
    return str(finding.get("condition"))


def top_findings(data: dict, lookup: Lookup, limit: int = TOP_FINDINGS) -> list[dict]:
    """The highest-ranked finding of each family, so one shift does not fill the list."""
    chosen: dict[str, dict] = {}
    for finding in sorted_findings(data):
        chosen.setdefault(finding_family(finding, lookup), finding)
    return list(chosen.values())[:limit]


def effect_words(finding: dict, lookup: Lookup) -> str:
    """For example "BA 0.137 lower"; the effect's sign is ignored, the registry gives the way."""
    metric = finding["metric"]
    direction = "lower" if lookup.higher_is_better(metric) else "higher"
    effect = finding.get("effect")
    size = fmt(abs(effect)) if is_number(effect) else "–"
    return f"{lookup.display(metric)} {size} {direction}"


def miss_sentence(lookup: Lookup, key: str, cls: str, reference: str = "clean") -> str | None:
    """Natural-frequency sentence on how many cases of `cls` would be missed under `key`.

    Uses the class-level "sensitivity" result: missed share = 1 - sensitivity. Returns None
    when that result is absent or NaN.
    """
    row = lookup.per_class.get((key, "sensitivity", cls))
    condition = lookup.conditions.get(key)
    if row is None or condition is None or not is_number(row.get("value")):
        return None
    missed = 1 - row["value"]
    plural = class_plural(cls)
    sentence = f"{natural_frequency(missed).capitalize()} {plural} {condition_phrase(condition)}"
    sentence += " would be missed"
    count = (row.get("params") or {}).get("count")
    if is_number(count) and count > 0:
        sentence += f" ({round(missed * count)} of {count:.0f} in this test set)"

    reference_row = lookup.per_class.get((reference, "sensitivity", cls))
    if key != reference and reference_row and is_number(reference_row.get("value")):
        reference_condition = lookup.conditions.get(reference, {"kind": "clean"})
        sentence += (f", against {natural_frequency(1 - reference_row['value'])} "
                     f"{condition_phrase(reference_condition)}")
    return sentence + "."


def miss_brief(lookup: Lookup, key: str, cls: str, reference: str = "clean") -> str | None:
    """Short form of `miss_sentence`, such as "basal cell carcinomas about 6 in 10 (clean about
    4 in 10)"."""
    row = lookup.per_class.get((key, "sensitivity", cls))
    if row is None or not is_number(row.get("value")):
        return None
    text = f"{class_plural(cls)} {natural_frequency(1 - row['value'])}"
    reference_row = lookup.per_class.get((reference, "sensitivity", cls))
    if key != reference and reference_row and is_number(reference_row.get("value")):
        text += f" (clean {natural_frequency(1 - reference_row['value'])})"
    return text


def consequence_classes(data: dict) -> list[str]:
    context = data.get("context") or {}
    classes = []
    if context.get("positive_class"):
        classes.append(context["positive_class"])
    for cls in context.get("malignant_classes") or []:
        if cls not in classes:
            classes.append(cls)
    return classes


def evidence_anchor(finding: dict, lookup: Lookup) -> str:
    condition = lookup.conditions.get(finding.get("condition"), {})
    if finding.get("kind") == "calibration" and condition.get("key") in lookup.data.get(
            "reliability", {}):
        return "reliability"
    if condition.get("kind") == "shift":
        return "curve-" + slug(shift_name(condition))
    if condition.get("kind") in ("subgroup", "site", "external"):
        return "forest"
    return anchor(finding.get("condition", ""))


def _missed_more(lookup: Lookup, key: str, cls: str, reference: str = "clean") -> bool:
    row = lookup.per_class.get((key, "sensitivity", cls))
    reference_row = lookup.per_class.get((reference, "sensitivity", cls))
    if row is None or not is_number(row.get("value")):
        return False
    if key == reference or reference_row is None or not is_number(reference_row.get("value")):
        return True
    return row["value"] < reference_row["value"]


def finding_view(finding: dict, lookup: Lookup, classes: list[str]) -> dict:
    key = finding.get("condition", "")
    condition = lookup.conditions.get(key, {"key": key, "kind": "other", "name": key})
    consequences = []
    others = []
    for cls in classes:
        # Only a class missed more often than on the reference is a consequence of this
        # finding. A class missed less often is no harm to report here.
        if not _missed_more(lookup, key, cls):
            continue
        if not consequences:
            sentence = miss_sentence(lookup, key, cls)
            if sentence:
                consequences.append(sentence)
            continue
        brief = miss_brief(lookup, key, cls)
        if brief:
            others.append(brief)
    if others:
        consequences.append("Also missed: " + "; ".join(others) + ".")
    return {
        "id": finding.get("id", ""),
        "light": finding.get("light", "amber"),
        "title": ("After recalibration, " if finding.get("kind") in RECALIBRATION_KINDS
                  else "") + f"{condition_label(condition)}: {effect_words(finding, lookup)}",
        "summary": finding.get("summary", ""),
        "consequences": consequences,
        "interval": fmt_interval(finding.get("low"), finding.get("high")),
        "p_value": fmt_p(finding.get("p_value")),
        "q_value": fmt_p(finding.get("q_value")),
        "p_phrase": "p " + fmt_p(finding.get("p_value")) if is_number(finding.get("p_value"))
        and finding["p_value"] < 0.0001 else "p = " + fmt_p(finding.get("p_value")),
        "anchor": evidence_anchor(finding, lookup),
        "row_anchor": anchor(key),
        "metric": lookup.display(finding["metric"]),
        "effect": fmt(finding.get("effect")),
        "condition": key,
        "kind": finding.get("kind", ""),
    }


def _severity_ranges(severities: list[int]) -> str:
    severities = sorted(severities)
    if not severities:
        return ""
    runs = [[severities[0], severities[0]]]
    for value in severities[1:]:
        if value == runs[-1][1] + 1:
            runs[-1][1] = value
        else:
            runs.append([value, value])
    parts = [str(a) if a == b else f"{a}–{b}" for a, b in runs]
    return ", ".join(parts)


# Findings about the temperature-scaled model, not about the audited model under a condition.
RECALIBRATION_KINDS = {"recalibration_harms", "recalibration_overconfidence_grows",
                       "subgroup_calibration_differs"}


def verdict_view(data: dict, lookup: Lookup) -> dict:
    """Build the verdict box: overall light, intended use, where the model held up and where not.

    Recalibration findings are left out, because they describe the temperature-scaled model
    and have their own section.
    """
    findings = [f for f in sorted_findings(data) if f.get("kind") not in RECALIBRATION_KINDS]
    by_condition: dict[str, list[dict]] = {}
    for finding in findings:
        by_condition.setdefault(finding.get("condition"), []).append(finding)

    light = "green"
    if findings:
        light = min((f.get("light", "amber") for f in findings),
                    key=lambda value: LIGHT_ORDER.get(value, 3))
    headline = {
        "green": "No clear drop was found under the conditions tested.",
        "amber": "Small but clear drops were found under some conditions.",
        "red": "The model did not hold up under some of the conditions tested.",
    }[light]

    held_up, failed, not_assessed = [], [], []
    shifts: dict[str, dict[str, list[int]]] = {}
    groups: dict[str, dict[str, list[str]]] = {}
    for condition in data["conditions"]:
        key, kind = condition["key"], condition.get("kind")
        if kind == "shift":
            entry = shifts.setdefault(shift_name(condition), {"ok": [], "bad": []})
            entry["bad" if key in by_condition else "ok"].append(condition.get("severity"))
        elif kind in ("subgroup", "site", "external", "prevalence", "reweight"):
            column, value = condition_parts(condition)
            label = value if kind in ("subgroup", "site") else condition_label(condition)
            column = column if kind in ("subgroup", "site") else kind
            entry = groups.setdefault(column, {"ok": [], "bad": [], "small": []})
            if condition.get("too_small"):
                entry["small"].append(f"{label} (n={condition.get('n')})")
            elif key in by_condition:
                worst = by_condition[key][0]
                entry["bad"].append(f"{label} ({effect_words(worst, lookup)})")
            else:
                entry["ok"].append(label)

    for name, entry in shifts.items():
        label = pretty_name(name)
        if entry["ok"]:
            held_up.append(f"{label}: severity {_severity_ranges(entry['ok'])}")
        if entry["bad"]:
            worst = next(f for f in findings if finding_family(f, lookup) == "shift:" + name)
            failed.append(f"{label}: severity {_severity_ranges(entry['bad'])} "
                          f"(worst: {effect_words(worst, lookup)})")
    for column, entry in groups.items():
        if entry["ok"]:
            held_up.append(f"{column}: {', '.join(entry['ok'])}")
        if entry["bad"]:
            failed.append(f"{column}: {', '.join(entry['bad'])}")
        if entry["small"]:
            not_assessed.append(f"{column}: {', '.join(entry['small'])}")

    context = data.get("context") or {}
    primary = data["plan"].get("primary_metric")
    primary_row = lookup.result("clean", primary) if primary else None
    return {
        "light": light,
        "headline": headline,
        "intended_use": context.get("intended_use") or "not stated",
        "deployment": context.get("deployment"),
        "held_up": held_up,
        "failed": failed,
        "not_assessed": not_assessed,
        "primary_display": lookup.display(primary) if primary else "",
        "primary_value": fmt(primary_row.get("value")) if primary_row else "–",
        "primary_interval": fmt_interval(primary_row.get("low"), primary_row.get("high"))
        if primary_row else "",
        "n_findings": len(findings),
        "counts": {name: sum(1 for f in findings if f.get("light") == name)
                   for name in ("red", "amber")},
        "n_recalibration_findings": sum(1 for f in data.get("findings") or []
                                        if f.get("kind") in RECALIBRATION_KINDS),
    }


# ---- tables ------------------------------------------------------------------------------------

def cell(row: dict | None) -> dict:
    if row is None:
        return {"value": "", "interval": "", "reason": "not computed", "raw": None}
    return {"value": fmt(row.get("value")), "interval": fmt_interval(row.get("low"),
                                                                      row.get("high")),
            "reason": row.get("reason") or "", "raw": row.get("value")}


def metric_table(data: dict, lookup: Lookup) -> dict:
    columns = lookup.metric_columns()
    rows = []
    for condition in data["conditions"]:
        key = condition["key"]
        cells = [cell(lookup.result(key, metric, params)) for metric, params in columns]
        if condition.get("too_small") and all(c["raw"] is None for c in cells):
            continue
        rows.append({"key": key, "anchor": anchor(key), "label": condition_label(condition),
                     "kind": condition.get("kind", ""), "n": condition.get("n"),
                     "cells": cells})
    return {"columns": [{"id": metric, "label": lookup.column_label(metric, params)}
                        for metric, params in columns], "rows": rows}


def class_table(data: dict, lookup: Lookup) -> dict:
    """Per-class results: one table per metric, rows = conditions, columns = classes."""
    metrics = sorted({metric for (_, metric, _) in lookup.per_class})
    classes = list(data["model"].get("classes") or sorted({c for (_, _, c) in lookup.per_class}))
    tables = []
    for metric in metrics:
        rows = []
        for condition in data["conditions"]:
            key = condition["key"]
            cells = [cell(lookup.per_class.get((key, metric, cls))) for cls in classes]
            if all(c["raw"] is None and c["reason"] == "not computed" for c in cells):
                continue
            rows.append({"key": key, "label": condition_label(condition), "cells": cells})
        tables.append({"metric": metric, "label": lookup.display(metric), "classes": classes,
                       "rows": rows})
    return {"tables": tables}


def difference_rows(data: dict, lookup: Lookup) -> list[dict]:
    rows = []
    for item in data.get("differences") or []:
        condition = lookup.conditions.get(item["condition"])
        reference = item.get("reference")
        reference_value = item.get("reference_value")
        if is_number(reference):
            reference_value, reference = reference, None
        rows.append({
            "label": condition_label(condition) if condition else item["condition"],
            "key": item["condition"], "metric": lookup.display(item["metric"]),
            "reference": str(reference) if reference else "",
            "reference_value": fmt(reference_value),
            "condition_value": fmt(item.get("condition_value")),
            "delta": fmt(item.get("delta")),
            "interval": fmt_interval(item.get("low"), item.get("high")),
            "p_value": fmt_p(item.get("p_value")),
            "paired": "paired" if item.get("paired") else "unpaired",
        })
    return rows


def glossary(data: dict, lookup: Lookup) -> list[dict]:
    """Every metric the report shows, from the registry's readings, then the report's terms."""
    used = [metric for metric, _ in lookup.metric_columns()]
    used += sorted({metric for (_, metric, _) in lookup.per_class} - set(used))
    used += [m["id"] for m in data["plan"].get("metrics", []) if m["id"] not in used]
    entries = []
    for metric in used:
        info = lookup.info.get(metric) or {}
        better = "higher is better" if info.get("higher_is_better", True) else "lower is better"
        entries.append({"term": info.get("display") or metric, "id": metric,
                        "reading": info.get("reading") or "No reading in the metric registry.",
                        "note": f"{pretty_name(str(info.get('family', 'metric')))}; {better}"})
    entries.sort(key=lambda entry: entry["term"].lower())
    for term, reading in REPORT_TERMS.items():
        entries.append({"term": term, "id": "", "reading": reading, "note": ""})
    return entries


def limitations(data: dict) -> list[str]:
    plan = data["plan"]
    items = []
    too_small = [c for c in data["conditions"] if c.get("too_small")]
    if too_small:
        names = ", ".join(f"{condition_label(c)} (n={c.get('n')})" for c in too_small)
        items.append(f"Too small to assess (fewer than {plan.get('min_subgroup_size', '?')} "
                     f"images): {names}.")
    kinds = {c.get("kind") for c in data["conditions"]}
    if "external" not in kinds:
        items.append("No external test set was evaluated: every number comes from a split of "
                     "the same data source.")
    if "prevalence" not in kinds:
        items.append("No change in class prevalence was simulated.")
    if "subgroup" not in kinds:
        items.append("No subgroups were evaluated.")
    for item in plan.get("not_tested") or []:
        items.append(str(item))
    for item in data.get("limitations") or []:
        items.append(str(item))
    return items
