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
    line = next(line for line in markdown.splitlines()
                if line.startswith('| <a id="cond-shift-jpeg-compression-5"></a>'
                                   'jpeg compression 5'))
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


# ---- wording a clinician reads ------------------------------------------------------------------

def with_population_conditions(data: dict) -> dict:
    """Add a balanced class mix and a test set re-weighted to equal datasets, with a finding."""
    data["conditions"] += [
        {"key": "prevalence:balanced", "kind": "prevalence", "name": "balanced", "severity": None,
         "params": {"class_mix": {"mel": 0.5, "nv": 0.5}}, "n": 80, "effective_n": 80.0,
         "too_small": False},
        {"key": "reweight:equal_dataset", "kind": "reweight", "name": "equal_dataset",
         "severity": None, "params": {"column": "dataset", "target": {"a": 0.5, "b": 0.5}},
         "n": 400, "effective_n": 169.4, "too_small": False},
    ]
    for key, ba in (("prevalence:balanced", 0.79), ("reweight:equal_dataset", 0.62)):
        data["results"].append({"condition": key, "metric": "balanced_accuracy", "params": {},
                                "class": None, "value": ba, "low": ba - 0.05,
                                "high": ba + 0.05, "reason": None})
    data["findings"].append({
        "id": "F2", "kind": "performance", "condition": "reweight:equal_dataset",
        "metric": "balanced_accuracy", "effect": 0.18, "low": 0.09, "high": 0.27,
        "p_value": 0.002, "light": "red",
        "summary": "BA fell from 0.800 to 0.620 under reweight:equal_dataset (change -0.180, "
                   "95% CI -0.270 to -0.090; against the rest of the test set).",
        "evidence": {"reference": "clean", "reference_value": 0.8, "condition_value": 0.62,
                     "delta": -0.18, "delta_low": -0.27, "delta_high": -0.09,
                     "paired": False}})
    return data


def test_column_labels_name_parameters_in_words():
    from tools.report.content import Lookup

    data = minimal_data()
    lookup = Lookup(data)

    assert lookup.column_label("sensitivity", {"positive_class": 0}) == "Sens (mel)"
    assert lookup.column_label("ece_top_label", {"n_bins": 15}) == "ece top label (15 bins)"
    assert lookup.column_label("balanced_accuracy", {}) == "BA"


def test_plan_table_names_positive_class_not_index():
    data = minimal_data()
    data["plan"]["metrics"].append({"id": "sensitivity", "params": {"positive_class": 0},
                                    "reason": "missed melanomas cost most"})
    markdown = render_markdown(data)

    assert "| Sens | `sensitivity` | mel | missed melanomas cost most |" in markdown
    assert "positive_class" not in markdown.split("### Spec")[0]
    assert "positive_class" not in render_html(data).split('id="spec"')[0]


def test_calibration_readings_scale_matches_fractions():
    from tools.metrics import REGISTRY
    from tools.report.data import metrics_info

    readings = {metric: entry["reading"] for metric, entry in metrics_info(set(REGISTRY)).items()}

    # Values are shown as fractions (0.106), so a reading in percentage points must give the
    # conversion.
    for metric, reading in readings.items():
        if "percentage points" in reading:
            assert re.search(r"0\.\d+ means \d+ percentage points", reading), metric
    assert "0.05 means 5 percentage points" in readings["ece_top_label"]


def test_top_finding_states_direction_of_effect_and_interval():
    markdown = render_markdown(minimal_data())
    html = render_html(minimal_data())
    expected = "BA 0.100 lower (95 % interval 0.060 to 0.140 lower), p = 0.0010"

    assert expected + ". Evidence:" in markdown
    assert expected + " · evidence:" in html
    assert "Effect 0.100" not in markdown


def test_finding_summary_uses_condition_labels():
    data = with_population_conditions(minimal_data())
    markdown = render_markdown(data)

    expected = ("BA was 0.800 on the clean test images and 0.620 with the test set re-weighted "
                "so each dataset counts equally.")
    assert expected in markdown
    assert "reweight:" not in markdown
    assert "95% CI" not in markdown


def test_stored_summary_keys_replaced_by_labels():
    data = minimal_data()
    data["findings"][0]["kind"] = "recalibration_harms"
    data["findings"][0]["summary"] = ("Recalibration raised the ECE on "
                                      "shift:jpeg_compression:3 from 0.100 to 0.200 (change "
                                      "+0.100, 95 % CI +0.050 to +0.150), against 0.030 on "
                                      "clean.")
    markdown = render_markdown(data)

    assert ("Recalibration raised the ECE on jpeg compression 3 from 0.100 to 0.200 (change "
            "+0.100, 95 % interval +0.050 to +0.150), against 0.030 on the clean test set.") \
        in markdown
    assert "shift:jpeg_compression:3" not in markdown


