"""The `clinaudit` command line: the only module that prints or draws on the terminal.

Heavy libraries are imported inside the commands, so `clinaudit --help` stays fast.
Exit codes: 0 success, 1 a gate or alert failed, 2 bad input (one line naming the file, row or
field).
"""

from __future__ import annotations

import os
import sys

# Torch's OpenMP threads otherwise spin while waiting, which on a small shared CPU slows
# training and inference several-fold. It only takes effect before torch is first imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
from pathlib import Path

import typer

from agent.chat import chat as chat_command
from agent.cli_common import (
    OutOption,
    ProgressBars,
    StoreOption,
    bad_input_exits,
    console,
    err_console,
    store_path,
)
from agent.cli_llm import audit_llm
from agent.monitor_cli import monitor

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Audit a medical image classifier under distribution shift.")


def _print_version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        console.print(f"clinaudit {version('clinaudit')}")
        raise typer.Exit(0)


@app.callback()
def _main(
    show_version: bool = typer.Option(False, "--version", metavar="", callback=_print_version,
                                      is_eager=True, help="Print the version and exit."),
) -> None:
    """Audit a medical image classifier under distribution shift."""


def print_plan(plan) -> None:
    from rich.table import Table

    table = Table(title="Audit plan", show_lines=False)
    table.add_column("what")
    table.add_column("choice")
    table.add_column("why")
    for metric in plan.metrics:
        star = " (primary)" if metric.id == plan.primary_metric else ""
        table.add_row("metric", metric.id + star, metric.reason)
    for shift in plan.shifts:
        table.add_row("shift", f"{shift.name} {shift.severities}", shift.reason)
    for group in plan.subgroups:
        table.add_row("subgroup", group.column, group.reason)
    if plan.site_column:
        table.add_row("site", plan.site_column, "evaluated per site, no retraining")
    for mix in plan.prevalence:
        table.add_row("prevalence", mix.name, mix.reason)
    for choice in plan.reweight:
        table.add_row("reweight", f"{choice.column} ({choice.name})", choice.reason)
    console.print(table)
    if plan.cost:
        console.print(f"Cost: {plan.cost.conditions} conditions, {plan.cost.images_predicted} "
                      f"image predictions, about {plan.cost.estimated_seconds:.0f} s "
                      f"({plan.cost.note}).")


def show_plan(plan) -> bool:
    """Print the plan and its cost before a non-interactive run, and go ahead."""
    print_plan(plan)
    return True


def print_summary(store_file: Path, audit_id: str, report_paths: dict[str, str]) -> None:
    """Print the clean results and the report's top findings, counted as the verdict counts them."""
    from rich.table import Table

    from tools.report.content import Lookup, audited_model_findings, top_findings
    from tools.report.data import build_report_data
    from tools.store import Store

    with Store(store_file) as store:
        results = [r for r in store.results(audit_id)
                   if r["condition"] == "clean" and r["class"] is None]
        data = build_report_data(store, audit_id, include_images=False)
    top = top_findings(data, Lookup(data))
    found = audited_model_findings(data["findings"])
    recalibration = len(data["findings"]) - len(found)
    table = Table(title=f"Audit {audit_id}: clean test set")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_column("95 % interval", justify="right")
    for row in results:
        interval = "" if row["low"] is None else f"{row['low']:.3f} to {row['high']:.3f}"
        value = "NaN" if row["value"] is None else f"{row['value']:.3f}"
        table.add_row(row["metric"], value, interval)
    console.print(table)
    console.print(f"{len(found)} findings about the audited model "
                  f"({sum(f['light'] == 'red' for f in found)} red, "
                  f"{sum(f['light'] == 'amber' for f in found)} amber)"
                  + (f", {recalibration} about the recalibrated model" if recalibration else "")
                  + (". Top findings, as in the report:" if top else "."))
    for finding in top:
        colour = "red" if finding["light"] == "red" else "yellow"
        console.print(f"  [{colour}]{finding['id']}[/] {finding['summary']}", highlight=False)
    print_paths(report_paths)


def print_paths(paths: dict) -> None:
    """Print each report file, and the figure files as one count with their folder."""
    figures = [Path(path) for kind, path in paths.items() if kind.startswith("figure:")]
    for kind, path in paths.items():
        if not kind.startswith("figure:"):
            console.print(f"{kind}: {path}", highlight=False, soft_wrap=True)
    if figures:
        console.print(f"figures: {len(figures)} files in {figures[0].parent}", highlight=False,
                      soft_wrap=True)


