"""assembly.pick_by_loss: the keys' heaviest sharers tried whole on the target's history, the lowest loss kept."""

import pytest
from pydantic import ValidationError

from conftest import tiny_llama
from perpcs.recipe import Recipe, apply_recipe
from perpcs.settings import AssemblySettings
from perpcs.training import heldout_loss, history_examples
from test_core import POSITIONS, make_pool, random_pieces
from test_strength import HISTORY, RATING, recipe

USERS = ["u0", "u1", "u2", "u3"]


def whole(pool, sid: str) -> Recipe:
    return Recipe(pool_id=pool.pool_id, base_fingerprint=pool.base_fingerprint, lora=pool.lora_config, mix="cat",
                  top_k=2, pieces={p: [(sid, 1.0)] for p in POSITIONS})


def test_the_heaviest_sharers_are_tried_whole_and_the_lowest_loss_is_the_recipe(tmp_path, tokenizer):
    pool = make_pool(tmp_path / "pool", {u: random_pieces(i, scale=1.0) for i, u in enumerate(USERS)})
    mixed = recipe(pool, tokenizer, RATING, HISTORY)
    totals = {}
    for chosen in mixed.pieces.values():
        for sid, w in chosen:
            totals[sid] = totals.get(sid, 0.0) + w
    heaviest = sorted(totals, key=lambda s: (-totals[s], s))
    picked = recipe(pool, tokenizer, RATING, HISTORY, pick_by_loss=2)
    assert list(picked.pick_losses) == heaviest[:2]
    examples = history_examples(RATING, tokenizer, HISTORY)
    for sid, loss in picked.pick_losses.items():  # each loss is the whole LoRA's, measured on its own
        model = apply_recipe(tiny_llama(), whole(pool, sid), pool)
        assert loss == pytest.approx(heldout_loss(model, examples, tokenizer.pad_token_id), abs=1e-5)
    best = min(picked.pick_losses, key=picked.pick_losses.get)
    assert picked.pieces == {p: [(best, 1.0)] for p in POSITIONS}
    assert Recipe.load(picked.save(tmp_path / "r.json")) == picked  # the losses travel with the recipe
    binary = Recipe.load(picked.save(tmp_path / "r.recipe"))
    assert binary.pick_losses == picked.pick_losses and binary.pieces == picked.pieces


def test_trying_every_sharer_of_select_all_keeps_the_lowest_loss_of_all(tmp_path, tokenizer):
    pool = make_pool(tmp_path / "pool", {u: random_pieces(i, scale=1.0) for i, u in enumerate(USERS)})
    picked = recipe(pool, tokenizer, RATING, HISTORY, select="all", pick_by_loss=10)
    assert sorted(picked.pick_losses) == sorted(pool.sharers())
    assert len(set(picked.pick_losses.values())) == len(USERS)  # random pieces: no tie
    best = min(picked.pick_losses, key=picked.pick_losses.get)
    assert picked.pieces == {p: [(best, 1.0)] for p in POSITIONS}


def test_pick_by_loss_needs_a_rule_that_mixes_sharers():
    with pytest.raises(ValidationError, match="select=none mixes none"):
        AssemblySettings(select="none", pick_by_loss=3)


@pytest.mark.parametrize("loss", [float("nan"), -1.0, float("inf")])
def test_a_recipe_with_a_bad_loss_is_refused(tmp_path, loss):
    pool = make_pool(tmp_path / "pool", {u: random_pieces(i) for i, u in enumerate(USERS)})
    with pytest.raises(ValidationError, match="u0"):
        Recipe.model_validate({**whole(pool, "u0").model_dump(), "pick_losses": {"u0": loss}})


def test_a_recipe_with_no_piece_has_nothing_to_pick(tmp_path, tokenizer):
    from perpcs.assembly import Assembler

    pool = make_pool(tmp_path / "pool", {u: random_pieces(i) for i, u in enumerate(USERS)})
    asm = Assembler(tiny_llama(), pool, AssemblySettings(mix="cat", top_k=2, pick_by_loss=3))
    try:
        empty = {p: {} for p in POSITIONS}
        assert asm.pick_by_loss(empty, history_examples(RATING, tokenizer, HISTORY), tokenizer.pad_token_id) \
            == (empty, {})
    finally:
        asm.unload()
