"""The LLM planner: chat completions with tools against any OpenAI-compatible endpoint.

It interviews the user through `ask_user` tool calls, plans through `select_*` calls and writes
the findings narrative through `write_report`. Every call goes through the toolbox dispatcher, so
a malformed or invalid call returns its error to the model, which may retry a bounded number of
times. Where the model leaves a part of the plan unselected, the rules planner fills that part
and notes this in the choice's reason. The model sees only the context the user typed, `DatasetInfo` and
aggregate results.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

from agent.narrative import check_narrative
from agent.planners import rules
from agent.state import AskFn, DatasetInfo
from agent.toolbox import Phase, ToolSession, dispatch, tool_schemas
from prompts import load_prompt
from tools.spec import AuditPlan, Context

log = logging.getLogger(__name__)

# Metadata columns with more distinct values than this are sent to the model without their
# values: such a column is an identifier (patient or lesion id) or free text, not a category.
MAX_CATEGORY_VALUES = 20

MODEL_ENV = "CLINAUDIT_LLM_MODEL"
BASE_URL_ENV = "OPENAI_BASE_URL"
API_KEY_ENV = "OPENAI_API_KEY"


class LLMError(ValueError):
    """The LLM endpoint failed, timed out or is misconfigured."""


def model_view(info: DatasetInfo) -> dict[str, Any]:
    """Return the dataset description the model may see: `info` without the values of
    identifier-like columns, whose most common values would be patient or lesion ids."""
    view = info.model_dump(mode="json")
    for column in view["metadata"]:
        if column["distinct"] > MAX_CATEGORY_VALUES:
            column["top_values"] = {}
    return view


def _message_dict(message: Any) -> dict[str, Any]:
    """Turn the client's assistant message into the plain dict the next request sends back."""
    out: dict[str, Any] = {"role": "assistant", "content": message.content}
    if message.tool_calls:
        out["tool_calls"] = [{"id": call.id, "type": "function",
                              "function": {"name": call.function.name,
                                           "arguments": call.function.arguments}}
                             for call in message.tool_calls]
    return out