def run_graph(spec, spec_base: Path, store_file: Path, out: Path | None, planner,
              ask=None, confirm=None, checkpointer=None, thread_id: str | None = None) -> dict:
    """Run the audit graph with progress bars and return its final state."""
    from agent.graph import build_graph, initial_state

    graph = build_graph(checkpointer=checkpointer)
    try:
        with ProgressBars() as bars:
            config = {"configurable": {"planner": planner, "progress": bars, "ask": ask,
                                       "confirm": confirm, "thread_id": thread_id or "audit"}}
            state = graph.invoke(initial_state(spec, spec_base, store_file, out), config)
    except KeyboardInterrupt:
        err_console.print("[bold red]interrupted:[/] the audit is marked interrupted in "
                          f"{store_file} (see `clinaudit runs`); run the command again to "
                          "audit from the start.", highlight=False)
        raise typer.Exit(130) from None
    return state


@app.command()
def run(
    spec_file: Path = typer.Argument(..., help="Audit spec (YAML)."),
    store: Path | None = StoreOption,
    out: Path | None = OutOption,
    device: str | None = typer.Option(None, help="auto, cpu or cuda (overrides the spec)."),
    batch_size: int | None = typer.Option(None, help="Images per forward pass (overrides the spec)."),
    bootstrap: int | None = typer.Option(None, help="Bootstrap resamples per interval "
                                            "(overrides audit.bootstrap)."),
    max_images: int | None = typer.Option(None, help="Audit at most this many test images, "
                                             "drawn at random with the audit seed (overrides "
                                             "audit.max_images)."),
    plan_only: bool = typer.Option(False, "--plan-only", metavar="", help="Print the plan and its cost, then stop."),
    llm_model: str | None = typer.Option(None, "--llm-model", help="Plan with this model on an "
                                            "OpenAI-compatible endpoint (default: the offline "
                                            "rules planner)."),
    llm_base_url: str | None = typer.Option(None, "--llm-base-url", help="Endpoint URL "
                                               "(default: $OPENAI_BASE_URL)."),
) -> None:
    """Run a scripted audit from a spec without prompting. Exit 1 when a gate fails."""
    from agent.planners.llm import planner_from_options
    from tools.spec import load_spec

    store_file = store_path(store)
    with bad_input_exits():
        spec = load_spec(spec_file)
        spec.audit = _override_audit(spec.audit, {"device": device, "batch_size": batch_size,
                                                  "bootstrap": bootstrap, "max_images": max_images})
        # Only a model named on the command line switches the LLM on, so scripted audits and
        # gates stay deterministic by default.
        planner = planner_from_options(llm_model, llm_base_url, use_env_model=False)
        if plan_only:
            from agent import resources
            from agent.graph import check_context_classes

            info = resources.describe(resources.load(spec), spec.data.group_column,
                                     max_images=spec.audit.max_images)
            check_context_classes(spec.context, info.classes)
            chosen = spec.plan or planner.plan(spec.context, info, n_boot=spec.audit.bootstrap)
            print_plan(chosen)
            return
        state = run_graph(spec, spec_file.parent.resolve(), store_file, out, planner,
                          confirm=show_plan)
    print_summary(store_file, state["audit_id"], state.get("report_paths", {}))
    if spec.gates:
        check_gates(store_file, state["audit_id"], spec.gates)


def _override_audit(audit, options: dict):
    """Return the spec's audit section with the options given on the command line, validated."""
    from pydantic import ValidationError

    from tools.spec import SpecError

    overrides = {name: value for name, value in options.items() if value is not None}
    if not overrides:
        return audit
    try:
        return type(audit).model_validate({**audit.model_dump(), **overrides})
    except ValidationError as error:
        problem = error.errors()[0]
        option = "--" + str(problem["loc"][0]).replace("_", "-")
        message = problem["msg"].removeprefix("Value error, ")
        raise SpecError(f"{option} {overrides.get(problem['loc'][0])!r}: {message}") from None


