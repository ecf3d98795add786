"""The audit flow as a langgraph StateGraph: interview -> plan -> run -> findings -> report.

Nodes are small functions of the state. What must not be checkpointed (the planner object, the
progress callback, the function that prompts the user, the confirmation prompt) travels in the
run's `configurable` config instead of the state.
"""


from pathlib import Path
from typing import Any

from langchain_core.runnables import RunnableConfig

from agent import resources
from agent.state import AuditState, DatasetInfo
from tools.spec import AuditPlan, AuditSpec, Context, spec_from_dict
from tools.store import Store


def _options(config: RunnableConfig | None) -> dict[str, Any]:
    return (config or {}).get("configurable", {})


def _spec(state: AuditState) -> AuditSpec:
    """Return the spec, with the context as the interview completed it."""
    spec = spec_from_dict(state["spec"], Path(state.get("spec_base", ".")))
    if state.get("context"):
        spec.context = Context.model_validate(state["context"])
    return spec


def _log(state: AuditState, line: str) -> list[str]:
    return [*state.get("log", []), line]


def interview(state: AuditState, config: RunnableConfig | None = None) -> dict[str, Any]:
    options = _options(config)
    spec = _spec(state)
    loaded = resources.load(spec)
    info = resources.describe(loaded, spec.data.group_column, max_images=spec.audit.max_images)
    context = Context.model_validate(state.get("context") or spec.context.model_dump())
    context = options["planner"].interview(context, info, options.get("ask"))
    check_context_classes(context, info.classes)
    return {"context": context.model_dump(mode="json"),
            "dataset_info": info.model_dump(mode="json"),
            "log": _log(state, "interview finished")}


def check_context_classes(context: Context, classes: list[str]) -> None:
    """Raise SpecError when the context names a class the model does not have."""
    from tools.spec import SpecError

    named = [("context.positive_class", context.positive_class)] + [
        (f"context.malignant_classes[{i}]", name) for i, name in
        enumerate(context.malignant_classes)]
    for field, name in named:
        if name is not None and name not in classes:
            raise SpecError(f"{field}: {name!r} is not one of the model's classes {classes}")


def plan(state: AuditState, config: RunnableConfig | None = None) -> dict[str, Any]:
    options = _options(config)
    spec = _spec(state)
    context = Context.model_validate(state["context"])
    info = DatasetInfo.model_validate(state["dataset_info"])

    if state.get("plan"):
        chosen = AuditPlan.model_validate(state["plan"])
    elif spec.plan is not None:
        chosen = spec.plan
    else:
        chosen = options["planner"].plan(context, info, n_boot=spec.audit.bootstrap)

    confirm = options.get("confirm")
    confirmed = True if confirm is None else bool(confirm(chosen))
    update: dict[str, Any] = {"plan": chosen.model_dump(mode="json"), "plan_confirmed": confirmed}
    if confirmed:
        # A chat session may fix the audit id up front (its checkpoint thread id) so that
        # `--resume AUDIT_ID` finds both the conversation and the stored conditions.
        with Store(state["store_path"]) as store:
            audit_id = state.get("audit_id")
            if audit_id is None or not store.has_audit(audit_id):
                spec_json = spec.model_copy(update={"context": context}).model_dump(mode="json")
                loaded = resources.load(spec)
                update["audit_id"] = store.create_audit(
                    "image", spec_json, update["plan"], audit_id=audit_id,
                    meta={"planner": chosen.planner, "dataset": info.model_dump(mode="json"),
                          "data_hash": loaded.dataset.data_hash,
                          "data_name": loaded.dataset.name})
    return update


