"""Command-line options of `clinaudit run` that override the spec's audit section."""

from __future__ import annotations

import pytest
from test_end_to_end import write_spec
from typer.testing import CliRunner

from agent.cli import app
from tools.store import Store

pytestmark = pytest.mark.e2e

SMALL_PLAN = {
    "metrics": [{"id": "accuracy"}],
    "primary_metric": "accuracy",
    "shifts": [{"name": "gaussian_noise", "severities": [5]}],
}


def test_run_overrides_shrink_the_audit(tmp_path, ham_dir, small_ham_manifest, tiny_model):
    spec = write_spec(tmp_path, ham_dir, small_ham_manifest, tiny_model, plan=SMALL_PLAN)
    store = tmp_path / "audits.duckdb"

    result = CliRunner().invoke(app, ["run", str(spec), "--store", str(store),
                                      "--out", str(tmp_path / "report"),
                                      "--max-images", "60", "--bootstrap", "30"])

    assert result.exit_code == 0, result.output
    with Store(store) as db:
        audit_id = db.list_audits()[-1]["id"]
        clean = db.predictions(audit_id, "clean")
        settings = db.audit(audit_id)["spec"]["audit"]
    assert len(clean["ids"]) == 60
    assert settings["bootstrap"] == 30
    assert settings["max_images"] == 60


@pytest.mark.parametrize("option, value, message", [
    ("--max-images", "0", "--max-images 0: must be at least 1"),
    ("--bootstrap", "5", "--bootstrap 5: 5 replicates are too few"),
    ("--batch-size", "0", "--batch-size 0: Input should be greater than 0"),
])
def test_run_rejects_bad_override(tmp_path, ham_dir, small_ham_manifest, tiny_model, option, value,
                                  message):
    spec = write_spec(tmp_path, ham_dir, small_ham_manifest, tiny_model, plan=SMALL_PLAN)

    result = CliRunner().invoke(app, ["run", str(spec), "--plan-only", option, value,
                                      "--store", str(tmp_path / "a.duckdb")])

    assert result.exit_code == 2
    assert message in result.output


def test_version_option_prints_installed_version():
    from importlib.metadata import version

    result = CliRunner().invoke(app, ["--version"])

    assert result.exit_code == 0
    assert result.output.strip() == f"clinaudit {version('clinaudit')}"


@pytest.mark.parametrize("command, flag", [("run", "--plan-only"), ("report", "--pdf"),
                                           ("delete", "--yes"), ("compare", "--all")])
def test_flags_show_no_value_placeholder(command, flag):
    result = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "120"})

    line = next(line for line in result.output.splitlines() if flag in line)
    assert "<bool>" not in line


@pytest.mark.parametrize("options, message", [
    (["--bootstrap", "-5"], "--bootstrap -5: -5 replicates are too few"),
    (["--input-size", "7"], "--input-size 7: the image shifts need at least 13 px"),
    (["--shifts", "hari"], "unknown shift 'hari'"),
    (["--max-images", "0"], "--max-images 0: must be at least 1"),
])
def test_demo_checks_options_before_training(tmp_path, ham_dir, options, message):
    result = CliRunner().invoke(app, ["demo", "--data", str(ham_dir), "--out", str(tmp_path / "d"),
                                      "--store", str(tmp_path / "d.duckdb"), *options])

    assert result.exit_code == 2
    assert message in result.output
    assert not (tmp_path / "d" / "model").exists()


def test_demo_names_missing_data_folder(tmp_path):
    missing = tmp_path / "ham1000_subset"

    result = CliRunner().invoke(app, ["demo", "--data", str(missing)])

    assert result.exit_code == 2
    assert f"data folder not found: {missing}" in result.output


def test_delete_mentions_kept_report_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    store = tmp_path / "a.duckdb"
    with Store(store) as db:
        audit_id = db.create_audit("image", {}, {})
    (tmp_path / "audits" / audit_id).mkdir(parents=True)

    result = CliRunner().invoke(app, ["delete", audit_id, "--yes", "--store", str(store)])

    assert result.exit_code == 0
    assert f"Its report files in audits/{audit_id}/ were kept" in " ".join(result.output.split())
    assert (tmp_path / "audits" / audit_id).is_dir()


def test_report_paths_count_figures_in_one_line(capsys, tmp_path):
    from agent.cli import print_paths

    figures = tmp_path / "figures"
    print_paths({"html": tmp_path / "report.html", "figure:a": figures / "a.svg",
                 "figure:b": figures / "b.svg", "markdown": tmp_path / "report.md"})

    lines = capsys.readouterr().out.splitlines()
    assert lines == [f"html: {tmp_path / 'report.html'}", f"markdown: {tmp_path / 'report.md'}",
                     f"figures: 2 files in {figures}"]