def check_gates(store_file: Path, audit_id: str, gates) -> None:
    """Print the spec's gate results for a finished audit; exit 1 when one fails."""
    from agent.graph import gate_outcome
    from tools.store import Store

    with Store(store_file) as store:
        # The graph stores the outcome before rendering the report; older audits lack it.
        outcome = store.artifact(audit_id, "gates") or gate_outcome(store, audit_id, gates)
    failures = outcome["failures"]
    if failures:
        console.print(f"[bold red]{len(failures)} gate check(s) failed:[/]")
        for failure in failures:
            console.print(f"  - {failure}", highlight=False)
        raise typer.Exit(1)
    console.print(f"[green]All {len(gates)} gates passed.[/]")


DEMO_SPEC = {
    "model": {"arch": "mobilenetv3_small_050", "input_size": 64,
              "classes": ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]},
    "data": {"id_column": "image_id", "label_column": "dx",
             "metadata": ["dataset", "sex", "age", "localization"], "group_column": "lesion_id",
             "split": {"test": 0.3, "calibration": 0.2, "seed": 0}},
    "context": {"domain": "dermatology",
                "intended_use": "second opinion for dermatologists on dermoscopy images",
                "deployment": "clinics whose dermatoscopes and patients differ from the training sites",
                "positive_class": "mel", "malignant_classes": ["mel", "bcc", "akiec"],
                "costlier_error": "false_negative", "ordinal": False, "referral_target": 0.9},
}


@app.command()
def demo(
    data: Path | None = typer.Option(None, help="ham10000_subset folder (metadata.csv and "
                                        "images/) (default: $CLINAUDIT_DATA/ham10000_subset)."),
    store: Path | None = StoreOption,
    out: Path | None = OutOption,
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    batch_size: int = typer.Option(256, help="Images per forward pass."),
    epochs: int = typer.Option(30, help="Training epochs for the demo model."),
    train_time_limit: float | None = typer.Option(
        None, help="Stop training after this many seconds (default: run every epoch)."),
    input_size: int = typer.Option(64, help="Model input size in pixels."),
    bootstrap: int = typer.Option(1000, help="Bootstrap replicates per interval."),
    max_images: int | None = typer.Option(None, help="Audit at most this many test images."),
    shifts: str | None = typer.Option(None, help="Comma-separated shift names to keep "
                                         "(default: the dermatology preset)."),
    pretrained: bool = typer.Option(False, "--pretrained", metavar="", help="Start from published timm "
                                    "weights (downloads them; needs network)."),
) -> None:
    """Train a small model on ham10000_subset, audit it, and write the report."""
    import time

    from agent.planners.rules import RulesPlanner
    from tools.spec import spec_from_dict

    if data is None:
        root = os.environ.get("CLINAUDIT_DATA")
        if not root:
            err_console.print("[bold red]error:[/] no data: pass --data PATH/ham10000_subset or set "
                              "CLINAUDIT_DATA to the folder that holds ham10000_subset/")
            raise typer.Exit(2)
        data = Path(root) / "ham10000_subset"
    if not data.exists():
        err_console.print(f"[bold red]error:[/] data folder not found: {data}; pass --data "
                          "PATH/ham10000_subset or set CLINAUDIT_DATA", highlight=False)
        raise typer.Exit(2)
    if not (data / "metadata.csv").is_file() or not (data / "images").is_dir():
        err_console.print(f"[bold red]error:[/] {data} is not a ham10000_subset folder (needs "
                          "metadata.csv and images/); pass --data or set CLINAUDIT_DATA",
                          highlight=False)
        raise typer.Exit(2)

    store_file = store_path(store)
    out = out or Path("audits") / f"demo-{time.strftime('%Y%m%d-%H%M%S')}"
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with bad_input_exits():
        # Options are checked before the minutes of training, and errors name the option.
        from tools.spec import MIN_INPUT_SIZE, AuditSettings, SpecError

        audit = _override_audit(AuditSettings(), {"bootstrap": bootstrap, "device": device,
                                                  "batch_size": batch_size,
                                                  "max_images": max_images})
        if input_size < MIN_INPUT_SIZE:
            raise SpecError(f"--input-size {input_size}: the image shifts need at least "
                            f"{MIN_INPUT_SIZE} px")
        if shifts:
            from tools.shifts import validate_shift

            for name in shifts.split(","):
                if name.strip():
                    validate_shift(name.strip(), 1)
        raw = {**DEMO_SPEC, "model": {**DEMO_SPEC["model"], "input_size": input_size},
               "data": {**DEMO_SPEC["data"], "manifest": str(data / "metadata.csv"),
                        "images": str(data / "images")},
               "audit": audit.model_dump(mode="json")}
        spec = spec_from_dict(raw, Path.cwd())
        checkpoint = out / "model" / "model.pt"
        _train_demo_model(spec, checkpoint, epochs, train_time_limit, pretrained)
        spec.model.checkpoint = checkpoint.resolve()
        planner = RulesPlanner()
        if shifts:
            planner = _ShiftFilter(planner, [s.strip() for s in shifts.split(",") if s.strip()])
        state = run_graph(spec, Path.cwd(), store_file, out, planner, confirm=show_plan)
    print_summary(store_file, state["audit_id"], state.get("report_paths", {}))
    console.print(f"Demo finished in {time.perf_counter() - started:.0f} s.")


