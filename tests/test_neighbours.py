"""NeighbourTable: known nearest users and picks, leave-one-out, its files round trip, bad files refused."""

import pytest
import torch
from safetensors.torch import save_file

from conftest import tiny_llama
from perpcs.assembly import Assembler
from perpcs.errors import InputError
from perpcs.neighbours import SCORES, NeighbourTable
from perpcs.settings import AssemblySettings
from test_core import HISTORY, L0, TASK, USERS, assemble, make_pool, random_pieces
from test_whole import target_means


def table(higher: bool = True) -> NeighbourTable:
    # three users with orthogonal keys at two positions; sharer s1 is best for u1 and u3, s2 for u2
    eye = torch.eye(3)
    return NeighbourTable(users=["u1", "u2", "u3"], sharers=["s1", "s2"],
                          scores=torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]]),
                          keys={"a": eye.clone(), "b": eye.clone()}, higher_is_better=higher)


def key_of(row: int) -> dict[str, torch.Tensor]:
    return {"a": torch.eye(3)[row], "b": torch.eye(3)[row]}


def test_similarities_by_hand():
    # centred on (1/3, 1/3, 1/3): u2 - c = (-1, 2, -1)/3 equals the target's, u1 - c = (2, -1, -1)/3:
    # cos = (-2 - 2 + 1) / 6 = -0.5 at both positions
    assert table().similarities(key_of(1)).tolist() == pytest.approx([-0.5, 1.0, -0.5])


def test_pick_reads_the_nearest_users():
    t = table()
    assert t.nearest(key_of(1), 1) == ["u2"] and t.pick(key_of(1), 1) == ["s2"]
    assert t.nearest(key_of(1), 3) == ["u2", "u1", "u3"]  # u1 and u3 tie: by id
    assert t.pick(key_of(1), 3) == ["s1"]  # mean scores (2/3, 1/3)
    assert t.pick(key_of(1), 3, top=2) == ["s1", "s2"] and t.pick(key_of(1), 1, top=5) == ["s2", "s1"]
    # leave-one-out: u2 scored as if it were a target does not read itself
    assert t.nearest(key_of(1), 1, exclude="u2") == ["u1"] and t.pick(key_of(1), 1, exclude="u2") == ["s1"]
    # a metric where lower is better (MAE) picks the lowest mean
    assert table(higher=False).pick(key_of(1), 1) == ["s1"]


def test_ties_and_missing_positions():
    t = NeighbourTable(users=["u1"], sharers=["s2", "s1"], scores=torch.tensor([[0.5, 0.5]]),
                       keys={"a": torch.ones(1, 2)})
    assert t.pick({"a": torch.ones(2)}, 5, top=2) == ["s1", "s2"]  # tied scores: the smaller id first
    with pytest.raises(ValueError, match="no position b"):
        table().similarities({"a": torch.ones(3)})
    with pytest.raises(ValueError, match="no validation user is left"):
        t.nearest({"a": torch.ones(2)}, 1, exclude="u1")


def test_round_trip(tmp_path):
    t = table(higher=False)
    t.items = 64
    t.save_pretrained(tmp_path)
    back = NeighbourTable.from_pretrained(tmp_path)
    assert (back.users, back.sharers, back.higher_is_better, back.items) == (t.users, t.sharers, False, 64)
    assert torch.equal(back.scores, t.scores) and all(torch.equal(back.keys[p], t.keys[p]) for p in t.keys)


@pytest.mark.parametrize("tensors, message", [
    ({"scores": torch.tensor([[float("nan"), 0.0]] * 3)}, "NaN or infinite"),
    ({"scores": torch.zeros(3, 3)}, r"scores have shape \[3, 3\], expected \[3, 2\]"),
    ({"keys.a": torch.zeros(2, 3)}, r"keys at a have shape \[2, 3\]"),
])
def test_bad_files_are_refused_with_the_file_named(tmp_path, tensors, message):
    t = table()
    t.save_pretrained(tmp_path)
    save_file({"scores": t.scores, **{f"keys.{p}": k for p, k in t.keys.items()}, **tensors}, str(tmp_path / SCORES))
    with pytest.raises(InputError, match=message) as e:
        NeighbourTable.from_pretrained(tmp_path)
    assert str(tmp_path) in str(e.value)


def test_missing_or_broken_files(tmp_path):
    with pytest.raises(InputError, match="neighbours.json"):
        NeighbourTable.from_pretrained(tmp_path)
    table().save_pretrained(tmp_path)
    (tmp_path / SCORES).write_bytes(b"not safetensors")
    with pytest.raises(InputError, match="neighbours.safetensors: could not be read"):
        NeighbourTable.from_pretrained(tmp_path)
    save_file({"scores": torch.zeros(3, 2)}, str(tmp_path / SCORES))
    with pytest.raises(InputError, match="tensor keys.a is missing"):
        NeighbourTable.from_pretrained(tmp_path)


