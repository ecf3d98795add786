"""Rendering of the report-data dict to HTML, Markdown and JSON."""

from __future__ import annotations

import copy
import json
import math
import re
from pathlib import Path

import pytest

from tools.report.content import ReportDataError, natural_frequency
from tools.report.pdf import ChromiumError, ReportFileError, html_to_pdf
from tools.report.render import render_html, render_json, render_markdown, write_report

FIXTURE = Path(__file__).parent / "fixtures" / "report_data.json"
SECTION_IDS = ["verdict", "findings", "evidence", "plan", "glossary", "reproducibility"]
SECTION_HEADINGS = ["## 1 Verdict", "## 2 Top findings", "## 3 Evidence",
                    "## 4 Plan, methods and limitations", "## 5 Glossary", "## 6 Reproducibility"]


@pytest.fixture(scope="module")
def data() -> dict:
    return json.loads(FIXTURE.read_text())


@pytest.fixture(scope="module")
def html(data) -> str:
    return render_html(data)


@pytest.fixture(scope="module")
def markdown(data) -> str:
    return render_markdown(data)


def minimal_data(mel_clean: float = 0.95, mel_shifted: float = 0.875) -> dict:
    """A hand-made audit: clean and one JPEG shift, melanoma sensitivity given per condition."""
    conditions = [
        {"key": "clean", "kind": "clean", "name": "clean", "severity": None, "params": {},
         "n": 400, "effective_n": 400.0, "too_small": False},
        {"key": "shift:jpeg_compression:3", "kind": "shift", "name": "jpeg_compression",
         "severity": 3, "params": {"severity": 3}, "n": 400, "effective_n": 400.0,
         "too_small": False},
    ]
    results = []
    for key, ba, sens in (("clean", 0.8, mel_clean),
                          ("shift:jpeg_compression:3", 0.7, mel_shifted)):
        results.append({"condition": key, "metric": "balanced_accuracy", "params": {},
                        "class": None, "value": ba, "low": ba - 0.03, "high": ba + 0.03,
                        "reason": None})
        results.append({"condition": key, "metric": "sensitivity", "params": {"count": 40},
                        "class": "mel",
                        "value": sens, "low": sens - 0.05, "high": min(1.0, sens + 0.04),
                        "reason": None})
    return {
        "schema_version": 1,
        "audit": {"id": "hand01", "created_at": "2026-12-01T10:00:00+00:00", "kind": "run",
                  "status": "finished", "planner": "rules", "wall_seconds": 12.0},
        "context": {"intended_use": "triage of pigmented lesions", "positive_class": "mel",
                    "malignant_classes": ["mel"]},
        "model": {"arch": "resnet18", "checkpoint": "model.pt", "checkpoint_sha256": "ab" * 32,
                  "classes": ["mel", "nv"], "input_size": 64},
        "data": {"name": "hand", "n_train": 100, "n_calibration": 50, "n_test": 400,
                 "data_hash": "cd" * 32, "greyscale": False},
        "plan": {"metrics": [{"id": "balanced_accuracy", "params": {}, "reason": "unequal"}],
                 "primary_metric": "balanced_accuracy", "primary_reason": "Unequal classes.",
                 "shifts": [{"name": "jpeg_compression", "severities": [3],
                             "reason": "teledermatology"}],
                 "subgroups": [], "cost": None},
        "conditions": conditions,
        "results": results,
        "differences": [],
        "findings": [{"id": "F1", "kind": "performance", "condition": "shift:jpeg_compression:3",
                      "metric": "balanced_accuracy", "effect": 0.1, "low": 0.06, "high": 0.14,
                      "p_value": 0.001, "light": "amber", "summary": "BA drops.",
                      "evidence": {}}],
        "reliability": {},
        "metrics_info": {
            "balanced_accuracy": {"display": "BA", "family": "counting",
                                  "higher_is_better": True, "reading": "Mean recall."},
            "sensitivity": {"display": "Sens", "family": "counting", "higher_is_better": True,
                            "reading": "Recall of one class."},
        },
        "contact_sheet_png": None,
        "reviews": [],
        "reproducibility": {"spec": {"audit": {"seed": 0}}, "packages": {"numpy": "2.0"}},
    }


