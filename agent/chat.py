"""`clinaudit chat`: a terminal conversation that plans, confirms, runs and reports an audit.

The command requests only the context the spec or the options leave open, shows the plan with
its cost and asks to confirm it, then runs the audit with progress bars. A langgraph SQLite
checkpointer keeps the conversation state (context and plan) under the audit id, and the store
keeps finished conditions, so `--resume AUDIT_ID` continues after Ctrl-C or a crash without
redoing either. An interview that stops with an exception (Ctrl-C, the end of piped input, an
LLM error) first writes the answers given so far into the checkpoint. After the audit, the
spec's gates are checked as `clinaudit run` checks them, and a failed gate exits with code 1.
"""

from __future__ import annotations

import csv
import time
import uuid
from pathlib import Path
from typing import Any

import typer

from agent.cli_common import (
    OutOption,
    ProgressBars,
    StoreOption,
    bad_input_exits,
    console,
    err_console,
    store_path,
)

# Manifest file names and column names tried, in order, when `--data` names a folder.
MANIFEST_NAMES = ["metadata.csv", "manifest.csv", "labels.csv"]
ID_COLUMNS = ["image_id", "id", "image", "filename", "file"]
LABEL_COLUMNS = ["label", "dx", "diagnosis", "class", "target", "grade"]
GROUP_COLUMNS = ["lesion_id", "patient_id", "subject_id", "patient"]


class ChatInputError(ValueError):
    """Options of `clinaudit chat` that cannot describe an audit."""


def checkpoint_path(store_file: Path) -> Path:
    """SQLite file of the chat checkpoints, kept beside the store."""
    return store_file.with_name(store_file.name + ".chat.sqlite")


def new_audit_id() -> str:
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"


def _pick_column(columns: list[str], candidates: list[str], what: str, folder: Path,
                 ask_choice) -> str | None:
    lowered = {c.lower(): c for c in columns}
    for name in candidates:
        if name in lowered:
            return lowered[name]
    if ask_choice is None:
        raise ChatInputError(f"{folder}: no {what} column among {columns}; pass --spec with "
                             f"data.{what}_column set")
    return ask_choice(f"Which column of the manifest holds the {what}?", columns)


def data_section(folder: Path, ask_choice=None) -> dict[str, Any]:
    """Describe a dataset folder (a CSV manifest and an images/ folder) as the spec's data
    section, guessing the id, label and group columns from their usual names."""
    manifest = next((folder / name for name in MANIFEST_NAMES if (folder / name).is_file()), None)
    if manifest is None:
        raise ChatInputError(f"--data {folder}: no manifest found (looked for "
                             f"{', '.join(MANIFEST_NAMES)})")
    images = folder / "images"
    if not images.is_dir():
        raise ChatInputError(f"--data {folder}: the images/ folder is missing")
    with open(manifest, newline="") as handle:
        columns = next(csv.reader(handle), [])
    id_column = _pick_column(columns, ID_COLUMNS, "id", folder, ask_choice)
    label_column = _pick_column(columns, LABEL_COLUMNS, "label", folder, ask_choice)
    group = next((c for c in columns if c.lower() in GROUP_COLUMNS), None)
    metadata = [c for c in columns if c not in (id_column, label_column, group)]
    return {"manifest": str(manifest.resolve()), "images": str(images.resolve()),
            "id_column": id_column, "label_column": label_column, "metadata": metadata,
            "group_column": group}


