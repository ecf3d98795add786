"""Render the report-data dict as one self-contained HTML file, Markdown and JSON.

The HTML inlines its CSS and its matplotlib figures as SVG and fetches nothing, so it can be
mailed or archived as a single file. The Markdown carries the same sections and numbers and
links its figures from a `figures/` folder that `write_report` writes next to it.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from pathlib import Path
from typing import Any

import yaml

from tools.report.content import (
    Lookup,
    ReportDataError,
    audited_model_findings,
    check_report_data,
    class_table,
    condition_label,
    consequence_classes,
    difference_rows,
    finding_view,
    fmt,
    fmt_interval,
    fmt_p,
    fmt_percent,
    glossary,
    limitations,
    metric_table,
    pretty_name,
    readable_text,
    sorted_findings,
    top_findings,
    verdict_view,
)
from tools.report.figures import Figure, build_figures
from tools.report.wording import (
    directed_change,
    directed_interval,
    fmt_count,
    fmt_plain,
    fmt_seconds,
    fmt_timestamp,
    is_number,
    params_words,
)

TEMPLATES = Path(__file__).with_name("templates")
FIGURE_DIR = "figures"
OPTIONAL_FIGURES = ("reliability", "forest", "calibration", "risk-coverage")

__all__ = ["ReportDataError", "build_view", "render_html", "render_json", "render_markdown",
           "write_report"]


def _environment(html: bool):
    import jinja2

    environment = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES),
        autoescape=html,
        undefined=jinja2.StrictUndefined,
        trim_blocks=not html,
        lstrip_blocks=not html,
        keep_trailing_newline=True,
    )
    environment.filters["md"] = _markdown_cell
    return environment


def _markdown_cell(value: Any) -> str:
    """Make a value safe inside a Markdown table cell: no pipes, no line breaks."""
    return str(value).replace("|", "\\|").replace("\r", " ").replace("\n", " ")


# ---- optional sections -------------------------------------------------------------------------

def _calibration_view(data: dict, lookup: Lookup) -> dict | None:
    """Temperature and per-condition verdicts, from the runner's "calibration" artifact."""
    calibration = data.get("calibration")
    if not calibration:
        return None
    temperature = calibration.get("temperature")
    summary = f"Method: {pretty_name(str(calibration.get('method', 'temperature')))}."
    if is_number(temperature):
        summary += f" Fitted temperature T = {temperature:.3f}"
        if is_number(calibration.get("low")) and is_number(calibration.get("high")):
            summary += f" (95 % interval {calibration['low']:.3f} to {calibration['high']:.3f})"
        if calibration.get("n_calibration"):
            summary += f" on {calibration['n_calibration']} calibration images"
        summary += "."
    if calibration.get("direction"):
        summary += (f" Before recalibration the model was {calibration['direction']}"
                    " (T > 1 means overconfident, T < 1 underconfident).")
    if is_number(calibration.get("nll_before")) and is_number(calibration.get("nll_after")):
        summary += (f" NLL on the calibration split went from {calibration['nll_before']:.3f} "
                    f"to {calibration['nll_after']:.3f}.")

    rows = []
    for item in calibration.get("verdicts") or []:
        condition = lookup.conditions.get(item.get("condition"))
        label = condition_label(condition) if condition else str(item.get("condition", ""))
        for change in item.get("changes") or []:
            rows.append({
                "label": label, "metric": lookup.display(change.get("metric", "")),
                "before": fmt(change.get("before")), "after": fmt(change.get("after")),
                "delta": directed_change(change.get("delta")),
                "interval": directed_interval(change.get("low"), change.get("high")),
                "p_value": fmt_p(change.get("p_value")),
                "verdict": _change_verdict(change),
            })
    sentence = readable_text(calibration["sentence"], lookup) if calibration.get(
        "sentence") else None
    return {"summary": summary, "sentence": sentence, "rows": rows}


def _min_class_rows() -> int:
    from tools.runner import MIN_CLASS_ROWS

    return MIN_CLASS_ROWS


def _change_verdict(change: dict) -> str:
    """Judge one metric's change under recalibration from its own interval.

    ECE, NLL and Brier score are better lower. The confidence gap is signed (confidence minus
    accuracy), so its change alone shows neither better nor worse and gets no verdict.
    """
    from tools.calibration import verdict_from_interval

    low, high = change.get("low"), change.get("high")
    if change.get("metric") == "confidence_gap" or not (is_number(low) and is_number(high)):
        return "–"
    return verdict_from_interval(low, high)


