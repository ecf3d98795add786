"""Audit reports: the data builder (`data.py`) and the HTML, Markdown and JSON renderers."""

from __future__ import annotations

from pathlib import Path


def write_audit_report(store, audit_id: str, out_dir: Path, narrative: str | None = None,
                       include_images: bool = True) -> dict[str, Path]:
    """Build the report data for one audit and write report.html, report.md and report.json."""
    from tools.report.data import build_report_data
    from tools.report.render import write_report

    data = build_report_data(store, audit_id, narrative=narrative, include_images=include_images)
    return write_report(data, Path(out_dir))