def metric_table_cells(html: str) -> tuple[list[str], dict[str, list[tuple[str, str]]]]:
    """Column metric ids and, per row anchor, (value, interval) of each cell of the metric table."""
    start = html.index('id="metric-table"')
    table = html[start:html.index("</table>", start)]
    columns = re.findall(r'<th title="([^"]+)">', table)
    rows = {}
    for anchor, body in re.findall(r'<tr id="(cond-[^"]+)"[^>]*>(.*?)</tr>', table, re.DOTALL):
        cells = re.findall(r'<td class="num"[^>]*>([^<]*)(?:<span class="iv">([^<]*)</span>)?</td>',
                           body)
        rows[anchor] = cells[1:]  # the first numeric cell is n
    return columns, rows


def test_html_has_six_sections_in_order(html):
    positions = [html.index(f'<section id="{section}">') for section in SECTION_IDS]
    assert positions == sorted(positions)
    assert '<section id="reviews">' in html


def test_contents_links_every_section(html):
    for section in SECTION_IDS:
        assert f'href="#{section}"' in html


def test_markdown_has_six_sections_in_order(markdown):
    positions = [markdown.index(heading) for heading in SECTION_HEADINGS]
    assert positions == sorted(positions)
    assert "## Reviews" in markdown


def test_metric_table_values_match_fixture(data, html):
    columns, rows = metric_table_cells(html)
    assert columns[0] == "balanced_accuracy"
    whole = {(r["condition"], r["metric"]): r for r in data["results"] if r["class"] is None}
    checked = 0
    for condition in data["conditions"]:
        anchor = "cond-" + re.sub(r"-+", "-", re.sub(r"[^a-z0-9]", "-",
                                                      condition["key"].lower())).strip("-")
        if condition["too_small"]:
            assert anchor not in rows
            continue
        for metric, (shown, interval) in zip(columns, rows[anchor]):
            row = whole[(condition["key"], metric)]
            assert shown == f"{row['value']:.3f}", (condition["key"], metric)
            assert interval == f"{row['low']:.3f} to {row['high']:.3f}", (condition["key"], metric)
            checked += 1
    assert checked == len(whole)


def test_markdown_metric_table_matches_fixture(data, markdown):
    row = next(r for r in data["results"] if r["condition"] == "shift:jpeg_compression:5"
               and r["metric"] == "balanced_accuracy" and r["class"] is None)
    line = next(line for line in markdown.splitlines() if line.startswith("| jpeg compression 5"))
    assert f"{row['value']:.3f} ({row['low']:.3f} to {row['high']:.3f})" in line


@pytest.mark.parametrize("rate, expected", [
    (0.125, "about 1 in 8"),
    (0.05, "about 1 in 20"),
    (0.3, "about 3 in 10"),
    (0.45, "about 45 in 100"),
    (0.7, "about 7 in 10"),
    (0.0004, "fewer than 1 in 1,000"),
    (0.0, "none"),
    (1.0, "all"),
])
def test_natural_frequency_wording(rate, expected):
    assert natural_frequency(rate) == expected


def test_natural_frequency_rejects_bad_rate():
    with pytest.raises(ReportDataError, match="1.5"):
        natural_frequency(1.5)


def test_missed_melanoma_sentence_hand_case():
    html = render_html(minimal_data(mel_clean=0.95, mel_shifted=0.875))
    expected = ("About 1 in 8 melanomas imaged with jpeg compression at severity 3 would be "
                "missed (5 of 40 in this test set), against about 1 in 20 on the clean test "
                "images.")
    assert expected in html
    assert expected in render_markdown(minimal_data(mel_clean=0.95, mel_shifted=0.875))