def test_recalibration_harm_summary_from_evidence():
    data = minimal_data()
    data["findings"][0].update({
        "kind": "recalibration_harms", "metric": "ece_top_label",
        "evidence": {"changes": [{"metric": "ece_top_label", "before": 0.204,
                                  "after": 0.338}]}})
    data["metrics_info"]["ece_top_label"] = {"display": "ECE", "family": "calibration",
                                             "higher_is_better": False, "reading": "Gap."}
    markdown = render_markdown(data)

    assert ("Recalibration raised the ECE on images with jpeg compression at severity 3 from "
            "0.204 to 0.338.") in markdown
    assert "After recalibration, jpeg compression 3: ECE 0.100 higher" in markdown


def test_also_missed_sentence_reads_whole():
    data = minimal_data()
    data["context"]["malignant_classes"] = ["mel", "nv"]
    for key, sens in (("clean", 0.1), ("shift:jpeg_compression:3", 0.0)):
        data["results"].append({"condition": key, "metric": "sensitivity", "params": {},
                                "class": "nv", "value": sens, "low": 0.0, "high": 0.2,
                                "reason": None})
    markdown = render_markdown(data)

    assert ("Also missed more often: all naevi (about 9 in 10 on the clean test images)."
            in markdown)


def test_referral_without_threshold_drops_clause():
    data = minimal_data()
    data["referral"] = {"target": 0.95, "target_metric": "accuracy", "score": "msp",
                        "threshold": None, "rows": [], "sentence": None}
    markdown = render_markdown(data)

    assert ("Target: accepted predictions at 95 % accuracy. No threshold on the maximum "
            "softmax probability reached the target on the calibration split, so every "
            "prediction would be referred to a clinician.") in markdown
    assert "threshold –" not in markdown
    assert " – (" not in markdown


def test_referral_sentence_not_repeated_when_no_threshold():
    data = minimal_data()
    data["referral"] = {"target": 0.9, "target_metric": "accuracy", "score": "msp",
                        "threshold": None, "rows": [],
                        "sentence": "No confidence threshold keeps accepted predictions at 90% "
                                    "accuracy on the calibration split: every prediction would "
                                    "need review."}
    markdown = render_markdown(data)

    assert ("No confidence threshold keeps accepted predictions at 90 % accuracy on the "
            "calibration split: every prediction would need review.") in markdown
    assert ("Target: accepted predictions at 90 % accuracy, with predictions ranked by their "
            "maximum softmax probability.") in markdown
    assert "No threshold on the" not in markdown


@pytest.mark.parametrize("seconds, text", [(0.1312341929988179, "0.13 s"), (8.45619, "8.5 s"),
                                           (50.815788, "51 s"), (412.7, "413 s"),
                                           (725.2, "12 min 5 s")])
def test_seconds_written_with_sensible_precision(seconds, text):
    from tools.report.wording import fmt_seconds

    assert fmt_seconds(seconds) == text


@pytest.mark.parametrize("stored, text", [
    ("2026-12-04T23:05:58.447566", "2026-12-04 23:05 UTC"),   # the store writes naive UTC
    ("2026-12-04T18:12:05+00:00", "2026-12-04 18:12 UTC"),
    ("2026-12-05T01:05:00+02:00", "2026-12-04 23:05 UTC"),
])
def test_timestamps_shown_in_utc(stored, text):
    from tools.report.wording import fmt_timestamp

    assert fmt_timestamp(stored) == text


def test_raw_numbers_formatted_for_reading():
    data = minimal_data()
    data["audit"]["created_at"] = "2026-12-04T23:05:58.447566"
    data["audit"]["wall_seconds"] = 50.815788
    data["reproducibility"]["timings"] = {"clean_predict_seconds": 1.3930028649992892,
                                          "total_seconds": 7.902966374000243}
    data["plan"]["subgroups"] = [{"column": "age", "bands": [0.0, 30.0, 45.0, 86.0],
                                  "reason": "age"}]
    data["plan"]["cost"] = {"conditions": 2, "images_predicted": 800,
                            "estimated_seconds": 11.0, "note": ""}
    data["reliability"] = {"clean": [{"lower": 0.0, "upper": 0.5, "count": 10.0,
                                      "confidence": 0.4, "accuracy": 0.5}]}
    markdown = render_markdown(data)

    assert "Audit hand01 · 2026-12-04 23:05 UTC ·" in markdown
    assert "Measured wall time: 51 s." in markdown
    assert "- **timings:** clean predict: 1.4 s, total: 7.9 s" in markdown
    assert "| age | 0, 30, 45, 86 | age |" in markdown
    assert "| 0.00–0.50 | 10 | 0.400 | 0.500 |" in markdown
    assert "Reliability bins of clean test set:" in markdown


