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
    RECALIBRATION_KINDS,
    Lookup,
    ReportDataError,
    check_report_data,
    class_table,
    condition_label,
    consequence_classes,
    difference_rows,
    finding_view,
    fmt,
    fmt_interval,
    fmt_p,
    fmt_params,
    fmt_percent,
    glossary,
    is_number,
    limitations,
    metric_table,
    pretty_name,
    sorted_findings,
    top_findings,
    verdict_view,
)
from tools.report.figures import Figure, build_figures

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
                "delta": fmt(change.get("delta")),
                "interval": fmt_interval(change.get("low"), change.get("high")),
                "p_value": fmt_p(change.get("p_value")),
                "verdict": _change_verdict(change),
            })
    return {"summary": summary, "sentence": calibration.get("sentence"), "rows": rows}


def _change_verdict(change: dict) -> str:
    """Judge one metric's change under recalibration from its own interval.

    ECE, NLL and Brier score are better lower. The confidence gap is signed (confidence minus
    accuracy), so its change alone says neither better nor worse and gets no verdict.
    """
    low, high = change.get("low"), change.get("high")
    if change.get("metric") == "confidence_gap" or not (is_number(low) and is_number(high)):
        return "–"
    if high < 0:
        return "helped"
    if low > 0:
        return "harmed"
    return "no clear change"


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
    summary = (f"Target: accepted predictions at {fmt_percent(referral.get('target'))} "
               f"{target_metric}, with predictions below the confidence threshold "
               f"{fmt(referral.get('threshold'))} ({score_words}) referred to a clinician.")
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
    return {"summary": summary, "sentence": referral.get("sentence"), "rows": rows,
            "target_metric": target_metric}


def _mitigation_view(data: dict, lookup: Lookup) -> dict | None:
    """Augment-and-retrain outcome, from the "mitigation" artifact (AugmentRetrainOutput)."""
    mitigation = data.get("mitigation")
    if not mitigation:
        return None
    metric = lookup.display(mitigation.get("metric", ""))

    policy = mitigation.get("policy") or {}
    steps = [f"{pretty_name(step.get('shift', ''))} with probability "
             f"{fmt(step.get('probability'), 2)}" for step in policy.get("steps") or []]
    summary = "Augment and retrain"
    if steps:
        summary += ": the model was retrained with " + "; ".join(steps)
    summary += "."
    if mitigation.get("new_audit_id"):
        summary += f" The retrained model was audited as {mitigation['new_audit_id']}."
    clean = (f"{metric} on the clean test set: {fmt(mitigation.get('clean_before'))} before, "
             f"{fmt(mitigation.get('clean_after'))} after retraining.")
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
    note = f"Retraining took {seconds:.0f} s." if is_number(seconds) else ""
    return {"summary": summary, "clean": clean, "overall": overall, "rows": rows,
            "metric": metric, "note": note}


# ---- plan, methods, reproducibility ------------------------------------------------------------

