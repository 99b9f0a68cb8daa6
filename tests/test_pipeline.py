"""The pipeline over a run folder, end to end on a tiny random Llama with the real tokenizer (seconds on CPU)."""

import random
import shutil
import time

import pytest
import torch

from perpcs.data import Item, User
from perpcs.models import fingerprint, load_base
from perpcs.pipeline import Run
from perpcs.pool import Pool
from perpcs.recipe import Recipe, apply_recipe
from perpcs.rules import PAPER_RULE
from perpcs.runfolder import safe_name, split_users
from perpcs.settings import RunConfig
from perpcs.utils import read_json

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def done_run(tmp_path_factory, tiny_run_config):
    """A finished run folder (the paper's rule), and the seconds its pipeline took."""
    folder = tmp_path_factory.mktemp("run") / "run"
    t0 = time.perf_counter()
    Run.create(folder, tiny_run_config(**PAPER_RULE)).pipeline()
    return folder, time.perf_counter() - t0


# --- split_users, safe_name ---

ACTIVITY = {"u0": 5, "u1": 4, "u2": 5, "u3": 1, "u4": 2, "u5": 4, "u6": 2, "u7": 3, "u8": 1, "u9": 2}


def make_users(activity: dict[str, int]) -> list[User]:
    return [User(user_id=u, history=[Item(input=f"{u} item {i}", output="x") for i in range(n)])
            for u, n in activity.items()]


def test_split_targets_are_most_active_ties_by_id():
    split = split_users(make_users(ACTIVITY), n_targets=3, base_fraction=0.3, seed=0)
    assert split["targets"] == ["u0", "u2", "u1"]  # 5, 5, then u1 beats u5 (both 4) by id
    assert len(split["base"]) == 2 and len(split["candidates"]) == 5  # round(0.3 * 7) = 2 base users
    parts = [set(split[k]) for k in ("base", "candidates", "targets")]
    assert set.union(*parts) == set(ACTIVITY) and sum(map(len, parts)) == len(ACTIVITY)


def test_split_is_deterministic_by_seed_and_ignores_input_order():
    users = make_users(ACTIVITY)
    split = split_users(users, 3, 0.3, seed=7)
    shuffled = users[:]
    random.Random(1).shuffle(shuffled)
    assert split_users(shuffled, 3, 0.3, seed=7) == split
    others = [split_users(users, 3, 0.3, seed=s)["base"] for s in range(10)]
    assert len({tuple(b) for b in others}) > 1  # the seed does choose the base users
    assert all(split_users(users, 3, 0.3, seed=s)["targets"] == split["targets"] for s in range(10))


def test_split_refuses_too_few_users():
    users = make_users(ACTIVITY)
    with pytest.raises(ValueError, match="n_targets=10 leaves no base users or sharers among 10 users"):
        split_users(users, 10, 0.3, 0)
    with pytest.raises(ValueError, match="leaves no sharer candidates among 1 users"):
        split_users(users[:3], 2, 0.3, 0)
    with pytest.raises(ValueError, match="n_targets"):
        split_users(users, 0, 0.3, 0)
    with pytest.raises(ValueError, match="base_fraction"):
        split_users(users, 2, -0.1, 0)


def test_safe_name_keeps_distinct_ids_distinct():
    names = [safe_name(u) for u in ("a/b", "a_b", "a b", "A/B")]
    assert len(set(names)) == 4
    assert all(n.replace("-", "").replace("_", "").replace(".", "").isalnum() for n in names)
    assert safe_name("a/b") == safe_name("a/b") and safe_name("a/b").startswith("a_b-")


# --- the run folder ---


