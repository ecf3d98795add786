"""`clinaudit chat` and `clinaudit run` end to end on a small ham10000_subset audit.

The chat command is registered on a test-only typer app, so these tests do not depend on how
the main CLI registers it. Plans stay small (one shift at two severities, 50 bootstrap
replicates, at most 150 test images) to keep each audit to seconds.
"""

from __future__ import annotations

import io
import json
import os
import re
import sys
from pathlib import Path

import pytest
import typer
import yaml
from scripted_llm import ScriptedLLM, text, tool_calls
from typer.testing import CliRunner

from agent.chat import chat
from agent.cli import app as cli_app
from tools.store import Store

pytestmark = pytest.mark.e2e

HAM_CLASSES = ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]
REPO = Path(__file__).resolve().parents[1]

chat_app = typer.Typer()
chat_app.command("chat")(chat)


@chat_app.callback()
def _group() -> None:
    """Test-only app; the callback keeps `chat` a named subcommand."""


# Replies to the rules planner's interview questions, in the order it asks them.
RULES_ANSWERS = ["dermatology", "second opinion for dermatologists",
                 "a clinic with a new dermatoscope", "mel", "false_negative", "no"]
SMALL_AUDIT = ["--shifts", "gaussian_noise", "--severities", "2,5", "--bootstrap", "50",
               "--max-images", "150", "--device", "cpu"]


@pytest.fixture(scope="module")
def data_folder(tmp_path_factory, ham_dir: Path, small_ham_manifest: Path) -> Path:
    """A dataset folder as `--data` expects it: the small manifest and a link to the images."""
    folder = tmp_path_factory.mktemp("chat_data")
    (folder / "metadata.csv").write_text(small_ham_manifest.read_text())
    (folder / "images").symlink_to(ham_dir / "images")
    return folder


def chat_args(data_folder: Path, model: Path, folder: Path, *extra: str) -> list[str]:
    return ["chat", "--data", str(data_folder), "--checkpoint", str(model),
            "--store", str(folder / "audits.duckdb"), "--out", str(folder / "report"),
            *SMALL_AUDIT, *extra]


def only_audit(store: Path) -> dict:
    with Store(store) as db:
        audits = db.list_audits()
    assert len(audits) == 1
    return audits[0]


def finished_times(store: Path, audit_id: str) -> dict[str, object]:
    with Store(store) as db:
        rows = db.con.execute("SELECT key, finished_at FROM conditions WHERE audit_id = ?",
                              [audit_id]).fetchall()
    return dict(rows)


# ---- chat with the rules planner -----------------------------------------------------------------

def spawn_chat(pexpect, folder: Path, args: list[str]):
    """Start `chat` with `args` in a pseudo-terminal, as a user at a terminal would."""
    launcher = folder / "launch_chat.py"
    launcher.write_text(
        "import typer\nfrom agent.chat import chat\n"
        "app = typer.Typer()\napp.command('chat')(chat)\n"
        "@app.callback()\ndef main() -> None:\n    pass\n"
        # The guard keeps the shift worker process, which re-imports this file, from
        # starting a second chat.
        "if __name__ == '__main__':\n    app()\n")
    env = {**os.environ, "COLUMNS": "160", "CLINAUDIT_LLM_MODEL": "", "TERM": "dumb"}
    return pexpect.spawn(sys.executable, [str(launcher), *args], cwd=str(REPO), env=env,
                         encoding="utf-8", timeout=240)


def test_chat_rules_planner_in_pseudo_terminal(tmp_path, data_folder, tiny_model):
    pexpect = pytest.importorskip("pexpect")
    child = spawn_chat(pexpect, tmp_path, chat_args(data_folder, tiny_model, tmp_path))

    prompts = ["clinical domain", "intended use", "deployed", "positive class",
               "costs patients more", "ordered grades"]
    for prompt, answer in zip(prompts, RULES_ANSWERS):
        child.expect(prompt)
        child.sendline(answer)
    child.expect("Run this audit")
    child.sendline("y")
    child.expect("html: ")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0, child.before

    for name in ("report.html", "report.md", "report.json"):
        assert (tmp_path / "report" / name).is_file(), name
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["context"]["positive_class"] == "mel"
    assert report["context"]["costlier_error"] == "false_negative"
    assert only_audit(tmp_path / "audits.duckdb")["status"] == "finished"
    keys = {c["key"] for c in report["conditions"]}
    assert {"clean", "shift:gaussian_noise:2", "shift:gaussian_noise:5"} <= keys