class _ShiftFilter:
    """Wrap a planner and keep only the named shifts of its plan."""

    def __init__(self, planner, names: list[str]):
        self.planner, self.names, self.name = planner, names, planner.name

    def interview(self, context, info, ask):
        return self.planner.interview(context, info, ask)

    def plan(self, context, info, n_boot=1000):
        from tools.shifts import validate_shift

        for name in self.names:
            validate_shift(name, 1)
        plan = self.planner.plan(context, info, n_boot=n_boot)
        kept = [s for s in plan.shifts if s.name in self.names]
        missing = [n for n in self.names if n not in {s.name for s in kept}]
        from tools.spec import ShiftChoice

        kept += [ShiftChoice(name=n, reason="requested with --shifts") for n in missing]
        return plan.model_copy(update={"shifts": kept})

    def narrate(self, summary):
        return self.planner.narrate(summary)


def _published_weights(spec, num_classes: int, folder: Path) -> Path:
    """Download published timm weights (only on an explicit --pretrained) into a state dict
    with a fresh classifier head."""
    import timm
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    network = timm.create_model(spec.model.arch, pretrained=True, num_classes=num_classes)
    path = folder / "pretrained_init.pt"
    torch.save(network.state_dict(), path)
    return path


def _train_demo_model(spec, checkpoint: Path, epochs: int, time_limit_s: float | None,
                      pretrained: bool) -> None:
    from tools.data import load_dataset
    from tools.models import resolve_device, save_checkpoint, train_classifier

    dataset = load_dataset(spec.data, spec.model.classes)
    train = dataset.part("train")
    with ProgressBars() as bars:
        images = train.images(spec.model.input_size,
                              progress=lambda d, t: bars("Loading training images", d, t))
        model = train_classifier(
            spec.model.arch, images, train.labels, dataset.classes,
            input_size=spec.model.input_size, epochs=epochs, seed=spec.audit.seed,
            # Batch 64 with class weights gave the best balanced accuracy on ham10000_subset
            # in short CPU runs (0.50 after 30 epochs, against 0.41 with batch 128).
            batch_size=64, lr=3e-3, time_limit_s=time_limit_s,
            device=resolve_device(spec.audit.device), class_weights="balanced",
            init_from=_published_weights(spec, len(dataset.classes), checkpoint.parent)
            if pretrained else None,
            progress=lambda d, t: bars("Training demo model", d, t))
    card = {"arch": spec.model.arch, "classes": dataset.classes,
            "input_size": spec.model.input_size,
            "normalization": spec.model.normalization.model_dump(), "outputs": "logits",
            "training_data_hash": dataset.data_hash, "epochs": epochs, "seed": spec.audit.seed,
            "pretrained": pretrained}
    save_checkpoint(model, checkpoint, card)


@app.command()
def report(
    audit_id: str = typer.Argument(..., help="Audit id (see `clinaudit runs`)."),
    store: Path | None = StoreOption,
    out: Path | None = OutOption,
    pdf: bool = typer.Option(False, "--pdf", metavar="", help="Also print the HTML to report.pdf with "
                             "headless Chromium."),
) -> None:
    """Re-render an audit's report from the store (shows reviews added since)."""
    from tools.report import write_audit_report
    from tools.store import Store

    with bad_input_exits():
        with Store(store_path(store)) as db:
            audit = db.audit(audit_id)
            db.require_finished(audit_id)
            include = (audit["spec"] or {}).get("report", {}).get("include_images", True)
            if audit["kind"] != "llm":
                paths = write_audit_report(db, audit_id, out or Path("audits") / audit_id,
                                           include_images=include)
        if audit["kind"] == "llm":
            from agent.llm_audit import load_llm_report
            from agent.llm_report import write_llm_report

            paths = write_llm_report(load_llm_report(store_path(store), audit_id),
                                     out or Path("audits") / audit_id)
        if pdf:
            from tools.report.pdf import html_to_pdf

            paths["pdf"] = html_to_pdf(paths["html"], Path(paths["html"]).with_suffix(".pdf"))
    print_paths(paths)