def run(state: AuditState, config: RunnableConfig | None = None) -> dict[str, Any]:
    import time

    from tools.runner import AuditInputs, AuditRunner

    options = _options(config)
    spec = _spec(state)
    loaded = resources.load(spec)
    chosen = AuditPlan.model_validate(state["plan"])
    test = loaded.dataset.part("test")
    if spec.audit.max_images and len(test.ids) > spec.audit.max_images:
        import numpy as np

        rng = np.random.default_rng(spec.audit.seed)
        keep = np.sort(rng.choice(len(test.ids), spec.audit.max_images, replace=False))
        test = test.subset(keep)
    started = time.perf_counter()
    with Store(state["store_path"]) as store:
        store.update_audit(state["audit_id"], status="running")
        with store.status_on_error(state["audit_id"]):
            runner = AuditRunner(spec, chosen, store, state["audit_id"],
                                 AuditInputs(loaded.classifier, test, loaded.externals,
                                             calibration=loaded.dataset.part("calibration")),
                                 progress=options.get("progress"))
            summary = runner.run()
        store.update_audit(state["audit_id"], meta={
            "timings": summary["timings"], "run_seconds": time.perf_counter() - started})
    return {"log": _log(state, "conditions finished")}


def findings(state: AuditState, config: RunnableConfig | None = None) -> dict[str, Any]:
    from tools.runner import find_and_store_findings

    spec = _spec(state)
    with Store(state["store_path"]) as store, store.status_on_error(state["audit_id"]):
        found = find_and_store_findings(store, state["audit_id"], spec)
    return {"findings": found, "log": _log(state, f"{len(found)} findings")}


def report(state: AuditState, config: RunnableConfig | None = None) -> dict[str, Any]:
    from tools.report import write_audit_report

    options = _options(config)
    spec = _spec(state)
    out_dir = Path(state.get("out_dir") or Path("audits") / state["audit_id"])
    with Store(state["store_path"]) as store:
        narrative = None
        planner = options.get("planner")
        if planner is not None:
            from tools.report.data import aggregate_summary

            narrative = planner.narrate(aggregate_summary(store, state["audit_id"]))
        if narrative is not None:
            store.save_artifact(state["audit_id"], "narrative", narrative)
        if spec.gates:
            store.save_artifact(state["audit_id"], "gates",
                                gate_outcome(store, state["audit_id"], spec.gates))
        # Finished before rendering, so the report states the audit's final status.
        store.update_audit(state["audit_id"], status="finished")
        paths = write_audit_report(store, state["audit_id"], out_dir, narrative=narrative,
                                   include_images=spec.report.include_images)
    return {"report_paths": {k: str(v) for k, v in paths.items()}, "narrative": narrative,
            "log": _log(state, f"report written to {out_dir}")}


def gate_outcome(store: Store, audit_id: str, gates) -> dict[str, Any]:
    """Evaluate the spec's gates on the stored results; return the count and the failures."""
    from tools.gates import evaluate_gates
    from tools.metrics import REGISTRY

    failures = evaluate_gates(gates, store.results(audit_id), store.differences(audit_id),
                              {k: v.higher_is_better for k, v in REGISTRY.items()})
    return {"checked": len(gates), "failures": [f["message"] for f in failures]}


def _after_plan(state: AuditState) -> str:
    return "run" if state.get("plan_confirmed") else "__end__"


def build_graph(checkpointer=None):
    """Assemble the audit graph; pass a checkpointer to make a conversation resumable."""
    from langgraph.graph import END, START, StateGraph

    graph = StateGraph(AuditState)
    graph.add_node("interview", interview)
    graph.add_node("plan", plan)
    graph.add_node("run", run)
    graph.add_node("findings", findings)
    graph.add_node("report", report)

    graph.add_edge(START, "interview")
    graph.add_edge("interview", "plan")
    graph.add_conditional_edges("plan", _after_plan, {"run": "run", "__end__": END})
    graph.add_edge("run", "findings")
    graph.add_edge("findings", "report")
    graph.add_edge("report", END)
    return graph.compile(checkpointer=checkpointer)


def initial_state(spec: AuditSpec, spec_base: Path, store_path: Path,
                  out_dir: Path | None) -> AuditState:
    return {
        "spec": spec.model_dump(mode="json"),
        "spec_base": str(spec_base),
        "store_path": str(store_path),
        "out_dir": str(out_dir) if out_dir else None,
        "context": spec.context.model_dump(mode="json"),
        "plan": spec.plan.model_dump(mode="json") if spec.plan else {},
        "log": [],
    }
