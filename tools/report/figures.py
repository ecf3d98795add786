"""The report's plots, drawn with matplotlib and returned as SVG text.

Figures are built on `matplotlib.figure.Figure` without pyplot, so drawing leaves no global
state behind. Text stays text in the SVG (`svg.fonttype = "none"`), which keeps files small and
searchable, and each figure gets its own hash salt so that clip-path ids do not collide when
several SVGs are inlined into one HTML page.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass

from tools.report.content import (
    LIGHT_ORDER,
    Lookup,
    condition_label,
    condition_parts,
    is_number,
    pretty_name,
    shift_name,
    slug,
)

COLOURS = {"red": "#c0392b", "amber": "#d68910", "green": "#1e8449", "line": "#1f4e79",
           "band": "#9fbfdf", "reference": "#7f7f7f", "after": "#117a65"}
SERIES = ["#1f4e79", "#c0392b", "#d68910", "#117a65", "#6c3483", "#7f7f7f"]
MAX_RELIABILITY_PANELS = 9


@dataclass
class Figure:
    """One plot: its file stem, the HTML id of its section, caption and SVG text."""

    name: str
    anchor: str
    title: str
    caption: str
    svg: str


# Applied while every figure is built, because text and axes read rcParams when created.
STYLE = {"svg.fonttype": "none", "font.size": 8, "font.family": "sans-serif",
         "axes.spines.top": False, "axes.spines.right": False, "axes.titlesize": 8}


def _to_svg(figure, salt: str) -> str:
    """Serialise a matplotlib figure to SVG text fit for inlining into HTML."""
    import matplotlib

    buffer = io.StringIO()
    with matplotlib.rc_context({"svg.hashsalt": salt}):
        figure.savefig(buffer, format="svg", metadata={"Date": None, "Creator": None},
                       bbox_inches="tight")
    text = buffer.getvalue()

    # The XML prolog, DOCTYPE and RDF metadata are not needed inline, and the DOCTYPE and
    # metadata name external URLs that a strict no-fetch check would flag.
    text = re.sub(r"<\?xml[^>]*\?>\s*", "", text)
    text = re.sub(r"<!DOCTYPE[^>]*>\s*", "", text)
    text = re.sub(r"<metadata>.*?</metadata>\s*", "", text, flags=re.DOTALL)
    return text.strip()


def _new_figure(width: float, height: float):
    from matplotlib.figure import Figure as MplFigure

    return MplFigure(figsize=(width, height), dpi=100)


def _grid(figure, count: int, columns: int):
    rows = (count + columns - 1) // columns
    axes = figure.subplots(rows, columns, squeeze=False)
    flat = [axis for row in axes for axis in row]
    for axis in flat[count:]:
        axis.set_visible(False)
    return flat[:count]


def _finding_lights(data: dict) -> dict[tuple[str, str], str]:
    lights: dict[tuple[str, str], str] = {}
    for finding in data.get("findings") or []:
        key = (finding.get("condition"), finding.get("metric"))
        light = finding.get("light", "amber")
        if key not in lights or LIGHT_ORDER.get(light, 3) < LIGHT_ORDER.get(lights[key], 3):
            lights[key] = light
    return lights


def severity_figures(data: dict, lookup: Lookup) -> list[Figure]:
    """Draw one figure per planned shift: each whole-set metric against severity, clean at 0."""
    shifts: dict[str, list[dict]] = {}
    for condition in data["conditions"]:
        if condition.get("kind") == "shift" and is_number(condition.get("severity")):
            shifts.setdefault(shift_name(condition), []).append(condition)
    columns = lookup.metric_columns()
    lights = _finding_lights(data)
    figures = []
    for name, conditions in shifts.items():
        conditions = sorted(conditions, key=lambda c: c["severity"])
        salt = f"curve-{slug(name)}"
        per_row = min(3, len(columns))
        rows = (len(columns) + per_row - 1) // per_row
        figure = _new_figure(3.0 * per_row, 2.3 * rows)
        for axis, (metric, params) in zip(_grid(figure, len(columns), per_row), columns):
            points = [(0, lookup.result("clean", metric, params))]
            points += [(c["severity"], lookup.result(c["key"], metric, params))
                       for c in conditions]
            points = [(x, row) for x, row in points if row and is_number(row.get("value"))]
            if not points:
                axis.set_title(f"{lookup.column_label(metric, params)}: no values")
                continue
            xs = [x for x, _ in points]
            ys = [row["value"] for _, row in points]
            banded = [(x, row) for x, row in points
                      if is_number(row.get("low")) and is_number(row.get("high"))]
            if banded:
                axis.fill_between([x for x, _ in banded], [row["low"] for _, row in banded],
                                  [row["high"] for _, row in banded], color=COLOURS["band"],
                                  alpha=0.5, linewidth=0, label="95 % interval")
            axis.plot(xs, ys, marker="o", markersize=3.5, color=COLOURS["line"])
            axis.axhline(ys[0] if xs[0] == 0 else float("nan"), color=COLOURS["reference"],
                         linewidth=0.8, linestyle="--")
            for condition in conditions:
                light = lights.get((condition["key"], metric))
                row = lookup.result(condition["key"], metric, params)
                if light and row and is_number(row.get("value")):
                    axis.plot([condition["severity"]], [row["value"]], marker="o", markersize=6,
                              color=COLOURS.get(light, COLOURS["amber"]), zorder=5)
            better = "higher is better" if lookup.higher_is_better(metric) else "lower is better"
            axis.set_title(f"{lookup.column_label(metric, params)} ({better})")
            axis.set_xticks(range(6))
            axis.set_xticklabels(["clean", "1", "2", "3", "4", "5"])
            axis.set_xlabel("severity")
        figure.suptitle(pretty_name(name), fontsize=10, x=0.01, ha="left")
        figure.tight_layout()
        figures.append(Figure(
            name=f"severity-{slug(name)}", anchor=salt,
            title=f"Metrics against severity: {pretty_name(name)}",
            caption="Point estimates with 95 % intervals (shaded); the dashed line is the clean "
                    "test set; red and amber dots mark findings.",
            svg=_to_svg(figure, salt)))
    return figures


def _reliability_panel(axis, bins: list[dict], label: str, colour: str, bars: bool) -> None:
    filled = [b for b in bins if b.get("count") and is_number(b.get("accuracy"))
              and is_number(b.get("confidence"))]
    axis.plot([0, 1], [0, 1], color=COLOURS["reference"], linewidth=0.8, linestyle="--")
    if bars:
        axis.bar([b["lower"] for b in filled], [b["accuracy"] for b in filled],
                 width=[b["upper"] - b["lower"] for b in filled], align="edge",
                 color=COLOURS["band"], edgecolor=colour, linewidth=0.6, label="accuracy")
        axis.plot([b["confidence"] for b in filled], [b["accuracy"] for b in filled],
                  linestyle="none", marker="o", markersize=2.5, color=colour)
    else:
        axis.plot([b["confidence"] for b in filled], [b["accuracy"] for b in filled],
                  marker="o", markersize=3, color=colour, label=label)
    axis.set_xlim(0, 1)
    axis.set_ylim(0, 1)
    axis.set_aspect("equal")
    axis.set_xlabel("confidence")
    axis.set_ylabel("accuracy")


def reliability_keys(data: dict, lookup: Lookup) -> list[str]:
    """Clean, the strongest severity of each shift, then conditions with a calibration finding."""
    available = data.get("reliability") or {}
    keys = [k for k in ("clean",) if k in available]
    strongest: dict[str, dict] = {}
    for condition in data["conditions"]:
        if condition["key"] in available and condition.get("kind") == "shift":
            name = shift_name(condition)
            if name not in strongest or condition["severity"] > strongest[name]["severity"]:
                strongest[name] = condition
    keys += [c["key"] for c in strongest.values()]
    for finding in data.get("findings") or []:
        key = finding.get("condition")
        if finding.get("kind") == "calibration" and key in available and key not in keys:
            keys.append(key)
    return keys[:MAX_RELIABILITY_PANELS]


def reliability_figure(data: dict, lookup: Lookup) -> Figure | None:
    keys = reliability_keys(data, lookup)
    if not keys:
        return None
    salt = "reliability"
    per_row = min(3, len(keys))
    rows = (len(keys) + per_row - 1) // per_row
    figure = _new_figure(2.7 * per_row, 2.7 * rows)
    for axis, key in zip(_grid(figure, len(keys), per_row), keys):
        condition = lookup.conditions.get(key, {"key": key, "kind": "other", "name": key})
        _reliability_panel(axis, data["reliability"][key], key, COLOURS["line"], bars=True)
        title = condition_label(condition)
        ece = lookup.result(key, "ece_top_label")
        if ece and is_number(ece.get("value")):
            title += f"\nECE {ece['value']:.3f}"
        axis.set_title(title)
    figure.tight_layout()
    return Figure(name="reliability", anchor="reliability", title="Reliability diagrams",
                  caption="Accuracy per confidence bin (bars) against the diagonal of perfect "
                          "calibration; dots mark each bin's mean confidence. Bars below the "
                          "diagonal mean overconfidence.",
                  svg=_to_svg(figure, salt))


def forest_figure(data: dict, lookup: Lookup) -> Figure | None:
    """Primary metric per subgroup, site and external set, against the clean test set."""
    metric = data["plan"].get("primary_metric")
    lights = _finding_lights(data)
    rows = []
    for condition in data["conditions"]:
        if condition.get("kind") not in ("subgroup", "site", "external"):
            continue
        column, value = condition_parts(condition)
        label = f"{column} = {value} (n={condition.get('n')})"
        if condition.get("kind") == "external":
            label = f"external {condition.get('name')} (n={condition.get('n')})"
        row = lookup.result(condition["key"], metric) if metric else None
        rows.append((label, condition, row))
    if not rows or not metric:
        return None

    salt = "forest"
    figure = _new_figure(6.5, 0.9 + 0.28 * len(rows))
    axis = figure.subplots()
    clean = lookup.result("clean", metric)
    if clean and is_number(clean.get("value")):
        axis.axvline(clean["value"], color=COLOURS["reference"], linestyle="--", linewidth=0.9,
                     label="clean test set")
    for position, (label, condition, row) in enumerate(reversed(rows)):
        if condition.get("too_small") or not row or not is_number(row.get("value")):
            axis.text(0.01, position, "too small to assess" if condition.get("too_small")
                      else "no value", transform=axis.get_yaxis_transform(), va="center",
                      color=COLOURS["reference"], fontsize=7)
            continue
        colour = COLOURS.get(lights.get((condition["key"], metric), ""), COLOURS["line"])
        if is_number(row.get("low")) and is_number(row.get("high")):
            axis.plot([row["low"], row["high"]], [position, position], color=colour,
                      linewidth=1.4)
        axis.plot([row["value"]], [position], marker="s", markersize=5, color=colour)
    axis.set_yticks(range(len(rows)))
    axis.set_yticklabels([label for label, _, _ in reversed(rows)])
    axis.set_ylim(-0.7, len(rows) - 0.3)
    axis.set_xlabel(f"{lookup.display(metric)} with 95 % interval")
    axis.legend(loc="lower left", bbox_to_anchor=(0, 1.0), frameon=False, fontsize=7)
    figure.tight_layout()
    return Figure(name="forest", anchor="forest", title="Subgroups and sites",
                  caption=f"{lookup.display(metric)} per subgroup with its 95 % interval; the "
                          "dashed line is the whole clean test set; red and amber mark findings.",
                  svg=_to_svg(figure, salt))


def calibration_figure(data: dict, lookup: Lookup) -> Figure | None:
    """Reliability before and after recalibration, one panel per condition.

    Reads the bins from each verdict of the "calibration" artifact, and otherwise pairs every
    "recalibrated:<key>" entry of data["reliability"] with "<key>".
    """
    calibration = data.get("calibration") or {}
    available = data.get("reliability") or {}
    pairs = []
    for verdict in calibration.get("verdicts") or []:
        if verdict.get("reliability_before") and verdict.get("reliability_after"):
            pairs.append((verdict.get("condition", ""), verdict["reliability_before"],
                          verdict["reliability_after"]))
    if not pairs:
        pairs = [(key[len("recalibrated:"):], available[key[len("recalibrated:"):]],
                  available[key]) for key in available
                 if key.startswith("recalibrated:") and key[len("recalibrated:"):] in available]
    if not pairs:
        return None
    salt = "calibration"
    per_row = min(3, len(pairs))
    rows = (len(pairs) + per_row - 1) // per_row
    figure = _new_figure(2.7 * per_row, 2.9 * rows)
    for axis, (key, before, after) in zip(_grid(figure, len(pairs), per_row), pairs):
        _reliability_panel(axis, before, "before", COLOURS["red"], bars=False)
        _reliability_panel(axis, after, "after", COLOURS["after"], bars=False)
        condition = lookup.conditions.get(key, {"key": key, "kind": "other", "name": key})
        axis.set_title(condition_label(condition))
        axis.legend(loc="upper left", frameon=False, fontsize=7)
    figure.tight_layout()
    return Figure(name="calibration", anchor="calibration",
                  title="Reliability before and after recalibration",
                  caption="Accuracy against mean confidence per bin, before (red) and after "
                          "(green) recalibration; the diagonal is perfect calibration.",
                  svg=_to_svg(figure, salt))


def risk_coverage_figure(data: dict, lookup: Lookup) -> Figure | None:
    referral = data.get("referral") or {}
    curves = referral.get("curves") or {}
    if not curves:
        return None
    salt = "referral"
    figure = _new_figure(5.0, 3.2)
    axis = figure.subplots()
    for index, (key, curve) in enumerate(curves.items()):
        condition = lookup.conditions.get(key, {"key": key, "kind": "other", "name": key})
        axis.plot(curve.get("coverage", []), curve.get("risk", []),
                  color=SERIES[index % len(SERIES)], label=condition_label(condition))
    target = referral.get("target")
    if is_number(target) and referral.get("target_metric", "accuracy") == "accuracy":
        axis.axhline(1 - target, color=COLOURS["reference"], linestyle="--", linewidth=0.8,
                     label=f"risk at target ({1 - target:.2f})")
    axis.set_xlabel("coverage (share of predictions accepted)")
    axis.set_ylabel("risk (error rate of accepted)")
    axis.set_xlim(0, 1)
    axis.legend(frameon=False, fontsize=7)
    figure.tight_layout()
    return Figure(name="risk-coverage", anchor="referral", title="Risk against coverage",
                  caption="Error rate among accepted predictions as more of them are accepted, "
                          "ordered by confidence.",
                  svg=_to_svg(figure, salt))


def build_figures(data: dict, lookup: Lookup) -> dict[str, Figure]:
    """Draw every figure the data allows, keyed by file stem, in report order."""
    import matplotlib

    with matplotlib.rc_context(STYLE):
        figures = severity_figures(data, lookup)
        for draw in (reliability_figure, forest_figure, calibration_figure,
                     risk_coverage_figure):
            extra = draw(data, lookup)
            if extra is not None:
                figures.append(extra)
    return {figure.name: figure for figure in figures}
