"""Markdown, HTML and JSON reports of an LLM audit, with the abstention curve as SVG.

The HTML file is self-contained: the plot is inlined SVG and the styles sit in the page, so it
opens offline and fetches nothing.
"""

from __future__ import annotations

import io
import json
import re
from pathlib import Path
from typing import Any

import jinja2

# Scores drawn in the abstention plot; the table lists all of them.
PLOTTED_SCORES = ["spectral_total", "kernel_entropy_total", "semantic_entropy",
                  "kernel_language_entropy"]
COLOURS = ["#1f4e79", "#c0392b", "#d68910", "#117a65"]


def abstention_svg(report: dict[str, Any]) -> str:
    """Draw accuracy against coverage for the main scores and return the figure as SVG text."""
    import matplotlib
    from matplotlib.figure import Figure

    figure = Figure(figsize=(5.5, 3.4))
    axes = figure.add_subplot()
    for name, colour in zip(PLOTTED_SCORES, COLOURS):
        curve = report["abstention"].get(name) or []
        if not curve:
            continue
        axes.plot([point["coverage"] for point in curve], [point["accuracy"] for point in curve],
                  label=name, color=colour, linewidth=1.2, marker="o", markersize=2.5)
    if report.get("accuracy") is not None:
        axes.axhline(report["accuracy"], color="#7f7f7f", linestyle="--", linewidth=1,
                     label="accuracy without abstention")
    axes.set_xlabel("coverage (share of questions answered)")
    axes.set_ylabel("accuracy of answered questions")
    axes.set_xlim(0, 1.02)
    axes.set_ylim(-0.02, 1.02)
    axes.legend(fontsize=7, loc="lower left", frameon=False)

    buffer = io.StringIO()
    settings = {"svg.fonttype": "none", "svg.hashsalt": "abstention", "font.size": 8,
                "axes.spines.top": False, "axes.spines.right": False}
    with matplotlib.rc_context(settings):
        figure.savefig(buffer, format="svg", metadata={"Date": None}, bbox_inches="tight")
    # The XML prolog and DOCTYPE are not allowed inside HTML, and the DOCTYPE and the RDF
    # metadata name external URLs that a no-fetch check of the page would flag.
    text = re.sub(r"<\?xml[^>]*\?>\s*", "", buffer.getvalue())
    text = re.sub(r"<!DOCTYPE[^>]*>\s*", "", text)
    return re.sub(r"<metadata>.*?</metadata>\s*", "", text, flags=re.DOTALL)


def aleatoric_note(report: dict[str, Any]) -> str:
    """Explain how far the aleatoric scores can be read as ambiguity in this audit."""
    return (
        f"{report['n_single_reading']} of {report['n_questions']} questions got a single reading "
        "from the clarifier, which forces their aleatoric scores to 0. Aleatoric scores also grow "
        "with gamma (a narrower kernel) when answers scatter, so compare them against questions "
        "known to be unambiguous before reading them as ambiguity."
    )


