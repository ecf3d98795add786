"""The toolbox dispatcher: schemas, validation errors returned to the model, and tool effects."""

from __future__ import annotations

import json

import pytest

from agent.state import ColumnSummary, DatasetInfo
from agent.toolbox import TOOLS, ToolSession, dispatch, tool_schemas
from tools.spec import Context

HAM_CLASSES = ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]


def ham_info(greyscale: bool = False) -> DatasetInfo:
    return DatasetInfo(
        classes=HAM_CLASSES,
        class_counts=dict(zip(HAM_CLASSES, [80, 120, 260, 30, 280, 1700, 40])),
        n_train=1500, n_calibration=400, n_test=600, greyscale=greyscale,
        metadata=[ColumnSummary(name="sex", numeric=False, distinct=2,
                                top_values={"male": 300, "female": 280}),
                  ColumnSummary(name="age", numeric=True, distinct=18),
                  ColumnSummary(name="dataset", numeric=False, distinct=4)])


def session(**changes) -> ToolSession:
    return ToolSession(context=Context(), info=ham_info(), **changes)


def error_of(outcome) -> str:
    assert not outcome.ok
    return json.loads(outcome.content)["error"]


def test_every_schema_is_openai_function_format():
    for phase in ("interview", "plan", "narrate"):
        for schema in tool_schemas(phase):
            assert schema["type"] == "function"
            function = schema["function"]
            assert function["name"] in TOOLS
            assert function["description"]
            assert function["parameters"]["type"] == "object"
            json.dumps(schema)


def test_phases_offer_only_their_tools():
    names = {s["function"]["name"] for s in tool_schemas("interview")}
    assert "ask_user" in names
    assert "run_audit" not in names
    assert {s["function"]["name"] for s in tool_schemas("narrate")} == {
        "propose_mitigation", "write_report"}


def test_unknown_tool_returns_error_with_names():
    message = error_of(dispatch(session(), "delete_everything", "{}", "plan"))
    assert "unknown tool 'delete_everything'" in message
    assert "select_metrics" in message


def test_tool_outside_its_phase_is_unknown():
    message = error_of(dispatch(session(), "run_audit", "{}", "interview"))
    assert "unknown tool 'run_audit'" in message


def test_malformed_json_returns_parse_error():
    message = error_of(dispatch(session(), "select_metrics", '{"metrics": [', "plan"))
    assert "not valid JSON" in message


def test_json_that_is_not_an_object_is_rejected():
    message = error_of(dispatch(session(), "select_metrics", "[1, 2]", "plan"))
    assert "must be a JSON object" in message


def test_code_in_arguments_is_never_run(tmp_path):
    marker = tmp_path / "ran"
    payload = f"__import__('pathlib').Path({str(marker)!r}).touch()"
    outcome = dispatch(session(), "select_metrics", payload, "plan")
    assert not outcome.ok
    assert not marker.exists()


def test_unknown_metric_id_names_close_match():
    s = session()
    args = {"metrics": [{"id": "balanced_acuracy", "reason": "r"}],
            "primary_metric": "balanced_acuracy", "primary_reason": "r"}
    message = error_of(dispatch(s, "select_metrics", json.dumps(args), "plan"))
    assert "unknown metric id 'balanced_acuracy'" in message
    assert "balanced_accuracy" in message
    assert s.metrics is None


def test_missing_reason_is_a_validation_error():
    args = {"metrics": [{"id": "accuracy"}], "primary_metric": "accuracy", "primary_reason": "r"}
    message = error_of(dispatch(session(), "select_metrics", json.dumps(args), "plan"))
    assert "metrics.0.reason" in message


def test_unknown_metric_parameter_is_rejected():
    args = {"metrics": [{"id": "ece_top_label", "params": {"bins": 10}, "reason": "r"}],
            "primary_metric": "ece_top_label", "primary_reason": "r"}
    message = error_of(dispatch(session(), "select_metrics", json.dumps(args), "plan"))
    assert "no parameter 'bins'" in message


