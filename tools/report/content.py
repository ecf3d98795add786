"""Turn the report-data dict into the plain sentences and tables that the templates lay out.

Everything here is pure Python over the dict that `tools/report/data.py` builds. The HTML and
Markdown templates share it, so both formats carry the same words and numbers.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from tools.report.wording import (
    class_name,
    directed_change,
    directed_interval,
    is_number,
    params_words,
    prevalence_words,
    reweight_words,
)

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
    "Clear drop found": "The metric worsened by at least the minimum relevant difference, the "
                        "95 % interval of the change excludes no change, and the change passed "
                        "the false discovery rate control.",
    "No clear drop found": "No change met all three conditions of a clear drop. This is not "
                           "proof that the model holds up: with few images the interval is "
                           "wide and even a large drop can go undetected.",
}

# Values the report shows that are not registry metrics: (display name, higher is better).
# The confidence gap is confidence minus accuracy, and its findings report it rising.
EXTRA_METRICS = {
    "confidence_gap": ("Confidence minus accuracy", False),
    "referral_accuracy": ("Accuracy of accepted predictions", True),
    "referral_sensitivity": ("Sensitivity of accepted predictions", True),
}

# Finding kinds in words, for the list of all findings.
FINDING_KIND_WORDS = {
    "performance": "performance",
    "calibration": "calibration",
    "failure_detection": "failure detection",
    "recalibration_harms": "recalibration made calibration worse",
    "recalibration_overconfidence_grows": "overconfidence after recalibration grows with shift",
    "subgroup_calibration_differs": "subgroup calibration after recalibration differs",
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
    if kind == "prevalence":
        return prevalence_words(condition)
    if kind == "reweight":
        return reweight_words(condition)
    if kind == "external":
        return f"external test set {condition.get('name')}"
    if kind in ("recalibrated", "mitigated"):
        of = str((condition.get("params") or {}).get("of") or condition.get("name"))
        return f"{key_label(of)}, {kind}"
    return str(condition.get("name") or condition["key"])


def key_label(key: str) -> str:
    """Label a condition known only by its key, such as "shift:jpeg_compression:5"."""
    pieces = key.split(":")
    if key == "clean":
        return condition_label({"kind": "clean", "key": key})
    if pieces[0] == "shift" and len(pieces) == 3:
        return condition_label({"kind": "shift", "key": key, "severity": pieces[2]})
    if pieces[0] in ("subgroup", "site") and len(pieces) == 3:
        return condition_label({"kind": pieces[0], "key": key})
    return pretty_name(pieces[-1])


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
        return f"from {column} {value}"
    if kind == "external":
        return f"in the external test set {condition.get('name')}"
    if kind == "prevalence":
        return f"with {prevalence_words(condition)}"
    if kind == "reweight":
        return f"with the {reweight_words(condition)}"
    return f"under {condition_label(condition)}"


def condition_where(condition: dict, paired: bool = True) -> str:
    """Phrase that completes "BA was 0.31 on the clean test images and 0.11 ...".

    `paired` is true when a shift is compared with the clean test set on the same images.
    """
    kind = condition.get("kind")
    if kind == "shift":
        same = "the same " if paired else ""
        return (f"on {same}images with {pretty_name(shift_name(condition))} at severity "
                f"{condition.get('severity')}")
    if kind == "site":
        column, value = condition_parts(condition)
        return f"on images from {column} {value}"
    return condition_phrase(condition)


def reference_words(reference: Any) -> str:
    """Name the reference of a change: the clean test images or the rest of the test set."""
    if reference in (None, "", "clean"):
        return "the clean test images"
    return "the rest of the test set"


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
        extra = EXTRA_METRICS.get(metric, (pretty_name(metric), True))[0]
        return (self.info.get(metric) or {}).get("display") or extra

    def higher_is_better(self, metric: str) -> bool:
        default = EXTRA_METRICS.get(metric, (metric, True))[1]
        return bool((self.info.get(metric) or {}).get("higher_is_better", default))

    def direction_words(self, metric: str) -> tuple[str, str]:
        """Return (bad, good), the words for a change that makes `metric` worse and better."""
        return ("lower", "higher") if self.higher_is_better(metric) else ("higher", "lower")

    def classes(self) -> list[str]:
        return [str(c) for c in (self.data.get("model") or {}).get("classes") or []]

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
        """Return the display name with its parameters in words, such as "Sens (mel)" or
        "ECE (15 bins)"."""
        extra = params_words(params, self.classes())
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
    """Write a finding's effect with its direction, such as "BA 0.137 lower".

    A finding's effect is positive when the metric got worse, so the registry's direction
    gives the word. A negative effect, which no finding should carry, reads the other way.
    """
    metric = finding["metric"]
    bad, good = lookup.direction_words(metric)
    size = directed_change(finding.get("effect"), up=bad, down=good)
    return f"{lookup.display(metric)} {size}" if size else lookup.display(metric)


def effect_interval_words(finding: dict, lookup: Lookup) -> str:
    """Write the effect's interval with its direction, such as "0.109 to 0.301 lower"."""
    bad, good = lookup.direction_words(finding["metric"])
    return directed_interval(finding.get("low"), finding.get("high"), up=bad, down=good)


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
    """Write the short form of `miss_sentence`, such as "about 6 in 10 basal cell carcinomas
    (about 4 in 10 on the clean test images)", without the bracket when the reference has no
    value."""
    row = lookup.per_class.get((key, "sensitivity", cls))
    if row is None or not is_number(row.get("value")):
        return None
    text = f"{natural_frequency(1 - row['value'])} {class_plural(cls)}"
    reference_row = lookup.per_class.get((reference, "sensitivity", cls))
    if key != reference and reference_row and is_number(reference_row.get("value")):
        reference_condition = lookup.conditions.get(reference, {"kind": "clean"})
        text += (f" ({natural_frequency(1 - reference_row['value'])} "
                 f"{condition_phrase(reference_condition)})")
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
    """Return the id of the figure that shows a finding: a severity curve, the reliability
    diagrams or the forest plot."""
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