CONFIDENCE_SCORE_NAMES = {"msp": "maximum softmax probability",
                          "entropy": "negative predictive entropy",
                          "margin": "margin between the top two classes"}


def _referral_view(data: dict, lookup: Lookup) -> dict | None:
    referral = data.get("referral")
    if not referral:
        return None
    target_metric = str(referral.get("target_metric", "accuracy"))
    if target_metric == "sensitivity" and referral.get("positive_class"):
        target_metric = f"sensitivity for {referral['positive_class']}"
    score = str(referral.get("score", ""))
    score_words = CONFIDENCE_SCORE_NAMES.get(score, pretty_name(score))
    sentence = readable_text(referral["sentence"], lookup) if referral.get("sentence") else None
    summary = _referral_summary(referral.get("target"), target_metric,
                                referral.get("threshold"), score_words,
                                explained=sentence is not None)
    rows = []
    for item in referral.get("rows") or []:
        condition = lookup.conditions.get(item.get("condition"))
        meets = item.get("meets_target")
        meets_text = "–"
        if meets is not None:
            meets_text = "yes" if meets else "no"
        rows.append({
            "label": condition_label(condition) if condition else item.get("condition", ""),
            "threshold": fmt(item.get("threshold")),
            "referred": fmt_percent(item.get("referred"), 1),
            "accepted": fmt(item.get("accepted_value")),
            "interval": fmt_interval(item.get("low"), item.get("high")),
            "meets": meets_text,
        })
    return {"summary": summary, "sentence": sentence, "rows": rows,
            "target_metric": target_metric}


def _referral_summary(target: Any, target_metric: str, threshold: Any, score_words: str,
                      explained: bool = False) -> str:
    """Describe the referral rule, leaving out the clause of a missing target or threshold.

    `explained` is true when the referral sentence above already states that no threshold
    reached the target.
    """
    goal = "Target: accepted predictions"
    if is_number(target):
        goal += f" at {fmt_percent(target)} {target_metric}"
    if is_number(threshold):
        return (f"{goal}. Predictions whose {score_words} is below {fmt(threshold)} are "
                "referred to a clinician.")
    if explained:
        return f"{goal}, with predictions ranked by their {score_words}."
    return (f"{goal}. No threshold on the {score_words} reached the target on the calibration "
            "split, so every prediction would be referred to a clinician.")


def _mitigation_view(data: dict, lookup: Lookup) -> dict | None:
    """Augment-and-retrain outcome, from the "mitigation" artifact (AugmentRetrainOutput)."""
    mitigation = data.get("mitigation")
    if not mitigation:
        return None
    metric = lookup.display(mitigation.get("metric", ""))

    policy = mitigation.get("policy") or {}
    steps = []
    for step in policy.get("steps") or []:
        probability = step.get("probability")
        chance = f" with probability {fmt(probability, 2)}" if is_number(probability) else ""
        steps.append(f"{pretty_name(step.get('shift', ''))}{chance}")
    summary = "Augment and retrain"
    if steps:
        summary += ": the model was retrained with " + "; ".join(steps)
    summary += "."
    if mitigation.get("new_audit_id"):
        summary += f" The retrained model was audited as {mitigation['new_audit_id']}."
    before, after = mitigation.get("clean_before"), mitigation.get("clean_after")
    clean = ""
    if is_number(before) and is_number(after):
        clean = (f"{metric} on the clean test set: {fmt(before)} before, {fmt(after)} after "
                 "retraining.")
    overall = ""
    if is_number(mitigation.get("overall_recovered_fraction")):
        overall = (f"Overall, {fmt_percent(mitigation['overall_recovered_fraction'])} of the "
                   "drop under the chosen shifts was recovered.")

    rows = []
    for item in mitigation.get("conditions") or []:
        condition = lookup.conditions.get(item.get("condition"))
        rows.append({
            "label": condition_label(condition) if condition else str(item.get("condition", "")),
            "clean": fmt(item.get("clean")), "before": fmt(item.get("before")),
            "after": fmt(item.get("after")),
            "drop_interval": fmt_interval(item.get("drop_low"), item.get("drop_high")),
            "recovered": fmt_percent(item.get("recovered_fraction")),
            "note": item.get("note") or "",
        })
    seconds = mitigation.get("train_seconds")
    note = f"Retraining took {fmt_seconds(seconds)}." if is_number(seconds) else ""
    return {"summary": summary, "clean": clean, "overall": overall, "rows": rows,
            "metric": metric, "note": note}