def build_spec(spec_file: Path | None, data: Path | None, arch: str | None,
               checkpoint: Path | None, torchscript: Path | None,
               audit_overrides: dict[str, Any], ask_choice=None):
    """Return (spec, base folder) from a spec file and/or the model and data options."""
    from tools.spec import load_spec, spec_from_dict

    if spec_file is None and data is None:
        raise ChatInputError("no data: pass --data FOLDER (a CSV manifest and images/) or "
                             "--spec FILE")
    if spec_file is not None:
        spec = load_spec(spec_file)
        raw, base = spec.model_dump(mode="json", exclude_none=False), spec_file.parent.resolve()
    else:
        raw, base = {}, Path.cwd()
    if data is not None:
        raw["data"] = data_section(data, ask_choice)
    model = dict(raw.get("model") or {})
    if torchscript is not None:
        model.update(torchscript=str(torchscript.resolve()), arch=None, checkpoint=None)
    if checkpoint is not None:
        model.update(checkpoint=str(checkpoint.resolve()), torchscript=None)
    if arch is not None:
        model["arch"] = arch
    if spec_file is None and not (torchscript or checkpoint):
        raise ChatInputError("no classifier: pass --checkpoint (with --arch) or --torchscript")
    raw["model"] = model
    raw["audit"] = {**(raw.get("audit") or {}), **audit_overrides}
    return spec_from_dict(raw, base, source=str(spec_file or "chat options")), base


class PlanFilter:
    """Wrap a planner and keep only the named shifts and severities of its plans."""

    def __init__(self, planner, shifts: list[str] | None, severities: list[int] | None):
        self.planner, self.shifts, self.severities = planner, shifts, severities
        self.name = planner.name

    def interview(self, context, info, ask):
        return self.planner.interview(context, info, ask)

    def plan(self, context, info, n_boot: int = 1000):
        from agent.planners.rules import estimate_cost
        from tools.shifts import validate_shift
        from tools.spec import ShiftChoice

        plan = self.planner.plan(context, info, n_boot=n_boot)
        kept = plan.shifts
        if self.shifts:
            for name in self.shifts:
                validate_shift(name, 1, greyscale=info.greyscale)
            kept = [s for s in kept if s.name in self.shifts]
            kept += [ShiftChoice(name=n, reason="requested with --shifts")
                     for n in self.shifts if n not in {s.name for s in kept}]
        if self.severities:
            kept = [s.model_copy(update={"severities": self.severities}) for s in kept]
        plan = plan.model_copy(update={"shifts": kept})
        plan.cost = estimate_cost(plan, info, n_boot)
        return plan

    def narrate(self, summary):
        return self.planner.narrate(summary)


class LazyProgressBars:
    """Progress bars that start at the first update, so prompts before the run stay clean."""

    def __init__(self) -> None:
        self.bars = None

    def __call__(self, task: str, done: int, total: int) -> None:
        if self.bars is None:

            self.bars = ProgressBars().__enter__()
        self.bars(task, done, total)

    def close(self) -> None:
        if self.bars is not None:
            self.bars.__exit__(None, None, None)
            self.bars = None


def _ask(question: str, field: str, choices: list[str] | None) -> str:
    from rich.prompt import Prompt


    return Prompt.ask(f"[bold]{question}[/]", choices=choices, console=console)


def _ask_choice(question: str, choices: list[str]) -> str:
    return _ask(question, "", choices)


class InterviewRecorder:
    """The `ask` function of the graph, which prompts the user and records each answer to a
    context field, so that an interrupted interview can save them in the checkpoint."""

    def __init__(self) -> None:
        self.answers: list[tuple[str, str]] = []

    def __call__(self, question: str, field: str, choices: list[str] | None) -> str:
        answer = _ask(question, field, choices)
        if field and answer is not None:
            self.answers.append((field, answer))
        return answer


def save_interview_answers(graph, config: dict, answers: list[tuple[str, str]]) -> int:
    """Write the answers of an unfinished interview into the checkpointed context and return how
    many were written.

    The interview node returns its context only when it finishes, so without this a resumed
    chat would ask every question again. The update is recorded as the graph's input, so the
    checkpoint still continues at the interview, which asks only the fields left unset.
    NOTE: an answer that leaves its field unset (positive class "none") and answers to free
    questions without a field are not saved, so a resumed interview may ask them again.
    """
    from langgraph.graph import START

    from agent.planners.rules import apply_answer
    from tools.spec import Context

    snapshot = graph.get_state(config)
    if not answers or "interview" not in snapshot.next:
        return 0
    context = Context.model_validate(snapshot.values.get("context") or {})
    saved = 0
    for field, answer in answers:
        try:
            # apply_answer does not validate, so validate each step and skip an invalid answer.
            context = Context.model_validate(apply_answer(context, field, answer).model_dump())
        except ValueError:
            continue
        saved += 1
    graph.update_state(config, {"context": context.model_dump(mode="json")}, as_node=START)
    return saved


