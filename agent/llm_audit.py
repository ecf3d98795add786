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
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from agent.llm_clients import Endpoint, make_client, request_clarifications, sample_answers
from agent.llm_qa import (
    BLANK_ANSWER,
    REFUSAL_ANSWER,
    LLMAuditError,
    QAItem,
    canonical_answer,
    contains_accepted,
    load_qa,
    scan_identifiers,
)
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


# ---------------------------------------------------------------------------------------------
# Settings and per-question records


@dataclass
class LLMAuditSettings:
    """Settings that change the audit's numbers, stored with the audit as its spec."""

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
    """Model output for one question and the scores computed from it."""

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
        error_detection[name] = lu.detection_with_intervals(errors, values, n_boot, seed)
        abstention[name] = abstention_curve(correct, values)
        if labelled:
            ambiguity_detection[name] = lu.detection_with_intervals(ambiguous, values[labelled], n_boot, seed)

    return {
        "n_questions": len(records),
        "accuracy": float(correct.mean()) if records else float("nan"),
        "n_single_reading": sum(len(record.clarifications) == 1 for record in records),
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
    """Outcome of an LLM audit: its id, whether the store has it, the report and its folder."""

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


def load_llm_report(store_path: Path, audit_id: str) -> dict[str, Any]:
    """Rebuild the report of a stored LLM audit, for rendering it again with `write_llm_report`."""
    from tools.store import Store

    with Store(store_path) as store:
        audit = store.audit(audit_id)
        if audit["kind"] != "llm":
            raise LLMAuditError(f"audit {audit_id} is a {audit['kind']} audit, not an LLM audit")
        summary = store.artifact(audit_id, "llm_summary")
        questions = store.artifact(audit_id, "llm_questions")
    if summary is None or questions is None:
        raise LLMAuditError(f"audit {audit_id} has no stored LLM results; it may not have finished")
    return {**summary, "questions": questions}
