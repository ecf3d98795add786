"""The LLM planner against a scripted OpenAI-compatible server on 127.0.0.1.

The real `openai` client sends every request, and every tool call goes through the toolbox
dispatcher, so these tests cover the wire format, retries after invalid calls and the
narrative guard.
"""

from __future__ import annotations

import json

import pytest
from scripted_llm import ScriptedLLM, text, tool_calls

from agent.planners.llm import LLMError, LLMPlanner, planner_from_options
from agent.planners.rules import RulesPlanner
from agent.state import ColumnSummary, DatasetInfo
from tools.spec import Context

HAM_CLASSES = ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]

METRICS = {"metrics": [{"id": "balanced_accuracy", "reason": "classes are imbalanced"},
                       {"id": "ece_top_label", "params": {"n_bins": 15},
                        "reason": "clinicians read the confidence"}],
           "primary_metric": "balanced_accuracy", "primary_reason": "rare melanomas count"}
SHIFTS = {"shifts": [{"name": "jpeg", "severities": [2, 4], "reason": "compressed uploads"}]}
SUBGROUPS = {"subgroups": [{"column": "sex", "reason": "fairness"}], "site_column": "dataset"}


def ham_info() -> DatasetInfo:
    return DatasetInfo(
        classes=HAM_CLASSES,
        class_counts=dict(zip(HAM_CLASSES, [80, 120, 260, 30, 280, 1700, 40])),
        n_train=1500, n_calibration=400, n_test=600, greyscale=False,
        metadata=[ColumnSummary(name="sex", numeric=False, distinct=2),
                  ColumnSummary(name="age", numeric=True, distinct=18),
                  ColumnSummary(name="dataset", numeric=False, distinct=4)])


def planner_for(server: ScriptedLLM, **options) -> LLMPlanner:
    return LLMPlanner(model="scripted-model", base_url=server.base_url, api_key="test-key",
                      timeout=10, max_retries=0, **options)


def plan_replies(*first: dict) -> list[dict]:
    """Scripted plan phase: optional replies first, then valid selections and run_audit."""
    return [*first, tool_calls(("select_metrics", METRICS)), tool_calls(("select_shifts", SHIFTS)),
            tool_calls(("select_subgroups", SUBGROUPS), ("estimate_cost", {})),
            tool_calls(("run_audit", {}))]


def tool_errors(server: ScriptedLLM, request_index: int) -> list[str]:
    messages = server.requests[request_index]["messages"]
    last_tools = []
    for message in reversed(messages):
        if message["role"] != "tool":
            break
        last_tools.append(json.loads(message["content"]).get("error", ""))
    return last_tools


def test_interview_asks_user_and_records_answers():
    answers = {"domain": "dermatology", "costlier_error": "false_negative"}
    asked = []

    def ask(question, field, choices):
        asked.append(field)
        return answers[field]

    replies = [
        tool_calls(("ask_user", {"question": "Which clinical domain?", "field": "domain"})),
        tool_calls(("ask_user", {"question": "Which error costs more?",
                                 "field": "costlier_error",
                                 "choices": ["false_negative", "false_positive", "equal"]})),
        text("I have what I need."),
    ]
    with ScriptedLLM(replies) as server:
        planner = planner_for(server)
        context = planner.interview(Context(), ham_info(), ask)
    assert asked == ["domain", "costlier_error"]
    assert context.domain == "dermatology"
    assert context.costlier_error == "false_negative"
    first = server.requests[0]
    assert first["model"] == "scripted-model"
    assert "ask_user" in {tool["function"]["name"] for tool in first["tools"]}


def test_plan_uses_selected_metrics_and_shifts():
    with ScriptedLLM(plan_replies()) as server:
        planner = planner_for(server)
        plan = planner.plan(Context(domain="dermatology"), ham_info(), n_boot=50)
    assert [m.id for m in plan.metrics] == ["balanced_accuracy", "ece_top_label"]
    assert plan.shifts[0].name == "jpeg"
    assert plan.shifts[0].severities == [2, 4]
    assert [s.column for s in plan.subgroups] == ["sex"]
    assert plan.site_column == "dataset"
    assert plan.planner == "llm:scripted-model"
    assert plan.cost is not None
    assert planner.fallbacks == []


