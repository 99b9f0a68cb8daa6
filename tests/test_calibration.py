"""Calibration: the choice rule on known predictions, the fixed-rule switch, and the step in a tiny pipeline."""

import math

import pytest
import torch

from perpcs.calibration import choose_by_loss, choose_rule, holm, reusable, validation_users
from perpcs.data import Item, User
from perpcs.mixing import effective_sharers, per_layer, spread, summarize
from perpcs.pipeline import Run
from perpcs.recipe import Recipe, apply_recipe
from perpcs.rules import GRID, OPT_IN, PAPER_RULE, RULES, fixes_rule, with_rule_fixed
from perpcs.settings import CalibrationSettings, RunConfig
from perpcs.tables import calibration_lines
from perpcs.tasks import Task
from perpcs.utils import read_json

TASK = Task(name="t", kind="classification", labels=["a", "b", "c"], instruction="Tag?")


def preds_with(golds: dict[str, str], right: int, wrong: str = "zzz") -> dict[str, str]:
    """The first `right` queries answered correctly, the others with `wrong`."""
    return {q: (g if i < right else wrong) for i, (q, g) in enumerate(golds.items())}


GOLDS = {f"q{i}": "abc"[i % 3] for i in range(30)}


# --- the choice ---

def test_holm_by_hand():
    # sorted p: 0.01 (x3 = 0.03), 0.02 (x2 = 0.04), 0.5 (x1 = 0.5); monotone
    assert holm({"x": 0.02, "y": 0.01, "z": 0.5}) == pytest.approx({"y": 0.03, "x": 0.04, "z": 0.5})
    assert holm({"x": 0.04, "y": 0.03}) == pytest.approx({"y": 0.06, "x": 0.06})  # step-down keeps the max


def test_the_clearly_best_rule_is_chosen():
    preds = {"none": preds_with(GOLDS, 0), "average": preds_with(GOLDS, 12), "act-cat": preds_with(GOLDS, 30)}
    result = choose_rule(TASK, GOLDS, preds, alpha=0.05)
    assert result["chosen"] == "act-cat" and not result["declined"]
    assert result["metric"] == "f1"
    assert result["candidates"]["act-cat"]["metrics"]["accuracy"] == 1.0
    assert result["candidates"]["act-cat"]["vs_none"]["diff"] == pytest.approx(1.0)
    assert result["candidates"]["act-cat"]["vs_none"]["p_holm"] < 0.05


def test_noise_declines():
    """Rules that are as good as the task model, within noise, are not chosen: 'none' is."""
    none = preds_with(GOLDS, 10)
    noisy = dict(none)
    noisy["q0"], noisy["q29"] = "zzz", GOLDS["q29"]  # one lost, one won
    result = choose_rule(TASK, GOLDS, {"none": none, "act-cat": noisy, "paper": dict(none)}, alpha=0.05)
    assert result["chosen"] == "none" and result["declined"]


def test_a_constant_answer_does_not_win_by_class_balance():
    """A rule answering the majority label everywhere has the best accuracy but not the best macro-F1."""
    golds = {f"q{i}": ("a" if i < 24 else "bc"[i % 2]) for i in range(40)}  # 60% a
    constant = {q: "a" for q in golds}  # accuracy 0.6, F1 (0.75 + 0 + 0) / 3 = 0.25
    faithful = {q: (g if i % 5 else "zzz") for i, (q, g) in enumerate(golds.items())}  # accuracy 0.8, all labels
    none = {q: "zzz" for q in golds}
    result = choose_rule(TASK, golds, {"none": none, "average": constant, "act-cat": faithful}, alpha=0.05)
    assert result["candidates"]["average"]["metrics"]["f1"] == pytest.approx(0.25)
    assert result["candidates"]["average"]["answers"] == 1
    assert result["chosen"] == "act-cat"


