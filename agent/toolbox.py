"""The tools a planner may call, their pydantic argument models and JSON schemas, and one
dispatcher that validates every call.

A model's tool call arrives as a name and a JSON string. `dispatch` parses the string with
`json.loads`, validates it against the tool's argument model and runs the tool. An unknown tool,
malformed JSON or an invalid argument is returned to the model as an error text it can correct.
Model output is only ever parsed as JSON, never evaluated as code.

Tools that act on the audit itself (`run_audit`, `fit_temperature`, `propose_mitigation`,
`write_report`) do not do the work inline. They record the request in the session and, where
they end a phase, set `session.done`, so the same langgraph graph runs the audit for both
planners.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from agent.state import AskFn, DatasetInfo
from tools.spec import AuditPlan, Context, MetricChoice, ShiftChoice, SubgroupChoice


class ToolError(ValueError):
    """A tool call the model must correct; its message goes back to the model."""


Phase = Literal["interview", "plan", "narrate"]


# ---- argument models ---------------------------------------------------------------------------

class _Args(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AskUserArgs(_Args):
    """Ask the user one question about the clinical context and wait for the answer."""

    question: str = Field(min_length=1, description="The question, in plain clinical language.")
    field: str | None = Field(None, description="Context field the answer fills (domain, "
                              "intended_use, deployment, positive_class, malignant_classes, "
                              "costlier_error, ordinal, referral_target); the answer is recorded "
                              "there when it is valid.")
    choices: list[str] | None = Field(None, description="Allowed answers, when the question has "
                                      "a fixed set of them.")


class RecordContextArgs(Context):
    """Record clinical context fields; only the fields given are changed."""


class ListMetricsArgs(_Args):
    """List the metric registry: ids, families, what each needs and how a clinician reads it."""

    family: Literal["counting", "multi_threshold", "calibration", "proper_score",
                    "failure_detection"] | None = Field(None, description="Only this family.")


class MetricSelection(_Args):
    id: str = Field(description="Metric id from list_metrics, e.g. balanced_accuracy.")
    params: dict[str, Any] = Field(default_factory=dict, description="Parameters that differ "
                                   "from the metric's defaults, e.g. {\"n_bins\": 15}; "
                                   "positive_class may be a class name.")
    reason: str = Field(min_length=1, description="Why a careful auditor includes it here.")


class SelectMetricsArgs(_Args):
    """Choose the audit's metrics and its primary metric; replaces any earlier selection."""

    metrics: list[MetricSelection] = Field(min_length=1)
    primary_metric: str = Field(description="Id of one of the selected metrics.")
    primary_reason: str = Field(min_length=1)


class ListPresetsArgs(_Args):
    """List the domain presets of image shifts and the full shift catalogue."""

    domain: str | None = Field(None, description="Only this domain's preset, e.g. dermatology.")


class ShiftSelection(_Args):
    name: str = Field(description="Shift name from list_presets.")
    severities: list[int] = Field(min_length=1, description="Severities in 1..5.")
    reason: str = Field(min_length=1, description="Which deployment change it stands for.")


class SelectShiftsArgs(_Args):
    """Choose the image shifts and their severities; replaces any earlier selection."""

    shifts: list[ShiftSelection] = Field(min_length=1)


class SubgroupSelection(_Args):
    column: str = Field(description="Metadata column name from the dataset description.")
    bands: list[float] | None = Field(None, description="Edges that cut a numeric column into "
                                      "bands, e.g. [0, 30, 45, 60, 75, 200] for age.")
    reason: str = Field(min_length=1)


class SelectSubgroupsArgs(_Args):
    """Choose the subgroup columns and the site column; replaces any earlier selection."""

    subgroups: list[SubgroupSelection] = Field(default_factory=list)
    site_column: str | None = Field(None, description="Column that names the acquisition site.")


class EstimateCostArgs(_Args):
    """Estimate conditions, image predictions and seconds of the plan selected so far."""


class RunAuditArgs(_Args):
    """Hand the selected plan to the user for confirmation and then run it."""