# ---- plan, methods, reproducibility ------------------------------------------------------------

def _cost_text(cost: dict) -> str:
    """Write the planner's cost estimate in words, leaving out the parts it did not estimate."""
    parts = []
    if is_number(cost.get("conditions")):
        parts.append(f"{cost['conditions']:.0f} conditions")
    if is_number(cost.get("images_predicted")):
        parts.append(f"{cost['images_predicted']:.0f} images predicted")
    if is_number(cost.get("estimated_seconds")):
        parts.append(f"about {fmt_seconds(cost['estimated_seconds'])} (estimate)")
    sentences = [", ".join(parts)] if parts else []
    note = str(cost.get("note") or "").strip()
    if note:
        sentences.append(note[0].upper() + note[1:])
    return " ".join(text if text.endswith(".") else text + "." for text in sentences)


def _band_text(bands: list) -> str:
    """Write band edges, whole ones without decimals, such as "0, 30, 45, 60, 75, 86"."""
    return ", ".join(fmt_plain(edge) for edge in bands)


def _plan_view(data: dict, lookup: Lookup) -> dict:
    plan = data["plan"]
    cost = plan.get("cost") or {}
    return {
        "primary": lookup.display(plan.get("primary_metric", "")),
        "primary_reason": plan.get("primary_reason") or "",
        "metrics": [{"display": lookup.display(m["id"]), "id": m["id"],
                     "params": params_words(m.get("params"), lookup.classes()),
                     "reason": m.get("reason", "")}
                    for m in plan.get("metrics", [])],
        "shifts": [{"name": pretty_name(s["name"]),
                    "severities": ", ".join(str(x) for x in s.get("severities", [])),
                    "reason": s.get("reason", "")} for s in plan.get("shifts", [])],
        "subgroups": [{"column": s.get("column", ""),
                       "bands": _band_text(s["bands"]) if s.get("bands") else "",
                       "reason": s.get("reason", "")} for s in plan.get("subgroups", [])],
        "cost": _cost_text(cost) if cost else "",
    }


def _audit_settings(data: dict) -> dict:
    spec = (data.get("reproducibility") or {}).get("spec")
    if isinstance(spec, dict):
        return spec.get("audit") or {}
    return {}


def _methods(data: dict) -> list[str]:
    settings = _audit_settings(data)
    bootstrap = (data.get("reproducibility") or {}).get("bootstrap", settings.get("bootstrap"))
    minimum = settings.get("min_relevant_difference", 0.05)
    fdr = settings.get("fdr", 0.05)
    resamples = f"{bootstrap} " if bootstrap is not None else ""
    return [
        (f"Every 95 % interval is a bootstrap percentile interval from {resamples}resamples of "
         "the test images."),
        ("Image shifts are applied to the clean test images and compared with them on the same "
         "images (paired bootstrap). Subgroups and sites are compared with the rest of the test "
         "set (unpaired bootstrap)."),
        (f"A finding needs a change of at least {minimum} in the metric's bad direction, a 95 % "
         "interval of the change that excludes no change, and a two-sided p-value that passes "
         f"Benjamini-Hochberg at FDR {fdr} across all candidate findings of the audit. The "
         "p-value is the normal approximation with the bootstrap standard error of the change, "
         "so its smallest value does not depend on the number of resamples."),
        ("\"Clear drop found\" in the verdict means a condition has such a finding. \"No clear "
         "drop found\" means it has none, which with a wide interval can also mean that the "
         "test set was too small to tell."),
        ("Traffic lights: green means no finding, amber an effect below twice the minimum "
         "relevant difference, red an effect above it."),
    ]


def _sample_sizes(data: dict) -> list[dict]:
    rows = []
    for condition in data["conditions"]:
        if condition.get("kind") == "shift":
            continue
        effective = condition.get("effective_n")
        rows.append({"label": condition_label(condition), "kind": condition.get("kind", ""),
                     "n": condition.get("n", ""),
                     "effective_n": f"{effective:.0f}" if is_number(effective) else "",
                     "assessed": "no, too small" if condition.get("too_small") else "yes"})
    return rows