# ---- finding summaries -------------------------------------------------------------------------

def _gap_words(gap: Any) -> str:
    """Write confidence minus accuracy in words, such as "confidence 0.050 above accuracy"."""
    if not is_number(gap):
        return ""
    if round(gap, 3) == 0:
        return "confidence equal to accuracy"
    side = "above" if gap > 0 else "below"
    return f"confidence {abs(gap):.3f} {side} accuracy"


def _difference_summary(finding: dict, condition: dict, lookup: Lookup) -> str | None:
    evidence = finding.get("evidence") or {}
    before, after = evidence.get("reference_value"), evidence.get("condition_value")
    if not (is_number(before) and is_number(after)):
        return None
    return (f"{lookup.display(finding['metric'])} was {fmt(before)} on "
            f"{reference_words(evidence.get('reference'))} and {fmt(after)} "
            f"{condition_where(condition)}.")


def _recalibration_harm_summary(finding: dict, condition: dict, lookup: Lookup) -> str | None:
    changes = (finding.get("evidence") or {}).get("changes") or []
    ece = next((c for c in changes if c.get("metric") == finding.get("metric")), None)
    if ece is None or not (is_number(ece.get("before")) and is_number(ece.get("after"))):
        return None
    return (f"Recalibration raised the {lookup.display(finding['metric'])} "
            f"{condition_where(condition, paired=False)} from {fmt(ece['before'])} to "
            f"{fmt(ece['after'])}.")


def _subgroup_gap_summary(finding: dict, condition: dict, lookup: Lookup) -> str | None:
    evidence = finding.get("evidence") or {}
    gap, reference_gap = (evidence.get("confidence_gap_after"),
                          evidence.get("reference_confidence_gap_after"))
    if not (is_number(gap) and is_number(reference_gap)):
        return None
    reference = lookup.conditions.get(evidence.get("reference"), {"kind": "clean"})
    return (f"After recalibration, {condition_where(condition, paired=False)} the model shows "
            f"{_gap_words(gap)}, against {_gap_words(reference_gap)} "
            f"{condition_where(reference)}.")


def _growing_gap_summary(finding: dict, condition: dict, lookup: Lookup) -> str | None:
    curve = (finding.get("evidence") or {}).get("curve") or []
    if len(curve) < 2:
        return None
    first, last = curve[0].get("confidence_gap_after"), curve[-1].get("confidence_gap_after")
    if not (is_number(first) and is_number(last)):
        return None
    return (f"The model was underconfident. After recalibration it shows {_gap_words(last)} "
            f"{condition_where(condition, paired=False)}, against {_gap_words(first)} on the "
            "clean test "
            "images, and the gap grows with severity.")


SUMMARY_BUILDERS = {
    "recalibration_harms": _recalibration_harm_summary,
    "subgroup_calibration_differs": _subgroup_gap_summary,
    "recalibration_overconfidence_grows": _growing_gap_summary,
}


def readable_text(text: str, lookup: Lookup) -> str:
    """Replace condition keys in stored text by their table labels, name the interval
    "95 % interval" and write "90 %" for "90%", as the rest of the report does.

    Stored summaries and sentences come from the audit run, which may predate this wording.
    """
    for key in sorted(lookup.conditions, key=len, reverse=True):
        if ":" in key and key in text:
            text = text.replace(key, condition_label(lookup.conditions[key]))
    text = re.sub(r"\bon clean\b", "on the clean test set", text)
    text = re.sub(r"95\s?% CI\b", "95 % interval", text)
    return re.sub(r"(\d)%", r"\1 %", text)