def test_pipeline_writes_every_step(done_run):
    folder, _ = done_run
    run = Run(folder)
    split = read_json(folder / "split.json")
    assert len(split["targets"]) == 2
    assert (folder / "task" / "adapter" / "adapter_model.safetensors").exists()
    assert (folder / "task" / "merged" / "config.json").exists()
    selection = read_json(folder / "selection.json")
    assert len(selection) == 3 and {s["user_id"] for s in selection} <= set(split["candidates"])
    assert all(s["reason"] for s in selection)
    pool = run.open_pool()
    assert len(pool) == 3
    assert set(pool.sharers()) == {pool.pseudonym(s["user_id"]) for s in selection}
    for s in selection:
        assert (run.sharer_dir(s["user_id"]) / "adapter" / "adapter_model.safetensors").exists()
    assert sorted(p.name for p in (folder / "recipes").iterdir()) == sorted(f"{safe_name(u)}.recipe"
                                                                           for u in split["targets"])
    for u in split["targets"]:
        recipe = Recipe.load(run.recipe_path(u))
        assert recipe.user == u and recipe.pool_id == pool.pool_id
        assert set(recipe.pieces) == set(pool.positions)
    stats = run.stats()
    assert {"task_adapt", "select", "build_pool", "assemble"} <= set(stats)
    assert stats["build_pool"]["sharers"] == 3 and set(stats["assemble"]["seconds_per_user"]) == set(split["targets"])


def test_pool_and_recipes_carry_the_merged_models_fingerprint(done_run):
    folder, _ = done_run
    run = Run(folder)
    merged, _ = load_base(run.merged_path)
    fp = fingerprint(merged)
    assert run.merged_fingerprint == fp
    assert Pool.open(run.pool_path).base_fingerprint == fp
    assert all(Recipe.load(run.recipe_path(u)).base_fingerprint == fp for u in run.split["targets"])


def test_other_settings_on_the_same_folder_are_refused(done_run, tiny_run_config):
    folder, _ = done_run
    with pytest.raises(ValueError, match=r"other settings \(n_targets\).*new --run folder"):
        Run.create(folder, tiny_run_config(n_targets=3, **PAPER_RULE))
    assert Run.create(folder, tiny_run_config(**PAPER_RULE)).config.n_targets == 2  # same settings: resumed


def test_not_a_run_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="no run.json"):
        Run(tmp_path)


def test_second_pipeline_retrains_nothing(done_run, tiny_run_config, monkeypatch):
    folder, first_seconds = done_run
    outputs = ["task", "sharers", "pool", "recipes"]
    before = {p: p.stat().st_mtime_ns for d in outputs for p in (folder / d).rglob("*") if p.is_file()}

    def refuse(*a, **k):
        raise AssertionError("a finished step ran again")
    for name in ("pipeline.train_lora", "user_lora.train_lora", "pipeline.train_gates", "pipeline.select_sharers",
                 "runfolder.split_users"):
        monkeypatch.setattr(f"perpcs.{name}", refuse)
    t0 = time.perf_counter()
    recipes = Run.create(folder, tiny_run_config(**PAPER_RULE)).pipeline()
    seconds = time.perf_counter() - t0
    after = {p: p.stat().st_mtime_ns for d in outputs for p in (folder / d).rglob("*") if p.is_file()}
    assert after == before
    assert set(recipes) == set(read_json(folder / "split.json")["targets"])
    assert seconds < first_seconds


def test_derived_run_with_activation_keys_reuses_the_sharers_loras(done_run, tmp_path, tiny_run_config, monkeypatch):
    """A run derived with key=activation links the task model and sharer LoRAs, trains nothing, and
    keys each piece by its sharer's mean activation there, with its own LoRA on."""
    from peft import PeftModel

    from perpcs.assembly import activation_means
    from perpcs.lora import lora_layers

    for name in ("pipeline.train_lora", "user_lora.train_lora", "pipeline.train_gates"):
        monkeypatch.setattr(f"perpcs.{name}", lambda *a, **k: pytest.fail("trained again"))
    old = Run(done_run[0])
    run = old.derive(tmp_path / "run", tiny_run_config(key="activation", assembly={"mix": "cat"}))
    recipes = run.pipeline()
    assert set(recipes) == set(run.split["targets"]) and run.split == old.split and run.select() == old.select()
    assert run.merged_fingerprint == old.merged_fingerprint
    pool = run.open_pool()
    assert pool.key == "activation" and old.open_pool().key == "gate"
    model, tok = run.merged
    user = run.select()[0].user_id
    peft_model = PeftModel.from_pretrained(model, run.sharer_dir(user) / "adapter")
    examples = run.examples(run.data.user(user), tok)
    want = activation_means(peft_model, lora_layers(peft_model), examples, tok.pad_token_id)
    peft_model.unload()
    for pos in pool.positions:
        ids, keys = pool.keys(pos)
        assert torch.allclose(keys[ids.index(pool.pseudonym(user))], want[pos], atol=1e-6)
    assert Recipe.load(run.recipe_path(run.split["targets"][0])).mix == "cat"