def _plan_view(data: dict, lookup: Lookup) -> dict:
    plan = data["plan"]
    cost = plan.get("cost") or {}
    cost_text = ""
    if cost:
        seconds = cost.get("estimated_seconds")
        seconds_text = f"{seconds:.0f}" if is_number(seconds) else "?"
        cost_text = (f"{cost.get('conditions', '?')} conditions, "
                     f"{cost.get('images_predicted', '?')} images predicted, about "
                     f"{seconds_text} s (estimate")
        cost_text += f"; {cost['note']})." if cost.get("note") else ")."
    return {
        "primary": lookup.display(plan.get("primary_metric", "")),
        "primary_reason": plan.get("primary_reason") or "",
        "metrics": [{"display": lookup.display(m["id"]), "id": m["id"],
                     "params": fmt_params(m.get("params")), "reason": m.get("reason", "")}
                    for m in plan.get("metrics", [])],
        "shifts": [{"name": pretty_name(s["name"]),
                    "severities": ", ".join(str(x) for x in s.get("severities", [])),
                    "reason": s.get("reason", "")} for s in plan.get("shifts", [])],
        "subgroups": [{"column": s.get("column", ""),
                       "bands": ", ".join(str(b) for b in s["bands"]) if s.get("bands") else "",
                       "reason": s.get("reason", "")} for s in plan.get("subgroups", [])],
        "cost": cost_text,
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
        (f"Intervals are 95 % bootstrap percentile intervals from {resamples}resamples of the "
        "test images."),
        ("Image shifts are applied to the clean test images and compared with them on the same "
        "images (paired bootstrap). Subgroups and sites are compared with the rest of the test "
        "set (unpaired bootstrap)."),
        (f"A finding needs a change of at least {minimum} in the metric's bad direction, a 95 % "
        "interval of the change that excludes 0, and a two-sided p-value that passes "
        f"Benjamini-Hochberg at FDR {fdr} across all candidate findings of the audit. The "
        "p-value is the normal approximation with the bootstrap standard error of the change, "
        "so its smallest value does not depend on the number of resamples."),
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


def _reproducibility(data: dict) -> tuple[list[tuple[str, str]], list[tuple[str, str]], str]:
    repro = dict(data.get("reproducibility") or {})
    spec = repro.pop("spec", None)
    packages = repro.pop("packages", None) or {}
    items = []
    for name, value in repro.items():
        if isinstance(value, dict):
            value = ", ".join(f"{k} = {v}" for k, v in value.items())
        elif isinstance(value, list):
            value = ", ".join(str(v) for v in value)
        items.append((pretty_name(name), str(value)))
    spec_text = ""
    if isinstance(spec, str):
        spec_text = spec
    elif spec is not None:
        spec_text = yaml.safe_dump(spec, sort_keys=False, allow_unicode=True)
    return items, sorted(packages.items()), spec_text


def _reliability_tables(data: dict) -> list[tuple[str, list[dict]]]:
    tables = []
    for key, bins in (data.get("reliability") or {}).items():
        rows = [{"range": f"{fmt(b.get('lower'), 2)}–{fmt(b.get('upper'), 2)}",
                 "count": b.get("count", 0), "confidence": fmt(b.get("confidence")),
                 "accuracy": fmt(b.get("accuracy"))} for b in bins]
        tables.append((key, rows))
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
    findings = [finding_view(f, lookup, classes) for f in sorted_findings(data)]
    top = [finding_view(f, lookup, classes) for f in top_findings(data, lookup)]
    repro_items, packages, spec_text = _reproducibility(data)
    return {
        "schema_version": data["schema_version"],
        "audit": _filled(data["audit"], ("id", "created_at", "kind", "status", "planner")),
        "model": _filled(data["model"], ("arch", "checkpoint", "checkpoint_sha256",
                                         "input_size")),
        "dataset": _filled(data["data"], ("name", "n_train", "n_calibration", "n_test",
                                          "data_hash")),
        "verdict": verdict_view(data, lookup),
        "top_findings": top,
        "more_findings": len(findings) - len(top),
        "all_findings": findings,
        "finding_conditions": {f["condition"] for f in findings
                               if f.get("kind") not in RECALIBRATION_KINDS},
        "metric_table": metric_table(data, lookup),
        "class_table": class_table(data, lookup),
        "differences": difference_rows(data, lookup),
        "figures": figures,
        "severity_figures": [f for name, f in figures.items()
                             if f is not None and name.startswith("severity-")],
        "reliability_tables": _reliability_tables(data),
        "contact_sheet": _contact_sheet(data),
        "calibration": _calibration_view(data, lookup),
        "referral": _referral_view(data, lookup),
        "mitigation": _mitigation_view(data, lookup),
        "plan": _plan_view(data, lookup),
        "methods": _methods(data),
        "sample_sizes": _sample_sizes(data),
        "limitations": limitations(data),
        "glossary": glossary(data, lookup),
        "repro_items": repro_items,
        "packages": packages,
        "spec_text": spec_text,
        "reviews": list(data.get("reviews") or []),
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