def _repro_value(name: str, value: Any) -> str:
    """Write one reproducibility value in words, durations (names ending in "_seconds" or
    "_s") in seconds."""
    if isinstance(value, dict):
        return ", ".join(f"{pretty_name(_duration_name(k))}: {_repro_value(k, v)}"
                         for k, v in value.items())
    if isinstance(value, list):
        return ", ".join(_repro_value(name, v) for v in value)
    if is_number(value) and _duration_name(name) != name:
        return fmt_seconds(value)
    if is_number(value):
        return fmt_plain(value) if float(value).is_integer() else f"{value:.4g}"
    return str(value)


def _duration_name(name: str) -> str:
    """Return `name` without a "_seconds" or "_s" ending, unchanged when it has none."""
    for ending in ("_seconds", "_s"):
        if name.endswith(ending):
            return name[:-len(ending)]
    return name


def _reproducibility(data: dict) -> tuple[list[tuple[str, str]], list[tuple[str, str]], str]:
    repro = dict(data.get("reproducibility") or {})
    spec = repro.pop("spec", None)
    packages = repro.pop("packages", None) or {}
    items = [(pretty_name(name), _repro_value(name, value)) for name, value in repro.items()]
    spec_text = ""
    if isinstance(spec, str):
        spec_text = spec
    elif spec is not None:
        spec_text = yaml.safe_dump(spec, sort_keys=False, allow_unicode=True)
    return items, sorted(packages.items()), spec_text


def _reliability_tables(data: dict, lookup: Lookup) -> list[tuple[str, list[dict]]]:
    """Build the reliability bins of each condition, labelled as in the tables, with integer
    counts."""
    tables = []
    for key, bins in (data.get("reliability") or {}).items():
        condition = lookup.conditions.get(key)
        if condition is None and key.startswith("recalibrated:"):
            of = lookup.conditions.get(key[len("recalibrated:"):])
            label = f"{condition_label(of)}, after recalibration" if of else key
        else:
            label = condition_label(condition) if condition else key
        rows = [{"range": f"{fmt(b.get('lower'), 2)}–{fmt(b.get('upper'), 2)}",
                 "count": fmt_count(b.get("count", 0)), "confidence": fmt(b.get("confidence")),
                 "accuracy": fmt(b.get("accuracy"))} for b in bins]
        tables.append((label, rows))
    return tables


def _contact_sheet(data: dict) -> str | None:
    encoded = data.get("contact_sheet_png")
    if not encoded:
        return None
    try:
        raw = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise ReportDataError("report data contact_sheet_png is not valid base64") from None
    if not raw.startswith(b"\x89PNG"):
        raise ReportDataError("report data contact_sheet_png does not contain a PNG image")
    return encoded


def _filled(section: dict, keys: tuple[str, ...]) -> dict:
    """Copy of `section` where the listed keys read "–" when missing or None, for display."""
    filled = dict(section)
    for key in keys:
        if filled.get(key) is None:
            filled[key] = "–"
    filled.setdefault("classes", [])
    filled["classes"] = filled["classes"] or []
    return filled


def _paragraphs(text: Any) -> list[str]:
    if not text:
        return []
    return [part.strip() for part in str(text).split("\n\n") if part.strip()]


# ---- the view the templates read ---------------------------------------------------------------