def test_by_accuracy_the_constant_answer_wins():
    """`macro_f1=False` (decision_probe's accuracy rule) selects classification by accuracy and the sign test."""
    golds = {f"q{i}": ("a" if i < 54 else "bc"[i % 2]) for i in range(60)}  # 90% a
    constant = {q: "a" for q in golds}  # accuracy 0.9, macro-F1 (108/114) / 3 = 0.316
    faithful = {q: (g if g != "a" or i % 2 else "zzz") for i, (q, g) in enumerate(golds.items())}  # 0.55, 0.889
    preds = {"none": {q: "zzz" for q in golds}, "average": constant, "act-cat": faithful}
    by_f1 = choose_rule(TASK, golds, preds, alpha=0.05)
    by_accuracy = choose_rule(TASK, golds, preds, alpha=0.05, macro_f1=False)
    assert by_f1["chosen"] == "act-cat" and by_f1["candidates"]["act-cat"]["metrics"]["f1"] == pytest.approx(8 / 9)
    assert by_accuracy["metric"] == "accuracy" and by_accuracy["chosen"] == "average"
    assert by_accuracy["candidates"]["act-cat"]["vs_best"]["test"] == "sign test"


def test_exact_ties_go_to_the_simpler_rule():
    p = preds_with(GOLDS, 30)
    result = choose_rule(TASK, GOLDS, {"none": preds_with(GOLDS, 0), "average": p, "act-cat": dict(p)}, alpha=0.05)
    assert result["chosen"] == "average" and result["tied_with_best"] == ["average", "act-cat"]


GOLDS60 = {f"q{i}": "abc"[i % 3] for i in range(60)}


def test_a_lead_within_noise_goes_to_the_simpler_rule():
    """act-cat-tau16 answers one more query right than act-cat: the best, but not by evidence."""
    result = choose_rule(TASK, GOLDS60, {"none": preds_with(GOLDS60, 0), "act-cat": preds_with(GOLDS60, 40),
                                         "act-cat-tau16": preds_with(GOLDS60, 41)}, alpha=0.05)
    assert result["best"] == "act-cat-tau16" and result["chosen"] == "act-cat"
    assert result["candidates"]["act-cat"]["vs_best"]["p"] >= 0.05


def test_a_lead_with_evidence_beats_the_simpler_rule():
    result = choose_rule(TASK, GOLDS60, {"none": preds_with(GOLDS60, 0), "act-cat": preds_with(GOLDS60, 20),
                                         "act-cat-tau16": preds_with(GOLDS60, 60)}, alpha=0.05)
    assert result["chosen"] == result["best"] == "act-cat-tau16"
    assert result["candidates"]["act-cat"]["vs_best"]["p"] < 0.05


def test_bootstrap_p_is_never_zero():
    """Every resample favours act-cat: p is (0 + 1) / (R + 1) per side, doubled; not 0."""
    from perpcs.stats import RESAMPLES
    result = choose_rule(TASK, GOLDS, {"none": preds_with(GOLDS, 0), "act-cat": preds_with(GOLDS, 30)}, alpha=0.05)
    assert result["candidates"]["act-cat"]["vs_none"]["p"] == pytest.approx(2 / (RESAMPLES + 1))


def test_rating_uses_the_sign_test_on_absolute_errors():
    task = Task(name="r", kind="rating", scale=[1, 5], instruction="Stars?")
    golds = {f"q{i}": "3" for i in range(20)}
    none = {q: "5" for q in golds}  # error 2 each
    close = {q: "3" for q in golds}  # error 0
    result = choose_rule(task, golds, {"none": none, "act-cat": close}, alpha=0.05)
    vs = result["candidates"]["act-cat"]["vs_none"]
    assert result["chosen"] == "act-cat" and vs["test"] == "sign test" and (vs["wins"], vs["losses"]) == (20, 0)
    assert vs["p"] == pytest.approx(2 * 0.5 ** 20)


