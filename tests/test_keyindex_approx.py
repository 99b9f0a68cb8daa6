"""The approximate key index (annindex.py): the scores it gives are assembly's, its top-k is the exhaustive
top-k when every list is probed, an index of another format is rebuilt, and assembly through it makes the
exhaustive recipe."""

import math

import pytest
import torch
import torch.nn.functional as F

from perpcs.annindex import FORMAT, ApproximateIndex, build, index_path, lists_for
from perpcs.keyindex import KeyIndex
from test_core import HISTORY, POSITIONS, assemble, make_pool, random_pieces


def clustered_pieces(n: int, seed: int) -> dict[str, dict]:
    """n sharers whose keys share a mean and differ in a few directions, as sharers' mean activations do."""
    g = torch.Generator().manual_seed(seed)
    basis = {p: torch.randn(4, d_in, generator=g) for p, (d_in, _) in POSITIONS.items()}
    pieces = {}
    for i in range(n):
        p = random_pieces(seed + i)
        pieces[f"u{i}"] = {pos: (a, b, 3 + torch.randn(4, generator=g) @ basis[pos]
                                 + 0.2 * torch.randn(k.shape, generator=g)) for pos, (a, b, k) in p.items()}
    return pieces


def hand_scores(kind: str, mean: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Assembly's scores of all candidates, written out: gate LN(g).m/sqrt(d), activation sqrt(d) cos(m-c, k-c)."""
    d = mean.numel()
    if kind == "gate":
        return torch.stack([(F.layer_norm(k, (d,)) * mean).sum() / math.sqrt(d) for k in keys])
    c = keys.mean(0)
    return torch.stack([math.sqrt(d) * torch.dot(mean - c, k - c) / ((mean - c).norm() * (k - c).norm()) for k in keys])


@pytest.mark.parametrize("kind", ["activation", "gate"])
def test_search_gives_assemblys_scores_and_rescoring_every_row_gives_the_exhaustive_top_k(tmp_path, kind):
    pool = make_pool(tmp_path / "pool", clustered_pieces(400, 0), key=kind)
    ApproximateIndex.of(pool, nprobe=1000)
    full = ApproximateIndex(index_path(pool), nprobe=1000, rerank=400)  # every row re-scored: only fp16 rounding
    coded = ApproximateIndex(index_path(pool), nprobe=1000, rerank=100)  # the codes' best 100 re-scored
    exact = KeyIndex.of(pool)
    g = torch.Generator().manual_seed(1)
    assert lists_for(400) > 1
    hits = 0
    for pos in POSITIONS:
        ids, keys = exact.keys(pos)
        for _ in range(5):
            mean = 3 + torch.randn(keys.shape[1], generator=g)
            want = hand_scores(kind, mean, keys)
            top = torch.topk(want, 5)
            score_of, tol = dict(zip(ids, want.tolist())), 5e-3 * math.sqrt(keys.shape[1])  # fp16 vectors
            for index in (full, coded):
                found, scores = index.search(pos, mean, 5)
                assert len(set(found)) == 5 and scores.tolist() == sorted(scores.tolist(), reverse=True)
                assert torch.allclose(scores, torch.tensor([score_of[f] for f in found]), atol=tol)
            found = full.search(pos, mean, 5)[0]  # the exhaustive top-5, in order, up to ties within fp16 rounding:
            assert all(score_of[f] >= top.values[r] - tol for r, f in enumerate(found))
            hits += len(set(coded.search(pos, mean, 5)[0]) & {ids[i] for i in top.indices.tolist()})
    assert hits / (5 * 5 * len(POSITIONS)) > 0.5  # re-scoring 100 of 400 rows at random would find a quarter
    assert index_path(pool).is_dir() and full.nbytes() > full.code_bytes() > 0


def test_an_index_of_another_format_is_not_read_but_rebuilt(tmp_path):
    pool = make_pool(tmp_path / "pool", clustered_pieces(30, 5), key="activation")
    old = pool.path / "ann-0123456789abcdef"  # the first format's folder: no format recorded
    old.mkdir()
    (old / "index.json").write_text('{"kind": "activation", "sharers": [], "positions": {}}')
    with pytest.raises(ValueError, match=f"format 1, not {FORMAT}"):
        ApproximateIndex(old, nprobe=8)
    index = ApproximateIndex.of(pool, nprobe=8)
    assert index.folder == index_path(pool) != old and not old.exists()
    assert index.code_bytes() == 0  # 30 candidates, under MIN_CODED: no codes, every row scored
    ids, keys = KeyIndex.of(pool).keys(list(POSITIONS)[0])
    mean = keys[3] + 0.01
    assert index.search(list(POSITIONS)[0], mean, 1)[0] == [ids[torch.argmax(hand_scores("activation", mean, keys))]]


def test_few_probes_find_most_of_the_top_3_and_build_resumes(tmp_path):
    pool = make_pool(tmp_path / "pool", clustered_pieces(400, 2), key="activation")
    exact = KeyIndex.of(pool)
    sharers = pool.sharers()
    calls = []

    def keys_at(pos):
        calls.append(pos)
        if len(calls) == 2:
            raise KeyboardInterrupt  # a build stopped after its first position
        ids, keys = exact.keys(pos)
        return [sharers.index(s) for s in ids], keys

    folder = tmp_path / "ann"
    with pytest.raises(KeyboardInterrupt):
        build(folder, sharers, "activation", list(POSITIONS), keys_at)
    build(folder, sharers, "activation", list(POSITIONS), keys_at)
    assert calls == list(POSITIONS)[:2] + list(POSITIONS)[1:]  # the first position was not built again
    index = ApproximateIndex(folder, nprobe=lists_for(400) // 2)
    g = torch.Generator().manual_seed(3)
    hits = total = 0
    for pos in POSITIONS:
        ids, keys = exact.keys(pos)
        for _ in range(10):
            mean = 3 + torch.randn(4, generator=g) @ torch.randn(4, keys.shape[1], generator=g)
            want = {ids[i] for i in torch.topk(hand_scores("activation", mean, keys), 3).indices.tolist()}
            hits += len(want & set(index.search(pos, mean, 3)[0]))
            total += 3
    assert 0.5 < hits / total <= 1.0


@pytest.mark.parametrize("select", ["topk", "sample"])
def test_assembly_through_the_index_makes_the_exhaustive_recipe(tmp_path, tokenizer, select):
    pool = make_pool(tmp_path / "pool", clustered_pieces(60, 4), key="activation")
    exact, _ = assemble(pool, tokenizer, HISTORY, top_k=2, batch_size=3, select=select, key_index="exact")
    approx, _ = assemble(pool, tokenizer, HISTORY, top_k=2, batch_size=3, select=select, key_index="approximate",
                         nprobe=1000)
    def chosen(recipe):
        return {p: [s for s, _ in c] for p, c in recipe.pieces.items()}

    assert chosen(approx) == chosen(exact)
    for pos, chosen in exact.pieces.items():
        assert [w for _, w in approx.pieces[pos]] == pytest.approx([w for _, w in chosen], abs=2e-3)
    for every in ("topp", "whole"):  # they score every candidate
        with pytest.raises(ValueError, match=every):
            assemble(pool, tokenizer, HISTORY, select=every, key_index="approximate")


def test_auto_takes_the_index_for_large_pools_unless_the_rule_scores_every_candidate(tmp_path, monkeypatch):
    import perpcs.assembly
    from conftest import tiny_llama
    from perpcs.assembly import Assembler
    from perpcs.settings import AssemblySettings

    pool = make_pool(tmp_path / "pool", clustered_pieces(60, 4), key="activation")
    monkeypatch.setattr(perpcs.assembly, "LARGE_POOL", len(pool))
    for select, approximate in [("topk", True), ("sample", True), ("topp", False), ("whole", False)]:
        asm = Assembler(tiny_llama(), pool, AssemblySettings(select=select, key_index="auto"))
        assert asm.approximate is approximate
        asm.unload()
