"""Plain-word formatting of numbers, times, metric parameters and population conditions.

The report is read by clinicians, so parameters appear as words ("15 bins", "mel"), counts as
integers, durations with a precision that fits their size, and timestamps with their zone.
"""

from __future__ import annotations

import math
from datetime import datetime, timezone
from typing import Any


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def fmt_count(value: Any) -> str:
    """Write a count such as 10.0 as "10", and a missing value as an empty string."""
    if not is_number(value):
        return ""
    return f"{round(value):d}"


def fmt_plain(value: Any) -> str:
    """Write a whole-valued number without decimals (30.0 as "30") and others as given."""
    if is_number(value) and float(value).is_integer():
        return f"{int(value):d}"
    return str(value)


def fmt_seconds(value: Any) -> str:
    """Write a duration in seconds: "0.13 s", "8.5 s", "51 s" or "6 min 53 s"."""
    if not is_number(value):
        return ""
    if value < 1:
        return f"{value:.2f} s"
    if value < 10:
        return f"{value:.1f} s"
    if value < 600:
        return f"{value:.0f} s"
    minutes, seconds = divmod(round(value), 60)
    return f"{minutes} min {seconds} s"


def fmt_timestamp(value: Any) -> str:
    """Write an ISO timestamp as "2026-12-04 23:05 UTC".

    The store writes its timestamps in UTC without a zone (DuckDB TIMESTAMP), so a value with
    no zone is read as UTC; a value with a zone is converted to UTC. Text that is not an ISO
    timestamp is returned unchanged.
    """
    if value is None or value == "":
        return ""
    try:
        moment = value if isinstance(value, datetime) else datetime.fromisoformat(str(value))
    except ValueError:
        return str(value)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


# Words for the registry's metric parameters, as they appear in column headers and the plan.
CONFIDENCE_WORDS = {"msp": "maximum softmax probability", "entropy": "negative entropy",
                    "margin": "top-two margin"}


def class_name(value: Any, classes: list[str]) -> str:
    """Return the class name for a class index, or the value itself when it is not one."""
    if is_number(value) and float(value).is_integer() and 0 <= int(value) < len(classes):
        return str(classes[int(value)])
    return str(value)


def param_words(key: str, value: Any, classes: list[str]) -> str | None:
    """Describe one metric parameter in words, or None when it needs no mention."""
    if value is None:
        return None
    if key == "positive_class":
        return class_name(value, classes)
    if key == "n_bins":
        return f"{fmt_plain(value)} bins"
    if key == "binning":
        return f"{str(value).replace('_', '-')} bins"
    if key == "threshold":
        return f"threshold {fmt_plain(value)}"
    if key == "coverage" and is_number(value):
        return f"{100 * value:.0f} % kept"
    if key == "confidence":
        return f"confidence by {CONFIDENCE_WORDS.get(str(value), str(value))}"
    if key == "average":
        return f"{value} average"
    if key == "weighting":
        return "unweighted" if value == "none" else f"{value} weights"
    if key == "beta":
        return f"beta {fmt_plain(value)}"
    if key == "cost_matrix":
        return "cost matrix from the context"
    if key == "debias":
        return "debiased" if value else None
    if key == "normalised":
        return "normalised" if value else None
    return f"{key.replace('_', ' ')} {fmt_plain(value)}"


def params_words(params: dict | None, classes: list[str] | None = None) -> str:
    """Describe a metric's parameters, such as "mel" or "15 bins", or return "" for none."""
    words = [param_words(key, value, classes or [])
             for key, value in sorted((params or {}).items())]
    return ", ".join(word for word in words if word)


# ---- population conditions ---------------------------------------------------------------------

def _equal(shares: dict) -> bool:
    values = [v for v in (shares or {}).values() if is_number(v)]
    return len(values) > 1 and max(values) - min(values) < 1e-9


def _mix_words(shares: dict) -> str:
    total = sum(v for v in shares.values() if is_number(v)) or 1.0
    return ", ".join(f"{name} {100 * share / total:.0f} %" for name, share in shares.items()
                     if is_number(share))


def prevalence_words(condition: dict) -> str:
    """Describe a prevalence condition, such as "classes re-sampled to equal prevalence"."""
    mix = (condition.get("params") or {}).get("class_mix") or {}
    if _equal(mix):
        return "classes re-sampled to equal prevalence"
    if mix:
        return f"classes re-sampled to the mix {_mix_words(mix)}"
    return f"classes re-sampled to the mix {condition.get('name')}"


def reweight_words(condition: dict) -> str:
    """Describe a reweight condition, such as "test set re-weighted so each dataset counts
    equally"."""
    params = condition.get("params") or {}
    column = params.get("column")
    target = params.get("target") or {}
    if column and _equal(target):
        return f"test set re-weighted so each {column} counts equally"
    if column and target:
        return f"test set re-weighted to the {column} mix {_mix_words(target)}"
    return f"test set re-weighted ({str(condition.get('name')).replace('_', ' ')})"


# ---- changes with their direction --------------------------------------------------------------

def _side(value: float, up: str, down: str, digits: int) -> str:
    word = up if value > 0 else down
    return f"{abs(value):.{digits}f} {word}"


def directed_interval(low: Any, high: Any, up: str = "higher", down: str = "lower",
                      digits: int = 3) -> str:
    """Write an interval of a signed change in words: "0.109 to 0.301 lower".

    Values above zero read `up`, below zero `down`. An interval across zero names both sides,
    such as "0.050 lower to 0.120 higher". Missing ends give an empty string.
    """
    if not (is_number(low) and is_number(high)):
        return ""
    if low >= 0 and high >= 0:
        return f"{low:.{digits}f} to {high:.{digits}f} {up}"
    if low <= 0 and high <= 0:
        return f"{-high:.{digits}f} to {-low:.{digits}f} {down}"
    return f"{_side(low, up, down, digits)} to {_side(high, up, down, digits)}"


def directed_change(delta: Any, up: str = "higher", down: str = "lower", digits: int = 3) -> str:
    """Write a signed change in words: "0.210 lower", "0.050 higher" or "no change"."""
    if not is_number(delta):
        return ""
    if round(delta, digits) == 0:
        return "no change"
    return _side(delta, up, down, digits)