def test_token_use_is_counted_per_request():
    with ScriptedLLM(plan_replies()) as server:
        planner = planner_for(server)
        planner.plan(Context(), ham_info())
    # The scripted server reports 100 prompt and 20 completion tokens per reply.
    assert planner.usage == {"requests": 4, "prompt_tokens": 400, "completion_tokens": 80,
                             "total_tokens": 480}


def test_malformed_arguments_then_corrected_call():
    broken = tool_calls(("select_metrics", '{"metrics": [{"id": "accuracy"'))
    with ScriptedLLM(plan_replies(broken)) as server:
        plan = planner_for(server).plan(Context(), ham_info())
    assert "not valid JSON" in tool_errors(server, 1)[0]
    assert [m.id for m in plan.metrics] == ["balanced_accuracy", "ece_top_label"]


def test_unknown_tool_then_corrected_call():
    wrong = tool_calls(("choose_metrics", {"metrics": ["accuracy"]}))
    with ScriptedLLM(plan_replies(wrong)) as server:
        plan = planner_for(server).plan(Context(), ham_info())
    assert "unknown tool 'choose_metrics'" in tool_errors(server, 1)[0]
    assert plan.metrics[0].id == "balanced_accuracy"


def test_invalid_metric_name_then_corrected_call():
    invalid = tool_calls(("select_metrics", {
        "metrics": [{"id": "sensitivity_at_95", "reason": "r"}],
        "primary_metric": "sensitivity_at_95", "primary_reason": "r"}))
    with ScriptedLLM(plan_replies(invalid)) as server:
        plan = planner_for(server).plan(Context(), ham_info())
    assert "unknown metric id 'sensitivity_at_95'" in tool_errors(server, 1)[0]
    assert "sensitivity_at_95" not in {m.id for m in plan.metrics}


def test_retries_are_bounded_and_rules_fill_the_gap():
    bad = tool_calls(("select_metrics", '{"metrics": 5}'))
    replies = [tool_calls(("select_shifts", SHIFTS), ("select_subgroups", SUBGROUPS)),
               bad, bad, bad, bad, bad, bad]
    with ScriptedLLM(replies) as server:
        planner = planner_for(server, max_tool_errors=2)
        plan = planner.plan(Context(), ham_info())
    # One good turn, then three invalid calls in a row end the phase.
    assert len(server.requests) == 4
    assert len(planner.fallbacks) == 1
    assert plan.primary_metric == "balanced_accuracy"
    assert all("rules planner" in m.reason for m in plan.metrics)
    assert plan.shifts[0].name == "jpeg"


def test_narrative_number_no_tool_produced_is_marked():
    summary = {"context": {"domain": "dermatology"},
               "results": [{"condition": "clean", "metric": "balanced_accuracy",
                            "value": 0.6123, "low": 0.55, "high": 0.67}],
               "findings": [{"id": "F1", "condition": "shift:jpeg:4", "metric": "auroc",
                             "effect": 0.084, "light": "red"}]}
    narrative = ("Balanced accuracy on clean images is 0.61 (95 % interval 0.55 to 0.67). "
                 "Under JPEG compression at severity 4 AUROC drops by 8.4 percentage points, "
                 "and sensitivity for melanoma falls to 0.42.")
    replies = [tool_calls(("propose_mitigation", {"kind": "augment_and_retrain",
                                                  "target": "F1", "reason": "JPEG drop"}),
                          ("write_report", {"narrative": narrative}))]
    with ScriptedLLM(replies) as server:
        planner = planner_for(server)
        written = planner.narrate(summary)
    assert planner.unverified == ["0.42"]
    assert "[unverified: 0.42]" in written
    assert "0.61 (95 % interval 0.55 to 0.67)" in written
    assert "8.4 percentage points" in written
    assert "augment_and_retrain for F1" in written
    sent = server.requests[0]["messages"][-1]["content"]
    assert "0.6123" in sent