@app.command()
def runs(store: Path | None = StoreOption) -> None:
    """List the audits in the store."""
    from rich.table import Table

    from tools.store import Store

    with bad_input_exits(), Store(store_path(store)) as db:
        audits = db.list_audits()
    # The audit id starts with its creation time, so no separate date column is needed.
    table = Table(title=f"Audits in {store_path(store)}")
    table.add_column("audit id", no_wrap=True)
    table.add_column("data", overflow="fold")
    for column in ("kind", "status", "conditions", "findings"):
        table.add_column(column, no_wrap=True)
    for audit in audits:
        data = audit["meta"].get("data_name") or audit["meta"].get("target_model") or ""
        table.add_row(audit["id"], str(data), audit["kind"], audit["status"],
                      str(audit["conditions"]), str(audit["findings"]))
    console.print(table)


@app.command()
def delete(
    audit_id: str = typer.Argument(..., help="Audit id to remove with all its data."),
    store: Path | None = StoreOption,
    yes: bool = typer.Option(False, "--yes", metavar="", help="Do not ask for confirmation."),
) -> None:
    """Remove an audit with its predictions, results, findings and reviews."""
    from tools.store import Store

    with bad_input_exits(), Store(store_path(store)) as db:
        db.require_audit(audit_id)
        if not yes and not sys.stdin.isatty():
            err_console.print(f"[bold red]error:[/] deleting audit {audit_id} needs confirmation: "
                              "run it in a terminal or pass --yes. Nothing deleted.", highlight=False)
            raise typer.Exit(2)
        if not yes and not typer.confirm(f"Delete audit {audit_id} and all its data?"):
            console.print("Nothing deleted.")
            raise typer.Exit(0)
        db.delete_audit(audit_id)
    console.print(f"Deleted audit {audit_id} from {store_path(store)}.")
    # Report files are the user's documents: they are kept, and the message gives their folder.
    folder = Path("audits") / audit_id
    if folder.is_dir():
        console.print(f"Its report files in {folder}/ were kept; remove them by hand if unwanted.")


@app.command()
def review(
    audit_id: str = typer.Argument(..., help="Audit id."),
    reviewer: str = typer.Option(..., help="Name of the reviewer."),
    verdict: str = typer.Option(..., help="approve, changes or reject."),
    comment: str = typer.Option("", help="Free-text comment."),
    finding: str | None = typer.Option(None, help="Finding id the review refers to."),
    store: Path | None = StoreOption,
) -> None:
    """Append a sign-off to an audit; re-render with `clinaudit report` to show it."""
    from tools.store import Store, StoreError

    with bad_input_exits():
        if verdict not in ("approve", "changes", "reject"):
            raise StoreError(f"--verdict {verdict!r} is invalid: use approve, changes or reject")
        with Store(store_path(store)) as db:
            review_id = db.add_review(audit_id, reviewer, verdict, comment, finding)
            gates = db.artifact(audit_id, "gates") or {}
    console.print(f"Review {review_id} stored for audit {audit_id}.")
    if verdict == "approve" and gates.get("failures"):
        err_console.print(f"[bold yellow]note:[/] audit {audit_id} failed "
                          f"{len(gates['failures'])} of its {gates['checked']} gate checks; the "
                          "approval is recorded next to them in the report.", highlight=False)