class FitTemperatureArgs(_Args):
    """Check temperature scaling: fitted on the calibration split, evaluated under every
    condition of the audit."""

    reason: str = Field(min_length=1, description="Why recalibration is worth checking here.")
    n_boot: int = Field(200, ge=20, le=10_000, description="Bootstrap refits for the interval "
                        "of the temperature.")


class ProposeMitigationArgs(_Args):
    """Propose one mitigation for a finding; it is listed in the report for a human to decide."""

    kind: Literal["recalibrate", "augment_and_retrain", "referral_threshold", "restrict_use",
                  "collect_data"]
    target: str = Field(min_length=1, description="Finding id or condition key it addresses.")
    reason: str = Field(min_length=1)


class WriteReportArgs(_Args):
    """Submit the findings narrative; the report is written with it after the number check."""

    narrative: str = Field(min_length=1, description="Plain-language findings narrative; every "
                           "number in it must come from the results given.")


# ---- session -----------------------------------------------------------------------------------

@dataclass
class ToolSession:
    """State that the tools read and change during one planner phase."""

    context: Context
    info: DatasetInfo
    ask: AskFn | None = None
    n_boot: int = 1000
    metrics: list[MetricChoice] | None = None
    primary_metric: str | None = None
    primary_reason: str = ""
    shifts: list[ShiftChoice] | None = None
    subgroups: list[SubgroupChoice] | None = None
    site_column: str | None = None
    # Requests for the graph (fit_temperature, propose_mitigation), as {"tool", "arguments"}.
    actions: list[dict[str, Any]] = field(default_factory=list)
    narrative: str | None = None
    # Set by a tool that hands control back to the graph (run_audit, write_report).
    done: bool = False

    def current_plan(self, planner: str) -> AuditPlan:
        """Return the plan selected so far; parts not yet selected stay empty."""
        return AuditPlan(metrics=self.metrics or [],
                         primary_metric=self.primary_metric or "balanced_accuracy",
                         primary_reason=self.primary_reason, shifts=self.shifts or [],
                         subgroups=self.subgroups or [], site_column=self.site_column,
                         planner=planner)


# ---- tools -------------------------------------------------------------------------------------

def _unknown_name_message(kind: str, name: str, known: list[str], hint: str) -> str:
    close = difflib.get_close_matches(name, known, n=3)
    suggestion = f" (did you mean {', '.join(close)}?)" if close else ""
    return f"unknown {kind} {name!r}{suggestion}; {hint}"


def _check_context(context: Context, info: DatasetInfo) -> None:
    if context.positive_class is not None and context.positive_class not in info.classes:
        raise ToolError(f"positive_class {context.positive_class!r} is not one of the classes "
                        f"{info.classes}")
    unknown = [c for c in context.malignant_classes if c not in info.classes]
    if unknown:
        raise ToolError(f"malignant_classes has {unknown[0]!r}, which is not one of the classes "
                        f"{info.classes}")
    if context.cost_matrix is not None:
        k = len(info.classes)
        if len(context.cost_matrix) != k or any(len(row) != k for row in context.cost_matrix):
            raise ToolError(f"cost_matrix must be {k} x {k} (one row and column per class "
                            f"{info.classes})")


def _merge_context(session: ToolSession, update: dict[str, Any]) -> dict[str, Any]:
    merged = Context.model_validate({**session.context.model_dump(), **update})
    _check_context(merged, session.info)
    session.context = merged
    return {key: getattr(merged, key) for key in update}


def ask_user(session: ToolSession, args: AskUserArgs) -> dict[str, Any]:
    from agent.planners.rules import apply_answer

    if session.ask is None:
        return {"answer": None, "note": "No user can be asked in this run; continue with the "
                "context already known and leave the rest unset."}
    if args.field is not None and args.field not in Context.model_fields:
        raise ToolError(_unknown_name_message("context field", args.field,
                                              list(Context.model_fields),
                                              "leave field empty for a free question"))
    answer = session.ask(args.question, args.field or "", args.choices)
    result: dict[str, Any] = {"answer": answer}
    if args.field and answer is not None:
        try:
            parsed = apply_answer(session.context, args.field, answer)
            result["recorded"] = _merge_context(session, {args.field: getattr(parsed, args.field)})
        except (ValueError, ValidationError) as error:
            # The answer stays with the model, which can record it in a valid form itself.
            result["not_recorded"] = f"{args.field}: {_error_text(error)}; call record_context " \
                                     "with a valid value"
    return result


