"""select="whole": whole sharers picked by their pieces' mean score, from one forward with nothing installed.

Expected values are computed here: the bare model's inputs at each position, the target's mean layer norm over
the tokens that predict outputs (per example, then over every example), each kind's score written out, and the
softmax over sharers' mean scores with math.exp.
"""

import math

import pytest
import torch

from test_core import HISTORY, L0, POSITIONS, USERS, assemble, bare_inputs, ln, make_pool, random_pieces


def target_means(tokenizer) -> dict[str, torch.Tensor]:
    """Per position: mean over examples of the mean LN(h) over the tokens that predict an output token, bare model."""
    seen, mask = bare_inputs(tokenizer)
    out = {}
    for p, h in seen.items():
        per_example = [torch.stack([ln(h[b, t]) for t in range(h.shape[1]) if mask[b, t]]).mean(0)
                       for b in range(h.shape[0]) if mask[b].any()]
        out[p] = torch.stack(per_example).mean(0)
    return out


def score(m: torch.Tensor, keys: dict[str, torch.Tensor], sid: str, key: str) -> float:
    d = m.numel()
    if key == "gate":
        return float(ln(keys[sid]) @ m / math.sqrt(d))
    c = torch.stack(list(keys.values())).mean(0)
    return math.sqrt(d) * float(torch.nn.functional.cosine_similarity(m - c, keys[sid] - c, dim=0))


@pytest.mark.parametrize("key", ["gate", "activation", "task-activation"])
def test_whole_mixes_the_top_sharers_by_mean_score_with_every_piece_they_share(tmp_path, tokenizer, key):
    pieces = {u: random_pieces(i, scale=3.0) for i, u in enumerate(USERS)}
    shares = {"u3": set(L0)}  # u3's mean is over its two positions only
    pool = make_pool(tmp_path / "pool", pieces, shares=shares, key=key)
    means = target_means(tokenizer)
    sid = {u: pool.pseudonym(u) for u in USERS}
    mean_score = {}
    for u in USERS:
        at = [p for p in POSITIONS if p in shares.get(u, POSITIONS)]
        mean_score[sid[u]] = sum(score(means[p], {sid[v]: pieces[v][p][2] for v in USERS
                                                  if p in shares.get(v, POSITIONS)}, sid[u], key) for p in at) / len(at)
    top = sorted(mean_score, key=mean_score.get, reverse=True)[:2]
    z = [math.exp(mean_score[s] / 2.0) for s in top]
    want = {s: x / sum(z) for s, x in zip(top, z)}
    for batch_size in (2, len(HISTORY)):  # the target's mean is over every example, however they are batched
        recipe, (trace,) = assemble(pool, tokenizer, select="whole", top_k=2, temperature=2.0, mix="cat",
                                    batch_size=batch_size)
        for p in POSITIONS:
            here = {s: w for s, w in want.items() if p in pool.positions_of(s)}
            assert dict(recipe.pieces[p]) == pytest.approx({s: w / sum(here.values()) for s, w in here.items()},
                                                           abs=1e-5)
            ids, scores = trace[p]
            assert len(ids) == (4 if p in L0 else 3)
        assert len(trace) == len(POSITIONS)


@pytest.mark.parametrize("key", ["activation", "task-activation"])
def test_whole_picks_the_sharer_whose_keys_are_the_targets_own(tmp_path, tokenizer, key):
    """A sharer whose key at every position is the target's own mean has cosine 1 everywhere: the highest score."""
    means = target_means(tokenizer)
    pieces = {u: random_pieces(i) for i, u in enumerate(USERS)}
    pieces["u2"] = {p: (a, b, means[p]) for p, (a, b, _) in pieces["u2"].items()}
    pool = make_pool(tmp_path / "pool", pieces, key=key)
    recipe, _ = assemble(pool, tokenizer, select="whole", top_k=1)
    assert recipe.pieces == {p: [(pool.pseudonym("u2"), 1.0)] for p in POSITIONS}