def test_chat_asks_nothing_the_spec_already_gives(tmp_path, data_folder, tiny_model):
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({
        "data": {"manifest": str(data_folder / "metadata.csv"),
                 "images": str(data_folder / "images"), "id_column": "image_id",
                 "label_column": "dx", "metadata": ["sex", "dataset"],
                 "group_column": "lesion_id"},
        "context": {"domain": "dermatology", "intended_use": "second opinion",
                    "deployment": "same clinics", "positive_class": "mel",
                    "costlier_error": "false_negative"}}))
    args = ["chat", "--spec", str(spec), "--checkpoint", str(tiny_model),
            "--store", str(tmp_path / "audits.duckdb"), "--out", str(tmp_path / "report"),
            *SMALL_AUDIT]
    # Only the ordinal question is open, then the confirmation.
    result = CliRunner().invoke(chat_app, args, input="no\ny\n")
    assert result.exit_code == 0, result.output
    assert "ordered grades" in result.output
    assert "clinical domain" not in result.output
    assert "intended use" not in result.output
    assert (tmp_path / "report" / "report.md").is_file()


def test_chat_declined_plan_runs_nothing(tmp_path, data_folder, tiny_model):
    answers = "\n".join(RULES_ANSWERS) + "\nn\n"
    result = CliRunner().invoke(chat_app, chat_args(data_folder, tiny_model, tmp_path),
                                input=answers)
    assert result.exit_code == 0, result.output
    assert "Audit plan" in result.output
    assert "nothing was run" in result.output
    assert not (tmp_path / "report").exists()


def test_chat_without_data_exits_2(tmp_path):
    result = CliRunner().invoke(chat_app, ["chat", "--store", str(tmp_path / "a.duckdb")])
    assert result.exit_code == 2
    assert "no data" in result.output
    assert list(tmp_path.iterdir()) == []


def test_resume_unknown_audit_exits_2(tmp_path):
    result = CliRunner().invoke(chat_app, ["chat", "--resume", "nope",
                                           "--store", str(tmp_path / "a.duckdb")])
    assert result.exit_code == 2
    assert "no chat checkpoints" in result.output


def test_resume_unknown_audit_id_exits_2(tmp_path, data_folder, tiny_model):
    answers = "\n".join(RULES_ANSWERS) + "\nn\n"
    CliRunner().invoke(chat_app, chat_args(data_folder, tiny_model, tmp_path), input=answers)
    result = CliRunner().invoke(chat_app, ["chat", "--resume", "nope",
                                           "--store", str(tmp_path / "audits.duckdb")])
    assert result.exit_code == 2
    assert "no chat with this audit id" in result.output


def test_interrupted_chat_resumes_without_redoing(tmp_path, data_folder, tiny_model,
                                                  monkeypatch):
    from agent import chat as chat_module

    original = chat_module.LazyProgressBars.__call__

    def interrupt_at_shifts(self, task, done, total):
        if task.startswith("Shifting"):
            raise KeyboardInterrupt
        original(self, task, done, total)

    monkeypatch.setattr(chat_module.LazyProgressBars, "__call__", interrupt_at_shifts)
    answers = "\n".join(RULES_ANSWERS) + "\ny\n"
    first = CliRunner().invoke(chat_app, chat_args(data_folder, tiny_model, tmp_path),
                               input=answers)
    assert first.exit_code == 130, first.output
    store = tmp_path / "audits.duckdb"
    audit_id = only_audit(store)["id"]
    assert f"--resume {audit_id}" in first.output
    before = finished_times(store, audit_id)
    assert "clean" in before
    assert not any(key.startswith("shift:") for key in before)

    monkeypatch.setattr(chat_module.LazyProgressBars, "__call__", original)
    # No input: a resumed chat must not ask the interview or the confirmation again.
    second = CliRunner().invoke(chat_app, ["chat", "--resume", audit_id,
                                           "--store", str(store)], input="")
    assert second.exit_code == 0, second.output
    assert "Resuming audit" in second.output
    after = finished_times(store, audit_id)
    assert after["clean"] == before["clean"]
    assert {"shift:gaussian_noise:2", "shift:gaussian_noise:5"} <= set(after)
    assert only_audit(store)["status"] == "finished"
    assert (tmp_path / "report" / "report.html").is_file()


