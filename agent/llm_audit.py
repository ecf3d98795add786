"""Audit of a clinical LLM: does its sampled-answer uncertainty flag wrong and ambiguous answers?

For each question of a QA file the flow
1. asks the clarifier model for up to n clarified readings of the question;
2. samples m answers from the target model for each reading, and one low-temperature answer to
   the original question, which is the answer judged for correctness;
3. scores uncertainty from the sampled answers alone (spectral, kernel entropy, semantic entropy,
   kernel language entropy, clarification ensembling);
4. measures how well each score detects wrong answers and, where questions carry an `ambiguous`
   label, ambiguous questions (AUROC and average precision with bootstrap intervals), and how
   accuracy grows when the most uncertain questions are withheld.

The questions are sent to the models under audit by design, so the QA file is scanned for text
that looks like patient identifiers first. Nothing in this module prints: the CLI draws progress
from the `progress` callback and shows the `warn` messages.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import string
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from tools import llm_uncertainty as lu
from tools.embeddings import Embedder, cosine_similarity, embed

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]

ERROR_SCORE = "spectral_total"
AMBIGUITY_SCORE = "spectral_aleatoric"

# Every uncertainty score the audit computes, with the direction "higher = more uncertain".
SCORES: dict[str, str] = {
    "spectral_total": "Spectral uncertainty, total (von Neumann entropy of all answers)",
    "spectral_aleatoric": "Spectral uncertainty, aleatoric (from the question's ambiguity)",
    "spectral_epistemic": "Spectral uncertainty, epistemic (mean within clarifications)",
    "kernel_entropy_total": "Kernel entropy of all answers (negative; closer to 0 = more uncertain)",
    "kernel_entropy_aleatoric": "Kernel entropy, total minus mean within clarifications",
    "kernel_entropy_epistemic": "Kernel entropy, mean within clarifications",
    "kernel_distance_variance": "Mean kernel within clarifications minus between them",
    "semantic_entropy": "Semantic entropy of all answers (entropy of meaning clusters)",
    "kernel_language_entropy": "Kernel language entropy of all answers",
    "ice_aleatoric": "Clarification ensembling, aleatoric (semantic entropy, total minus mean)",
    "ice_epistemic": "Clarification ensembling, epistemic (mean semantic entropy within)",
}

NO_CLARIFICATION = "no clarification needed"
BLANK_ANSWER = "[no answer]"
REFUSAL_ANSWER = "I don't know."
_REFUSALS = re.compile(
    r"^(i (do not|don't|dont) know|unknown|not sure|i am not sure|i'm not sure|"
    r"i (cannot|can't|cant) (answer|say|tell)|cannot be determined|no idea)\b",
    re.IGNORECASE,
)

CLARIFY_SYSTEM = (
    "You help to disambiguate questions. You never answer them."
)
CLARIFY_USER = (
    "Question: {question}\n\n"
    "If this question can reasonably be read in more than one way, write up to {n} clarified "
    "versions of it, one per line, numbered 1., 2., and so on. Each version must be a complete "
    "question that fixes one reading. If the question has a single clear reading, reply with "
    "exactly: No clarification needed."
)
ANSWER_SYSTEM = (
    "Answer the question with a short answer of a few words, without explanation."
)


class LLMAuditError(ValueError):
    """Invalid input to an LLM audit; the message names the file, line, field or argument."""


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


# ---------------------------------------------------------------------------------------------
# Model calls


@dataclass
class Endpoint:
    """An OpenAI-compatible chat model: its name, server and call limits."""

    model: str
    base_url: str | None = None
    timeout_s: float = 60.0
    max_retries: int = 2

    def check(self) -> None:
        """Raise LLMAuditError naming the first field out of range."""
        if not self.model or not self.model.strip():
            raise LLMAuditError("model name is empty; pass the name the server knows the model by")
        if not self.timeout_s > 0:
            raise LLMAuditError(f"timeout must be positive seconds, got {self.timeout_s!r}")
        if not isinstance(self.max_retries, int) or self.max_retries < 0:
            raise LLMAuditError(f"max_retries must be 0 or more, got {self.max_retries!r}")


def make_client(endpoint: Endpoint):
    """Create an `openai.OpenAI` client with the endpoint's timeout and bounded retries.

    The key comes from OPENAI_API_KEY. A server given by base URL may need none, and then a
    placeholder is sent.
    """
    import openai

    base_url = endpoint.base_url or os.environ.get("OPENAI_BASE_URL") or None
    api_key = os.environ.get("OPENAI_API_KEY")
    if not api_key:
        if base_url is None:
            raise LLMAuditError(
                f"OPENAI_API_KEY is not set and no base URL is given for model {endpoint.model!r}; "
                "set the key or pass the server's base URL"
            )
        api_key = "not-needed"
    return openai.OpenAI(
        base_url=base_url,
        api_key=api_key,
        timeout=endpoint.timeout_s,
        max_retries=endpoint.max_retries,
    )


def _chat(client, model: str, messages: list[dict], n: int, temperature: float,
          max_tokens: int) -> list[str]:
    response = client.chat.completions.create(
        model=model,
        messages=messages,
        n=n,
        temperature=temperature,
        max_tokens=max_tokens,
    )
    return [choice.message.content or "" for choice in response.choices]


def sample_answers(client, model: str, question: str, m: int, temperature: float,
                   max_tokens: int) -> list[str]:
    """Sample m answers to a question, topping up when a server returns fewer choices than n."""
    messages = [
        {"role": "system", "content": ANSWER_SYSTEM},
        {"role": "user", "content": question},
    ]
    answers: list[str] = []
    for _ in range(m):
        answers += _chat(client, model, messages, m - len(answers), temperature, max_tokens)
        if len(answers) >= m:
            return answers[:m]
    raise LLMAuditError(
        f"model {model!r} returned {len(answers)} of {m} requested answers after {m} requests"
    )


def parse_clarifications(text: str, question: str, n: int) -> list[str]:
    """Extract up to n clarified questions from the clarifier's output, one per line.

    Numbering and bullets are removed. An output of "No clarification needed", or one with no
    usable line, gives the original question alone.
    """
    lines = []
    for raw in text.splitlines():
        line = re.sub(r"^\s*(\d+[.):]|[-*•])\s*", "", raw).strip()
        if line and NO_CLARIFICATION not in line.lower():
            lines.append(line)
    if not lines:
        return [question]
    return lines[:n]


def request_clarifications(client, model: str, question: str, n: int, temperature: float,
                           max_tokens: int) -> list[str]:
    """Ask the clarifier for up to n readings of the question; n = 1 skips the call."""
    if n == 1:
        return [question]
    messages = [
        {"role": "system", "content": CLARIFY_SYSTEM},
        {"role": "user", "content": CLARIFY_USER.format(question=question, n=n)},
    ]
    output = _chat(client, model, messages, 1, temperature, max_tokens)
    return parse_clarifications(output[0] if output else "", question, n)


# ---------------------------------------------------------------------------------------------
# Settings and per-question records


@dataclass
class LLMAuditSettings:
    """Every choice that changes the audit's numbers; stored with the audit as its spec."""

    n_clarifications: int = 5
    n_answers: int = 10
    temperature: float = 0.5
    clarifier_temperature: float = 1.0
    answer_temperature: float = 0.1
    max_tokens: int = 100
    clarifier_max_tokens: int = 400
    gamma: float = 1.0
    similarity_threshold: float = 0.8
    entail_similarity: float = 0.9
    neutral_similarity: float = 0.7
    n_boot: int = 1000
    seed: int = 0

    def check(self) -> None:
        """Raise LLMAuditError naming the first setting out of range."""
        for name in ("n_clarifications", "n_answers", "max_tokens", "clarifier_max_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise LLMAuditError(f"{name} must be a positive integer, got {value!r}")
        for name in ("temperature", "clarifier_temperature", "answer_temperature"):
            value = getattr(self, name)
            if not 0 <= value <= 2:
                raise LLMAuditError(f"{name} must be between 0 and 2, got {value!r}")
        if not self.gamma > 0:
            raise LLMAuditError(f"gamma must be positive, got {self.gamma!r}")
        for name in ("similarity_threshold", "entail_similarity", "neutral_similarity"):
            value = getattr(self, name)
            if not -1 <= value <= 1:
                raise LLMAuditError(f"{name} must be a cosine similarity in [-1, 1], got {value!r}")
        if self.neutral_similarity > self.entail_similarity:
            raise LLMAuditError(
                f"neutral_similarity ({self.neutral_similarity}) must not exceed "
                f"entail_similarity ({self.entail_similarity})"
            )
        if self.n_boot < 0:
            raise LLMAuditError(f"n_boot must be 0 or more, got {self.n_boot!r}")


@dataclass
class QuestionRecord:
    """What the models returned for one question, and the scores computed from it."""

    id: str
    question: str
    accepted: list[str]
    ambiguous: bool | None
    clarifications: list[str]
    answers: list[list[str]]
    response: str
    correct: bool = False
    correct_by: str = ""
    sample_accuracy: float = float("nan")
    scores: dict[str, float] = field(default_factory=dict)


def query_models(item: QAItem, target_client, target_model: str, clarifier_client,
                 clarifier_model: str, settings: LLMAuditSettings) -> QuestionRecord:
    """Make every model call for one question: clarifications, samples and the judged answer."""
    clarifications = request_clarifications(
        clarifier_client, clarifier_model, item.question, settings.n_clarifications,
        settings.clarifier_temperature, settings.clarifier_max_tokens,
    )
    answers = [
        [
            canonical_answer(answer)
            for answer in sample_answers(target_client, target_model, clarification,
                                         settings.n_answers, settings.temperature,
                                         settings.max_tokens)
        ]
        for clarification in clarifications
    ]
    response = sample_answers(target_client, target_model, item.question, 1,
                              settings.answer_temperature, settings.max_tokens)[0]
    return QuestionRecord(
        id=item.id, question=item.question, accepted=item.answers, ambiguous=item.ambiguous,
        clarifications=clarifications, answers=answers, response=canonical_answer(response),
    )


# ---------------------------------------------------------------------------------------------
# Correctness and uncertainty scores


class SimilarityEntailment:
    """Stand-in for an NLI model, built from answer embeddings and normalised strings.

    premise => hypothesis is entailment (2) when the normalised premise contains the normalised
    hypothesis as whole words or their cosine similarity is at least `entail_at`, neutral (1)
    from `neutral_at`, and contradiction (0) below. It is a proxy: it cannot see negation or
    logical entailment the way an NLI model such as DeBERTa-MNLI does.
    """

    def __init__(self, vectors: dict[str, np.ndarray], entail_at: float, neutral_at: float):
        self.vectors = vectors
        self.entail_at = entail_at
        self.neutral_at = neutral_at
        self.description = (
            f"embedding similarity stand-in for NLI (entailment when the premise contains the "
            f"hypothesis or cosine >= {entail_at}, neutral when cosine >= {neutral_at})"
        )

    def __call__(self, premise: str, hypothesis: str) -> int:
        if contains_accepted(premise, [hypothesis]):
            return lu.ENTAILMENT
        similarity = float(self.vectors[premise] @ self.vectors[hypothesis])
        if similarity >= self.entail_at:
            return lu.ENTAILMENT
        if similarity >= self.neutral_at:
            return lu.NEUTRAL
        return lu.CONTRADICTION


def embed_texts(embedder: Embedder, texts: Sequence[str]) -> dict[str, np.ndarray]:
    """Embed the distinct texts once each and return unit vectors keyed by text."""
    unique = list(dict.fromkeys(texts))
    vectors = embed(embedder, unique)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    unit = np.divide(vectors, norms, out=np.zeros_like(vectors), where=norms > 0)
    return dict(zip(unique, unit))


def judge(record: QuestionRecord, vectors: dict[str, np.ndarray], threshold: float) -> None:
    """Mark the judged answer and the sampled answers correct or not, in place."""

    def is_correct(answer: str) -> tuple[bool, str]:
        if answer in (BLANK_ANSWER, REFUSAL_ANSWER):
            return False, "no answer"
        if contains_accepted(answer, record.accepted):
            return True, "contains an accepted answer"
        accepted = np.stack([vectors[option] for option in record.accepted])
        similarity = float(cosine_similarity(vectors[answer][None, :], accepted).max())
        if similarity >= threshold:
            return True, f"cosine similarity {similarity:.2f} to an accepted answer"
        return False, f"best cosine similarity {similarity:.2f}"

    record.correct, record.correct_by = is_correct(record.response)
    samples = [answer for group in record.answers for answer in group]
    record.sample_accuracy = float(np.mean([is_correct(answer)[0] for answer in samples]))


def score_question(record: QuestionRecord, vectors: dict[str, np.ndarray],
                   entailment: lu.Entailment, gamma: float) -> dict[str, float]:
    """Compute every uncertainty score of one question from its sampled answers."""
    groups = [np.stack([vectors[answer] for answer in group]) for group in record.answers]
    pooled = [answer for group in record.answers for answer in group]

    spectral = lu.spectral_uncertainty(groups, kernel="rbf", gamma=gamma)
    kernel = lu.predictive_kernel_entropy(groups, kernel="rbf", gamma=gamma)
    ensemble = lu.clarification_ensemble_entropy(record.answers, entailment)
    return {
        "spectral_total": spectral.total,
        "spectral_aleatoric": spectral.aleatoric,
        "spectral_epistemic": spectral.epistemic,
        "kernel_entropy_total": kernel.total,
        "kernel_entropy_aleatoric": kernel.aleatoric,
        "kernel_entropy_epistemic": kernel.epistemic,
        "kernel_distance_variance": lu.kernel_distance_variance(groups, kernel="rbf", gamma=gamma),
        "semantic_entropy": ensemble.total,
        "kernel_language_entropy": lu.kernel_language_entropy(pooled, entailment),
        "ice_aleatoric": ensemble.aleatoric,
        "ice_epistemic": ensemble.epistemic,
    }


# ---------------------------------------------------------------------------------------------
# Detection metrics and the abstention curve


def detection_metrics(labels: np.ndarray, scores: np.ndarray, n_boot: int,
                      seed: int) -> dict[str, Any]:
    """Compute AUROC and average precision of scores for labels, with 95 % bootstrap intervals.

    Questions with an undefined (NaN) score are left out and counted. Intervals are percentile
    intervals over `n_boot` resamples of questions. Resamples with a single label are redrawn
    from the count, and the interval is left out when over half of them are.
    """
    finite = np.isfinite(scores)
    labels = labels[finite].astype(np.int64)
    scores = scores[finite]
    result: dict[str, Any] = {
        "n": int(labels.size), "n_positive": int(labels.sum()), "n_undefined": int((~finite).sum()),
        "auroc": float("nan"), "auroc_low": float("nan"), "auroc_high": float("nan"),
        "aupr": float("nan"), "aupr_low": float("nan"), "aupr_high": float("nan"),
        "reason": None,
    }
    if labels.size == 0 or labels.min() == labels.max():
        result["reason"] = "needs both positive and negative questions with a defined score"
        return result

    result["auroc"] = lu.auroc(labels, scores)
    result["aupr"] = lu.average_precision(labels, scores)
    if n_boot == 0:
        return result

    rng = np.random.default_rng(seed)
    aurocs, auprs = [], []
    for _ in range(n_boot):
        index = rng.integers(0, labels.size, labels.size)
        resampled = labels[index]
        if resampled.min() == resampled.max():
            continue
        aurocs.append(lu.auroc(resampled, scores[index]))
        auprs.append(lu.average_precision(resampled, scores[index]))
    if len(aurocs) < n_boot / 2:
        result["reason"] = f"only {len(aurocs)} of {n_boot} bootstrap resamples had both labels"
        return result

    result["auroc_low"], result["auroc_high"] = (float(v) for v in np.percentile(aurocs, [2.5, 97.5]))
    result["aupr_low"], result["aupr_high"] = (float(v) for v in np.percentile(auprs, [2.5, 97.5]))
    return result


def abstention_curve(correct: np.ndarray, scores: np.ndarray) -> list[dict[str, float]]:
    """Compute accuracy against coverage when the most uncertain questions are withheld first.

    Questions are ordered by score, lowest (most certain) first, with ties kept in file order.
    Point k covers the k most certain questions. Questions with an undefined score are left out.
    """
    finite = np.isfinite(scores)
    order = np.argsort(scores[finite], kind="stable")
    kept = correct[finite][order].astype(np.float64)
    if kept.size == 0:
        return []
    counts = np.arange(1, kept.size + 1)
    accuracy = np.cumsum(kept) / counts
    return [
        {"coverage": float(k / kept.size), "accuracy": float(a), "n": int(k)}
        for k, a in zip(counts, accuracy)
    ]


def summarise(records: list[QuestionRecord], n_boot: int, seed: int) -> dict[str, Any]:
    """Compute error and ambiguity detection for every score, and the abstention curves."""
    correct = np.array([record.correct for record in records], dtype=bool)
    errors = (~correct).astype(np.int64)
    labelled = [index for index, record in enumerate(records) if record.ambiguous is not None]
    ambiguous = np.array([int(bool(records[index].ambiguous)) for index in labelled], dtype=np.int64)

    error_detection, ambiguity_detection, abstention = {}, {}, {}
    for name in SCORES:
        values = np.array([record.scores[name] for record in records], dtype=np.float64)
        error_detection[name] = detection_metrics(errors, values, n_boot, seed)
        abstention[name] = abstention_curve(correct, values)
        if labelled:
            ambiguity_detection[name] = detection_metrics(ambiguous, values[labelled], n_boot, seed)

    return {
        "n_questions": len(records),
        "accuracy": float(correct.mean()) if records else float("nan"),
        "n_labelled_ambiguity": len(labelled),
        "n_ambiguous": int(ambiguous.sum()),
        "error_detection": error_detection,
        "ambiguity_detection": ambiguity_detection,
        "abstention": abstention,
    }


# ---------------------------------------------------------------------------------------------
# The whole audit


@dataclass
class LLMAuditResult:
    """Where an LLM audit went and the summary the report shows."""

    audit_id: str
    stored: bool
    report: dict[str, Any]
    out: Path | None


def run_llm_audit(
    qa_file: Path,
    target: Endpoint,
    clarifier: Endpoint | None = None,
    settings: LLMAuditSettings | None = None,
    embedder: Embedder | None = None,
    entailment: lu.Entailment | None = None,
    store_path: Path | None = None,
    out: Path | None = None,
    progress: Progress | None = None,
    warn: Callable[[str], None] | None = None,
) -> LLMAuditResult:
    """Run the LLM audit of `qa_file` against `target`, store it and write its report.

    `clarifier=None` uses the target model as its own clarifier. `embedder=None` loads the default
    MiniLM embedder. `entailment=None` uses `SimilarityEntailment` over the same embeddings.
    Questions whose model calls fail after the client's retries are skipped and listed in the
    report. LLMAuditError is raised when the input is invalid or no question could be answered.
    """
    started = time.monotonic()
    settings = settings or LLMAuditSettings()
    settings.check()
    warn = warn or (lambda message: None)
    qa_file = Path(qa_file)

    items = load_qa(qa_file)
    identifier_warnings = scan_identifiers(qa_file)
    for message in identifier_warnings:
        warn(message)

    if embedder is None:
        from tools.embeddings import MiniLMEmbedder

        embedder = MiniLMEmbedder()
    clarifier = clarifier or target
    target.check()
    clarifier.check()
    target_client = make_client(target)
    clarifier_client = target_client if clarifier is target else make_client(clarifier)

    records, skipped = _query_all(items, target_client, target.model, clarifier_client,
                                  clarifier.model, settings, progress, warn)
    if not records:
        reasons = "; ".join(f"{entry['id']}: {entry['reason']}" for entry in skipped[:3])
        raise LLMAuditError(f"no question of {qa_file} could be answered ({reasons})")

    texts = [text for record in records for text in _texts_of(record)]
    vectors = embed_texts(embedder, texts)
    if entailment is None:
        entailment = SimilarityEntailment(vectors, settings.entail_similarity,
                                          settings.neutral_similarity)
    for record in records:
        judge(record, vectors, settings.similarity_threshold)
        record.scores = score_question(record, vectors, entailment, settings.gamma)

    report = {
        "schema_version": 1,
        "kind": "llm",
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "qa_file": str(qa_file),
        "qa_sha256": hashlib.sha256(qa_file.read_bytes()).hexdigest(),
        "target": {"model": target.model, "base_url": target.base_url},
        "clarifier": {"model": clarifier.model, "base_url": clarifier.base_url},
        "settings": settings.__dict__.copy(),
        "embedder": embedder.name,
        "entailment": getattr(entailment, "description", repr(entailment)),
        "scores_info": SCORES,
        "primary_scores": {"error_detection": ERROR_SCORE, "ambiguity_detection": AMBIGUITY_SCORE},
        "identifier_warnings": identifier_warnings,
        "skipped": skipped,
        **summarise(records, settings.n_boot, settings.seed),
        "questions": [record.__dict__.copy() for record in records],
    }
    report["wall_seconds"] = round(time.monotonic() - started, 2)
    report = _json_safe(report)

    audit_id, stored = persist_llm_audit(store_path, report)
    report["audit_id"] = audit_id
    if out is None:
        out = Path("audits") / audit_id
    from agent.llm_report import write_llm_report

    write_llm_report(report, Path(out))
    return LLMAuditResult(audit_id=audit_id, stored=stored, report=report, out=Path(out))


def _query_all(items, target_client, target_model, clarifier_client, clarifier_model, settings,
               progress, warn) -> tuple[list[QuestionRecord], list[dict[str, str]]]:
    import openai

    records, skipped = [], []
    for done, item in enumerate(items, start=1):
        try:
            records.append(query_models(item, target_client, target_model, clarifier_client,
                                        clarifier_model, settings))
        except (openai.OpenAIError, LLMAuditError) as error:
            reason = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
            log.warning("question %s skipped: %s", item.id, reason)
            warn(f"question {item.id} (line {item.line}) skipped: {reason}")
            skipped.append({"id": item.id, "line": item.line, "reason": reason})
        if progress is not None:
            progress(done, len(items))
    return records, skipped


def _texts_of(record: QuestionRecord) -> list[str]:
    return [*record.accepted, record.response, *(a for group in record.answers for a in group)]


def _json_safe(value: Any) -> Any:
    """Replace NaN and infinities by None and numpy scalars by Python ones, recursively."""
    if isinstance(value, dict):
        return {str(key): _json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(item) for item in value]
    if isinstance(value, (np.floating, float)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, Path):
        return str(value)
    return value


def persist_llm_audit(store_path: Path | None, report: dict[str, Any]) -> tuple[str, bool]:
    """Save the audit to the DuckDB store; returns (audit id, whether it was stored).

    The per-question records go to the artifact "llm_questions" and everything else to
    "llm_summary". Without a store path the audit gets an id but is kept only in the report.
    """
    if store_path is None:
        return f"{datetime.now(timezone.utc):%Y%m%d-%H%M%S}-llm", False

    from tools.store import Store

    spec = {
        "qa_file": report["qa_file"],
        "target": report["target"],
        "clarifier": report["clarifier"],
        "settings": report["settings"],
    }
    meta = {
        "qa_sha256": report["qa_sha256"],
        "embedder": report["embedder"],
        "entailment": report["entailment"],
        "n_questions": report["n_questions"],
        "wall_seconds": report["wall_seconds"],
    }
    summary = {key: value for key, value in report.items() if key != "questions"}
    with Store(store_path) as store:
        audit_id = store.create_audit(kind="llm", spec=spec, plan=None, meta=meta)
        summary["audit_id"] = audit_id
        store.save_artifact(audit_id, "llm_questions", report["questions"])
        store.save_artifact(audit_id, "llm_summary", summary)
        store.update_audit(audit_id, status="finished")
    return audit_id, True