def test_task_activation_keys_are_the_sharers_means_on_the_task_model(done_run, tmp_path, tiny_run_config):
    """key=task-activation keys each piece by its sharer's mean activation with its LoRA off: the task model's
    own means over the sharer's history, which differ from the LoRA-on keys of key=activation."""
    from perpcs.assembly import activation_means

    old = Run(done_run[0])
    runs = {k: old.derive(tmp_path / k, tiny_run_config(key=k, assembly={"mix": "cat"}))
            for k in ("activation", "task-activation")}
    for run in runs.values():
        run.build_pool()
    model, tok = old.merged
    user = old.select()[0].user_id
    examples = old.examples(old.data.user(user), tok)
    pools = {k: run.open_pool() for k, run in runs.items()}
    modules = {pos: model.get_submodule(pos) for pos in pools["task-activation"].positions}
    want = activation_means(model, modules, examples, tok.pad_token_id)
    for pos in modules:
        got = {}
        for k, pool in pools.items():
            ids, keys = pool.keys(pos)
            got[k] = keys[ids.index(pool.pseudonym(user))]
        assert torch.allclose(got["task-activation"], want[pos], atol=1e-6)
    assert not all(torch.allclose(runs["activation"].open_pool().keys(p)[1], pools["task-activation"].keys(p)[1],
                                  atol=1e-4) for p in modules)


def test_derived_run_with_more_sharers_trains_only_the_new_ones(done_run, tmp_path, tiny_run_config, monkeypatch):
    """Another sharer count selects again; a sharer the first run had keeps its LoRA (linked), only
    the others train, and the task model and split are the first run's."""
    import perpcs.user_lora

    trained = []
    real = perpcs.user_lora.train_lora
    monkeypatch.setattr("perpcs.pipeline.train_lora", lambda *a, **k: pytest.fail("task LoRA trained again"))
    monkeypatch.setattr("perpcs.user_lora.train_lora",
                        lambda *a, desc, **k: trained.append(desc) or real(*a, desc=desc, **k))
    old = Run(done_run[0])
    run = old.derive(tmp_path / "run", tiny_run_config(n_sharers=5, selection="active"))
    run.pipeline()
    before, after = {s.user_id for s in old.select()}, {s.user_id for s in run.select()}
    assert len(after) == 5 and before & after, "the test needs sharers in common"
    assert sorted(trained) == sorted(f"sharer {u}: LoRA" for u in after - before)
    for u in before & after:
        assert (run.sharer_dir(u) / "adapter").resolve() == (old.sharer_dir(u) / "adapter").resolve()
    assert not any(run.sharer_dir(u).exists() for u in before - after)
    assert run.split == old.split and run.merged_fingerprint == old.merged_fingerprint
    assert {run.open_pool().pseudonym(u) for u in after} == set(run.open_pool().sharers())


def test_derived_run_refuses_settings_of_step_0(done_run, tmp_path, tiny_run_config):
    """The task model is shared; sharer LoRAs may train again (DP-SGD, other budgets), the task LoRA may not."""
    with pytest.raises(ValueError, match="; not these: task_train$"):
        Run(done_run[0]).derive(tmp_path / "run", tiny_run_config(n_sharers=2, task_train={"steps": 3},
                                                                  sharer_train={"steps": 5}))
    assert not (tmp_path / "run").exists()


