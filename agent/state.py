"""State the audit graph carries between nodes, and the view of the data a planner may see.

The state holds only JSON-serialisable values so the langgraph checkpointer can persist it.
Loaded models and images are kept out of it (see `agent.resources`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, TypedDict

from pydantic import BaseModel

from tools.spec import AuditPlan, Context


class ColumnSummary(BaseModel):
    name: str
    numeric: bool
    distinct: int
    # Up to 20 most common values with their counts; aggregate only, never a patient row.
    top_values: dict[str, int] = {}
    max_value: float | None = None  # numeric columns only


class DatasetInfo(BaseModel):
    """Aggregate description of the data: the only view of it a planner (and so an LLM) gets."""

    classes: list[str]
    class_counts: dict[str, int]
    n_train: int
    n_calibration: int
    n_test: int
    greyscale: bool
    metadata: list[ColumnSummary] = []
    input_size: int = 64
    # The audit's audit.max_images: the audit predicts at most this many test images.
    max_images: int | None = None
    externals: list[str] = []


# ask(question, field, choices) -> the user's reply. It is None when no user can be prompted.
AskFn = Callable[[str, str, list[str] | None], str]


class Planner(Protocol):
    """Chooses the context questions, the plan, and the narrative; both planners implement it."""

    name: str

    def interview(self, context: Context, info: DatasetInfo, ask: AskFn | None) -> Context:
        """Return the context completed with the user's answers (or defaults without `ask`)."""

    def plan(self, context: Context, info: DatasetInfo) -> AuditPlan:
        """Choose metrics, shifts and subgroups, each with its reason."""

    def narrate(self, summary: dict[str, Any]) -> str | None:
        """Write the findings narrative from aggregate results; None to leave it out."""


class AuditState(TypedDict, total=False):
    spec: dict[str, Any]  # AuditSpec as JSON (paths as strings)
    spec_base: str  # folder that relative paths in the spec resolve against
    store_path: str
    out_dir: str | None
    audit_id: str
    context: dict[str, Any]
    dataset_info: dict[str, Any]
    plan: dict[str, Any]
    plan_confirmed: bool
    findings: list[dict[str, Any]]
    narrative: str | None
    report_paths: dict[str, str]
    log: list[str]