@app.command()
def compare(
    audit_a: str = typer.Argument(..., help="Earlier audit id."),
    audit_b: str = typer.Argument(..., help="Later audit id."),
    store: Path | None = StoreOption,
    show_all: bool = typer.Option(False, "--all", metavar="", help="List every condition and metric, not "
                                  "only clean and the clear changes."),
) -> None:
    """Show which whole-set metrics got better or worse between two audits, per condition."""
    from rich.table import Table

    from tools.compare import compare_audits

    with bad_input_exits():
        from tools.store import Store

        with Store(store_path(store)) as db:
            for audit_id in (audit_a, audit_b):
                db.require_audit(audit_id)
                db.require_finished(audit_id)
            rows = compare_audits(db, audit_a, audit_b)
    shown = rows if show_all else [r for r in rows if r["condition"] == "clean"
                                   or r["verdict"] != "no clear change"]
    table = Table(title=f"{audit_a} -> {audit_b}")
    table.add_column("condition", overflow="fold")
    for column in ("metric", "A", "B", "change", "95% interval", "verdict"):
        table.add_column(column, overflow="fold")
    for row in shown:
        colour = {"better": "green", "worse": "red"}.get(row["verdict"], "white")
        interval = "" if row["low"] is None else f"{row['low']:+.3f} to {row['high']:+.3f}"
        table.add_row(row["condition"], row["metric"], f"{row['a']:.3f}", f"{row['b']:.3f}",
                      f"{row['delta']:+.3f}", interval, f"[{colour}]{row['verdict']}[/]")
    console.print(table)
    better = sum(r["verdict"] == "better" for r in rows)
    worse = sum(r["verdict"] == "worse" for r in rows)
    console.print(f"{len(rows)} comparisons: {better} better, {worse} worse, "
                  f"{len(rows) - better - worse} no clear change (Benjamini–Hochberg at 0.05)."
                  + ("" if show_all else " --all lists every row."))
    unpaired = sorted({r["condition"] for r in rows if not r["paired"]})
    if unpaired:
        console.print(f"[yellow]Note:[/] {len(unpaired)} condition(s) hold different images in "
                      "the two audits, so their changes mix the model's change with the test "
                      "set's (compared unpaired).", highlight=False)


@app.command()
def mitigate(
    audit_id: str = typer.Argument(..., help="Audit whose damaging shifts to train against."),
    store: Path | None = StoreOption,
    out: Path | None = OutOption,
    epochs: int = typer.Option(5, help="Fine-tuning epochs."),
    time_limit: float = typer.Option(1800, help="Training time limit in seconds."),
    from_scratch: bool = typer.Option(False, "--from-scratch", metavar="", help="Train a new model instead "
                                      "of fine-tuning the audited checkpoint."),
    lr: float = typer.Option(1e-3, help="Peak learning rate."),
) -> None:
    """Fine-tune against the audit's damaging shifts, re-audit, and report what came back.

    Augment-and-retrain: the shifts that hurt the model become training augmentations, the
    fine-tuned model is audited again, and the table shows how much of each loss was recovered.
    """
    from rich.table import Table

    from tools.report import write_audit_report
    from tools.retrain import AugmentRetrainInput, augment_and_retrain
    from tools.store import Store, new_audit_id

    store_file = store_path(store)
    new_id = new_audit_id()
    out = out or Path("audits") / new_id
    with bad_input_exits():
        with Store(store_file) as db:
            db.require_finished(audit_id)
        request = AugmentRetrainInput(audit_id=audit_id, store=store_file, out_dir=out,
                                      new_audit_id=new_id,
                                      epochs=epochs, time_limit_s=time_limit,
                                      from_scratch=from_scratch, lr=lr)
        with ProgressBars() as bars:
            result = augment_and_retrain(request, progress=bars)
        with Store(store_file) as db:
            paths = write_audit_report(db, result.new_audit_id, out)

    table = Table(title=f"Recovery of {result.metric}: audit {audit_id} -> {result.new_audit_id}")
    for column in ("condition", "clean", "before", "after", "recovered"):
        table.add_column(column)
    for row in result.conditions:
        if row.recovered_fraction is None:
            recovered = row.note
        else:
            recovered = f"{row.recovered_fraction:.0%}" + (f" ({row.note})" if row.note else "")
        table.add_row(row.condition, f"{row.clean:.3f}", f"{row.before:.3f}", f"{row.after:.3f}",
                      recovered)
    console.print(table)
    overall = result.overall_recovered_fraction
    console.print(f"Clean {result.metric}: {result.clean_before:.3f} -> {result.clean_after:.3f}. "
                  "Net recovered over the clear losses, after subtracting falls elsewhere: "
                  f"{'n/a' if overall is None else f'{overall:.0%}'}.")
    print_paths(paths)


app.command("audit-llm")(audit_llm)
app.command("chat")(chat_command)
app.command("monitor")(monitor)


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
