"""BM25 retrieval over a user's own history (for retrieval-augmented prompts and training copies)."""

from __future__ import annotations

import re

from rank_bm25 import BM25Okapi

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