def test_by_loss_sign_test_holm_and_the_tie_by_hand():
    """Statistic "likelihood": per-query losses, lower is better. act-cat beats none on 10 of 10 queries (sign
    test p = 2 / 2**10, x2 rules by Holm); average on 8 of 10 (p = 0.109): not chosen. act-cat-tau16 is lower
    than act-cat on 6 of 10 queries (p = 0.754) with the lower mean: the best, tied, and act-cat, simpler, wins."""
    none = {f"q{i}": 2.0 for i in range(10)}
    average = {q: (1.5 if i < 8 else 2.5) for i, q in enumerate(none)}
    act_cat = {q: 1.0 for q in none}
    tau16 = {q: (0.5 if i < 6 else 1.1) for i, q in enumerate(none)}  # mean 0.74
    result = choose_by_loss({"none": none, "average": average, "act-cat": act_cat, "act-cat-tau16": tau16}, 0.05)
    table = result["candidates"]
    assert result["metric"] == "loss" and not result["higher_is_better"]
    assert table["act-cat"]["metrics"]["loss"] == pytest.approx(1.0)
    assert table["act-cat-tau16"]["metrics"]["loss"] == pytest.approx(0.74)
    assert table["act-cat"]["vs_none"]["p"] == pytest.approx(2 / 2 ** 10)
    assert table["act-cat"]["vs_none"]["p_holm"] == pytest.approx(3 * 2 / 2 ** 10)
    assert table["average"]["vs_none"]["p"] == pytest.approx(2 * (1 + 10 + 45) / 2 ** 10)
    assert result["best"] == "act-cat-tau16" and result["tied_with_best"] == ["act-cat", "act-cat-tau16"]
    assert result["chosen"] == "act-cat" and table["act-cat"]["vs_best"]["p"] == pytest.approx(2 * 386 / 2 ** 10)
    assert "| - |" in "\n".join(calibration_lines({**result, "validation": {"users": ["u"], "queries": 10},
                                                    "cost": {"seconds": 1, "assembly_forwards": 2, "generations": 0,
                                                             "loss_forwards": 40}}))


# --- which settings fix the rule ---

def test_rule_fields_turn_calibration_off_unless_asked():
    assert fixes_rule({"key": "gate"}) and fixes_rule({"assembly": {"temperature": 4}})
    assert not fixes_rule({"assembly": {"recent_k": 8}, "n_sharers": 3})
    assert with_rule_fixed({"assembly": {"mix": "cat"}})["calibration"] == {"enabled": False}
    kept = {"key": "gate", "calibration": {"enabled": True}}
    assert with_rule_fixed(kept) == kept
    assert RunConfig(data="d").calibration.enabled
    assert not RunConfig(data="d", **PAPER_RULE).calibration.enabled
    cfg = RunConfig(data="d", assembly={"recent_k": 8})
    assert cfg.calibration.enabled and RunConfig.model_validate(cfg.model_dump()) == cfg


def test_unknown_rule_is_refused_and_none_always_runs():
    with pytest.raises(ValueError, match="unknown rules"):
        CalibrationSettings(rules=["act-cat", "bogus"])
    assert CalibrationSettings(rules=["paper", "act-cat"]).rules == ["none", "act-cat", "paper"]


def test_validation_users_are_active_non_sharers_with_half_their_history_at_most():
    users = [User(user_id=f"u{i}", history=[Item(input=f"x{j}", output="a") for j in range(n)])
             for i, n in enumerate([9, 3, 12, 1, 7])]
    val = validation_users(users, {"u2"}, CalibrationSettings(max_users=3, items=4))
    assert [v.user_id for v in val] == ["u0", "u4", "u1"]  # u2 shares, u3 has 1 item
    assert [len(v.heldout) for v in val] == [4, 3, 1]
    assert val[0].context == users[0].history[:5] and val[0].heldout == users[0].history[5:]
    # a budget of 5 queries is dealt one per user in turn: 1, 1, 1, then 1, 1 to the two with room
    dealt = validation_users(users, {"u2"}, CalibrationSettings(max_users=3, items=4, queries=5))
    assert [len(v.heldout) for v in dealt] == [2, 2, 1]
    # fewer queries than users: the least active get none and are not validation users
    assert [v.user_id for v in validation_users(users, {"u2"}, CalibrationSettings(max_users=3, queries=2))] == \
        ["u0", "u4"]


# --- mixing ---