def test_assembly_installs_the_sharer_the_nearest_validation_user_names(tmp_path, tokenizer):
    """select="neighbours" reads the target's key as the bare model's means (computed here, as test_whole does),
    and the recipe is the named sharer's whole LoRA, weight 1 where it shares a piece; a validation user scored as
    a target reads the other one."""
    pool = make_pool(tmp_path / "pool", {u: random_pieces(i) for i, u in enumerate(USERS)}, shares={"u3": set(L0)})
    sid = {u: pool.pseudonym(u) for u in USERS}
    means = target_means(tokenizer)
    # v1's key is the target's, v2's its opposite about their mean: the target's nearest is v1 (cos 1, v2 -1)
    nbrs = NeighbourTable(users=["v1", "v2"], sharers=[sid["u3"], sid["u1"]],
                          scores=torch.tensor([[0.9, 0.1], [0.2, 0.8]]),
                          keys={p: torch.stack([m, -m]) for p, m in means.items()})
    for user, sharer in ((None, "u3"), ("v1", "u1")):
        asm = Assembler(tiny_llama(), pool, AssemblySettings(select="neighbours", neighbours=1, top_k=1),
                        neighbours=nbrs)
        recipe = asm.recipe(TASK, tokenizer, HISTORY, user=user)
        assert {p: dict(w) for p, w in recipe.pieces.items()} == {
            p: ({sid[sharer]: 1.0} if p in pool.positions_of(sid[sharer]) else {}) for p in pool.positions}
    # top-k 2 installs both, equal weights; u3 shares layer 0 only, so u1 has the other positions alone
    asm = Assembler(tiny_llama(), pool, AssemblySettings(select="neighbours", neighbours=1, top_k=2), neighbours=nbrs)
    recipe = asm.recipe(TASK, tokenizer, HISTORY)
    assert {p: dict(w) for p, w in recipe.pieces.items()} == {
        p: ({sid["u3"]: 0.5, sid["u1"]: 0.5} if p in L0 else {sid["u1"]: 1.0}) for p in pool.positions}
    with pytest.raises(ValueError, match="needs the pool's neighbour table"):
        assemble(pool, tokenizer, select="neighbours")


def test_calibration_builds_the_table_once_and_scores_each_validation_user_without_itself(tmp_path,
                                                                                          tiny_run_config):
    """Calibrating with `nbr-whole` keeps the table in RUN/neighbours (validation users x sharers, with the task's
    per-query metric), counts its generations, and a validation user's answers come from the sharer its nearest
    *other* validation users name."""
    from perpcs.calibration import run_validation_users
    from perpcs.pipeline import Run
    from perpcs.rules import RULES

    run = Run.create(tmp_path / "run", tiny_run_config(calibration={"enabled": True, "rules": ["nbr-whole"]}))
    run.task_adapt(), run.select(), run.build_pool()
    cal = run.calibrate()
    users = run_validation_users(run)
    table = NeighbourTable.from_pretrained(run.neighbours_path)
    assert table.users == [u.user_id for u in users] and table.sharers == run.own_pool().sharers()
    assert cal["cost"]["generations"] == cal["validation"]["queries"] * (2 + len(table.sharers))  # none, rule, table
    assert bool(((table.scores >= 0) & (table.scores <= 1)).all())  # mean per-query scores of the tiny task
    model, tok = run.merged
    settings = run.config.updated(RULES["nbr-whole"]).assembly
    asm = Assembler.for_run(model, run.own_pool(), run.config, settings, table)
    try:
        for u in users:
            key = asm.bare_means(asm.examples(run.data.task, tok, u.context, u.profile), tok.pad_token_id)
            want, = table.pick(key, settings.neighbours, exclude=u.user_id)
            recipe = asm.recipe(run.data.task, tok, u.context, u.profile, user=u.user_id)
            assert {p: dict(w) for p, w in recipe.pieces.items()} == asm.whole(want)
    finally:
        asm.unload()
    # the table on disk is read again only if it was built for these validation users and this history budget
    from perpcs.calibration import neighbour_table

    assert table.items == settings.recent_k == 64 and neighbour_table(run, users, settings).users == table.users
    with pytest.raises(InputError, match="its keys read 64 items, this rule 16"):
        neighbour_table(run, users, settings.model_copy(update={"recent_k": 16}))
    table.users[0] = "someone else"
    table.save_pretrained(run.neighbours_path)
    with pytest.raises(InputError, match="built for other validation users"):
        neighbour_table(run, users, settings)


def test_a_fixed_nbr_whole_rule_builds_the_table_when_it_assembles(tmp_path, tiny_run_config):
    from perpcs.pipeline import Run
    from perpcs.rules import RULES

    run = Run.create(tmp_path / "run", tiny_run_config(**RULES["nbr-whole"]))
    recipes = run.pipeline()
    table = NeighbourTable.from_pretrained(run.neighbours_path)
    for r in recipes.values():  # one sharer of the table, whole, weight 1
        named = {sid for chosen in r.pieces.values() for sid, _ in chosen}
        assert len(named) == 1 and named <= set(table.sharers)
        assert all(w == 1.0 for chosen in r.pieces.values() for _, w in chosen)