def test_invalid_parameter_value_is_rejected_by_the_metric():
    args = {"metrics": [{"id": "cohen_kappa", "params": {"weighting": "cubic"}, "reason": "r"}],
            "primary_metric": "cohen_kappa", "primary_reason": "r"}
    message = error_of(dispatch(session(), "select_metrics", json.dumps(args), "plan"))
    assert "cubic" in message


def test_binary_only_metric_rejected_on_multiclass():
    args = {"metrics": [{"id": "brier_binary", "reason": "r"}],
            "primary_metric": "brier_binary", "primary_reason": "r"}
    message = error_of(dispatch(session(), "select_metrics", json.dumps(args), "plan"))
    assert "needs a binary task" in message


def test_primary_metric_must_be_selected():
    args = {"metrics": [{"id": "accuracy", "reason": "r"}],
            "primary_metric": "auroc", "primary_reason": "r"}
    message = error_of(dispatch(session(), "select_metrics", json.dumps(args), "plan"))
    assert "primary_metric 'auroc'" in message


def test_valid_metric_selection_is_stored():
    s = session()
    args = {"metrics": [{"id": "balanced_accuracy", "reason": "imbalanced classes"},
                        {"id": "cohen_kappa", "params": {"weighting": "quadratic"},
                         "reason": "ordered grades"}],
            "primary_metric": "cohen_kappa", "primary_reason": "grades"}
    outcome = dispatch(s, "select_metrics", json.dumps(args), "plan")
    assert outcome.ok, outcome.content
    assert [m.id for m in s.metrics] == ["balanced_accuracy", "cohen_kappa"]
    assert s.metrics[1].params == {"weighting": "quadratic"}
    assert s.primary_metric == "cohen_kappa"


def test_list_metrics_filters_by_family():
    outcome = dispatch(session(), "list_metrics", '{"family": "calibration"}', "plan")
    rows = json.loads(outcome.content)["metrics"]
    assert rows
    assert {row["family"] for row in rows} == {"calibration"}
    assert "ece_top_label" in {row["id"] for row in rows}


def test_unknown_shift_and_bad_severity_are_rejected():
    s = session()
    unknown = {"shifts": [{"name": "jpg", "severities": [1], "reason": "r"}]}
    assert "unknown shift 'jpg'" in error_of(dispatch(s, "select_shifts", json.dumps(unknown),
                                                      "plan"))
    too_severe = {"shifts": [{"name": "jpeg", "severities": [6], "reason": "r"}]}
    assert "6" in error_of(dispatch(s, "select_shifts", json.dumps(too_severe), "plan"))
    assert s.shifts is None


def test_colour_shift_rejected_on_greyscale_source():
    s = ToolSession(context=Context(), info=ham_info(greyscale=True))
    args = {"shifts": [{"name": "hue", "severities": [2], "reason": "r"}]}
    assert not dispatch(s, "select_shifts", json.dumps(args), "plan").ok


def test_valid_shift_selection_is_stored():
    s = session()
    args = {"shifts": [{"name": "jpeg", "severities": [5, 2], "reason": "compression"}]}
    assert dispatch(s, "select_shifts", json.dumps(args), "plan").ok
    assert s.shifts[0].name == "jpeg"
    assert s.shifts[0].severities == [2, 5]


def test_subgroup_column_must_exist():
    args = {"subgroups": [{"column": "skin_type", "reason": "r"}]}
    message = error_of(dispatch(session(), "select_subgroups", json.dumps(args), "plan"))
    assert "unknown metadata column 'skin_type'" in message


def test_record_context_checks_class_names():
    s = session()
    message = error_of(dispatch(s, "record_context", '{"positive_class": "melanoma"}', "plan"))
    assert "positive_class 'melanoma'" in message
    assert dispatch(s, "record_context", '{"positive_class": "mel", "ordinal": false}', "plan").ok
    assert s.context.positive_class == "mel"
    assert s.context.ordinal is False


def test_record_context_rejects_unknown_field():
    message = error_of(dispatch(session(), "record_context", '{"hospital": "x"}', "interview"))
    assert "hospital: unknown field" in message