def test_effective_sharers_and_spread_by_hand():
    assert effective_sharers([("a", 1.0)]) == pytest.approx(1.0)
    assert effective_sharers([("a", 0.5), ("b", 0.5)]) == pytest.approx(2.0)
    assert effective_sharers([]) == 0.0
    entropy = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    assert effective_sharers([("a", 0.25), ("b", 0.75)]) == pytest.approx(math.exp(entropy))

    def recipe(pieces):
        return Recipe(pool_id="p", base_fingerprint="f", lora={"r": 1, "alpha": 1, "target_modules": ["q"]}, top_k=1,
                      pieces=pieces)
    same = {"t1": recipe({"l.0": [("a", 1.0)]}), "t2": recipe({"l.0": [("a", 1.0)]})}
    apart = {"t1": recipe({"l.0": [("a", 1.0)]}), "t2": recipe({"l.0": [("b", 1.0)]})}
    assert spread(same) == 0.0
    assert spread(apart) == pytest.approx(0.5)  # mean (0.5, 0.5); each target is 0.5 away in total variation
    assert summarize(apart)["effective_sharers_mean"] == 1.0
    # per layer: layer 0 has a one-hot and an even pair (mean 1.5), layer 1 one even pair; no layer in the name is -1
    layered = recipe({"model.layers.0.q": [("a", 1.0)], "model.layers.0.o": [("a", 0.5), ("b", 0.5)],
                      "model.layers.1.q": [("a", 0.5), ("b", 0.5)], "lm_head": [("a", 1.0)]})
    assert per_layer(layered) == {-1: 1.0, 0: pytest.approx(1.5), 1: pytest.approx(2.0)}
    assert "per_layer" not in summarize({"t": layered})  # curves stay out of results.json


# --- the step in a tiny pipeline ---

def test_the_known_best_rule_is_chosen_and_used_for_targets(tmp_path, tiny_run_config, monkeypatch):
    """A generator that is right exactly when the installed update is at strength 0.5: calibration must
    find act-cat-half by scoring every rule on the validation users, and the targets' recipes use it."""
    import perpcs.assembly
    import perpcs.calibration

    strength = {"now": None}
    install = perpcs.assembly.Assembler.install_weights

    def spy(self, weights, alpha):
        strength["now"] = alpha
        return install(self, weights, alpha)
    monkeypatch.setattr(perpcs.assembly.Assembler, "install_weights", spy)
    run = Run.create(tmp_path / "run", tiny_run_config(calibration={"enabled": True}))
    run.task_adapt()
    run.build_pool()
    answers = {run.data.task.format_prompt(it.input): it.output for u in run.data.users for it in u.history}

    def fake_generate(model, tok, texts, budget, *a, **k):
        right, strength["now"] = strength["now"] == 0.5, None  # "none" generates without installing
        return [answers[t] if right else "no such label" for t in texts]
    monkeypatch.setattr(perpcs.calibration, "generate", fake_generate)
    recipes = run.pipeline()
    cal = run.calibrate()
    assert cal["chosen"] == "act-cat-half", cal["candidates"]
    assert cal["candidates"]["act-cat-half"]["metrics"]["accuracy"] == 1.0
    assert all(c["metrics"]["accuracy"] == 0.0 for n, c in cal["candidates"].items() if n != "act-cat-half")
    assert set(cal["validation"]["users"]).isdisjoint(run.split["targets"] + [s.user_id for s in run.select()])
    kept = run.pool_path / "calibration.json"
    assert kept.exists() and "predictions" not in kept.read_text()
    for r in recipes.values():
        assert (r.strength, r.mix, r.top_k) == (0.5, "cat", 3)
        assert all(len(chosen) <= 3 for chosen in r.pieces.values())