def resume_id(output: str) -> str:
    match = re.search(r"--resume (\S+)", output)
    assert match, output
    return match.group(1)


def checkpointed_context(store: Path, audit_id: str) -> dict:
    """Read the context of a chat's latest checkpoint, as `--resume` will start from it."""
    import sqlite3

    from langgraph.checkpoint.sqlite import SqliteSaver

    from agent.chat import checkpoint_path
    from agent.graph import build_graph

    connection = sqlite3.connect(checkpoint_path(store), check_same_thread=False)
    try:
        graph = build_graph(checkpointer=SqliteSaver(connection))
        return graph.get_state({"configurable": {"thread_id": audit_id}}).values["context"]
    finally:
        connection.close()


def test_resume_after_ctrl_c_keeps_answers(tmp_path, data_folder, tiny_model):
    pexpect = pytest.importorskip("pexpect")
    store = tmp_path / "audits.duckdb"
    child = spawn_chat(pexpect, tmp_path, chat_args(data_folder, tiny_model, tmp_path))
    child.logfile_read = io.StringIO()
    prompts = ["clinical domain", "intended use", "deployed", "positive class",
               "costs patients more"]
    for prompt, answer in zip(prompts, RULES_ANSWERS):
        child.expect(prompt)
        child.sendline(answer)
    child.expect("ordered grades")
    child.sendintr()
    child.expect(pexpect.EOF)
    child.close()
    first = child.logfile_read.getvalue()
    assert child.exitstatus == 130, first
    assert "Saved 5 interview answer(s)" in first
    assert "Interrupted. Continue with: clinaudit chat --resume" in first
    audit_id = resume_id(first)

    # The reported case: `printf 'no\nn\n' | clinaudit chat --resume AUDIT_ID`.
    second = CliRunner().invoke(chat_app, ["chat", "--resume", audit_id, "--store", str(store)],
                                input="no\nn\n")
    assert second.exit_code == 0, second.output
    assert f"Resuming audit {audit_id} at step interview." in second.output
    for answered in prompts:
        assert answered not in second.output
    assert second.output.count("ordered grades") == 1
    assert "Plan not confirmed; nothing was run." in second.output

    context = checkpointed_context(store, audit_id)
    assert context["domain"] == "dermatology"
    assert context["intended_use"] == "second opinion for dermatologists"
    assert context["deployment"] == "a clinic with a new dermatoscope"
    assert context["positive_class"] == "mel"
    assert context["costlier_error"] == "false_negative"
    assert context["ordinal"] is False


def test_resume_after_input_end_keeps_answers(tmp_path, data_folder, tiny_model):
    store = tmp_path / "audits.duckdb"
    first = CliRunner().invoke(chat_app, chat_args(data_folder, tiny_model, tmp_path),
                               input="\n".join(RULES_ANSWERS[:3]) + "\n")
    assert first.exit_code == 2, first.output
    assert "the input ended before the chat finished" in first.output
    assert "Saved 3 interview answer(s)" in first.output
    audit_id = resume_id(first.output)

    second = CliRunner().invoke(chat_app, ["chat", "--resume", audit_id, "--store", str(store)],
                                input="mel\nfalse_negative\nno\ny\n")
    assert second.exit_code == 0, second.output
    for answered in ("clinical domain", "intended use", "deployed"):
        assert answered not in second.output
    for question in ("positive class", "costs patients more", "ordered grades"):
        assert second.output.count(question) == 1, question

    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["context"]["domain"] == "dermatology"
    assert report["context"]["intended_use"] == "second opinion for dermatologists"
    assert report["context"]["deployment"] == "a clinic with a new dermatoscope"
    assert report["context"]["positive_class"] == "mel"
    assert report["context"]["costlier_error"] == "false_negative"
    assert report["context"]["ordinal"] is False
    assert only_audit(store)["status"] == "finished"


def write_chat_spec(folder: Path, data_folder: Path, gates: list[dict]) -> Path:
    """Write a spec whose context is complete, so `chat --yes` prompts for nothing."""
    spec = folder / "spec.yaml"
    spec.write_text(yaml.safe_dump({
        "data": {"manifest": str(data_folder / "metadata.csv"),
                 "images": str(data_folder / "images"), "id_column": "image_id",
                 "label_column": "dx", "metadata": ["sex", "dataset"],
                 "group_column": "lesion_id"},
        "context": {"domain": "dermatology", "intended_use": "second opinion",
                    "deployment": "same clinics", "positive_class": "mel",
                    "costlier_error": "false_negative", "ordinal": False},
        "gates": gates}))
    return spec