def finding_summary(finding: dict, lookup: Lookup) -> str:
    """Write one plain sentence on what was measured, from the finding's evidence.

    Falls back to the stored summary, with condition keys replaced by labels, when the
    evidence lacks the values the sentence needs.
    """
    condition = lookup.conditions.get(finding.get("condition"))
    if condition is not None:
        build = SUMMARY_BUILDERS.get(finding.get("kind"), _difference_summary)
        sentence = build(finding, condition, lookup)
        if sentence:
            return sentence
    return readable_text(str(finding.get("summary") or ""), lookup)


def finding_view(finding: dict, lookup: Lookup, classes: list[str],
                 figure_anchors: set[str] | None = None) -> dict:
    """Collect everything a finding shows: title, consequences for patients, summary, numbers.

    `figure_anchors` contains the ids of the figures the report draws. The figure link is left
    out when the finding's figure is not among them.
    """
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
        consequences.append("Also missed more often: " + "; ".join(others) + ".")

    figure = evidence_anchor(finding, lookup)
    interval = effect_interval_words(finding, lookup)
    change = effect_words(finding, lookup)
    if interval:
        change += f" (95 % interval {interval})"
    p_value = finding.get("p_value")
    return {
        "id": finding.get("id", ""),
        "light": finding.get("light", "amber"),
        "title": ("After recalibration, " if finding.get("kind") in RECALIBRATION_KINDS
                  else "") + f"{condition_label(condition)}: {effect_words(finding, lookup)}",
        "summary": finding_summary(finding, lookup),
        "consequences": consequences,
        "change": change,
        "change_cell": directed_change(finding.get("effect"), *lookup.direction_words(
            finding["metric"])),
        "interval": interval,
        "p_value": fmt_p(p_value),
        "q_value": fmt_p(finding.get("q_value")),
        "p_phrase": ("p " + fmt_p(p_value) if is_number(p_value) and p_value < 0.0001
                     else "p = " + fmt_p(p_value)) if is_number(p_value) else "",
        "anchor": figure if figure_anchors is None or figure in figure_anchors else None,
        "row_anchor": anchor(key),
        "metric": lookup.display(finding["metric"]),
        "condition": key,
        "condition_label": condition_label(condition),
        "kind": finding.get("kind", ""),
        "kind_words": FINDING_KIND_WORDS.get(finding.get("kind"),
                                             pretty_name(str(finding.get("kind", "")))),
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


# Headings in the verdict for conditions that change the test population as a whole.
POPULATION_GROUPS = {"external": "external test sets", "prevalence": "class mix",
                     "reweight": "population mix"}


# Findings about the temperature-scaled model, not about the audited model under a condition.
RECALIBRATION_KINDS = {"recalibration_harms", "recalibration_overconfidence_grows",
                       "subgroup_calibration_differs"}


def audited_model_findings(findings: list[dict]) -> list[dict]:
    """Keep the findings about the audited model, leaving out those about the recalibrated one."""
    return [f for f in findings if f.get("kind") not in RECALIBRATION_KINDS]


def _thin_class_lines(data: dict, lookup: Lookup) -> list[str]:
    """List, per one-class metric, the conditions with too few images of that class to test it."""
    classes = data["model"].get("classes") or []
    places: dict[tuple[str, str], list[str]] = {}
    for item in data.get("thin_class_conditions") or []:
        condition = lookup.conditions.get(item["condition"])
        label = condition_label(condition) if condition else item["condition"]
        name = class_name(item["positive_class"], classes)
        if item.get("counted") == "predictions":
            counted = f"{item['rows']} predicted {name}"
        else:
            counted = f"{item['rows']} {name}"
        places.setdefault((item["metric"], name), []).append(f"{label} ({counted})")
    return [f"{lookup.display(metric)} ({name}): {', '.join(where)}"
            for (metric, name), where in places.items()]


def verdict_view(data: dict, lookup: Lookup) -> dict:
    """Build the verdict box: overall light, intended use, where the model held up and where not.

    Recalibration findings are left out, because they describe the temperature-scaled model
    and have their own section.
    """
    findings = audited_model_findings(sorted_findings(data))
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
        "red": "Clear drops of at least twice the minimum relevant difference were found "
               "under some conditions.",
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
            column = column if kind in ("subgroup", "site") else POPULATION_GROUPS[kind]
            entry = groups.setdefault(column, {"ok": [], "bad": [], "small": []})
            if condition.get("too_small"):
                entry["small"].append(f"{label} (n={condition.get('n')})")
            elif key in by_condition:
                worst = by_condition[key][0]
                entry["bad"].append(f"{label} ({effect_words(worst, lookup)}, "
                                    f"{worst.get('light', 'amber')})")
            else:
                entry["ok"].append(label)

    for name, entry in shifts.items():
        label = pretty_name(name)
        if entry["ok"]:
            held_up.append(f"{label}: severity {_severity_ranges(entry['ok'])}")
        if entry["bad"]:
            worst = next(f for f in findings if finding_family(f, lookup) == "shift:" + name)
            failed.append(f"{label}: severity {_severity_ranges(entry['bad'])} "
                          f"(worst: {effect_words(worst, lookup)}, {worst.get('light', 'amber')})")
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
        "thin_classes": _thin_class_lines(data, lookup),
        "clean_text": _clean_text(data, lookup, primary, primary_row),
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
        "n_recalibration_findings": (len(data.get("findings") or [])
                                     - len(audited_model_findings(data.get("findings") or []))),
    }