def test_by_likelihood_each_query_scores_its_own_output_loss_and_the_known_best_rule_wins(tmp_path, tiny_run_config,
                                                                                         monkeypatch):
    """Statistic "likelihood": no generation; a validation query's loss under "none" and under act-cat is the
    output loss of that query's own answer with the task model, and with the user's act-cat recipe installed (as
    a target would get it). With losses low only at strength 0.5, act-cat-half is chosen, as by answers above."""
    import perpcs.assembly
    import perpcs.calibration
    from perpcs.training import history_examples, output_losses

    config = tiny_run_config(calibration={"enabled": True, "statistic": "likelihood",
                                          "rules": ["act-cat", "act-cat-half", "average"]})
    run = Run.create(tmp_path / "run", config)
    run.task_adapt()
    run.build_pool()
    monkeypatch.setattr(perpcs.calibration, "generate", None)  # never called
    cal = run.calibrate()
    assert cal["statistic"] == "likelihood" and "predictions" not in cal and cal["cost"]["generations"] == 0
    assert cal["cost"]["loss_forwards"] == cal["validation"]["queries"] * 4 and set(cal["losses"]) == set(cal["grid"])
    model, tok = run.merged
    u = validation_users(run.users(run.split["candidates"]), {x.user_id for x in run.select()},
                         run.config.calibration)[0]
    examples = history_examples(run.data.task, tok, u.heldout, run.config.max_len)
    assert [cal["losses"]["none"][f"{u.user_id}#{i}"] for i in range(len(u.heldout))] == pytest.approx(
        output_losses(model, examples, tok.pad_token_id))
    from perpcs.assembly import Assembler
    asm = Assembler.for_run(model, run.own_pool(), run.config, run.config.updated(RULES["act-cat"]).assembly)
    try:
        recipe = asm.recipe(run.data.task, tok, u.context, u.profile)
        asm.install_weights({p: dict(c) for p, c in recipe.pieces.items()}, recipe.strength)
        with_recipe = output_losses(asm.model, examples, tok.pad_token_id)
    finally:
        asm.unload()
    assert [cal["losses"]["act-cat"][f"{u.user_id}#{i}"] for i in range(len(u.heldout))] == pytest.approx(with_recipe)
    assert with_recipe != pytest.approx(output_losses(model, examples, tok.pad_token_id))  # the recipe did something

    strength = {"now": None}
    install = perpcs.assembly.Assembler.install_weights

    def spy(self, weights, alpha):
        strength["now"] = alpha
        return install(self, weights, alpha)

    def fake_losses(model, examples, pad_id, batch_size=1):
        right, strength["now"] = strength["now"] == 0.5, None
        return [0.1 if right else 1.0] * len(examples)
    monkeypatch.setattr(perpcs.assembly.Assembler, "install_weights", spy)
    monkeypatch.setattr(perpcs.calibration, "output_losses", fake_losses)
    again = run.derive(tmp_path / "again", config.updated({"calibration": {"alpha": 0.01}})).calibrate()
    assert again["chosen"] == "act-cat-half"
    assert again["candidates"]["act-cat-half"]["metrics"]["loss"] == pytest.approx(0.1)


def test_a_pool_of_noise_declines_and_targets_get_the_task_model(tmp_path, tiny_run_config, monkeypatch):
    """Sharer pieces replaced by large random noise: no rule beats the task model on the validation users,
    so the pool declines; every target's recipe then carries no piece and generates as the task model does."""
    import perpcs.pipeline
    from perpcs.generation import generate
    from perpcs.retrieval import prompts

    real = perpcs.pipeline.lora_state
    gen = torch.Generator().manual_seed(0)

    def noise(peft_model):
        return {pos: (torch.randn(A.shape, generator=gen), torch.randn(B.shape, generator=gen))
                for pos, (A, B) in real(peft_model).items()}
    monkeypatch.setattr(perpcs.pipeline, "lora_state", noise)
    config = tiny_run_config(calibration={"enabled": True, "rules": ["act-cat", "average", "paper"]})
    run = Run.create(tmp_path / "run", config)
    recipes = run.pipeline()
    cal = run.calibrate()
    assert cal["chosen"] == "none" and cal["declined"], cal["candidates"]
    assert set(cal["candidates"]) == {"none", "average", "act-cat", "paper"}
    model, tok = run.merged
    pool = run.open_pool()
    for uid, recipe in recipes.items():
        assert all(not chosen for chosen in recipe.pieces.values())
        user = run.data.user(uid)
        plain = generate(model, tok, prompts(run.data.task, user), 4)
        peft_model = apply_recipe(model, recipe, pool)
        assert generate(peft_model, tok, prompts(run.data.task, user), 4) == plain
        peft_model.unload()


def test_a_pool_of_dp_keys_calibrates_without_gates(tmp_path, tiny_run_config):
    """`key_noise` (as --preset private sets it) promises DP keys: calibration must not train gates, which are
    not noised means, and must still run every activation rule (it once crashed on the paper's rule)."""
    config = tiny_run_config(key_noise=0.5, calibration={"enabled": True, "rules": ["act-cat", "paper"]})
    run = Run.create(tmp_path / "run", config)
    run.pipeline()
    cal = run.calibrate()
    assert set(cal["candidates"]) == {"none", "act-cat"} and set(cal["left_out"]) == {"paper"}
    assert not (run.folder / "keys" / "gate").exists() and cal["cost"]["other_key_pool_seconds"] == 0
    assert "Not a candidate: paper" in " ".join(calibration_lines(cal))