def test_finding_links_to_its_evidence(html):
    assert re.search(r'<div class="finding red" id="top-F\d+">', html)
    for target in re.findall(r'evidence: <a href="#([^"]+)">figure</a>', html):
        assert f'id="{target}"' in html, target


def test_top_findings_lead_with_primary(data, html):
    section = html[html.index('<section id="findings">'):html.index('<section id="evidence">')]
    first_title = re.search(r'<div class="title">(.*?)</div>', section, re.DOTALL).group(1)
    assert "BA" in first_title
    assert "jpeg compression 5" in first_title


def test_verdict_lists_failed_and_held(html):
    verdict = html[html.index('<section id="verdict">'):html.index('<section id="findings">')]
    assert "Second opinion for dermatologists" in verdict
    assert "jpeg compression: severity 3–5" in verdict
    assert "brightness: severity 1–5" in verdict
    assert "rosendahl" in verdict
    assert "age: 0-29 (n=24)" in verdict


def test_html_fetches_nothing(html):
    assert "<script" not in html.lower()
    assert "<link" not in html.lower()
    assert not re.search(r"url\(\s*['\"]?\s*(https?:)?//", html, re.IGNORECASE)
    assert not re.search(r"(src|href)\s*=\s*['\"]?\s*(https?:)?//", html, re.IGNORECASE)
    assert not re.search(r"@import", html)


def test_html_inlines_every_figure(data, html):
    assert html.count("<svg") == 8
    assert html.count('<img alt="Contact sheet') == 1
    assert f"data:image/png;base64,{data['contact_sheet_png'][:40]}" in html


def test_contact_sheet_omitted_when_null(data):
    changed = copy.deepcopy(data)
    changed["contact_sheet_png"] = None
    html = render_html(changed)
    assert "<img" not in html
    assert 'id="contact-sheet"' not in html


def test_optional_sections_only_when_keys_exist():
    html = render_html(minimal_data())
    for section in ("calibration", "referral", "mitigation", "reviews", "forest",
                    "reliability"):
        assert f'id="{section}"' not in html, section
    for section in SECTION_IDS:
        assert f'<section id="{section}">' in html


def test_glossary_explains_every_metric(data, html):
    glossary = html[html.index('<section id="glossary">'):]
    for metric in {r["metric"] for r in data["results"]}:
        assert f"<code>{metric}</code>" in glossary, metric
        assert data["metrics_info"][metric]["reading"] in glossary, metric


def test_reproducibility_shows_hashes(data, html):
    section = html[html.index('<section id="reproducibility">'):]
    assert data["model"]["checkpoint_sha256"] in section
    assert data["data"]["data_hash"] in section
    assert "albumentations" in section
    assert "2.0.8" in section
    assert "group_column: lesion_id" in section


def test_user_text_is_escaped_in_html():
    hostile = minimal_data()
    hostile["context"]["intended_use"] = "<script>alert(1)</script> & more"
    html = render_html(hostile)
    assert "<script>alert(1)</script>" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt; &amp; more" in html


def test_json_keeps_schema_version_first(data):
    text = render_json(data)
    parsed = json.loads(text)
    assert next(iter(parsed)) == "schema_version"
    assert parsed == data


def test_json_writes_nan_as_null():
    changed = minimal_data()
    changed["results"][0]["value"] = math.nan
    changed["results"][0]["reason"] = "only one class present"
    parsed = json.loads(render_json(changed))
    assert parsed["results"][0]["value"] is None
    assert parsed["results"][0]["reason"] == "only one class present"


def test_nan_result_shows_dash_with_reason():
    changed = minimal_data()
    changed["results"][0]["value"] = math.nan
    changed["results"][0]["reason"] = "only one class present"
    html = render_html(changed)
    assert 'title="only one class present">–' in html


def test_missing_key_is_rejected():
    broken = minimal_data()
    del broken["results"]
    with pytest.raises(ReportDataError, match="'results'"):
        render_html(broken)