def record_context(session: ToolSession, args: RecordContextArgs) -> dict[str, Any]:
    update = {key: getattr(args, key) for key in args.model_fields_set}
    if not update:
        raise ToolError("record_context needs at least one context field")
    return {"recorded": _merge_context(session, update),
            "context": session.context.model_dump(mode="json")}


def list_metrics(session: ToolSession, args: ListMetricsArgs) -> dict[str, Any]:
    from tools.metrics import REGISTRY

    binary = len(session.info.classes) == 2
    rows = []
    for metric_id, info in REGISTRY.items():
        if args.family is not None and info.family != args.family:
            continue
        rows.append({"id": metric_id, "display": info.display, "family": info.family,
                     "higher_is_better": info.higher_is_better, "needs": sorted(info.needs),
                     "usable": binary or "binary" not in info.needs,
                     "default_params": info.default_params, "reading": info.reading})
    return {"classes": session.info.classes, "metrics": rows}


def _check_metric(selection: MetricSelection, session: ToolSession) -> MetricChoice:
    import numpy as np

    from tools.metrics import REGISTRY, MetricError, compute_metric

    info = REGISTRY.get(selection.id)
    if info is None:
        raise ToolError(_unknown_name_message("metric id", selection.id, list(REGISTRY),
                                              "call list_metrics for the valid ids"))
    unknown = [key for key in selection.params if key not in info.default_params]
    if unknown:
        raise ToolError(f"metric {selection.id} has no parameter {unknown[0]!r}; its parameters "
                        f"are {sorted(info.default_params)}")
    classes = session.info.classes
    if "binary" in info.needs and len(classes) != 2:
        raise ToolError(f"metric {selection.id} needs a binary task, but the model has "
                        f"{len(classes)} classes")
    params = dict(selection.params)
    if "cost_matrix" in info.needs and params.get("cost_matrix") is None:
        if session.context.cost_matrix is None:
            raise ToolError(f"metric {selection.id} needs a cost matrix: record "
                            "context.cost_matrix first or pass params.cost_matrix")
        params["cost_matrix"] = session.context.cost_matrix
    positive = params.get("positive_class")
    if isinstance(positive, str):
        # Metrics take the class index; the model may name the class instead.
        if positive not in classes:
            raise ToolError(f"metric {selection.id}: positive_class {positive!r} is not one of "
                            f"the classes {classes}")
        params["positive_class"] = classes.index(positive)

    # A trial run on a tiny synthetic set catches parameter values the metric rejects.
    k = len(classes)
    labels = np.arange(2 * k) % k
    probs = np.full((2 * k, k), 0.5 / max(k - 1, 1))
    probs[np.arange(2 * k), labels] = 0.5
    probs /= probs.sum(axis=1, keepdims=True)
    try:
        compute_metric(selection.id, probs, labels, **params)
    except (MetricError, TypeError, ValueError) as error:
        raise ToolError(f"metric {selection.id} rejects params {selection.params}: "
                        f"{_error_text(error)}") from None
    return MetricChoice(id=selection.id, params=params, reason=selection.reason)


def select_metrics(session: ToolSession, args: SelectMetricsArgs) -> dict[str, Any]:
    chosen = [_check_metric(selection, session) for selection in args.metrics]
    if args.primary_metric not in {choice.id for choice in chosen}:
        raise ToolError(f"primary_metric {args.primary_metric!r} is not among the selected "
                        f"metrics {[c.id for c in chosen]}")
    session.metrics = chosen
    session.primary_metric = args.primary_metric
    session.primary_reason = args.primary_reason
    return {"selected": [c.id for c in chosen], "primary_metric": args.primary_metric}


