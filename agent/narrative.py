"""The narrative guard: every number in LLM-written text must be one the tools produced.

A number in the text matches a produced value v when it equals v, 100 * v (a percentage or
percentage points) or 1 / v (the N of "1 in N") after rounding to the decimals written, with the
sign ignored because prose writes "dropped by 0.05" for a delta of -0.05. Numbers inside the
produced data's strings (severities in condition keys, bin counts in parameters) count as
produced too. A number that matches nothing is wrapped in a visible marker and listed under the
text, so the report never keeps it silently.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

MARKER = "[unverified: {}]"

# Numbers every narrative may use without a tool producing them: the "1" of "1 in N",
# the denominators of natural frequencies, and the 95 of "95 % interval".
CONVENTIONAL_NUMBERS = (1.0, 10.0, 95.0, 100.0, 1000.0)

# A number that is not part of an identifier (mobilenetv3, shift:jpeg:3), with an optional
# thousands separator, decimals and a percent sign or word after it.
NUMBER = re.compile(
    r"(?<![\w.:/-])[-−]?(?P<digits>\d{1,3}(?:,\d{3})+|\d+)(?P<decimals>\.\d+)?"
    r"(?P<percent>\s?%|\s?percent\b|\s?per cent\b)?(?![\w:])")


@dataclass
class GuardResult:
    """The checked text with unmatched numbers marked, and the numbers that matched nothing."""

    text: str
    unmatched: list[str] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return not self.unmatched


def _value(match: re.Match) -> tuple[float, int]:
    digits = match.group("digits").replace(",", "")
    decimals = match.group("decimals") or ""
    return float(digits + decimals), max(len(decimals) - 1, 0)


def produced_numbers(data: Any) -> set[float]:
    """Collect the absolute values of every number in a nested JSON-like value, strings included."""
    found: set[float] = set()

    def walk(value: Any) -> None:
        if isinstance(value, bool) or value is None:
            return
        if isinstance(value, (int, float)):
            if math.isfinite(value):
                found.add(abs(float(value)))
        elif isinstance(value, str):
            for match in NUMBER.finditer(value):
                found.add(_value(match)[0])
            for piece in re.findall(r"\d+(?:\.\d+)?", value):
                found.add(float(piece))
        elif isinstance(value, dict):
            for item in value.values():
                walk(item)
        elif isinstance(value, (list, tuple, set)):
            for item in value:
                walk(item)

    walk(data)
    return found


def _candidates(values: Iterable[float]) -> list[float]:
    out = set(CONVENTIONAL_NUMBERS)
    for v in values:
        out.add(v)
        out.add(100.0 * v)
        if 0 < v < 1:
            out.add(1.0 / v)
    return sorted(out)


def _matches(number: float, decimals: int, candidates: list[float]) -> bool:
    half_step = 0.5 * 10.0 ** -decimals + 1e-9
    return any(abs(candidate - number) <= half_step for candidate in candidates)


def check_narrative(text: str, produced: Any) -> GuardResult:
    """Mark every number in `text` that no value in `produced` explains after rounding.

    `produced` is the aggregate data the narrative was written from (any nested dict/list of
    numbers and strings). Returns the text with each unmatched number wrapped as
    "[unverified: X]" and a closing line listing them; the text is unchanged when all match.
    """
    candidates = _candidates(produced_numbers(produced))
    unmatched: list[str] = []

    def mark(match: re.Match) -> str:
        number, decimals = _value(match)
        if _matches(number, decimals, candidates):
            return match.group(0)
        unmatched.append(match.group(0).strip())
        return MARKER.format(match.group(0).strip())

    marked = NUMBER.sub(mark, text)
    if unmatched:
        marked = (marked.rstrip() + "\n\nNumbers marked [unverified] were not produced by the "
                  "audit tools and must not be trusted: " + ", ".join(unmatched) + ".")
    return GuardResult(marked, unmatched)