def test_ask_user_records_a_valid_answer():
    asked = []

    def ask(question, field, choices):
        asked.append((question, field, choices))
        return "false_negative"

    s = session(ask=ask)
    args = {"question": "Which error costs more?", "field": "costlier_error",
            "choices": ["false_negative", "false_positive", "equal"]}
    outcome = dispatch(s, "ask_user", json.dumps(args), "interview")
    assert outcome.ok
    assert asked == [("Which error costs more?", "costlier_error",
                      ["false_negative", "false_positive", "equal"])]
    assert s.context.costlier_error == "false_negative"


def test_ask_user_keeps_an_invalid_answer_unrecorded():
    s = session(ask=lambda question, field, choices: "the misses")
    args = {"question": "Which error costs more?", "field": "costlier_error"}
    result = json.loads(dispatch(s, "ask_user", json.dumps(args), "interview").content)
    assert result["answer"] == "the misses"
    assert "costlier_error" in result["not_recorded"]
    assert s.context.costlier_error is None


def test_ask_user_without_user_returns_note():
    result = json.loads(dispatch(session(), "ask_user", '{"question": "Domain?"}',
                                 "interview").content)
    assert result["answer"] is None


def test_run_audit_needs_metrics_and_shifts():
    s = session()
    message = error_of(dispatch(s, "run_audit", "{}", "plan"))
    assert "select_metrics and select_shifts" in message
    assert not s.done


def test_run_audit_ends_planning_after_selections():
    s = session()
    dispatch(s, "select_metrics", json.dumps({
        "metrics": [{"id": "accuracy", "reason": "r"}], "primary_metric": "accuracy",
        "primary_reason": "r"}), "plan")
    dispatch(s, "select_shifts", json.dumps({
        "shifts": [{"name": "jpeg", "severities": [3], "reason": "r"}]}), "plan")
    assert dispatch(s, "run_audit", "{}", "plan").ok
    assert s.done


def test_estimate_cost_counts_conditions():
    s = session(n_boot=50)
    dispatch(s, "select_shifts", json.dumps({
        "shifts": [{"name": "jpeg", "severities": [1, 3], "reason": "r"}]}), "plan")
    cost = json.loads(dispatch(s, "estimate_cost", "{}", "plan").content)
    # clean + two shifted conditions, each predicting the 600 test images
    assert cost["conditions"] == 3
    assert cost["images_predicted"] == 1800


def test_fit_temperature_and_mitigation_are_recorded_as_requests():
    s = session()
    assert dispatch(s, "fit_temperature", '{"reason": "overconfident"}', "plan").ok
    args = {"kind": "recalibrate", "target": "shift:jpeg:5", "reason": "ECE rose"}
    assert dispatch(s, "propose_mitigation", json.dumps(args), "narrate").ok
    assert [a["tool"] for a in s.actions] == ["fit_temperature", "propose_mitigation"]


def test_write_report_stores_narrative_and_ends_phase():
    s = session()
    assert dispatch(s, "write_report", '{"narrative": "All fine."}', "narrate").ok
    assert s.narrative == "All fine."
    assert s.done


@pytest.mark.parametrize("arguments", [None, ""])
def test_empty_arguments_mean_no_arguments(arguments):
    assert dispatch(session(), "estimate_cost", arguments, "plan").ok


def test_positive_class_name_becomes_index():
    s = session()
    args = {"metrics": [{"id": "sensitivity", "params": {"positive_class": "mel"},
                         "reason": "missed melanoma"}],
            "primary_metric": "sensitivity", "primary_reason": "r"}
    assert dispatch(s, "select_metrics", json.dumps(args), "plan").ok
    assert s.metrics[0].params == {"positive_class": 4}


def test_unknown_positive_class_name_is_rejected():
    args = {"metrics": [{"id": "sensitivity", "params": {"positive_class": "melanoma"},
                         "reason": "r"}],
            "primary_metric": "sensitivity", "primary_reason": "r"}
    message = error_of(dispatch(session(), "select_metrics", json.dumps(args), "plan"))
    assert "positive_class 'melanoma'" in message


def test_fit_temperature_needs_calibration_split():
    info = ham_info().model_copy(update={"n_calibration": 0})
    s = ToolSession(context=Context(), info=info)
    message = error_of(dispatch(s, "fit_temperature", '{"reason": "r"}', "plan"))
    assert "no calibration split" in message
    assert s.actions == []
