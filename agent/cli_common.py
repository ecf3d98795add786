"""Terminal helpers shared by every command: consoles, the --store option, bad-input exits
and progress bars.

They live apart from `agent.cli` so that command modules can import them at the top without
an import cycle with the module that registers the commands.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Self

import typer
from rich.console import Console

console = Console()
err_console = Console(stderr=True, soft_wrap=True)

StoreOption = typer.Option(None, "--store", help="DuckDB file of audits "
                           "(default: $CLINAUDIT_STORE, else ./clinaudit.duckdb).")
OutOption = typer.Option(None, "--out", help="Folder for report.html/.md/.json "
                         "(default: audits/<audit id>/).")


def store_path(option: Path | None) -> Path:
    from tools.store import resolve_store_path

    return resolve_store_path(option)


def _user_errors() -> tuple[type[BaseException], ...]:
    """Error classes that mean bad input; anything else is a bug and keeps its traceback."""
    from tools.spec import SpecError
    from tools.store import StoreError

    errors: list[type[BaseException]] = [SpecError, StoreError, FileNotFoundError]
    for module, name in [("tools.data", "DataError"), ("tools.models", "ModelError"),
                         ("tools.shifts", "ShiftError"), ("tools.metrics", "MetricError"),
                         ("tools.calibration", "CalibrationError"),
                         ("tools.monitor", "MonitorError")]:
        try:
            errors.append(getattr(__import__(module, fromlist=[name]), name))
        except (ImportError, AttributeError):
            continue
    return tuple(errors)


@contextmanager
def bad_input_exits() -> Iterator[None]:
    """Turn bad-input errors into one line on stderr and exit code 2."""
    try:
        yield
    except _user_errors() as error:
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        err_console.print(f"[bold red]error:[/] {message}", highlight=False)
        raise typer.Exit(2) from None


class ProgressBars:
    """Rich progress bars fed by the tools' (task, done, total) callbacks."""

    def __init__(self) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.progress = Progress(TextColumn("{task.description:<32}"), BarColumn(),
                                 MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
                                 console=err_console, transient=False)
        self.tasks: dict[str, int] = {}

    def __call__(self, task: str, done: int, total: int) -> None:
        if task not in self.tasks:
            self.tasks[task] = self.progress.add_task(task, total=total)
        self.progress.update(self.tasks[task], completed=done, total=total)

    def __enter__(self) -> Self:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()
