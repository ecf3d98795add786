"""The `clinaudit monitor` command: label-free checks of a deployment batch against an audit.

`agent/cli.py` registers `monitor` on the main typer app. Exit codes follow the other
commands: 0 no alert, 1 an alert, 2 bad input (one line naming the audit, file or value).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import typer

from agent.cli_common import (
    ProgressBars,
    StoreOption,
    bad_input_exits,
    console,
    err_console,
    store_path,
)

# Default shown in the help of each --max-* option, because without a threshold the check is off.
NO_THRESHOLD = "none: never alerts"
ALERTS_NOT_CHECKED = (
    "Alerts not checked: no threshold is set, so this batch cannot raise an alert. Pass "
    "--max-accuracy-drop, --max-balanced-accuracy-drop or --max-drift-p, or audit with a spec "
    "whose monitor: section sets max_accuracy_drop, max_balanced_accuracy_drop or max_drift_p.")


@contextmanager
def _monitor_errors() -> Iterator[None]:
    """Turn MonitorError into one line on stderr and exit code 2, like `bad_input_exits`."""
    from tools.monitor import MonitorError

    try:
        yield
    except MonitorError as error:
        err_console.print(f"[bold red]error:[/] {str(error).splitlines()[0]}", highlight=False)
        raise typer.Exit(2) from None


def monitor(
    audit: str = typer.Option(..., "--audit", help="Id of the audit the batch is compared with "
                              "(see `clinaudit runs`)."),
    data: Path = typer.Option(..., "--data", help="Deployment batch without labels: an image "
                              "folder, or a CSV manifest (metadata columns optional)."),
    store: Path | None = StoreOption,
    out: Path | None = typer.Option(None, "--out", help="Folder for the monitoring record "
                                       "(JSON) and the trend plot (default: "
                                       "audits/<audit id>/monitor/)."),
    images: Path | None = typer.Option(None, "--images", help="Image folder of a manifest "
                                          "batch (default: images/ beside the manifest, else "
                                          "the manifest's folder)."),
    id_column: str | None = typer.Option(None, "--id-column", help="Manifest column naming "
                                            "each image file <id>.jpg/.png (default: the "
                                            "audit spec's data.id_column)."),
    path_column: str | None = typer.Option(None, "--path-column", help="Manifest column with "
                                              "image paths relative to --images."),
    max_accuracy_drop: float | None = typer.Option(
        None, help="Alert when estimated accuracy (ATC) is more than this below the audited "
        "clean accuracy, as a fraction (0.05 = 5 points). Overrides "
        "monitor.max_accuracy_drop of the audit's spec.", show_default=NO_THRESHOLD),
    max_balanced_accuracy_drop: float | None = typer.Option(
        None, help="Alert when estimated balanced accuracy (ATC) is more than this below the "
        "audited clean balanced accuracy. Overrides "
        "monitor.max_balanced_accuracy_drop of the audit's spec.", show_default=NO_THRESHOLD),
    max_drift_p: float | None = typer.Option(
        None, help="Alert when a drift test's p-value (adjusted over the image statistics) is "
        "below this. Overrides monitor.max_drift_p of the audit's spec.", show_default=NO_THRESHOLD),
    bootstrap: int | None = typer.Option(None, help="Bootstrap replicates per interval "
                                            "(default: the audit's)."),
    sample: int = typer.Option(200, help="Clean test images re-shifted per audited shift to "
                               "describe it for the nearest-condition match."),
    score: str = typer.Option("max_confidence", help="ATC score: max_confidence or "
                              "negative_entropy."),
    recalibration: str = typer.Option("vector", help="Recalibration fitted on the calibration "
                                      "split before estimating: vector, temperature or platt "
                                      "(binary models only)."),
    device: str | None = typer.Option(None, help="auto, cpu or cuda (default: the audit's)."),
    batch_size: int | None = typer.Option(None, help="Images per forward pass "
                                             "(default: the audit's)."),
) -> None:
    """Check an unlabelled deployment batch against an audit; exit 1 on an alert."""
    from tools.monitor import (
        MonitorThresholds,
        build_reference,
        load_audit_spec,
        load_batch,
        load_classifier_for,
        monitor_batch,
        monitor_history,
        plot_trend,
    )
    from tools.store import Store, StoreError

    with bad_input_exits(), _monitor_errors():
        # Checked first, because loading the audit's data and the batch takes seconds to minutes.
        _check_estimator_options(score, recalibration)
        options = _threshold_options(max_accuracy_drop, max_balanced_accuracy_drop, max_drift_p)

        if not store_path(store).is_file():
            # Opening a missing store would create an empty one, with no audit to compare with.
            raise StoreError(f"store not found: {store_path(store)}; pass --store or set "
                             "CLINAUDIT_STORE")
        with Store(store_path(store)) as db:
            db.require_audit(audit)
            raw_spec = db.audit(audit)["spec"] or {}
            spec = load_audit_spec(db, audit)
            thresholds = _thresholds(MonitorThresholds, raw_spec, options)
            classifier = load_classifier_for(spec, device)
            batch = load_batch(data, classifier.input_size,
                               greyscale_model=getattr(classifier, "in_chans", 3) == 1,
                               id_column=id_column or spec.data.id_column,
                               path_column=path_column, images_dir=images)
            rows = batch_size or spec.audit.batch_size
            with ProgressBars() as bars:
                reference = build_reference(db, audit, spec, classifier, sample=sample,
                                            batch_size=rows, progress=bars)
                if reference.greyscale:
                    # The audit data is grey-scale even where the model reads three channels.
                    load_batch(data, classifier.input_size, greyscale_model=True,
                               id_column=id_column or spec.data.id_column,
                               path_column=path_column, images_dir=images)
                record = monitor_batch(
                    db, audit, batch, reference, classifier, thresholds=thresholds,
                    n_boot=spec.audit.bootstrap if bootstrap is None else bootstrap,
                    score=score, recalibration=recalibration, batch_size=rows, progress=bars)
            history = monitor_history(db, audit)

        folder = out or Path("audits") / audit / "monitor"
        folder.mkdir(parents=True, exist_ok=True)
        stamp = datetime.fromisoformat(record["created_at"]).strftime("%Y%m%d-%H%M%S-%f")
        record_path = folder / f"monitor-{stamp}.json"
        import json

        record_path.write_text(json.dumps(record, indent=2))
        trend_path = plot_trend(history, folder / "monitor_trend.svg")

    print_record(record)
    console.print(f"record: {record_path}")
    console.print(f"trend ({len(history)} batches): {trend_path}")
    if record["alerts"]:
        console.print(f"[bold red]{len(record['alerts'])} alert(s):[/]")
        for alert in record["alerts"]:
            console.print(f"  - {alert}", highlight=False)
        raise typer.Exit(1)
    if any(value is not None for value in record["thresholds"].values()):
        console.print("[green]No alerts.[/]")
    else:
        console.print(ALERTS_NOT_CHECKED, highlight=False)


def _check_estimator_options(score: str, recalibration: str) -> None:
    """Raise MonitorError naming the option when --score or --recalibration is not a known value."""
    from tools.calibration import SCALERS
    from tools.monitor import SCORES, MonitorError

    for option, value, choices in (("--score", score, SCORES),
                                   ("--recalibration", recalibration, sorted(SCALERS))):
        if value not in choices:
            raise MonitorError(f"{option} {value!r} is invalid: use one of {', '.join(choices)}")


# Accepted range of each threshold option, as MonitorThresholds enforces it.
THRESHOLD_RANGES = {
    "max_accuracy_drop": "a fraction from 0 to 1",
    "max_balanced_accuracy_drop": "a fraction from 0 to 1",
    "max_drift_p": "a value above 0 and below 1",
}


def _threshold_options(max_accuracy_drop: float | None, max_balanced_accuracy_drop: float | None,
                       max_drift_p: float | None) -> dict[str, float]:
    """Validate the threshold options one by one and return those that are set, by field name."""
    from pydantic import ValidationError

    from tools.monitor import MonitorError, MonitorThresholds

    options = {"max_accuracy_drop": max_accuracy_drop,
               "max_balanced_accuracy_drop": max_balanced_accuracy_drop,
               "max_drift_p": max_drift_p}
    set_options = {key: value for key, value in options.items() if value is not None}
    for key, value in set_options.items():
        try:
            MonitorThresholds.model_validate({key: value})
        except ValidationError:
            option = "--" + key.replace("_", "-")
            raise MonitorError(f"{option} {value:g} is invalid: use {THRESHOLD_RANGES[key]}") from None
    return set_options


def _thresholds(model, raw_spec: dict[str, Any], options: dict[str, float]):
    """Merge the spec's `monitor` section (when the spec has one) with the command line."""
    from pydantic import ValidationError

    from tools.monitor import MonitorError
    from tools.spec import format_validation_error

    merged = dict(raw_spec.get("monitor") or {})
    merged.update(options)
    try:
        return model.model_validate(merged)
    except ValidationError as error:
        raise MonitorError(format_validation_error(error, "monitor thresholds")) from None