def _clean_text(data: dict, lookup: Lookup, primary: str | None, row: dict | None) -> str:
    """Write the primary metric on the clean test set, such as "BA 0.313 (95 % interval 0.227
    to 0.395), n = 400", leaving out parts without a value."""
    parts = []
    if primary and row and is_number(row.get("value")):
        text = f"{lookup.display(primary)} {fmt(row['value'])}"
        interval = fmt_interval(row.get("low"), row.get("high"))
        if interval:
            text += f" (95 % interval {interval})"
        parts.append(text)
    elif primary:
        parts.append(f"no value of {lookup.display(primary)}")
    n_test = (data.get("data") or {}).get("n_test")
    if is_number(n_test):
        parts.append(f"n = {n_test:.0f}")
    return ", ".join(parts) or "no values"


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
    """Build the rows of the table of changes against the reference, each with its direction."""
    rows = []
    for item in data.get("differences") or []:
        condition = lookup.conditions.get(item["condition"])
        reference = item.get("reference")
        reference_value = item.get("reference_value")
        if is_number(reference):
            reference_value, reference = reference, None
        reference_condition = lookup.conditions.get(reference) if reference else None
        if reference_condition is not None:
            reference_text = condition_label(reference_condition)
        else:
            reference_text = str(reference) if reference else ""
        rows.append({
            "label": condition_label(condition) if condition else item["condition"],
            "key": item["condition"], "metric": lookup.display(item["metric"]),
            "reference": reference_text,
            "reference_value": fmt(reference_value),
            "condition_value": fmt(item.get("condition_value")),
            "delta": directed_change(item.get("delta")),
            "interval": directed_interval(item.get("low"), item.get("high")),
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


def interval_beside_estimate(data: dict, lookup: Lookup) -> str | None:
    """Return an example of a whole-set result whose interval excludes its own point estimate,
    such as "AP 0.253 (0.262 to 0.475) on localization = abdomen", or None."""
    for row in data["results"]:
        value, low, high = row.get("value"), row.get("low"), row.get("high")
        if row.get("class") is not None or not all(is_number(x) for x in (value, low, high)):
            continue
        if round(value, 3) < round(low, 3) or round(value, 3) > round(high, 3):
            condition = lookup.conditions.get(row["condition"])
            where = condition_label(condition) if condition else row["condition"]
            return (f"{lookup.display(row['metric'])} {fmt(value)} "
                    f"({fmt_interval(low, high)}) on {where}")
    return None


def limitations(data: dict, lookup: Lookup | None = None) -> list[str]:
    lookup = lookup or Lookup(data)
    plan = data["plan"]
    items = []
    too_small = [c for c in data["conditions"] if c.get("too_small")]
    if too_small:
        names = ", ".join(f"{condition_label(c)} (n={c.get('n')})" for c in too_small)
        minimum = plan.get("min_subgroup_size")
        fewer = f" (fewer than {minimum} images)" if is_number(minimum) else ""
        items.append(f"Too small to assess{fewer}: {names}.")

    example = interval_beside_estimate(data, lookup)
    beside = (f"Some 95 % intervals lie entirely beside their point estimate, for example "
              f"{example}. " if example else
              "A 95 % interval can lie entirely beside its point estimate. ")
    items.append(beside + "This happens mostly on small subgroups and for metrics such as AP "
                 "and ECE: the bootstrap repeats some images and leaves out others, and on "
                 "such resampled test sets these metrics come out systematically higher or "
                 "lower than on the real one. Such an interval says the estimate is unstable; "
                 "it is not a range around the value shown.")

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