def build_view(data: dict) -> dict:
    """Collect every sentence, table and figure the templates lay out."""
    check_report_data(data)
    lookup = Lookup(data)
    # Every optional figure name is present, as None when the data has nothing to draw.
    figures: dict[str, Figure | None] = dict.fromkeys(OPTIONAL_FIGURES)
    figures.update(build_figures(data, lookup))
    classes = consequence_classes(data)
    drawn = {figure.anchor for figure in figures.values() if figure is not None}
    findings = [finding_view(f, lookup, classes, drawn) for f in sorted_findings(data)]
    top = [finding_view(f, lookup, classes, drawn) for f in top_findings(data, lookup)]
    repro_items, packages, spec_text = _reproducibility(data)
    audit = _filled(data["audit"], ("id", "created_at", "kind", "status", "planner"))
    audit["created_at"] = fmt_timestamp(data["audit"].get("created_at")) or "–"
    audit["wall_time"] = fmt_seconds(data["audit"].get("wall_seconds"))
    reviews = [{**review, "created_at": fmt_timestamp(review.get("created_at"))}
               for review in data.get("reviews") or []]
    return {
        "schema_version": data["schema_version"],
        "audit": audit,
        "model": _filled(data["model"], ("arch", "checkpoint", "checkpoint_sha256",
                                         "input_size")),
        "dataset": _filled(data["data"], ("name", "n_train", "n_calibration", "n_test",
                                          "data_hash")),
        "verdict": verdict_view(data, lookup),
        "min_class_rows": _min_class_rows(),
        "gates": data.get("gates"),
        "top_findings": top,
        "more_findings": len(findings) - len(top),
        "all_findings": findings,
        "finding_conditions": {f["condition"] for f in audited_model_findings(findings)},
        "metric_table": metric_table(data, lookup),
        "class_table": class_table(data, lookup),
        "differences": difference_rows(data, lookup),
        "figures": figures,
        "severity_figures": [f for name, f in figures.items()
                             if f is not None and name.startswith("severity-")],
        "reliability_tables": _reliability_tables(data, lookup),
        "contact_sheet": _contact_sheet(data),
        "calibration": _calibration_view(data, lookup),
        "referral": _referral_view(data, lookup),
        "mitigation": _mitigation_view(data, lookup),
        "plan": _plan_view(data, lookup),
        "methods": _methods(data),
        "sample_sizes": _sample_sizes(data),
        "limitations": limitations(data, lookup),
        "glossary": glossary(data, lookup),
        "repro_items": repro_items,
        "packages": packages,
        "spec_text": spec_text,
        "reviews": reviews,
        "narrative": _paragraphs(data.get("narrative")),
        # The first consequence of the top finding, repeated in the verdict box.
        "patient": next(({"sentence": f["consequences"][0], "id": f["id"]}
                         for f in top if f["consequences"]), None),
    }


def _render_html_view(view: dict) -> str:
    css = (TEMPLATES / "style.css").read_text()
    return _environment(html=True).get_template("report.html.j2").render(v=view, css=css)


def _render_markdown_view(view: dict, figure_dir: str) -> str:
    return _environment(html=False).get_template("report.md.j2").render(
        v=view, figure_dir=figure_dir)


def render_html(data: dict) -> str:
    """Render the report as one self-contained HTML page (inline CSS and SVG, no fetches)."""
    return _render_html_view(build_view(data))


def render_markdown(data: dict, figure_dir: str = FIGURE_DIR) -> str:
    """Render the report as Markdown; figures are linked as `<figure_dir>/<name>.svg`."""
    return _render_markdown_view(build_view(data), figure_dir)


def _json_safe(value: Any) -> Any:
    """Replace NaN and infinities by None, because JSON has no literal for them."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def render_json(data: dict) -> str:
    """Serialise the report data as JSON, schema_version first; NaN values become null."""
    check_report_data(data)
    ordered = {"schema_version": data["schema_version"]}
    ordered.update((k, v) for k, v in data.items() if k != "schema_version")
    return json.dumps(_json_safe(ordered), indent=2, ensure_ascii=False, allow_nan=False) + "\n"


def write_report(data: dict, out_dir: Path) -> dict[str, Path]:
    """Write report.html, report.md, report.json and the Markdown's figures into `out_dir`.

    Returns the written paths keyed by "html", "markdown", "json" and "figure:<name>".
    """
    out_dir = Path(out_dir)
    view = build_view(data)
    figure_folder = out_dir / FIGURE_DIR
    figure_folder.mkdir(parents=True, exist_ok=True)

    written: dict[str, Path] = {}
    figures: dict[str, Figure | None] = view["figures"]
    for name, figure in figures.items():
        if figure is None:
            continue
        path = figure_folder / f"{name}.svg"
        path.write_text(figure.svg + "\n", encoding="utf-8")
        written[f"figure:{name}"] = path
    if view["contact_sheet"]:
        path = figure_folder / "contact-sheet.png"
        path.write_bytes(base64.b64decode(view["contact_sheet"]))
        written["figure:contact-sheet"] = path

    outputs = {
        "html": ("report.html", _render_html_view(view)),
        "markdown": ("report.md", _render_markdown_view(view, FIGURE_DIR)),
        "json": ("report.json", render_json(data)),
    }
    for key, (filename, text) in outputs.items():
        path = out_dir / filename
        path.write_text(text, encoding="utf-8")
        written[key] = path
    return written
