"""An audit that stops before the end is marked failed, and its partial results are never
rendered or compared as if it had finished."""

from __future__ import annotations

import pytest
from test_end_to_end import write_spec
from typer.testing import CliRunner

from agent.cli import app
from tools.store import Store

pytestmark = pytest.mark.e2e

SMALL_PLAN = {
    "metrics": [{"id": "balanced_accuracy"}, {"id": "accuracy"}],
    "primary_metric": "balanced_accuracy",
    "shifts": [{"name": "gaussian_noise", "severities": [5]}],
}


@pytest.fixture()
def failed_audit(tmp_path, ham_dir, small_ham_manifest, tiny_model, monkeypatch):
    """Run an audit whose shift conditions raise; return (store path, audit id, CLI result)."""
    from tools.runner import AuditRunner

    def broken_shifts(self, *args, **kwargs):
        raise RuntimeError("disk full while writing shift:gaussian_noise:5")

    monkeypatch.setattr(AuditRunner, "_shifts", broken_shifts)
    spec = write_spec(tmp_path, ham_dir, small_ham_manifest, tiny_model, plan=SMALL_PLAN)
    store = tmp_path / "audits.duckdb"
    result = CliRunner().invoke(app, ["run", str(spec), "--store", str(store),
                                      "--out", str(tmp_path / "report")])
    with Store(store) as db:
        audit_id = db.list_audits()[-1]["id"]
    return store, audit_id, result


def test_audit_stopped_by_error_is_failed(failed_audit):
    store, audit_id, result = failed_audit

    assert result.exit_code != 0
    with Store(store) as db:
        audit = db.audit(audit_id)
    assert audit["status"] == "failed"
    assert audit["meta"]["error"] == "RuntimeError: disk full while writing shift:gaussian_noise:5"
    assert audit["finished_at"] is not None


def test_report_and_compare_reject_unfinished(failed_audit, tmp_path):
    store, audit_id, _ = failed_audit
    runner = CliRunner()

    report = runner.invoke(app, ["report", audit_id, "--store", str(store),
                                 "--out", str(tmp_path / "again")])
    compare = runner.invoke(app, ["compare", audit_id, audit_id, "--store", str(store)])

    assert report.exit_code == 2
    assert f"audit {audit_id} failed (RuntimeError: disk full" in report.output
    assert "no verdict" in report.output
    assert not (tmp_path / "again").exists()
    assert compare.exit_code == 2
    assert "its results are incomplete" in compare.output


def test_audit_left_running_is_not_reported(tmp_path):
    # A process killed mid-audit cannot mark it; the status stays "running".
    store = tmp_path / "audits.duckdb"
    with Store(store) as db:
        audit_id = db.create_audit("image", {}, {})

    result = CliRunner().invoke(app, ["report", audit_id, "--store", str(store)])

    assert result.exit_code == 2
    assert "is still running or stopped without finishing" in result.output


def test_ctrl_c_marks_audit_interrupted(tmp_path, ham_dir, small_ham_manifest, tiny_model,
                                        monkeypatch):
    from tools.runner import AuditRunner

    def pressed_ctrl_c(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(AuditRunner, "_shifts", pressed_ctrl_c)
    spec = write_spec(tmp_path, ham_dir, small_ham_manifest, tiny_model, plan=SMALL_PLAN)
    store = tmp_path / "audits.duckdb"

    result = CliRunner().invoke(app, ["run", str(spec), "--store", str(store),
                                      "--out", str(tmp_path / "report")])

    assert result.exit_code == 130
    assert "interrupted: the audit is marked interrupted" in " ".join(result.output.split())
    with Store(store) as db:
        audit = db.audit(db.list_audits()[-1]["id"])
    assert audit["status"] == "interrupted"
    assert audit["meta"]["error"] == "stopped by Ctrl-C"
