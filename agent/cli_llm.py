"""The `clinaudit audit-llm` command: audit a clinical LLM's uncertainty on a QA file.

`agent/cli.py` registers `audit_llm` on the main typer app. It lives in its own module so that
the LLM audit's options and output stay in one place.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

console = Console()
err_console = Console(stderr=True)


def audit_llm(
    qa_file: Annotated[Path, typer.Argument(
        help="QA file in JSON Lines: id, question, answers (accepted answers), optional ambiguous.",
        show_default=False)],
    target_model: Annotated[str, typer.Option(
        "--target-model", help="Name of the model under audit on its OpenAI-compatible server.",
        show_default=False)],
    clarifier_model: Annotated[str | None, typer.Option(
        "--clarifier-model",
        help="Model that writes clarified readings of each question (default: the target model).",
    )] = None,
    target_base_url: Annotated[str | None, typer.Option(
        "--target-base-url", help="Base URL of the target's server (default: $OPENAI_BASE_URL).",
    )] = None,
    clarifier_base_url: Annotated[str | None, typer.Option(
        "--clarifier-base-url",
        help="Base URL of the clarifier's server (default: the target's when no clarifier model "
             "is given, else $OPENAI_BASE_URL).",
    )] = None,
    n_clarifications: Annotated[int, typer.Option(
        "--n-clarifications", help="Maximum clarified readings per question; 1 skips the "
                                          "clarifier.")] = 5,
    n_answers: Annotated[int, typer.Option(
        "--n-answers", help="Answers sampled from the target per reading.")] = 10,
    temperature: Annotated[float, typer.Option(
        "--temperature", help="Sampling temperature of the target.")] = 0.5,
    answer_temperature: Annotated[float, typer.Option(
        "--answer-temperature",
        help="Temperature of the single answer that is judged for correctness.")] = 0.1,
    gamma: Annotated[float, typer.Option(
        "--gamma",
        help="RBF kernel gamma in exp(-gamma * ||x - y||^2) on unit-norm embeddings.")] = 1.0,
    similarity_threshold: Annotated[float, typer.Option(
        "--similarity-threshold",
        help="Cosine similarity to an accepted answer from which an answer counts as correct.",
    )] = 0.8,
    bootstrap: Annotated[int, typer.Option(
        "--bootstrap", help="Bootstrap resamples for the AUROC/AUPR intervals.")] = 1000,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the bootstrap.")] = 0,
    timeout: Annotated[float, typer.Option(
        "--timeout", help="Timeout of one model request, in seconds.",
    )] = 60.0,
    max_retries: Annotated[int, typer.Option(
        "--max-retries", help="Retries of a failed or timed-out model request.")] = 2,
    store: Annotated[Path | None, typer.Option(
        "--store", help="DuckDB file of audits (default: $CLINAUDIT_STORE, else "
                        "./clinaudit.duckdb).")] = None,
    out: Annotated[Path | None, typer.Option(
        "--out", help="Folder for report.html/.md/.json (default: audits/<audit id>/).")] = None,
) -> None:
    """Audit whether a clinical LLM's uncertainty flags its wrong answers and ambiguous questions.

    The questions are sent to the target and clarifier models, so the file must not contain
    patient identifiers. The command warns when it looks as if it does.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from agent.llm_audit import LLMAuditSettings, run_llm_audit
    from agent.llm_clients import Endpoint
    from agent.llm_qa import LLMAuditError
    from tools.embeddings import EmbedderError
    from tools.llm_uncertainty import UncertaintyError
    from tools.store import StoreError, resolve_store_path

    settings = LLMAuditSettings(
        n_clarifications=n_clarifications, n_answers=n_answers, temperature=temperature,
        answer_temperature=answer_temperature, gamma=gamma,
        similarity_threshold=similarity_threshold, n_boot=bootstrap, seed=seed,
    )
    target = Endpoint(target_model, target_base_url, timeout_s=timeout, max_retries=max_retries)
    clarifier = None
    if clarifier_model is not None:
        clarifier = Endpoint(clarifier_model, clarifier_base_url, timeout_s=timeout,
                             max_retries=max_retries)
    elif clarifier_base_url is not None:
        clarifier = Endpoint(target_model, clarifier_base_url, timeout_s=timeout,
                             max_retries=max_retries)

    def warn(message: str) -> None:
        err_console.print(f"[bold yellow]warning:[/] {message}", highlight=False, soft_wrap=True)

    bars = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), console=err_console)
    task = bars.add_task(f"questions to {target_model}", total=None)

    # The bar starts with the first model call, so an invalid QA file leaves one line of output.
    def progress(done: int, total: int) -> None:
        if not bars.live.is_started:
            bars.start()
        bars.update(task, completed=done, total=total)

    try:
        result = run_llm_audit(
            qa_file, target, clarifier, settings, store_path=resolve_store_path(store), out=out,
            progress=progress, warn=warn,
        )
    except (LLMAuditError, UncertaintyError, EmbedderError, StoreError) as error:
        bars.stop()
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    bars.stop()

    _print_summary(result.report, result.audit_id, result.out)


def _print_summary(report: dict, audit_id: str, out: Path) -> None:
    def cell(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.3f}"

    console.print(
        f"LLM audit [bold]{audit_id}[/]: {report['n_questions']} questions, "
        f"{len(report['skipped'])} skipped, accuracy {cell(report['accuracy'])}"
    )
    table = Table(title="Detection by uncertainty (AUROC, 95 % interval)")
    table.add_column("score")
    table.add_column("wrong answers")
    table.add_column("ambiguous questions")
    for name, entry in report["error_detection"].items():
        ambiguity = report["ambiguity_detection"].get(name)
        table.add_row(
            name,
            f"{cell(entry['auroc'])} [{cell(entry['auroc_low'])}, {cell(entry['auroc_high'])}]",
            "" if ambiguity is None else
            f"{cell(ambiguity['auroc'])} [{cell(ambiguity['auroc_low'])}, "
            f"{cell(ambiguity['auroc_high'])}]",
        )
    console.print(table)
    console.print(f"Report: {out / 'report.html'}")