def test_grid_has_what_calibration_must_compare():
    assert GRID["paper"] == PAPER_RULE
    assert list(GRID) == [n for n in RULES if n not in OPT_IN] and "act-loss3" in RULES and "act-loss3" not in GRID
    assert CalibrationSettings().rules == list(GRID)  # opt-in rules only when named
    assert CalibrationSettings(rules=["paper", "act-loss3"]).rules == ["none", "act-loss3", "paper"]
    assert {GRID[n]["assembly"].get("temperature") for n in GRID if n.startswith("act")} >= {1.0, 4.0, 16.0}
    assert {GRID[n]["assembly"].get("top_k") for n in GRID if n.startswith("act")} >= {1, 3}
    assert {GRID[n]["assembly"].get("mix") for n in GRID if n.startswith("act")} == {"cat", "linear"}


def test_with_no_validation_users_the_pool_declines_and_says_why(tmp_path, tiny_run_config):
    """Every sharer candidate a sharer: no evidence, so no rule is chosen over the task model; the pipeline
    still finishes, and results say why."""
    probe = Run.create(tmp_path / "probe", tiny_run_config())
    everyone = len(probe.split["candidates"])
    run = Run.create(tmp_path / "run", tiny_run_config(calibration={"enabled": True}, n_sharers=everyone))
    recipes = run.pipeline()
    cal = run.calibrate()
    assert {s.user_id for s in run.select()} == set(run.split["candidates"])
    assert cal["declined"] and cal["chosen"] == "none" and cal["validation"]["queries"] == 0
    assert "no validation users" in cal["reason"]
    assert all(not chosen for r in recipes.values() for chosen in r.pieces.values())
    assert "declined" in calibration_lines(cal)[0] and "lower n_sharers" in calibration_lines(cal)[0]


def test_a_grown_grid_scores_only_its_new_rule_and_matches_a_full_calibration(tmp_path, tiny_run_config):
    """A run derived on the same pool with one more rule takes its source's answers for the rules both have;
    they are what scoring them again gives, so the choice is the one a full calibration makes."""
    config = tiny_run_config(calibration={"enabled": True, "rules": ["act-cat", "average"]})
    src = Run.create(tmp_path / "src", config)
    src.pipeline()
    old = read_json(src.calibration_path)
    grown = config.updated({"calibration": {"rules": ["act-cat", "average", "act-loss3"]}})
    carried = src.derive(tmp_path / "carried", grown).calibrate(scored=old)
    full = src.derive(tmp_path / "full", grown).calibrate()
    assert carried["cost"]["reused"] == ["act-cat", "average", "none"] and full["cost"]["reused"] == []
    assert carried["cost"]["generations"] == old["validation"]["queries"]  # only act-loss3 answered
    assert carried["predictions"] == full["predictions"] and carried["chosen"] == full["chosen"]
    assert set(carried["predictions"]) == {"none", "act-cat", "average", "act-loss3"}
    # act-loss3 shared act-cat's assembly in calibration; a validation user's answers are still those of the recipe
    # a target gets (Assembler.recipe with the rule's own settings)
    from perpcs.assembly import Assembler
    from perpcs.generation import generate
    from perpcs.tasks import answer_budget

    run = Run(tmp_path / "full")
    model, tok = run.merged
    u = validation_users(run.users(run.split["candidates"]), {x.user_id for x in run.select()},
                         run.config.calibration)[0]
    asm = Assembler.for_run(model, run.own_pool(), run.config, run.config.updated(RULES["act-loss3"]).assembly)
    try:
        recipe = asm.recipe(run.data.task, tok, u.context, u.profile)
        asm.install_weights({p: dict(c) for p, c in recipe.pieces.items()}, recipe.strength)
        texts = generate(asm.model, tok, [run.data.task.format_prompt(it.input) for it in u.heldout],
                         answer_budget(run.data.task, tok))
    finally:
        asm.unload()
    assert recipe.pick_losses and {f"{u.user_id}#{i}": run.data.task.parse_output(t) for i, t in enumerate(texts)} \
        == {q: a for q, a in full["predictions"]["act-loss3"].items() if q.startswith(f"{u.user_id}#")}
    with pytest.raises(ValueError, match="other validation queries"):
        reusable(old, ["act-cat"], {**old["golds"], "someone#0": "x"})