def test_lost_recipe_is_reassembled_alone(done_run, monkeypatch):
    folder, _ = done_run
    run = Run(folder)
    lost, kept = run.split["targets"]
    old = Recipe.load(run.recipe_path(lost)).model_dump(exclude={"seconds"})
    kept_mtime = run.recipe_path(kept).stat().st_mtime_ns
    run.recipe_path(lost).unlink()
    for name in ("pipeline.train_lora", "user_lora.train_lora"):
        monkeypatch.setattr(f"perpcs.{name}", lambda *a, **k: pytest.fail("retrained"))
    run.pipeline()
    assert Recipe.load(run.recipe_path(lost)).model_dump(exclude={"seconds"}) == old  # assembly is deterministic
    assert run.recipe_path(kept).stat().st_mtime_ns == kept_mtime


def test_export_loads_with_plain_peft_and_matches_in_memory(done_run, tmp_path):
    from peft import PeftModel

    folder, _ = done_run
    run = Run(folder)
    user = run.split["targets"][0]
    out = run.export(user, tmp_path / "adapter")
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in out.iterdir()}

    merged, tok = load_base(run.merged_path)
    ids = tok("Tags: a lonely android on a frozen moon", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        plain = merged(ids).logits
        exported = PeftModel.from_pretrained(load_base(run.merged_path)[0], out).eval()(ids).logits
        in_memory = apply_recipe(merged, Recipe.load(run.recipe_path(user)), run.open_pool())(ids).logits
    torch.testing.assert_close(exported, in_memory, rtol=1e-5, atol=1e-6)
    assert not torch.equal(exported, plain)  # the adapter does change the model


def test_export_of_unknown_user_says_so(done_run, tmp_path):
    folder, _ = done_run
    with pytest.raises(FileNotFoundError, match="no recipe for user 'nobody'"):
        Run(folder).export("nobody", tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()


def test_same_seed_same_result(done_run, tmp_path, tiny_run_config):
    folder_a, _ = done_run
    folder_b = tmp_path / "run"
    Run.create(folder_b, tiny_run_config(**PAPER_RULE)).pipeline()
    a, b = Run(folder_a), Run(folder_b)
    for name in ("split.json", "selection.json", "task/fingerprint.json"):
        assert read_json(folder_a / name) == read_json(folder_b / name), name
    pool_a, pool_b = a.open_pool(), b.open_pool()
    assert pool_a.pool_id != pool_b.pool_id  # each pool has its own salt ...
    sharers = [s.user_id for s in a.select()]
    by_sid = {pool.pseudonym(u): u for pool in (pool_a, pool_b) for u in sharers}
    for u in sharers:  # ... but the same user's pieces are the same
        for pos in pool_a.positions:
            for ta, tb in zip(pool_a.piece(pool_a.pseudonym(u), pos), pool_b.piece(pool_b.pseudonym(u), pos)):
                assert torch.equal(ta, tb)
    for u in a.split["targets"]:  # pieces are listed by pseudonym, so compare them as user id -> weight
        ra, rb = Recipe.load(a.recipe_path(u)), Recipe.load(b.recipe_path(u))
        assert {pos: {by_sid[s]: w for s, w in v} for pos, v in ra.pieces.items()} == \
               {pos: {by_sid[s]: w for s, w in v} for pos, v in rb.pieces.items()}
    shutil.rmtree(folder_b)


# --- CLI: settings and the run-folder commands ---


def test_parse_overrides_nests_keys_and_reads_json():
    from perpcs.overrides import parse_overrides

    got = parse_overrides(["assembly.top_k=5", "sharer_train.lr=5e-4", "sharer_train.steps=3", "selection=active",
                           "lora.target_modules=[\"q_proj\"]", 'device="cpu"', "a.b.c=true", "note=1 2"])
    assert got == {"assembly": {"top_k": 5}, "sharer_train": {"lr": 5e-4, "steps": 3}, "selection": "active",
                   "lora": {"target_modules": ["q_proj"]}, "device": "cpu", "a": {"b": {"c": True}}, "note": "1 2"}
    for bad in ("top_k", "=3"):
        with pytest.raises(ValueError, match="expected KEY=VALUE"):
            parse_overrides([bad])


def test_parse_variants():
    from perpcs.overrides import parse_variants

    assert parse_variants(["act:key=activation,assembly.mix=cat", "k5:assembly.top_k=5"]) == \
        {"act": {"key": "activation", "assembly": {"mix": "cat"}}, "k5": {"assembly": {"top_k": 5}}}
    assert parse_variants(['two:calibration.rules=["act-cat","paper"],assembly.strengths=[0.5,1],seed=3']) == \
        {"two": {"calibration": {"rules": ["act-cat", "paper"]}, "assembly": {"strengths": [0.5, 1]}, "seed": 3}}
    for bad in ("act", "act:", ":key=gate"):
        with pytest.raises(ValueError, match="expected NAME:KEY=VALUE"):
            parse_variants([bad])


def test_build_config_precedence(tmp_path):
    from perpcs.overrides import build_config
    from perpcs.utils import write_json

    file = write_json(tmp_path / "cfg.json", {"n_targets": 5, "n_sharers": 4, "sharer_train": {"lr": 0.1, "steps": 7}})
    cfg = build_config(tmp_path / "d", "b", 3, targets=2, sharers=None, config=file, overrides=["sharer_train.lr=5e-4"])
    assert (cfg.data, cfg.base, cfg.seed, cfg.n_targets, cfg.n_sharers) == (str(tmp_path / "d"), "b", 3, 2, 4)
    assert (cfg.sharer_train.lr, cfg.sharer_train.steps) == (5e-4, 7)  # --set merges into the file's section
    default = RunConfig(data="d")
    assert cfg.sharer_train.batch_size == default.sharer_train.batch_size  # untouched keys keep the run's defaults
    assert cfg.task_train == default.task_train
    # an older config's assembly.retrieval_copies is read as the run's setting when they agree
    assert build_config(tmp_path, None, 0, None, None, None, ["retrieval_copies=true"]).retrieval_copies
    same = build_config(tmp_path, None, 0, None, None, None,
                        ["retrieval_copies=true", "assembly.retrieval_copies=true"])
    assert same == build_config(tmp_path, None, 0, None, None, None, ["retrieval_copies=true"])
    with pytest.raises(ValueError, match="assembly.retrieval_copies=false: assembly uses the run's retrieval_copies"):
        build_config(tmp_path, None, 0, None, None, None, ["retrieval_copies=true", "assembly.retrieval_copies=false"])


def test_older_run_json_repeating_the_history_format_in_assembly_still_reads():
    config = RunConfig(data="d", retrieval_copies=True, max_len=64, seed=5)
    # run.json of an older perpcs repeated the three in `assembly` (and a never-read max_len in training)
    old = {**config.model_dump(), "assembly": {**config.assembly.model_dump(), "retrieval_copies": True,
                                               "max_len": 64, "seed": 0},
           "task_train": {**config.task_train.model_dump(), "max_len": 256}}
    assert RunConfig.model_validate(old) == config


def test_cli_refuses_bad_settings_and_foreign_run_folders(done_run, tiny_data, tmp_path, cli):
    folder, _ = done_run
    code, out = cli("init", "--data", tiny_data, "--run", tmp_path / "r", "--set", "n_targets")
    assert code == 2 and "expected KEY=VALUE" in out
    code, out = cli("init", "--data", tiny_data, "--run", tmp_path / "r", "--set", "n_targets=many")
    assert code == 2 and "n_targets" in out
    code, out = cli("init", "--data", tiny_data, "--run", tmp_path / "r", "--set", "no_such_setting=1")
    assert code == 2 and "no_such_setting" in out
    assert not (tmp_path / "r").exists()
    code, out = cli("init", "--data", tiny_data, "--run", folder, "--targets", "3")
    assert code == 2 and "other settings (base, n_targets" in out


def test_cli_export(done_run, tmp_path, cli):
    folder, _ = done_run
    code, out = cli("export", "--run", folder, "--user", "nobody", "--out", tmp_path / "a")
    assert code == 2 and "no recipe for user 'nobody'" in out
    code, out = cli("export", "--run", tmp_path, "--user", "u00", "--out", tmp_path / "a")
    assert code == 2 and "not a perpcs run folder" in out
    user = read_json(folder / "split.json")["targets"][0]
    code, out = cli("export", "--run", folder, "--user", user, "--out", tmp_path / "a")
    assert code == 0 and (tmp_path / "a" / "adapter_model.safetensors").exists()
