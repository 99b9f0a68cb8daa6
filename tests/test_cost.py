"""Known-answer tests for the cost work: linear gate scores, the history budget, the key index, the
binary recipe, and bulk assembly."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_llama
from perpcs.assembly import Assembler, example_means, piece_scores
from perpcs.keyindex import KeyIndex
from perpcs.recipe import Recipe, materialize
from perpcs.recipe_format import unpack
from perpcs.settings import AssemblySettings
from perpcs.training import history_examples
from test_core import HISTORY, L0, LORA, POSITIONS, TASK, USERS, make_pool, random_pieces


def per_token_gate_scores(h, keys, mask):
    """The formula before averaging moved first: every token against every key, [B, T, n], then the means."""
    d = h.shape[-1]
    per_token = F.layer_norm(h, (d,)) @ F.layer_norm(keys, (d,)).T / math.sqrt(d)
    return example_means(per_token, mask).mean(0)


def test_linear_gate_scores_equal_the_per_token_formula():
    g = torch.Generator().manual_seed(0)
    h, keys = 3 * torch.randn(4, 9, 24, generator=g) + 1, torch.randn(50, 24, generator=g)
    mask = torch.rand(4, 9, generator=g) > 0.5
    mask[2] = False  # an example with no scored token is left out of both
    assert mask.any(1).sum() == 3
    assert torch.allclose(piece_scores(h, keys, mask, "gate"), per_token_gate_scores(h, keys, mask), atol=1e-5)


def sample_recipe(n_positions=120, seed=0) -> Recipe:
    g = torch.Generator().manual_seed(seed)
    sharers = [f"s{i:012x}" for i in range(6)]
    pieces = {}
    for p in range(n_positions):
        chosen = torch.randperm(6, generator=g)[:3].tolist()
        w = torch.softmax(torch.randn(3, generator=g), 0).tolist()
        position = f"model.layers.{p // 4}.self_attn.{'qkvo'[p % 4]}_proj"
        pieces[position] = [(sharers[c], round(x, 7)) for c, x in zip(chosen, w)]
    return Recipe(pool_id="pool-0123456789abcdef", base_fingerprint="f" * 64, lora=LORA.model_dump(), mix="cat",
                  top_k=3, user="u0", settings=AssemblySettings().model_dump(), pieces=pieces)


def fp16(recipe: Recipe) -> Recipe:
    return recipe.model_copy(update={"pieces": {p: [(s, float(torch.tensor(w).half())) for s, w in c]
                                                for p, c in recipe.pieces.items()}})


def test_binary_recipe_round_trip_is_the_recipe_with_fp16_weights(tmp_path):
    recipe = sample_recipe()
    recipe.save(tmp_path / "r.json")
    recipe.save(tmp_path / "r.recipe")
    back = Recipe.load(tmp_path / "r.recipe")
    assert back != recipe  # weights lost precision ...
    assert back == fp16(recipe)  # ... and that is all they lost; every other field, order included, is kept
    assert list(back.pieces) == list(recipe.pieces)
    assert Recipe.load(tmp_path / "r.json") == recipe  # JSON recipes still read
    json_bytes, bin_bytes = (tmp_path / "r.json").stat().st_size, (tmp_path / "r.recipe").stat().st_size
    assert bin_bytes * 5 < json_bytes  # 120 positions x 3 pieces: names written once, numbers packed


def test_fields_travel_by_name_in_the_binary_header(tmp_path):
    recipe = sample_recipe(n_positions=4)
    recipe.save(tmp_path / "r.recipe")
    fields, pieces = unpack((tmp_path / "r.recipe").read_bytes())
    assert fields == recipe.model_dump(mode="json", exclude={"pieces"}, exclude_none=True)
    assert pieces == fp16(recipe).pieces


@pytest.mark.parametrize("mix", ["cat", "linear"])
def test_binary_recipe_materialises_the_same_adapter_up_to_fp16_weights(tmp_path, tokenizer, mix):
    pool = make_pool(tmp_path / "pool", {u: random_pieces(i) for i, u in enumerate(USERS)})
    model = tiny_llama()
    asm = Assembler(model, pool, AssemblySettings(mix=mix))
    recipe = asm.recipe(TASK, tokenizer, HISTORY)
    asm.unload()
    recipe.save(tmp_path / "r.recipe")
    got, want = materialize(Recipe.load(tmp_path / "r.recipe"), pool), materialize(fp16(recipe), pool)
    assert got.keys() == want.keys()
    assert all(torch.equal(got[p][0], want[p][0]) and torch.equal(got[p][1], want[p][1]) for p in got)


def test_corrupt_binary_recipes_are_refused(tmp_path):
    path = tmp_path / "r.recipe"
    sample_recipe(n_positions=4).save(path)
    data = path.read_bytes()
    path.write_bytes(data[:-6])
    with pytest.raises(ValueError, match="r.recipe: not a perpcs recipe: corrupt"):
        Recipe.load(path)
    path.write_bytes(data[:4] + b"\x09" + data[5:])
    with pytest.raises(ValueError, match="version 9"):
        Recipe.load(path)


def test_history_budget_keeps_the_newest_items(tokenizer, tmp_path):
    pool = make_pool(tmp_path / "pool", {u: random_pieces(i) for i, u in enumerate(USERS[:2])})
    sizes = [len(e.input_ids) for e in history_examples(TASK, tokenizer, HISTORY)]

    def kept(**settings):
        asm = Assembler(tiny_llama(), pool, AssemblySettings(**settings))
        return [len(e.input_ids) for e in asm.examples(TASK, tokenizer, HISTORY)]

    assert kept(recent_k=2) == sizes[-2:]
    assert kept(budget_tokens=sizes[-1] + sizes[-2]) == sizes[-2:]  # exactly fits two
    assert kept(budget_tokens=sizes[-1] + sizes[-2] - 1) == sizes[-1:]
    assert kept(budget_tokens=1) == sizes[-1:]  # never less than the newest item
    assert kept(recent_k=3, budget_tokens=10**6) == sizes[-3:]  # both budgets hold


def test_key_index_gives_the_pool_keys_and_follows_pool_changes(tmp_path):
    pieces = {u: random_pieces(i) for i, u in enumerate(USERS)}
    shares = {"u1": set(L0)}  # u1 shares only layer 0
    pool = make_pool(tmp_path / "pool", {u: pieces[u] for u in USERS[:3]}, shares)
    index = KeyIndex.of(pool)
    for pos in POSITIONS:
        ids, keys = index.keys(pos)
        want_ids, want_keys = pool.keys(pos)
        assert ids == want_ids and torch.equal(keys, want_keys)
    pool.add_sharer("u3", pieces["u3"], share=set(POSITIONS))
    newer = KeyIndex.of(pool)
    assert newer.path != index.path and not index.path.exists()
    assert newer.keys(L0[0])[0] == pool.candidates(L0[0]) and len(newer.keys(L0[0])[0]) == 4


def test_bulk_assembly_equals_one_by_one(tmp_path, tiny_run_config):
    from perpcs.pipeline import Run

    run = Run.create(tmp_path / "run", tiny_run_config())
    run.build_pool()  # steps 0-4, no recipe yet
    users = [u.user_id for u in run.data.users][:5]
    def content(recipes):  # all but the seconds each took
        return {u: r.model_dump(exclude={"seconds"}) for u, r in recipes.items()}

    together = content(run.assemble(users))  # one model, one pool, one Assembler for all five
    saved = content({u: Recipe.load(run.recipe_path(u)) for u in users})
    assert run.recipe_path(users[0]).suffix == ".recipe" and run.stats()["assemble"]["users_per_hour"] > 0
    for u in users:
        run.recipe_path(u).unlink()
    apart = {}
    for u in users:  # a fresh Assembler per user
        apart.update(content(run.assemble([u])))
    assert len(together) == 5 and together == apart
    assert saved == content({u: Recipe.load(run.recipe_path(u)) for u in users})


def test_run_reads_the_json_recipes_of_older_runs(tmp_path, tiny_run_config):
    from perpcs.pipeline import Run
    from perpcs.runfolder import safe_name

    run = Run.create(tmp_path / "run", tiny_run_config())
    old = tmp_path / "run" / "recipes" / f"{safe_name('u0')}.json"
    assert run.recipe_path("u0").suffix == ".recipe"
    sample_recipe(n_positions=2).save(old)
    assert run.recipe_path("u0") == old and json.loads(old.read_text())["user"] == "u0"


def test_cli_assemble_users_file_errors_name_the_line(tmp_path, tiny_run_config):
    from typer.testing import CliRunner

    from perpcs.cli import app
    from perpcs.pipeline import Run

    run = Run.create(tmp_path / "run", tiny_run_config())
    users = tmp_path / "users.txt"
    users.write_text(f"{run.data.users[0].user_id}\n\nnobody\n")
    result = CliRunner().invoke(app, ["assemble", "--run", str(run.folder), "--users", str(users)])
    assert result.exit_code == 2 and "line 3" in result.output and "nobody" in result.output