def _value(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def _interval(entry: dict[str, Any]) -> str:
    if entry.get("low") is None:
        return _value(entry.get("value"))
    return f"{_value(entry['value'])} ({_value(entry['low'])} to {_value(entry['high'])})"


ESTIMATE_NAMES = {
    "accuracy_atc": "ATC accuracy",
    "balanced_accuracy_atc": "ATC balanced accuracy",
    "accuracy_confidence": "mean-confidence accuracy",
    "balanced_accuracy_confidence": "mean-confidence balanced accuracy",
}


def degenerate_notes(record: dict[str, Any]) -> list[str]:
    """Return one warning per estimate whose bootstrap interval has collapsed to a point.

    Every bootstrap replicate then gave the same value, most often because no batch image (or
    every one) scores above the ATC threshold, so the interval carries no information about the error.
    """
    estimator = record["estimator"]
    n = record["batch"]["n"]
    notes = []
    for key, name in ESTIMATE_NAMES.items():
        entry = record["performance"][key]
        if entry["low"] is None or entry["low"] != entry["high"]:
            continue
        reason = "every bootstrap replicate gave the same value"
        above = estimator.get("atc_images_above")
        if key.endswith("_atc") and above in (0, n):
            reason = (f"{above} of {n} batch images score above the ATC threshold "
                      f"{estimator['atc_threshold']:.3g}")
        notes.append(f"the {name} estimate {_value(entry['value'])} has a zero-width interval "
                     f"because {reason}; the estimate is degenerate and should not be trusted.")
    return notes


def print_record(record: dict[str, Any]) -> None:
    """Print a monitoring record as tables."""
    from rich.table import Table

    batch = record["batch"]
    console.print(f"Batch {batch['source']}: {batch['n']} images, audit {record['audit_id']}.")

    performance = record["performance"]
    clean = record["audited_clean"]
    estimator = record["estimator"]
    recalibration = estimator["recalibration"]["kind"]
    table = Table(title="Estimated performance without labels (95 % bootstrap interval)")
    for column in ("metric", "audited clean", (f"ATC estimate ({recalibration}-recalibrated "
                   f"{estimator['atc_score']})"),
                   f"mean-confidence estimate ({recalibration}-recalibrated)"):
        table.add_column(column)
    for metric in ("accuracy", "balanced_accuracy"):
        table.add_row(metric, _value(clean.get(metric)), _interval(performance[f"{metric}_atc"]),
                      _interval(performance[f"{metric}_confidence"]))
    console.print(table)
    console.print(f"Both estimates use the batch's probabilities after {recalibration} "
                  "recalibration fitted on the calibration split. ATC (average thresholded "
                  f"confidence) estimates accuracy as the share of batch images whose "
                  f"{estimator['atc_score']} is above a threshold set on the calibration split, "
                  "where that share equals the accuracy.", highlight=False)
    for note in degenerate_notes(record):
        console.print(f"[bold yellow]note:[/] {note}", highlight=False)

    table = Table(title="Input drift against the clean test images")
    for column in ("statistic", "clean mean", "batch mean", "std. mean difference", "KS D",
                   "adjusted p"):
        table.add_column(column)
    for row in record["input_drift"]:
        table.add_row(row["statistic"], _value(row["reference_mean"], 4),
                      _value(row["batch_mean"], 4), _value(row["smd"], 2),
                      _value(row["ks_statistic"], 2), f"{row['q_value']:.2g}")
    console.print(table)

    output = record["output_drift"]
    console.print(f"Raw confidence (top-class probability before recalibration): mean {_value(output['confidence']['reference_mean'])} on clean, "
                  f"{_value(output['confidence']['batch_mean'])} on the batch "
                  f"(KS D {_value(output['confidence']['ks_statistic'], 2)}, "
                  f"p = {output['confidence']['p_value']:.2g}). Predicted class mix: "
                  f"total variation {_value(output['class_mix']['total_variation'], 2)}, "
                  f"chi-square p = {output['class_mix']['p_value']:.2g}.", highlight=False)

    prevalence = record["prevalence"]
    table = Table(title="Class prevalence: calibration split, predicted, corrected estimates")
    for column in ("class", "calibration", "predicted", "BBSE", "EM"):
        table.add_column(column)
    def cell(method: str, k: int) -> str:
        entry = prevalence[method]
        if entry["low"] is None:
            return _value(entry["value"][k])
        return f"{_value(entry['value'][k])} ({_value(entry['low'][k])} to {_value(entry['high'][k])})"

    for k, name in enumerate(record["classes"]):
        table.add_row(name, _value(prevalence["source"][k]),
                      _value(output["class_mix"]["batch"][k]), cell("bbse", k), cell("em", k))
    console.print(table)

    nearest = record["nearest"]
    console.print(f"Nearest audited condition: [bold]{nearest['condition']}[/] "
                  f"(distance {_value(nearest['distance'], 2)}; next: "
                  + ", ".join(f"{row['condition']} {_value(row['distance'], 2)}"
                              for row in nearest["ranking"][1:4]) + ").", highlight=False)
    measured = [row for row in nearest["measured"] if row["metric"] in ("accuracy", "balanced_accuracy")]
    for row in measured or nearest["measured"][:4]:
        change = "" if row["delta_vs_clean"] is None else f", {row['delta_vs_clean']:+.3f} vs clean"
        console.print(f"  the audit measured {row['metric']} {_value(row['value'])} "
                      f"({_value(row['low'])} to {_value(row['high'])}{change}) there",
                      highlight=False)