def invoke_chat_spec(folder: Path, spec: Path, model: Path):
    return CliRunner().invoke(chat_app, [
        "chat", "--spec", str(spec), "--checkpoint", str(model),
        "--store", str(folder / "audits.duckdb"), "--out", str(folder / "report"),
        *SMALL_AUDIT, "--yes"], input="")


def test_chat_failed_gate_exits_1(tmp_path, data_folder, tiny_model):
    gates = [{"metric": "balanced_accuracy", "condition": "clean", "min_value": 0.999},
             {"metric": "accuracy", "condition": "clean", "min_value": 0.0},
             {"metric": "balanced_accuracy", "condition": "any_shift", "max_drop": 1.0}]
    result = invoke_chat_spec(tmp_path, write_chat_spec(tmp_path, data_folder, gates),
                              tiny_model)
    assert result.exit_code == 1, result.output
    assert (tmp_path / "report" / "report.html").is_file()

    audit_id = only_audit(tmp_path / "audits.duckdb")["id"]
    with Store(tmp_path / "audits.duckdb") as db:
        clean = next(row["value"] for row in db.results(audit_id)
                     if row["condition"] == "clean" and row["metric"] == "balanced_accuracy"
                     and row["class"] is None)
    assert clean < 0.999
    lines = [line.strip() for line in result.output.splitlines()]
    failed = lines.index("1 gate check(s) failed:")
    assert lines[failed + 1] == f"- balanced_accuracy = {clean:.3f} on clean (below 0.999)"
    assert "gates passed" not in result.output


def test_chat_passing_gates_exit_0(tmp_path, data_folder, tiny_model):
    gates = [{"metric": "accuracy", "condition": "clean", "min_value": 0.0},
             {"metric": "balanced_accuracy", "condition": "any_shift", "max_drop": 1.0}]
    result = invoke_chat_spec(tmp_path, write_chat_spec(tmp_path, data_folder, gates),
                              tiny_model)
    assert result.exit_code == 0, result.output
    assert "All 2 gates passed." in result.output
    assert "gate check(s) failed" not in result.output


# ---- chat with the LLM planner against a scripted server -------------------------------------------

def llm_chat_replies(narrative: str) -> list[dict]:
    return [
        tool_calls(("ask_user", {"question": "Which clinical domain is this for?",
                                 "field": "domain"})),
        tool_calls(("record_context", {"positive_class": "mel",
                                       "costlier_error": "false_negative", "ordinal": False})),
        text("Thanks, that is enough."),
        tool_calls(("list_metrics", {})),
        tool_calls(("select_metrics", '{"metrics": [{"id": "balanced_accuracy"'),),
        tool_calls(("select_metrics", {
            "metrics": [{"id": "balanced_accuracy", "reason": "imbalanced classes"},
                        {"id": "auroc", "reason": "threshold-free"},
                        {"id": "ece_top_label", "reason": "confidence is read"}],
            "primary_metric": "balanced_accuracy", "primary_reason": "rare melanomas"})),
        tool_calls(("select_shifts", {"shifts": [{"name": "gaussian_noise",
                                                  "severities": [2, 5],
                                                  "reason": "sensor noise"}]}),
                   ("select_subgroups", {"subgroups": [{"column": "sex", "reason": "fairness"}]})),
        tool_calls(("estimate_cost", {}), ("run_audit", {})),
        tool_calls(("write_report", {"narrative": narrative})),
    ]