def _number(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _interval(entry: dict[str, Any], metric: str) -> str:
    low, high = entry.get(f"{metric}_low"), entry.get(f"{metric}_high")
    if low is None or high is None:
        return ""
    return f" [{low:.3f}, {high:.3f}]"


def detection_rows(report: dict[str, Any], task: str) -> list[dict[str, str]]:
    """Format one detection table (`error_detection` or `ambiguity_detection`) as text cells."""
    rows = []
    for name, entry in report.get(task, {}).items():
        rows.append({
            "score": name,
            "description": report["scores_info"].get(name, ""),
            "auroc": _number(entry["auroc"]) + _interval(entry, "auroc"),
            "aupr": _number(entry["aupr"]) + _interval(entry, "aupr"),
            "n": f"{entry['n']} ({entry['n_positive']} positive)",
            "note": entry.get("reason") or (
                f"{entry['n_undefined']} questions with undefined score left out"
                if entry.get("n_undefined") else ""
            ),
        })
    return rows


def _markdown_escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_markdown(report: dict[str, Any]) -> str:
    """Render the report as Markdown; the plot is linked as `abstention.svg` beside the file."""
    settings = report["settings"]
    lines = [
        f"# LLM audit {report['audit_id']}",
        "",
        f"- Target model: `{report['target']['model']}`; clarifier: `{report['clarifier']['model']}`",
        (f"- QA file: `{report['qa_file']}` (sha256 {report['qa_sha256'][:12]}…), "
        f"{report['n_questions']} questions answered, {len(report['skipped'])} skipped"),
        f"- Accuracy of the low-temperature answer: {_number(report['accuracy'])}",
        (f"- Samples: up to {settings['n_clarifications']} clarifications × "
        f"{settings['n_answers']} answers at temperature {settings['temperature']}"),
        f"- RBF kernel gamma {settings['gamma']} on {report['embedder']} embeddings",
        (f"- An answer is correct when it contains an accepted answer after normalising, or its "
        f"cosine similarity to one is at least {settings['similarity_threshold']}"),
        f"- Entailment for semantic entropy and kernel language entropy: {report['entailment']}",
        "",
    ]
    lines += [f"{aleatoric_note(report)}", ""]
    if report["identifier_warnings"]:
        lines += ["## Warnings", ""]
        lines += [f"- {_markdown_escape(message)}" for message in report["identifier_warnings"]]
        lines.append("")

    tasks = [("error_detection", "Error detection (positive = wrong answer)"),
             ("ambiguity_detection", "Ambiguity detection (positive = question labelled ambiguous)")]
    for task, title in tasks:
        rows = detection_rows(report, task)
        if not rows:
            continue
        lines += [f"## {title}", "",
                  "AUROC and average precision with 95 % bootstrap intervals over questions.", "",
                  "| score | AUROC | AUPR | n | note |", "|---|---|---|---|---|"]
        lines += [f"| {row['score']} | {row['auroc']} | {row['aupr']} | {row['n']} | "
                  f"{_markdown_escape(row['note'])} |" for row in rows]
        lines.append("")

    lines += ["## Accuracy against coverage", "",
              "Questions withheld in order of decreasing uncertainty.", "",
              "![accuracy against coverage](abstention.svg)", ""]

    lines += ["## Questions", "",
              "| id | correct | response | spectral total | aleatoric | epistemic |",
              "|---|---|---|---|---|---|"]
    for question in report["questions"]:
        scores = question["scores"]
        lines.append(
            f"| {_markdown_escape(question['id'])} | {'yes' if question['correct'] else 'no'} | "
            f"{_markdown_escape(question['response'][:80])} | "
            f"{_number(scores['spectral_total'])} | {_number(scores['spectral_aleatoric'])} | "
            f"{_number(scores['spectral_epistemic'])} |"
        )
    if report["skipped"]:
        lines += ["", "## Skipped questions", ""]
        lines += [f"- {entry['id']} (line {entry['line']}): {_markdown_escape(entry['reason'])}"
                  for entry in report["skipped"]]
    return "\n".join(lines) + "\n"


_HTML = jinja2.Environment(autoescape=True).from_string("""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>LLM audit {{ r.audit_id }}</title>
<style>
body { font-family: system-ui, sans-serif; max-width: 60rem; margin: 2rem auto; padding: 0 1rem;
       color: #222; line-height: 1.45; }
table { border-collapse: collapse; margin: 0.5rem 0 1.5rem; font-size: 0.9rem; }
th, td { border-bottom: 1px solid #ddd; padding: 0.25rem 0.6rem; text-align: left; }
.warning { background: #fdf2e9; border-left: 4px solid #d68910; padding: 0.4rem 0.8rem; }
.muted { color: #666; font-size: 0.9rem; }
</style></head><body>
<h1>LLM audit {{ r.audit_id }}</h1>
<ul>
<li>Target model <code>{{ r.target.model }}</code>, clarifier <code>{{ r.clarifier.model }}</code></li>
<li>QA file <code>{{ r.qa_file }}</code>: {{ r.n_questions }} questions answered,
    {{ r.skipped|length }} skipped</li>
<li>Accuracy of the low-temperature answer: {{ accuracy }}</li>
<li>Up to {{ s.n_clarifications }} clarifications × {{ s.n_answers }} answers at temperature
    {{ s.temperature }}; RBF kernel gamma {{ s.gamma }} on {{ r.embedder }} embeddings</li>
<li>Correct: contains an accepted answer after normalising, or cosine similarity to one of at
    least {{ s.similarity_threshold }}</li>
<li>Entailment for semantic entropy and kernel language entropy: {{ r.entailment }}</li>
</ul>
<p class="muted">{{ aleatoric_note }}</p>
{% for message in r.identifier_warnings %}<p class="warning">{{ message }}</p>{% endfor %}
{% for title, rows in tables %}{% if rows %}
<h2>{{ title }}</h2>
<p class="muted">AUROC and average precision with 95 % bootstrap intervals over questions.</p>
<table><tr><th>score</th><th>AUROC</th><th>AUPR</th><th>n</th><th>note</th></tr>
{% for row in rows %}<tr><td title="{{ row.description }}">{{ row.score }}</td><td>{{ row.auroc }}</td>
<td>{{ row.aupr }}</td><td>{{ row.n }}</td><td>{{ row.note }}</td></tr>
{% endfor %}</table>{% endif %}{% endfor %}
<h2>Accuracy against coverage</h2>
<p class="muted">Questions withheld in order of decreasing uncertainty.</p>
{{ svg|safe }}
<h2>Questions</h2>
<table><tr><th>id</th><th>correct</th><th>response</th><th>clarifications</th>
<th>spectral total</th><th>aleatoric</th><th>epistemic</th></tr>
{% for q in r.questions %}<tr><td>{{ q.id }}</td><td>{{ "yes" if q.correct else "no" }}</td>
<td>{{ q.response[:80] }}</td><td>{{ q.clarifications|length }}</td>
<td>{{ number(q.scores.spectral_total) }}</td><td>{{ number(q.scores.spectral_aleatoric) }}</td>
<td>{{ number(q.scores.spectral_epistemic) }}</td></tr>
{% endfor %}</table>
{% if r.skipped %}<h2>Skipped questions</h2><ul>
{% for entry in r.skipped %}<li>{{ entry.id }} (line {{ entry.line }}): {{ entry.reason }}</li>
{% endfor %}</ul>{% endif %}
</body></html>
""")


def render_html(report: dict[str, Any], svg: str) -> str:
    """Render the report as one self-contained HTML page with the SVG plot inlined."""
    tables = [
        ("Error detection (positive = wrong answer)", detection_rows(report, "error_detection")),
        ("Ambiguity detection (positive = question labelled ambiguous)",
         detection_rows(report, "ambiguity_detection")),
    ]
    return _HTML.render(r=report, s=report["settings"], tables=tables, svg=svg,
                        accuracy=_number(report["accuracy"]), number=_number,
                        aleatoric_note=aleatoric_note(report))


def write_llm_report(report: dict[str, Any], out: Path) -> dict[str, Path]:
    """Write report.json, report.md, report.html and abstention.svg into `out`; returns paths."""
    out.mkdir(parents=True, exist_ok=True)
    svg = abstention_svg(report)
    paths = {
        "json": out / "report.json",
        "markdown": out / "report.md",
        "html": out / "report.html",
        "svg": out / "abstention.svg",
    }
    paths["json"].write_text(json.dumps(report, indent=1), encoding="utf-8")
    paths["markdown"].write_text(render_markdown(report), encoding="utf-8")
    paths["html"].write_text(render_html(report, svg), encoding="utf-8")
    paths["svg"].write_text(svg, encoding="utf-8")
    return paths

