"""The QA file of an LLM audit, its scan for patient identifiers, and answer normalisation.

QA files are JSON Lines with `id`, `question`, `answers` (accepted answers) and an optional
`ambiguous` label per line.
"""

from __future__ import annotations

import json
import re
import string
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

BLANK_ANSWER = "[no answer]"
REFUSAL_ANSWER = "I don't know."
_REFUSALS = re.compile(
    r"^(i (do not|don't|dont) know|unknown|not sure|i am not sure|i'm not sure|"
    r"i (cannot|can't|cant) (answer|say|tell)|cannot be determined|no idea)\b",
    re.IGNORECASE,
)


class LLMAuditError(ValueError):
    """Invalid input to an LLM audit. The message names the file, line, field or argument."""


# ---------------------------------------------------------------------------------------------
# The QA file


@dataclass
class QAItem:
    """One question of the QA file with its accepted answers."""

    id: str
    question: str
    answers: list[str]
    ambiguous: bool | None
    line: int


def load_qa(path: Path) -> list[QAItem]:
    """Read a QA JSON Lines file: `id`, `question`, `answers` (accepted), optional `ambiguous`.

    Blank lines are skipped. Any other invalid line raises LLMAuditError naming the file and line.
    """
    path = Path(path)
    if not path.is_file():
        raise LLMAuditError(f"{path}: QA file not found")

    items: list[QAItem] = []
    seen: dict[str, int] = {}
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not raw.strip():
            continue
        item = _parse_qa_line(path, number, raw)
        if item.id in seen:
            raise LLMAuditError(
                f"{path} line {number}: id {item.id!r} already used on line {seen[item.id]}"
            )
        seen[item.id] = number
        items.append(item)

    if not items:
        raise LLMAuditError(f"{path}: QA file has no questions")
    return items


def _parse_qa_line(path: Path, number: int, raw: str) -> QAItem:
    where = f"{path} line {number}"
    try:
        row = json.loads(raw)
    except json.JSONDecodeError as error:
        raise LLMAuditError(f"{where}: invalid JSON ({error.msg} at column {error.colno})") from None
    if not isinstance(row, dict):
        raise LLMAuditError(f"{where}: expected a JSON object, got {type(row).__name__}")

    unknown = sorted(set(row) - {"id", "question", "answers", "ambiguous"})
    if unknown:
        raise LLMAuditError(
            f"{where}: unknown field {unknown[0]!r}; allowed: id, question, answers, ambiguous"
        )
    for name in ("id", "question", "answers"):
        if name not in row:
            raise LLMAuditError(f"{where}: missing field {name!r}")

    identifier = row["id"]
    if isinstance(identifier, bool) or not isinstance(identifier, (str, int)):
        raise LLMAuditError(f"{where}: field 'id' must be a string or integer, got {identifier!r}")
    identifier = str(identifier).strip()
    if not identifier:
        raise LLMAuditError(f"{where}: field 'id' is empty")

    question = row["question"]
    if not isinstance(question, str) or not question.strip():
        raise LLMAuditError(f"{where}: field 'question' must be a non-empty string, got {question!r}")

    answers = row["answers"]
    if isinstance(answers, str):
        answers = [answers]
    if not isinstance(answers, list) or not answers:
        raise LLMAuditError(
            f"{where}: field 'answers' must be a non-empty list of strings, got {answers!r}"
        )
    for answer in answers:
        if not isinstance(answer, str) or not normalize_answer(answer):
            raise LLMAuditError(
                f"{where}: field 'answers' contains {answer!r}, which is empty after normalising"
            )

    ambiguous = row.get("ambiguous")
    if ambiguous is not None and not isinstance(ambiguous, bool):
        raise LLMAuditError(f"{where}: field 'ambiguous' must be true, false or null, got {ambiguous!r}")

    return QAItem(identifier, question.strip(), [a.strip() for a in answers], ambiguous, number)


# Patterns for text that looks like patient identifiers. They err towards warning.
_IDENTIFIER_PATTERNS: list[tuple[str, re.Pattern[str]]] = [
    ("an email address", re.compile(r"[\w.+-]+@[\w-]+\.[\w.-]+")),
    ("a medical record number", re.compile(r"\b(MRN|medical record|patient (id|number))\b\W*\w*\d",
                                           re.IGNORECASE)),
    ("a date of birth", re.compile(r"\b(DOB|date of birth|born( on)?)\b\W*\d", re.IGNORECASE)),
    ("a full date", re.compile(r"\b(\d{1,2}[/.-]\d{1,2}[/.-](19|20)\d{2}|(19|20)\d{2}-\d{2}-\d{2})\b")),
    ("a phone number", re.compile(r"(?<![\w.])(\+\d{1,3}[ -]?)?(\(\d{2,5}\)[ -]?|\d{2,5}[ -])"
                                  r"\d{3,4}[ -]?\d{3,4}(?![\w.])")),
    ("a long identifier number", re.compile(r"(?<![\w.])\d{7,12}(?![\w.])")),
]


def scan_identifiers(path: Path) -> list[str]:
    """List lines of a file whose text looks like patient identifiers, one message per kind.

    The messages name the line and the kind of identifier but never repeat the matched text.
    """
    found: dict[str, list[int]] = {}
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        for kind, pattern in _IDENTIFIER_PATTERNS:
            if pattern.search(line):
                found.setdefault(kind, []).append(number)

    messages = []
    for kind, lines in found.items():
        shown = ", ".join(str(number) for number in lines[:5])
        more = f" and {len(lines) - 5} more" if len(lines) > 5 else ""
        messages.append(
            f"{path}: lines {shown}{more} contain what looks like {kind}; these questions are "
            "sent to the models under audit, so remove patient identifiers first"
        )
    return messages


# ---------------------------------------------------------------------------------------------
# Answers: normalisation and correctness


def normalize_answer(text: str) -> str:
    """Lower-case, drop punctuation and the articles a, an, the, and collapse white space."""
    text = text.lower()
    text = "".join(" " if char in string.punctuation else char for char in text)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def canonical_answer(text: str | None) -> str:
    """Map blank answers and refusals to one fixed string each, so each forms one answer class.

    An empty string would otherwise still get an embedding and look like a real answer.
    """
    stripped = (text or "").strip()
    if not stripped:
        return BLANK_ANSWER
    if _REFUSALS.match(stripped):
        return REFUSAL_ANSWER
    return stripped


def contains_accepted(answer: str, accepted: Sequence[str]) -> bool:
    """Return whether the normalised answer contains a normalised accepted answer as whole words."""
    padded = f" {normalize_answer(answer)} "
    options = [normalize_answer(option) for option in accepted]
    return any(f" {option} " in padded for option in options if option)