def test_llm_chat_interview_to_report(tmp_path, data_folder, tiny_model):
    narrative = "The audit found that sensitivity for melanoma is 0.987654 on clean images."
    with ScriptedLLM(llm_chat_replies(narrative)) as server:
        args = chat_args(data_folder, tiny_model, tmp_path, "--llm-model", "scripted",
                         "--llm-base-url", server.base_url)
        result = CliRunner().invoke(chat_app, args, input="dermatology\ny\n",
                                    env={"OPENAI_API_KEY": "test-key"})
    assert result.exit_code == 0, result.output
    assert "Planner: llm:scripted" in result.output
    assert "LLM use: 9 requests" in result.output
    assert "0.987654" in result.output

    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["context"]["domain"] == "dermatology"
    assert report["plan"]["planner"] == "llm:scripted"
    assert [m["id"] for m in report["plan"]["metrics"]] == ["balanced_accuracy", "auroc",
                                                             "ece_top_label"]
    assert "[unverified: 0.987654]" in report["narrative"]
    assert "[unverified: 0.987654]" in (tmp_path / "report" / "report.md").read_text()

    # The model saw the validation error of the malformed call, then the corrected one passed.
    errors = [m["content"] for request in server.requests for m in request["messages"]
              if m["role"] == "tool" and "not valid JSON" in m["content"]]
    assert errors
    # The model never saw an image id or a patient row.
    sent = json.dumps(server.requests)
    assert "ISIC_" not in sent
    assert "HAM_" not in sent


# ---- clinaudit run gates ------------------------------------------------------------------------

def write_run_spec(folder: Path, data_folder: Path, model: Path, gates: list[dict]) -> Path:
    spec = {
        "model": {"arch": "mobilenetv3_small_050", "checkpoint": str(model),
                  "classes": HAM_CLASSES, "input_size": 32},
        "data": {"manifest": str(data_folder / "metadata.csv"),
                 "images": str(data_folder / "images"), "id_column": "image_id",
                 "label_column": "dx", "metadata": ["sex", "dataset"],
                 "group_column": "lesion_id"},
        "plan": {"metrics": [{"id": "balanced_accuracy"}, {"id": "accuracy"}],
                 "primary_metric": "balanced_accuracy",
                 "shifts": [{"name": "gaussian_noise", "severities": [2, 5]}]},
        "audit": {"bootstrap": 50, "max_images": 150, "device": "cpu"},
        "gates": gates,
    }
    path = folder / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def invoke_run(folder: Path, spec: Path):
    return CliRunner().invoke(cli_app, ["run", str(spec), "--store", str(folder / "a.duckdb"),
                                        "--out", str(folder / "report")])


def test_run_failed_gates_exit_1_and_are_listed(tmp_path, data_folder, tiny_model):
    gates = [{"metric": "balanced_accuracy", "condition": "clean", "min_value": 0.999},
             {"metric": "accuracy", "condition": "clean", "min_value": 0.0},
             {"metric": "auroc", "condition": "clean", "min_value": 0.5}]
    result = invoke_run(tmp_path, write_run_spec(tmp_path, data_folder, tiny_model, gates))
    assert result.exit_code == 1, result.output
    assert "2 gate check(s) failed" in result.output
    assert "below 0.999" in result.output
    # auroc is not in the plan, so its gate cannot be checked and must fail.
    assert "cannot pass unchecked" in result.output
    markdown = (tmp_path / "report" / "report.md").read_text()
    assert "- **Gates of the spec: 2 of 3 failed:**" in markdown
    assert "below 0.999" in markdown

    with Store(tmp_path / "a.duckdb") as db:
        audit_id = db.list_audits()[-1]["id"]
    review = CliRunner().invoke(cli_app, ["review", audit_id, "--reviewer", "Dr A",
                                          "--verdict", "approve",
                                          "--store", str(tmp_path / "a.duckdb")])
    assert review.exit_code == 0
    assert f"note: audit {audit_id} failed 2 of its 3 gate checks" in " ".join(review.output.split())


def test_run_passing_gates_exit_0(tmp_path, data_folder, tiny_model):
    gates = [{"metric": "accuracy", "condition": "clean", "min_value": 0.0},
             {"metric": "balanced_accuracy", "condition": "any_shift", "max_drop": 1.0}]
    result = invoke_run(tmp_path, write_run_spec(tmp_path, data_folder, tiny_model, gates))
    assert result.exit_code == 0, result.output
    assert "All 2 gates passed" in result.output
    assert "- **Gates of the spec:** all 2 passed" in (tmp_path / "report" / "report.md").read_text()


def test_run_bad_input_exits_2(tmp_path, data_folder, tiny_model):
    spec = write_run_spec(tmp_path, data_folder, tiny_model, [])
    raw = yaml.safe_load(spec.read_text())
    raw["audit"]["bootstraps"] = 10
    spec.write_text(yaml.safe_dump(raw))
    result = invoke_run(tmp_path, spec)
    assert result.exit_code == 2
    assert "audit.bootstraps: unknown field" in result.output