def test_plain_text_narrative_is_checked_too():
    with ScriptedLLM([text("Accuracy is 0.99.")]) as server:
        planner = planner_for(server)
        written = planner.narrate({"results": [{"metric": "accuracy", "value": 0.7}]})
    assert written.startswith("Accuracy is [unverified: 0.99].")


def test_server_error_raises_llm_error():
    with ScriptedLLM([]) as server:
        planner = planner_for(server)
        with pytest.raises(LLMError, match="HTTP 500"):
            planner.plan(Context(), ham_info())


def test_unreachable_endpoint_raises_llm_error():
    with ScriptedLLM([]) as server:
        url = server.base_url
    planner = LLMPlanner(model="m", base_url=url, api_key="k", timeout=2, max_retries=0)
    with pytest.raises(LLMError, match="cannot reach"):
        planner.interview(Context(), ham_info(), None)


def test_model_option_selects_planner(monkeypatch):
    monkeypatch.setenv("CLINAUDIT_LLM_MODEL", "env-model")
    assert isinstance(planner_from_options(None, None, use_env_model=False), RulesPlanner)
    assert planner_from_options(None, None, use_env_model=True).model == "env-model"
    assert planner_from_options("cli-model", None, use_env_model=False).model == "cli-model"
    monkeypatch.delenv("CLINAUDIT_LLM_MODEL")
    assert isinstance(planner_from_options(None, None, use_env_model=True), RulesPlanner)


def test_base_url_and_key_come_from_environment(monkeypatch):
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:9/v1")
    monkeypatch.setenv("OPENAI_API_KEY", "env-key")
    planner = LLMPlanner(model="m")
    assert planner.base_url == "http://127.0.0.1:9/v1"
    assert planner.api_key == "env-key"


def _load_scorer():
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "evals" / "planner" / "score.py"
    spec = importlib.util.spec_from_file_location("planner_score", path)
    module = importlib.util.module_from_spec(spec)
    # dataclasses look the module up in sys.modules while the file executes.
    sys.modules.setdefault("planner_score", module)
    spec.loader.exec_module(module)
    return module


def test_scenarios_cover_required_cases():
    scorer = _load_scorer()
    scenarios = scorer.load_scenarios()
    assert len(scenarios) >= 12
    contexts = [s.get("context") or {} for s in scenarios]
    assert any(c.get("ordinal") for c in contexts)
    assert any(c.get("costlier_error") in ("false_negative", "false_positive") for c in contexts)
    assert any(s["expect"].get("must_ask") for s in scenarios)
    shares = [min(s["dataset"]["class_counts"].values()) / sum(s["dataset"]["class_counts"].values())
              for s in scenarios]
    assert min(shares) < 0.01
    assert scorer.SCENARIOS.is_dir()


def test_rules_planner_meets_every_scenario():
    scorer = _load_scorer()
    scores = scorer.score_planner(RulesPlanner())
    assert {s.name: s.missed for s in scores} == {s.name: [] for s in scores}


def test_scorer_runs_llm_planner_and_counts_misses():
    scorer = _load_scorer()
    scenario = next(s for s in scorer.load_scenarios() if s["name"] == "vague_request")
    replies = [
        tool_calls(("ask_user", {"question": "Which domain?", "field": "domain"})),
        text("Enough."),
        tool_calls(("select_metrics", METRICS), ("select_shifts", SHIFTS)),
        tool_calls(("run_audit", {})),
    ]
    with ScriptedLLM(replies) as server:
        score = scorer.run_scenario(planner_for(server), scenario)
    assert "ask domain" not in score.missed
    assert "ask intended_use" in score.missed
    assert "shift family blur" in score.missed
    assert 0 < score.agreement < 1


def test_identifier_column_values_are_not_sent():
    info = ham_info()
    info.metadata.append(ColumnSummary(name="lesion_id", numeric=False, distinct=900,
                                       top_values={"HAM_0000118": 3, "HAM_0002730": 2}))
    info.metadata[0].top_values = {"male": 300, "female": 280}
    with ScriptedLLM(plan_replies()) as server:
        planner_for(server).plan(Context(), info)
    sent = json.dumps(server.requests[0])
    assert "HAM_0000118" not in sent
    assert "lesion_id" in sent
    assert "female" in sent