class LLMPlanner:
    """Planner that lets an LLM choose the questions, the plan and the narrative via tools."""

    def __init__(self, model: str, base_url: str | None = None, api_key: str | None = None,
                 timeout: float = 60.0, max_retries: int = 2, max_turns: int = 16,
                 max_tool_errors: int = 3, client: Any = None):
        self.model = model
        self.base_url = base_url or os.environ.get(BASE_URL_ENV)
        self.api_key = api_key or os.environ.get(API_KEY_ENV)
        self.timeout = timeout
        self.max_retries = max_retries
        self.max_turns = max_turns
        self.max_tool_errors = max_tool_errors
        self.name = f"llm:{model}"
        self._client = client
        self.messages: list[dict[str, Any]] = []
        self.usage = {"requests": 0, "prompt_tokens": 0, "completion_tokens": 0,
                      "total_tokens": 0}
        self.actions: list[dict[str, Any]] = []
        # Numbers the last narrative used that no tool produced.
        self.unverified: list[str] = []
        # Phases the model ended without finishing, e.g. after too many invalid calls.
        self.fallbacks: list[str] = []

    # ---- endpoint ----

    def client(self) -> Any:
        if self._client is None:
            from openai import OpenAI

            # The openai client rejects a missing key; a local server usually ignores it.
            self._client = OpenAI(base_url=self.base_url, api_key=self.api_key or "unused",
                                  timeout=self.timeout, max_retries=self.max_retries)
        return self._client

    def _complete(self, phase: Phase) -> Any:
        import openai

        try:
            response = self.client().chat.completions.create(
                model=self.model, messages=self.messages, tools=tool_schemas(phase),
                tool_choice="auto")
        except openai.APITimeoutError:
            raise LLMError(f"LLM request to {self.base_url or 'the OpenAI API'} timed out after "
                           f"{self.timeout:.0f} s and {self.max_retries} retries") from None
        except openai.APIConnectionError as error:
            raise LLMError(f"cannot reach the LLM endpoint {self.base_url or 'api.openai.com'} "
                           f"({error}); check --llm-base-url") from None
        except openai.APIStatusError as error:
            raise LLMError(f"LLM endpoint returned HTTP {error.status_code} for model "
                           f"{self.model!r}: {error.message}") from None
        self.usage["requests"] += 1
        if response.usage is not None:
            for key in ("prompt_tokens", "completion_tokens", "total_tokens"):
                self.usage[key] += int(getattr(response.usage, key, 0) or 0)
        if not response.choices:
            raise LLMError(f"LLM endpoint returned no choices for model {self.model!r}")
        return response.choices[0].message

    def _run_phase(self, session: ToolSession, phase: Phase, prompt: str) -> str | None:
        """Send the phase's prompt and serve tool calls until a tool ends the phase, the model
        answers without a tool call, or the turn or error budget runs out.

        Returns the model's last plain-text content, if any.
        """
        if not self.messages:
            self.messages.append({"role": "system", "content": load_prompt("system")})
        self.messages.append({"role": "user", "content": prompt})
        errors_in_a_row = 0
        for _ in range(self.max_turns):
            message = self._complete(phase)
            self.messages.append(_message_dict(message))
            if not message.tool_calls:
                return message.content
            for call in message.tool_calls:
                outcome = dispatch(session, call.function.name, call.function.arguments, phase)
                self.messages.append({"role": "tool", "tool_call_id": call.id,
                                      "content": outcome.content})
                errors_in_a_row = 0 if outcome.ok else errors_in_a_row + 1
                if not outcome.ok:
                    log.info("tool call %s rejected: %s", call.function.name, outcome.content)
            if session.done:
                return None
            if errors_in_a_row > self.max_tool_errors:
                log.warning("%s phase stopped after %d invalid tool calls in a row",
                            phase, errors_in_a_row)
                self.fallbacks.append(f"{phase}: {errors_in_a_row} invalid tool calls in a row")
                return None
        log.warning("%s phase stopped after %d turns without finishing", phase, self.max_turns)
        self.fallbacks.append(f"{phase}: no end after {self.max_turns} turns")
        return None

    # ---- Planner protocol ----

    def interview(self, context: Context, info: DatasetInfo, ask: AskFn | None) -> Context:
        session = ToolSession(context=context, info=info, ask=ask)
        user_available = ("A user is available to answer questions." if ask is not None else
                          "No user can be asked in this run: do not call ask_user; record only "
                          "what the context already implies.")
        prompt = load_prompt("interview", user_available=user_available,
                             context=json.dumps(context.model_dump(mode="json"), indent=1),
                             dataset=json.dumps(model_view(info), indent=1))
        self._run_phase(session, "interview", prompt)
        return session.context

    def plan(self, context: Context, info: DatasetInfo, n_boot: int = 1000) -> AuditPlan:
        session = ToolSession(context=context, info=info, n_boot=n_boot)
        values = {"context": json.dumps(context.model_dump(mode="json"), indent=1),
                  "dataset": json.dumps(model_view(info), indent=1)}
        prompt = load_prompt("metrics") + "\n\n" + load_prompt("shifts", **values)
        self._run_phase(session, "plan", prompt)
        self.actions.extend(session.actions)
        return self._complete_plan(session, context, info, n_boot)

    def _complete_plan(self, session: ToolSession, context: Context, info: DatasetInfo,
                       n_boot: int) -> AuditPlan:
        """Fill the parts the model left unselected from the rules planner, saying so."""
        fallback = " (chosen by the rules planner because the LLM selected none)"
        plan = session.current_plan(self.name)
        if session.metrics is None:
            metrics, primary, reason = rules.choose_metrics(context, info)
            plan.metrics = [m.model_copy(update={"reason": m.reason + fallback}) for m in metrics]
            plan.primary_metric, plan.primary_reason = primary, reason + fallback
        if session.shifts is None:
            plan.shifts = [s.model_copy(update={"reason": s.reason + fallback})
                           for s in rules.choose_shifts(context, info)]
        if session.subgroups is None:
            plan.subgroups, plan.site_column = rules.choose_subgroups(info)
        plan.cost = rules.estimate_cost(plan, info, n_boot)
        return plan

    def narrate(self, summary: dict[str, Any]) -> str | None:
        session = ToolSession(context=Context.model_validate(summary.get("context") or {}),
                              info=DatasetInfo(classes=[], class_counts={}, n_train=0,
                                               n_calibration=0, n_test=0, greyscale=False))
        content = self._run_phase(session, "narrate",
                                  load_prompt("narrative", summary=json.dumps(summary, indent=1)))
        self.actions.extend(session.actions)
        text = session.narrative or content
        if not text:
            return None
        mitigations = [a["arguments"] for a in session.actions
                       if a["tool"] == "propose_mitigation"]
        if mitigations:
            text += "\n\nProposed mitigations (for a human to decide):\n" + "\n".join(
                f"- {m['kind']} for {m['target']}: {m['reason']}" for m in mitigations)
        guarded = check_narrative(text, summary)
        self.unverified = guarded.unmatched
        return guarded.text


def planner_from_options(llm_model: str | None, llm_base_url: str | None,
                         use_env_model: bool) -> Any:
    """Return an LLMPlanner when a model is named (on the command line, or in the environment
    where `use_env_model` allows it), else the rules planner."""
    model = llm_model or (os.environ.get(MODEL_ENV) if use_env_model else None)
    if not model:
        return rules.RulesPlanner()
    return LLMPlanner(model=model, base_url=llm_base_url)