def _invoke(graph, graph_input: dict | None, config: dict, recorder: InterviewRecorder) -> dict:
    """Run the graph, and when it stops during the interview, save the answers given so far."""
    try:
        return graph.invoke(graph_input, config)
    except BaseException:
        saved = save_interview_answers(graph, config, recorder.answers)
        if saved:
            err_console.print(f"\nSaved {saved} interview answer(s) for --resume.")
        raise


def check_spec_gates(store_file: Path, audit_id: str, spec: dict[str, Any]) -> None:
    """Check the spec's gates against the finished audit as `clinaudit run` does. A failed gate
    exits with code 1."""
    from agent.cli import check_gates
    from tools.spec import Gate

    gates = [Gate.model_validate(gate) for gate in spec.get("gates") or []]
    if gates:
        check_gates(store_file, audit_id, gates)


def _confirm_with(assume_yes: bool):
    def confirm(plan) -> bool:
        from rich.prompt import Confirm

        from agent.cli import print_plan

        print_plan(plan)
        if assume_yes:
            return True
        return Confirm.ask("Run this audit?", default=True, console=console)

    return confirm


def _parse_list(text: str | None, cast=str) -> list | None:
    if not text:
        return None
    return [cast(item.strip()) for item in text.split(",") if item.strip()]