def test_one_interval_wording_throughout(data, markdown, html):
    for text in (markdown, html):
        assert "95% CI" not in text
        assert "95 % CI" not in text
        assert "bootstrap interval" not in text
        assert "95 % interval" in text


def test_verdict_explains_population_conditions():
    from tools.report.content import Lookup, verdict_view

    data = with_population_conditions(minimal_data())
    verdict = verdict_view(data, Lookup(data))

    assert "class mix: classes re-sampled to equal prevalence" in verdict["held_up"]
    assert ("population mix: test set re-weighted so each dataset counts equally "
            "(BA 0.180 lower, red)") in verdict["failed"]


def test_verdict_says_clear_drop_not_held_up(markdown, html):
    for text in (markdown, html):
        assert "Held up" not in text
        assert "hold up" not in text
        assert "No clear drop found" in text
        assert "Clear drop found" in text


def test_limitations_explain_interval_beside_estimate():
    data = minimal_data()
    data["results"][0].update({"value": 0.253, "low": 0.262, "high": 0.475})
    markdown = render_markdown(data)

    assert ("Some 95 % intervals lie entirely beside their point estimate, for example BA "
            "0.253 (0.262 to 0.475) on clean test set.") in markdown
    assert markdown.count("beside") == 1


def markdown_links_resolve(markdown: str) -> list[str]:
    """Fragment links of the Markdown whose target id it does not contain."""
    ids = set(re.findall(r'<a id="([^"]+)"></a>', markdown))
    return [target for target in re.findall(r"\]\(#([^)]+)\)", markdown) if target not in ids]


def test_markdown_links_have_anchors(markdown):
    assert "](#cond-" in markdown
    assert "](#curve-" in markdown
    assert markdown_links_resolve(markdown) == []
    assert markdown_links_resolve(render_markdown(with_population_conditions(
        minimal_data()))) == []


def test_long_tables_move_to_appendix(markdown, html):
    appendix = markdown.index("## Appendix")
    assert markdown.index("## 6 Reproducibility") < appendix
    for heading in ("### A All findings", "### B Changes against the reference",
                    "### C Results per class", "#### Sens per class",
                    "### D Recalibration per condition", "### F Reliability bins"):
        assert markdown.index(heading) > appendix, heading
    assert markdown.index("### Metrics per condition") < appendix

    positions = [html.index(f'<section id="{section}">') for section in SECTION_IDS]
    assert positions[-1] < html.index('<section id="appendix">')
    assert html.index('id="all-findings"') > html.index('<section id="appendix">')


def test_report_data_marks_store_timestamps_utc(tmp_path):
    from tools.report.data import build_report_data
    from tools.store import Store

    with Store(tmp_path / "a.duckdb") as store:
        audit = store.create_audit("image", {}, {"metrics": []})
        stored = store.audit(audit)["created_at"]
        data = build_report_data(store, audit)

    assert stored.tzinfo is None
    assert data["audit"]["created_at"] == stored.isoformat() + "+00:00"


def test_verdict_lists_conditions_too_thin_for_one_class():
    data = minimal_data()
    data["conditions"].append({"key": "site:dataset:molemax", "kind": "site", "name": "molemax",
                               "severity": None, "params": {"column": "dataset",
                                                            "value": "molemax"},
                               "n": 120, "effective_n": None, "too_small": False})
    data["thin_class_conditions"] = [{"condition": "site:dataset:molemax", "metric": "sensitivity",
                                      "positive_class": 0, "rows": 4, "counted": "labels"}]

    html = render_html(data)
    markdown = render_markdown(data)

    assert "Not tested for one class (fewer than 10 images of that class):" in markdown
    assert "Sens (mel): dataset = molemax (4 mel)" in markdown
    assert "Sens (mel): dataset = molemax (4 mel) – fewer than 10 images of that class" in html
