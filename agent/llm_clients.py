"""Calls to OpenAI-compatible chat models for an LLM audit: clarifications and answer samples.

The `openai` client brings the timeout and the bounded retries with exponential back-off.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass

from agent.llm_qa import LLMAuditError

log = logging.getLogger(__name__)

NO_CLARIFICATION = "no clarification needed"

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
    """Sample m answers to a question, topping up when a server returns fewer choices than n.

    A server that rejects n > 1 with HTTP 400 is asked again one choice per request.
    """
    import openai

    messages = [
        {"role": "system", "content": ANSWER_SYSTEM},
        {"role": "user", "content": question},
    ]
    answers: list[str] = []
    per_request = m
    for _ in range(m + 1):
        requested = min(per_request, m - len(answers))
        try:
            answers += _chat(client, model, messages, requested, temperature, max_tokens)
        except openai.BadRequestError:
            if requested == 1:
                raise
            log.info("model %s rejected n=%d; requesting one answer at a time", model, requested)
            per_request = 1
            continue
        if len(answers) >= m:
            return answers[:m]
    raise LLMAuditError(
        f"model {model!r} returned {len(answers)} of {m} requested answers after {m + 1} requests"
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