def chat(
    spec_file: Path | None = typer.Option(None, "--spec", help="Audit spec (YAML); its "
                                             "context may be incomplete."),
    data: Path | None = typer.Option(None, "--data", help="Dataset folder: a CSV manifest "
                                        "(metadata.csv) and an images/ folder."),
    arch: str | None = typer.Option(None, "--arch", help="timm architecture of --checkpoint "
                                       "(default: from the model card beside it)."),
    checkpoint: Path | None = typer.Option(None, "--checkpoint", help="State dict of the "
                                              "classifier."),
    torchscript: Path | None = typer.Option(None, "--torchscript", help="TorchScript "
                                               "classifier file."),
    store: Path | None = StoreOption,
    out: Path | None = OutOption,
    llm_model: str | None = typer.Option(None, "--llm-model", help="Model name of the "
                                            "LLM planner (default: $CLINAUDIT_LLM_MODEL; without "
                                            "one the offline rules planner runs)."),
    llm_base_url: str | None = typer.Option(None, "--llm-base-url", help="OpenAI-compatible "
                                               "endpoint (default: $OPENAI_BASE_URL)."),
    resume: str | None = typer.Option(None, "--resume", help="Audit id of an interrupted "
                                         "chat to continue (with the same --store, and "
                                         "--llm-model to keep the LLM planner)."),
    device: str | None = typer.Option(None, help="auto, cpu or cuda (overrides the spec)."),
    batch_size: int | None = typer.Option(None, help="Images per forward pass."),
    bootstrap: int | None = typer.Option(None, help="Bootstrap replicates per interval."),
    max_images: int | None = typer.Option(None, help="Audit at most this many test images."),
    shifts: str | None = typer.Option(None, help="Comma-separated shift names to keep "
                                         "(default: all the planner chooses)."),
    severities: str | None = typer.Option(None, help="Comma-separated severities (1..5) "
                                             "for every shift (default: the planner's)."),
    yes: bool = typer.Option(False, "--yes", metavar="", help="Run the plan without asking to confirm it."),
) -> None:
    """Plan an audit in a terminal conversation, confirm it, run it and write the report.
    Exit 1 when a gate of the spec fails."""
    import sqlite3

    from langgraph.checkpoint.sqlite import SqliteSaver

    from agent.cli import print_summary
    from agent.graph import build_graph, initial_state
    from agent.planners.llm import LLMError, planner_from_options

    store_file = store_path(store)
    planner = planner_from_options(llm_model, llm_base_url, use_env_model=True)
    shift_names, severity_list = _parse_list(shifts), _parse_list(severities, int)
    if shift_names or severity_list:
        planner = PlanFilter(planner, shift_names, severity_list)
    console.print(f"Planner: {planner.name}")

    bars = LazyProgressBars()
    recorder = InterviewRecorder()
    checkpoints = checkpoint_path(store_file)
    audit_id = resume or new_audit_id()
    resume_command = (f"clinaudit chat --resume {audit_id}"
                      + (f" --store {store_file}" if store else ""))
    config = {"configurable": {"planner": planner, "progress": bars, "ask": recorder,
                               "confirm": _confirm_with(yes), "thread_id": audit_id}}
    connection = None
    try:
        with bad_input_exits():
            try:
                if resume:
                    if not checkpoints.is_file():
                        raise ChatInputError(f"--resume {resume}: no chat checkpoints at "
                                             f"{checkpoints}; pass the --store of that chat")
                    connection = sqlite3.connect(checkpoints, check_same_thread=False)
                    graph = build_graph(checkpointer=SqliteSaver(connection))
                    state = _resume(graph, config, resume, checkpoints, recorder)
                else:
                    overrides = {k: v for k, v in {
                        "device": device, "batch_size": batch_size, "bootstrap": bootstrap,
                        "max_images": max_images}.items() if v is not None}
                    spec, base = build_spec(spec_file, data, arch, checkpoint, torchscript,
                                            overrides, ask_choice=_ask_choice)
                    start = initial_state(spec, base, store_file, out)
                    start["audit_id"] = audit_id
                    connection = sqlite3.connect(checkpoints, check_same_thread=False)
                    graph = build_graph(checkpointer=SqliteSaver(connection))
                    console.print(f"Audit id: {audit_id} (continue after an interruption with "
                                  f"--resume {audit_id})")
                    state = _invoke(graph, start, config, recorder)
            except (ChatInputError, LLMError) as error:
                err_console.print(f"[bold red]error:[/] {error}", highlight=False)
                raise typer.Exit(2) from None
    except KeyboardInterrupt:
        bars.close()
        err_console.print(f"\nInterrupted. Continue with: {resume_command}", highlight=False)
        raise typer.Exit(130) from None
    except EOFError:
        # Piped answers ran out before a question, and the checkpoint keeps those given.
        bars.close()
        err_console.print(f"[bold red]error:[/] the input ended before the chat finished. "
                          f"Continue with: {resume_command}", highlight=False)
        raise typer.Exit(2) from None
    finally:
        bars.close()
        if connection is not None:
            connection.close()

    if not state.get("plan_confirmed"):
        console.print("Plan not confirmed; nothing was run.")
        return
    print_summary(store_file, state["audit_id"], state.get("report_paths", {}))
    _print_llm_use(planner, console)
    check_spec_gates(store_file, state["audit_id"], state["spec"])


def _resume(graph, config: dict, audit_id: str, checkpoints: Path,
            recorder: InterviewRecorder) -> dict:
    """Continue a checkpointed chat from its last finished step and return the final state."""

    snapshot = graph.get_state(config)
    if not snapshot.values:
        raise ChatInputError(f"--resume {audit_id}: no chat with this audit id in {checkpoints}")
    if not snapshot.next:
        console.print(f"Audit {audit_id} had already finished.")
        return snapshot.values
    console.print(f"Resuming audit {audit_id} at step {', '.join(snapshot.next)}.")
    return _invoke(graph, None, config, recorder)


def _print_llm_use(planner, console) -> None:
    inner = getattr(planner, "planner", planner)
    usage = getattr(inner, "usage", None)
    if usage is None:
        return
    console.print(f"LLM use: {usage['requests']} requests, {usage['prompt_tokens']} prompt and "
                  f"{usage['completion_tokens']} completion tokens.")
    if getattr(inner, "unverified", None):
        console.print(f"[yellow]The narrative has numbers no tool produced, marked in the "
                      f"report: {', '.join(inner.unverified)}[/]")
    if getattr(inner, "fallbacks", None):
        console.print("[yellow]The rules planner filled in where the LLM did not finish: "
                      f"{'; '.join(inner.fallbacks)}[/]")
