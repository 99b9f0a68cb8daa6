"""The assembled update's strength: fixed, or chosen per target on its newest history items."""

import pytest
import torch
from rouge_score.rouge_scorer import RougeScorer

from conftest import tiny_llama
from perpcs.assembly import Assembler
from perpcs.data import Item
from perpcs.recipe import Recipe, apply_recipe, materialize
from perpcs.settings import AssemblySettings
from perpcs.strength import best_strength, holdout_size
from perpcs.tasks import Task
from perpcs.training import collate, history_examples, lm_loss
from test_core import POSITIONS, TASK, make_pool, random_pieces

RATING = Task(name="r", kind="rating", scale=(1, 5), instruction="Rate it.", input_name="In", output_name="Score")
HISTORY = [Item(input=f"review {i} " + "y" * i, output=str(1 + i % 5)) for i in range(10)]
USERS = ["u0", "u1", "u2"]


@pytest.mark.parametrize("n, v", [(3, 0), (4, 0), (5, 1), (12, 2), (19, 3), (40, 4)])
def test_holdout_is_a_fifth_of_the_history_at_most_4(n, v):
    assert holdout_size(n, 4) == v


@pytest.mark.parametrize("scores, best", [({0.0: -1.0, 0.5: -1.0, 1.0: -2.0}, 0.0),
                                          ({0.0: -2.0, 0.5: -1.0, 1.0: -1.0}, 0.5),
                                          ({1.0: 3.0, 0.0: 1.0, 0.5: 2.0}, 1.0)])
def test_best_strength_breaks_ties_towards_the_smaller(scores, best):
    assert best_strength(scores) == best


@pytest.mark.parametrize("mix", ["cat", "linear"])
def test_strength_scales_the_materialized_update(tmp_path, mix):
    pool = make_pool(tmp_path / "pool", {u: random_pieces(i) for i, u in enumerate(USERS)})
    pieces = {p: [(pool.pseudonym("u0"), 0.7), (pool.pseudonym("u2"), 0.3)] for p in POSITIONS}
    full = Recipe(pool_id=pool.pool_id, base_fingerprint=pool.base_fingerprint, lora=pool.lora_config, mix=mix,
                  top_k=2, pieces=pieces)
    one = materialize(full, pool)
    for alpha in (0.0, 0.5):
        scaled = materialize(full.model_copy(update={"strength": alpha}), pool)
        for p, (A, B) in one.items():
            assert torch.allclose(scaled[p][1] @ scaled[p][0], alpha * (B @ A), atol=1e-6)


def recipe(pool, tokenizer, task, history, **settings) -> Recipe:
    asm = Assembler(tiny_llama(), pool, AssemblySettings(mix="cat", top_k=2, **settings))
    try:
        return asm.recipe(task, tokenizer, history)
    finally:
        asm.unload()


def same_weights(a: Recipe, b: Recipe) -> bool:
    return all([s for s, _ in a.pieces[p]] == [s for s, _ in b.pieces[p]]
               and all(abs(w - v) < 1e-5 for (_, w), (_, v) in zip(a.pieces[p], b.pieces[p])) for p in a.pieces)


def test_auto_strength_reads_all_but_the_newest_and_keeps_the_lowest_loss(tmp_path, tokenizer):
    pool = make_pool(tmp_path / "pool", {u: random_pieces(i, scale=1.0) for i, u in enumerate(USERS)})
    auto = recipe(pool, tokenizer, RATING, HISTORY, strength="auto", holdout_items=4)
    v = 2  # a fifth of 10 items
    assert same_weights(auto, recipe(pool, tokenizer, RATING, HISTORY[:-v]))  # assembly never read the held-out items
    assert sorted(auto.strength_scores) == [0.0, 0.5, 1.0]
    for alpha, s in auto.strength_scores.items():  # minus the mean per-item output loss, with the recipe applied
        model = apply_recipe(tiny_llama(), auto.model_copy(update={"strength": alpha}), pool)
        losses = [lm_loss(model, collate([e], tokenizer.pad_token_id)).item()
                  for e in history_examples(RATING, tokenizer, HISTORY[-v:])]
        assert s == pytest.approx(-sum(losses) / v, abs=1e-5)
    assert len(set(auto.strength_scores.values())) == 3  # random pieces at full strength: no tie
    assert auto.strength == max(auto.strength_scores, key=auto.strength_scores.get)
    assert Recipe.load(auto.save(tmp_path / "r.json")) == auto  # the choice and its scores travel with the recipe


def test_generation_strength_is_chosen_by_the_metric_of_greedy_outputs(tmp_path, tokenizer, monkeypatch):
    """Generation scripted per candidate (0, 0.5, 1 in order): the middle one writes the golds'
    words, so it wins by ROUGE-1; each call sees the model with alpha times the update installed."""
    pool = make_pool(tmp_path / "pool", {u: random_pieces(i) for i, u in enumerate(USERS)})
    history = [Item(input=f"note {i}", output=f"title number {i}") for i in range(10)]
    scripted = [["nothing here"] * 2, ["title number", "number 9 title"], ["title 8", "zz"]]
    deltas = []

    def fake_generate(model, tok, prompts, max_new_tokens):
        assert prompts == [TASK.format_prompt(it.input) for it in history[-2:]]
        layer = dict(model.named_modules())[f"base_model.model.{next(iter(POSITIONS))}"]
        deltas.append(layer.get_delta_weight("default"))
        return scripted[len(deltas) - 1]

    monkeypatch.setattr("perpcs.strength.generate", fake_generate)
    auto = recipe(pool, tokenizer, TASK, history, strength="auto")
    scorer = RougeScorer(["rouge1"])
    for alpha, texts in zip([0.0, 0.5, 1.0], scripted):
        want = sum(scorer.score(it.output, t)["rouge1"].fmeasure for it, t in zip(history[-2:], texts)) / 2
        assert auto.strength_scores[alpha] == pytest.approx(want)
    assert auto.strength == 0.5
    assert not deltas[0].any() and torch.allclose(deltas[1], deltas[2] / 2, atol=1e-6) and deltas[2].any()


def test_short_history_falls_back_to_full_strength_on_every_item(tmp_path, tokenizer):
    pool = make_pool(tmp_path / "pool", {u: random_pieces(i) for i, u in enumerate(USERS)})
    short = HISTORY[:4]
    auto = recipe(pool, tokenizer, RATING, short, strength="auto")
    assert auto.strength == 1.0 and auto.strength_scores is None
    assert same_weights(auto, recipe(pool, tokenizer, RATING, short))
    saved = Recipe.load(auto.save(tmp_path / "r.json"))
    assert saved == auto