def test_write_report_writes_every_file(data, tmp_path):
    written = write_report(data, tmp_path)
    assert written["html"] == tmp_path / "report.html"
    for key in ("html", "markdown", "json"):
        assert written[key].stat().st_size > 0
    markdown = written["markdown"].read_text()
    linked = re.findall(r"\]\((figures/[^)]+)\)", markdown)
    assert len(linked) == 9
    for relative in linked:
        assert (tmp_path / relative).is_file(), relative
    assert (tmp_path / "figures" / "contact-sheet.png").read_bytes().startswith(b"\x89PNG")
    assert (tmp_path / "figures" / "forest.svg").read_text().startswith("<svg")


def test_html_to_pdf_reports_missing_chromium(tmp_path):
    page = tmp_path / "report.html"
    page.write_text("<html><body>x</body></html>")
    with pytest.raises(ChromiumError, match="not found"):
        html_to_pdf(page, tmp_path / "report.pdf", executable=tmp_path / "no-chromium")


def test_html_to_pdf_reports_missing_html(tmp_path):
    with pytest.raises(ReportFileError, match="missing.html"):
        html_to_pdf(tmp_path / "missing.html", tmp_path / "report.pdf")


def test_verdict_leaves_out_recalibration_findings():
    from tools.report.content import Lookup, verdict_view

    data = minimal_data()
    data["findings"] = [{"id": "F9", "kind": "recalibration_harms",
                         "condition": "shift:jpeg_compression:3", "metric": "balanced_accuracy",
                         "effect": 0.1, "low": 0.05, "high": 0.15, "p_value": 0.001,
                         "light": "red", "summary": "Recalibration raised the error.",
                         "evidence": {}}]
    verdict = verdict_view(data, Lookup(data))
    assert verdict["failed"] == []
    assert verdict["held_up"] == ["jpeg compression: severity 3"]
    assert verdict["light"] == "green"


def test_no_missed_case_sentence_when_fewer_are_missed():
    improved = render_html(minimal_data(mel_clean=0.60, mel_shifted=0.80))
    worse = render_html(minimal_data(mel_clean=0.95, mel_shifted=0.875))
    assert "would be missed" not in improved.split("Top findings", 1)[1].split("Evidence", 1)[0]
    assert "would be missed" in worse


@pytest.mark.parametrize("rate, words", [(0.97, "almost all"), (0.92, "about 9 in 10"),
                                         (0.7, "about 7 in 10")])
def test_natural_frequency_never_says_one_in_one(rate, words):
    assert natural_frequency(rate) == words


def test_verdict_counts_recalibration_findings_apart():
    from tools.report.content import Lookup, verdict_view

    data = minimal_data()
    data["findings"].append({"id": "F9", "kind": "recalibration_harms",
                             "condition": "shift:jpeg_compression:3", "metric": "ece_top_label",
                             "effect": 0.1, "low": 0.05, "high": 0.15, "p_value": 0.001,
                             "light": "red", "summary": "Recalibration raised the error.",
                             "evidence": {}})

    verdict = verdict_view(data, Lookup(data))
    html = render_html(data)

    assert verdict["n_findings"] == 1
    assert verdict["n_recalibration_findings"] == 1
    assert "1 about the audited model (0 red, 1 amber), and 1 about the recalibrated model" in html


def test_recalibration_rows_judged_one_by_one():
    from tools.report.render import _change_verdict

    # ECE rose clearly, NLL fell within noise, Brier fell clearly, the signed gap gets none.
    assert _change_verdict({"metric": "ece_top_label", "low": 0.02, "high": 0.09}) == "harmed"
    assert _change_verdict({"metric": "nll", "low": -0.13, "high": 0.09}) == "no clear change"
    assert _change_verdict({"metric": "brier", "low": -0.05, "high": -0.01}) == "helped"
    assert _change_verdict({"metric": "confidence_gap", "low": -0.24, "high": -0.17}) == "–"