def list_presets(session: ToolSession, args: ListPresetsArgs) -> dict[str, Any]:
    from tools.shifts import DOMAIN_PRESETS, SHIFTS

    presets = {}
    for name, preset in DOMAIN_PRESETS.items():
        aliases = [a.lower() for a in getattr(preset, "aliases", ())]
        if args.domain is not None and args.domain.lower() not in [name.lower(), *aliases]:
            continue
        presets[name] = [{"name": s.name, "severities": list(s.severities), "where": s.where}
                         for s in preset.shifts]
    if args.domain is not None and not presets:
        raise ToolError(_unknown_name_message("domain", args.domain, list(DOMAIN_PRESETS),
                                              "omit domain to list every preset"))
    catalogue = [{"name": info.name, "family": info.family, "description": info.description,
                  "colour": info.colour, "usable": not (info.colour and session.info.greyscale)}
                 for info in SHIFTS.values()]
    return {"greyscale_source": session.info.greyscale, "presets": presets, "shifts": catalogue}


def select_shifts(session: ToolSession, args: SelectShiftsArgs) -> dict[str, Any]:
    from tools.shifts import SHIFTS, validate_shift

    chosen = []
    for selection in args.shifts:
        if selection.name not in SHIFTS:
            raise ToolError(_unknown_name_message("shift", selection.name, list(SHIFTS),
                                                  "call list_presets for the valid names"))
        for severity in selection.severities:
            validate_shift(selection.name, severity, greyscale=session.info.greyscale)
        chosen.append(ShiftChoice(name=selection.name, severities=selection.severities,
                                  reason=selection.reason))
    session.shifts = chosen
    return {"selected": [{"name": c.name, "severities": c.severities} for c in chosen]}


def select_subgroups(session: ToolSession, args: SelectSubgroupsArgs) -> dict[str, Any]:
    columns = [column.name for column in session.info.metadata]
    for name in [s.column for s in args.subgroups] + [args.site_column or ""]:
        if name and name not in columns:
            raise ToolError(_unknown_name_message("metadata column", name, columns,
                                                  f"the dataset's columns are {columns}"))
    session.subgroups = [SubgroupChoice(column=s.column, bands=s.bands, reason=s.reason)
                         for s in args.subgroups]
    session.site_column = args.site_column
    return {"subgroups": [s.column for s in session.subgroups], "site_column": args.site_column}


def estimate_cost(session: ToolSession, args: EstimateCostArgs) -> dict[str, Any]:
    from agent.planners.rules import estimate_cost as rules_estimate

    cost = rules_estimate(session.current_plan("llm"), session.info, session.n_boot)
    return cost.model_dump()


def run_audit(session: ToolSession, args: RunAuditArgs) -> dict[str, Any]:
    missing = [name for name, value in (("select_metrics", session.metrics),
                                        ("select_shifts", session.shifts)) if value is None]
    if missing:
        raise ToolError(f"call {' and '.join(missing)} before run_audit")
    session.done = True
    return {"status": "The plan goes to the user for confirmation; the audit runs after that."}


def fit_temperature(session: ToolSession, args: FitTemperatureArgs) -> dict[str, Any]:
    # The audit runner fits and checks temperature scaling whenever a calibration split exists,
    # so this call confirms that it will happen (or explains why it cannot) and records why the
    # planner wants it.
    if session.info.n_calibration == 0:
        raise ToolError("the data has no calibration split, so temperature scaling cannot be "
                        "fitted; the spec's data.split.calibration must be above 0")
    session.actions.append({"tool": "fit_temperature", "arguments": args.model_dump()})
    return {"status": f"Scheduled: temperature scaling is fitted on the "
            f"{session.info.n_calibration} calibration images and checked under every "
            "condition of the audit."}


def propose_mitigation(session: ToolSession, args: ProposeMitigationArgs) -> dict[str, Any]:
    session.actions.append({"tool": "propose_mitigation", "arguments": args.model_dump()})
    return {"status": "Recorded for the report; a human decides whether to apply it."}


def write_report(session: ToolSession, args: WriteReportArgs) -> dict[str, Any]:
    session.narrative = args.narrative
    session.done = True
    return {"status": "The report is written with this narrative after its numbers are checked."}


