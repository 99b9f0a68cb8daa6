"""BM25 retrieval over a user's own history (for retrieval-augmented prompts and training copies)."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from rank_bm25 import BM25Okapi

if TYPE_CHECKING:
    from perpcs.data import User
    from perpcs.tasks import Task

_WORD = re.compile(r"\w+")


def _tokens(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def bm25_top(corpus: list[str], query: str, k: int = 1) -> list[int]:
    """Indices of the k items of `corpus` most similar to `query` by BM25 Okapi (best first).

    Ties (and all-zero scores, e.g. no shared words) go to the most recent item, the natural
    guess for a history ordered oldest first.
    """
    if not corpus or k <= 0:
        return []
    scores = BM25Okapi([_tokens(doc) or [""] for doc in corpus]).get_scores(_tokens(query))
    order = sorted(range(len(corpus)), key=lambda i: (-float(scores[i]), -i))
    return order[: min(k, len(corpus))]


def prompts(task: Task, user: User, rag_k: int = 0) -> list[str]:
    """The user's query prompts; with rag_k > 0, each with its BM25 top-k history items (and profile)."""
    corpus = [it.input for it in user.history]
    out = []
    for q in user.queries:
        retrieved = [user.history[i] for i in bm25_top(corpus, q.input, rag_k)] if rag_k else []
        out.append(task.format_prompt(q.input, retrieved, user.profile if rag_k else None))
    return out