@dataclass(frozen=True)
class Tool:
    name: str
    args: type[BaseModel]
    run: Callable[[ToolSession, Any], dict[str, Any]]
    phases: frozenset[str]

    def schema(self) -> dict[str, Any]:
        """Return the tool in the OpenAI chat-completions `tools` format."""
        parameters = self.args.model_json_schema()
        description = (self.args.__doc__ or "").strip()
        parameters.pop("title", None)
        parameters.pop("description", None)
        return {"type": "function",
                "function": {"name": self.name, "description": description,
                             "parameters": parameters}}


def _tool(name: str, args: type[BaseModel], run: Callable, *phases: str) -> Tool:
    return Tool(name, args, run, frozenset(phases))


TOOLS: dict[str, Tool] = {tool.name: tool for tool in [
    _tool("ask_user", AskUserArgs, ask_user, "interview"),
    _tool("record_context", RecordContextArgs, record_context, "interview", "plan"),
    _tool("list_metrics", ListMetricsArgs, list_metrics, "plan"),
    _tool("select_metrics", SelectMetricsArgs, select_metrics, "plan"),
    _tool("list_presets", ListPresetsArgs, list_presets, "interview", "plan"),
    _tool("select_shifts", SelectShiftsArgs, select_shifts, "plan"),
    _tool("select_subgroups", SelectSubgroupsArgs, select_subgroups, "plan"),
    _tool("estimate_cost", EstimateCostArgs, estimate_cost, "plan"),
    _tool("fit_temperature", FitTemperatureArgs, fit_temperature, "plan"),
    _tool("run_audit", RunAuditArgs, run_audit, "plan"),
    _tool("propose_mitigation", ProposeMitigationArgs, propose_mitigation, "narrate"),
    _tool("write_report", WriteReportArgs, write_report, "narrate"),
]}


def tool_schemas(phase: Phase) -> list[dict[str, Any]]:
    """Return the schemas of the tools allowed in one phase, for the `tools` request field."""
    return [tool.schema() for tool in TOOLS.values() if phase in tool.phases]


# ---- dispatcher --------------------------------------------------------------------------------

@dataclass
class ToolOutcome:
    """One dispatched call: `content` is the JSON text sent back to the model."""

    name: str
    ok: bool
    content: str


def _error_text(error: BaseException) -> str:
    if isinstance(error, ValidationError):
        parts = []
        for item in error.errors():
            where = ".".join(str(p) for p in item["loc"]) or "(arguments)"
            message = "unknown field" if item["type"] == "extra_forbidden" else item["msg"]
            parts.append(f"{where}: {message}")
        return "; ".join(parts)
    return str(error).splitlines()[0] if str(error) else type(error).__name__


def _failure(name: str, message: str) -> ToolOutcome:
    return ToolOutcome(name, False, json.dumps({"error": message + " Correct the call and try "
                                                "again."}))


def dispatch(session: ToolSession, name: str, arguments: str | None,
             phase: Phase | None = None) -> ToolOutcome:
    """Validate one tool call and run it; every invalid call returns the error for the model.

    `arguments` is the JSON string of the call. Only project errors (ValueError subclasses such
    as ToolError, ShiftError, MetricError and pydantic's ValidationError) become error texts; any
    other exception is a bug and propagates.
    """
    tool = TOOLS.get(name)
    allowed = [t.name for t in TOOLS.values() if phase is None or phase in t.phases]
    if tool is None or name not in allowed:
        return _failure(name, _unknown_name_message("tool", name, allowed,
                                                    f"available tools: {', '.join(allowed)}."))
    try:
        raw = json.loads(arguments or "{}")
    except json.JSONDecodeError as error:
        return _failure(name, f"arguments of {name} are not valid JSON ({error.msg} at "
                        f"character {error.pos}).")
    if not isinstance(raw, dict):
        return _failure(name, f"arguments of {name} must be a JSON object, got "
                        f"{type(raw).__name__}.")
    try:
        args = tool.args.model_validate(raw)
        result = tool.run(session, args)
    except ValueError as error:
        return _failure(name, f"{name} rejected the call: {_error_text(error)}.")
    return ToolOutcome(name, True, json.dumps(result, default=str))
