"""Privacy attacks, DP keys and DP-SGD: a planted leak is found, a random or DP-trained LoRA hides it; the DP
accounting and noise."""

import json
import math
import random

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from conftest import ByteTokenizer, tiny_llama
from perpcs.assembly import activation_means
from perpcs.dp import classic_sigma, gaussian_delta, gaussian_epsilon, key_generator, noisy_keys, sgd_epsilon
from perpcs.lora import lora_layers
from perpcs.pipeline import Run
from perpcs.privacy import PrivacySettings, forward_items, key_scores, privacy
from perpcs.privacy_report import roc, tpr_at
from perpcs.settings import LoraSettings, RunConfig, TrainSettings
from perpcs.training import add_lora, batch_indices, encode, train_lora

pytestmark = pytest.mark.usefixtures("one_thread")


def random_examples(tokenizer, n: int, seed: int) -> list:
    """Prompts and targets of random letters: nothing to learn but the items themselves."""
    rng = random.Random(seed)
    word = lambda k: "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(k))  # noqa: E731
    return [encode(tokenizer, f"q {word(8)}:", word(6), 64) for _ in range(n)]


LORA = LoraSettings(r=4, alpha=8, target_modules=["q_proj", "v_proj"])


PLANT = TrainSettings(lr=1e-2, steps=150, batch_size=8, seed=0)  # many epochs: a LoRA that memorises


def plant(**dp):
    """A LoRA trained only on the members (with `dp`: by DP-SGD), its stats, members, non-members."""
    tok = ByteTokenizer()
    members, nonmembers = random_examples(tok, 16, 0), random_examples(tok, 16, 1)
    peft, stats = train_lora(tiny_llama(seed=0), members, LORA, PLANT.model_copy(update=dp), 0)
    return peft, stats, members, nonmembers


@pytest.fixture(scope="module")
def planted():
    peft, _, members, nonmembers = plant()
    return peft, members, nonmembers


def test_roc_known_values():
    assert roc([2, 3, 4], [0, 1], resamples=100)["auroc"] == 1.0
    assert roc([0, 1], [2, 3, 4], resamples=100)["auroc"] == 0.0
    r = roc([1, 3], [0, 2], resamples=200)  # pairs: (1>0) (1<2) (3>0) (3>2) -> 3/4
    assert r["auroc"] == 0.75 and r["ci"][0] <= 0.75 <= r["ci"][1]
    # 1% FPR on 100 non-members allows one false positive: the member above all but one non-member counts
    y, s = np.r_[np.ones(2), np.zeros(100)], np.r_[[1000, 98.5], np.arange(100)]
    assert tpr_at(y, s) == 1.0 and tpr_at(y, s, 0.0) == 0.5
    assert math.isnan(roc([1], [0, 1])["auroc"])  # too few to say


def test_planted_leak_is_found_by_loss_and_calibrated_loss(planted):
    peft, members, nonmembers = planted
    with peft.disable_adapter():
        base_m, base_n = (forward_items(peft, ex, 0, 8)[0] for ex in (members, nonmembers))
    loss_m, loss_n = (forward_items(peft, ex, 0, 8)[0] for ex in (members, nonmembers))
    assert loss_m.mean() < loss_n.mean()
    assert roc(-loss_m, -loss_n)["auroc"] > 0.9
    assert roc(base_m - loss_m, base_n - loss_n)["auroc"] > 0.9
    assert roc(-base_m, -base_n)["auroc"] < 0.8  # the model without the LoRA never saw them: no such gap


def test_random_lora_gives_chance():
    """A LoRA with random B (never trained): members and non-members alike, AUROC about 0.5 on average."""
    tok, aucs = ByteTokenizer(), []
    for seed in range(4):
        members, nonmembers = random_examples(tok, 24, 10 + seed), random_examples(tok, 24, 20 + seed)
        peft = add_lora(tiny_llama(seed=seed), LORA, seed)
        with torch.no_grad():
            for layer in lora_layers(peft).values():
                layer.lora_B["default"].weight.normal_(0, 0.05)
        aucs.append(roc(-forward_items(peft, members, 0, 8)[0], -forward_items(peft, nonmembers, 0, 8)[0])["auroc"])
    assert 0.35 < np.mean(aucs) < 0.65, aucs


def test_dp_sgd_hides_the_planted_leak(planted):
    """The same LoRA trained by DP-SGD (opacus): the attack that finds the plain LoRA's members (AUROC above
    0.9) finds less with more noise, and about nothing at epsilon 1.3; opacus's hooks are gone after."""
    plain, members, nonmembers = planted
    auroc = {}
    for z in (0, 4.0, 20.0):
        peft, stats = (plain, None) if not z else plant(dp_noise=z, dp_clip=0.1)[:2]
        with peft.disable_adapter():
            base_m, base_n = (forward_items(peft, ex, 0, 8)[0] for ex in (members, nonmembers))
        loss_m, loss_n = (forward_items(peft, ex, 0, 8)[0] for ex in (members, nonmembers))
        auroc[z] = roc(base_m - loss_m, base_n - loss_n)["auroc"]
        if z:
            assert stats["steps"] == 150 and stats["final_loss"] < stats["first_loss"]  # it trains
            assert all(not hasattr(p, "grad_sample") for p in peft.parameters())
            assert not any(m._forward_hooks or m._backward_hooks for m in peft.modules())
    assert sgd_epsilon(20.0, 8 / 16, 150, 1e-5) == pytest.approx(1.27, abs=0.01)
    assert auroc[0] > 0.9 > auroc[4.0] > auroc[20.0] and 0.35 < auroc[20.0] < 0.7, auroc


def test_dp_sgd_accounting_and_sampling():
    """opacus's RDP epsilon: above the exact value where it is known (rate 1: T Gaussian steps are one Gaussian
    of noise z / sqrt(T)) and not far from it; lower with more noise, a lower rate or fewer steps. DP-SGD's steps
    are Poisson samples of expected size batch_size, seeded, and replayed as the LoRA's members."""
    from perpcs.data import Item
    from perpcs.privacy import trained_items

    for z, steps in ((1.0, 10), (2.0, 40)):
        exact = gaussian_epsilon(z / math.sqrt(steps), 1e-5)
        assert exact <= sgd_epsilon(z, 1.0, steps, 1e-5) < 1.5 * exact
    assert sgd_epsilon(2.0, 0.1, 20, 1e-5) < sgd_epsilon(1.0, 0.1, 20, 1e-5) < sgd_epsilon(1.0, 0.2, 20, 1e-5)
    assert sgd_epsilon(1.0, 0.1, 10, 1e-5) < sgd_epsilon(1.0, 0.1, 20, 1e-5)
    s = TrainSettings(batch_size=4, seed=3, dp_noise=1.0)
    steps = list(batch_indices(40, s, 500))
    assert steps == list(batch_indices(40, s, 500)) and len(steps) == 500
    assert np.mean([len(b) for b in steps]) == pytest.approx(4, rel=0.1) and any(not b for b in steps)
    items = [Item(input=f"x{i}", output="y") for i in range(40)]
    seen = {j for b in batch_indices(40, s, 3) for j in b}
    assert [it.input for it in trained_items(items, s, {"steps": 3})] == [f"x{j}" for j in sorted(seen)]


def test_activation_key_membership_is_found(planted):
    """Items a key averages score higher against it than other items (the key attack), a reference key does not."""
    peft, members, nonmembers = planted
    layers = lora_layers(peft)
    others = [random_examples(ByteTokenizer(), 12, 30 + i) for i in range(3)]
    keys = [activation_means(peft, layers, ex, 0) for ex in [members] + others]
    stacked = {pos: torch.stack([k[pos] for k in keys]) for pos in layers}
    scores = {}
    for name, ex in (("m", members), ("n", nonmembers)):
        _, red = forward_items(peft, ex, 0, 8, layers, lambda pos, v: key_scores(v, stacked[pos], "activation"))
        scores[name] = torch.stack(list(red.values())).mean(0).numpy()  # [n, keys]
    own, ref = (roc(scores["m"][:, j], scores["n"][:, j])["auroc"] for j in (0, 1))
    assert own > 0.75 and ref < 0.65  # ref: a key that never saw the members


def test_gate_scores_match_assembly():
    from perpcs.assembly import piece_scores

    torch.manual_seed(0)
    h, g = torch.randn(1, 5, 16), torch.randn(3, 16)
    mask = torch.ones(1, 5, dtype=torch.bool)
    v = torch.nn.functional.layer_norm(h, (16,)).mean(1)
    assert torch.allclose(key_scores(v, g, "gate")[0], piece_scores(h, g, mask, "gate"), atol=1e-5)
    assert torch.allclose(key_scores(v, g, "activation")[0] * 4, piece_scores(h, g, mask, "activation"), atol=1e-5)


# --- DP keys ---

def test_analytic_gaussian_accounting():
    for z in (0.3, 1.0, 3.0):
        eps = gaussian_epsilon(z, 1e-5)
        assert gaussian_delta(eps, z) == pytest.approx(1e-5, rel=1e-4)
        assert gaussian_delta(eps * 0.9, z) > 1e-5  # the smallest such epsilon
    assert gaussian_epsilon(0.5, 1e-5) > gaussian_epsilon(1.0, 1e-5) > gaussian_epsilon(2.0, 1e-5)
    # tighter than the textbook bound where that holds (epsilon < 1)
    z = classic_sigma(0.5, 1e-5, 1.0)
    assert gaussian_epsilon(z, 1e-5) < 0.5
    assert gaussian_epsilon(0.0, 1e-5) == math.inf


def test_noisy_keys_scale_and_seed():
    keys = {"a": torch.zeros(10_000), "b": torch.ones(400)}
    one = noisy_keys(keys, n=50, clip=0.5, z=2.0, generator=key_generator(0, "u"))
    again = noisy_keys(keys, n=50, clip=0.5, z=2.0, generator=key_generator(0, "u"))
    other = noisy_keys(keys, n=50, clip=0.5, z=2.0, generator=key_generator(0, "v"))
    assert all(torch.equal(one[p], again[p]) for p in keys) and not torch.equal(one["a"], other["a"])
    sigma = 2.0 * 2 * 0.5 * math.sqrt(10_000) / 50  # z * 2 C sqrt(d) / n
    assert one["a"].std().item() == pytest.approx(sigma, rel=0.05)


def test_clipping_bounds_each_example(planted):
    peft, members, _ = planted
    layers = lora_layers(peft)
    plain = activation_means(peft, layers, members, 0)
    clipped = activation_means(peft, layers, members, 0, clip=0.1)
    for pos, k in clipped.items():
        assert k.norm() <= 0.1 * math.sqrt(k.numel()) + 1e-4 < plain[pos].norm()
    big = activation_means(peft, layers, members, 0, clip=100.0)  # no example is that long: unchanged
    assert all(torch.allclose(big[p], plain[p]) for p in plain)


@pytest.mark.parametrize("bad", [{"key_noise": -1}, {"key_noise": math.inf}, {"key_noise": math.nan},
                                 {"key_clip": 0}, {"key_delta": 1}, {"key_noise": 1, "key": "gate"},
                                 {"key_noise": 1, "retrieval_copies": True}])
def test_key_noise_settings_are_checked(bad):
    with pytest.raises(ValidationError):
        RunConfig(data="d", **bad)


@pytest.mark.parametrize("bad", [{"sharer_train": {"dp_noise": -1}}, {"sharer_train": {"dp_clip": 0}},
                                 {"gate_train": {"dp_noise": 1}}, {"task_train": {"dp_noise": 1}},
                                 {"sharer_train": {"dp_noise": 1}, "retrieval_copies": True}])
def test_dp_sgd_settings_are_checked(bad):
    with pytest.raises(ValidationError, match="dp_"):
        RunConfig(data="d", **bad)


def test_dp_sgd_pool_records_epsilon_and_derived_runs_retrain(finished, tmp_path):
    """A run derived with DP-SGD sharers trains every sharer again (no LoRA linked); the pool records the
    largest epsilon over its sharers, each sharer's own is in its lora.json."""
    base = Run(finished)
    dp = base.derive(tmp_path / "dp", base.config.updated({"sharer_train": {"dp_noise": 1.0, "dp_clip": 0.5}}))
    dp.pipeline()
    lp = dp.open_pool().lora_privacy
    assert lp["dp_noise"] == 1.0 and lp["dp_clip"] == 0.5 and lp["delta"] == 1e-5 and lp["sharers"] == 3
    own = []
    for s in dp.select():
        assert not (dp.sharer_dir(s.user_id) / "adapter").is_symlink()
        stats = json.loads((dp.sharer_dir(s.user_id) / "lora.json").read_text())
        n = dp.training_items(s.user_id)
        assert stats["dp_epsilon"] == pytest.approx(sgd_epsilon(1.0, 4 / n, 2, 1e-5))
        own.append(stats["dp_epsilon"])
    assert lp["epsilon"] == pytest.approx(max(own))
    assert base.open_pool().lora_privacy is None


# --- perpcs privacy on a finished run ---

@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_run_config):
    folder = tmp_path_factory.mktemp("priv") / "run"
    Run.create(folder, tiny_run_config(key_noise=1.0, key_clip=0.5)).pipeline()
    return folder


def test_key_noise_is_recorded_in_the_pool(finished, tiny_run_config, tmp_path):
    kp = Run(finished).open_pool().key_privacy
    assert kp["key_noise"] == 1.0 and kp["key_clip"] == 0.5 and kp["delta"] == 1e-5
    assert kp["epsilon_per_key"] == pytest.approx(gaussian_epsilon(1.0, 1e-5))
    assert kp["epsilon_all_keys"] == pytest.approx(gaussian_epsilon(1.0 / math.sqrt(kp["positions"]), 1e-5))
    plain = Run.create(tmp_path / "plain", tiny_run_config())
    plain.build_pool()
    assert plain.open_pool().key_privacy is None


def test_a_run_derived_with_key_noise_has_noisy_keys(finished, tmp_path):
    """Not the pool of the run it derives from (same sharers and key kind, other noise): its own keys."""
    base = Run(finished)
    quiet = base.derive(tmp_path / "quiet", base.config.updated({"key_noise": 0}))
    quiet.build_pool()
    louder = quiet.derive(tmp_path / "louder", quiet.config.updated({"key_noise": 2.0}))
    louder.build_pool()
    assert quiet.open_pool().key_privacy is None and louder.open_pool().key_privacy["key_noise"] == 2.0
    u = quiet.select()[0].user_id
    keys = [r.open_pool().sharer_keys(r.open_pool().pseudonym(u)) for r in (quiet, louder)]
    assert not any(torch.equal(keys[0][pos], keys[1][pos]) for pos in keys[0])


def test_privacy_writes_its_three_files(finished, tmp_path):
    result = privacy(finished, tmp_path / "out", PrivacySettings(members=4, nonmembers=8, resamples=100))
    assert {p.name for p in (tmp_path / "out").iterdir()} == {"privacy.json", "privacy.md", "privacy.png"}
    saved = json.loads((tmp_path / "out" / "privacy.json").read_text())
    assert saved["key"] == "activation" and saved["key_privacy"]["key_noise"] == 1.0
    pairs = {"piece_loss": 3, "piece_calibrated": 3, "key_membership": 3, "key_membership_calibrated": 3,
             "assembled_loss": 2, "assembled_calibrated": 2}  # each sharer's (target's) scores of the 8 items
    for name, n in pairs.items():
        a = result["attacks"][name]["attack"]
        assert 0 <= a["auroc"] <= 1 and a["ci"][0] <= a["auroc"] <= a["ci"][1] and a["nonmembers"] == 8 * n
    assert "piece_loss" in (tmp_path / "out" / "privacy.md").read_text()
    again = privacy(finished, tmp_path / "out", PrivacySettings(members=4, nonmembers=8, resamples=100))
    assert again["attacks"] == result["attacks"]  # same seed, same result


def test_views_share_the_runs_passes(finished, tmp_path, tiny_run_config):
    """A derived run with other keys: its key attacks come from the same passes; a foreign run is refused."""
    base = Run(finished)
    view = base.derive(tmp_path / "gate", base.config.updated({"key": "gate", "key_noise": 0}))
    view.pipeline()
    s = PrivacySettings(members=4, nonmembers=8, resamples=100)
    both = privacy(finished, tmp_path / "out", s, views={"gate": view.folder})
    alone = privacy(view.folder, tmp_path / "alone", s)
    for name in ("key_membership", "key_membership_calibrated", "assembled_loss"):
        assert both["views"]["gate"]["attacks"][name]["attack"] == alone["attacks"][name]["attack"]
    assert both["views"]["gate"]["key"] == "gate" and "gate" in (tmp_path / "out" / "privacy.md").read_text()
    other = Run.create(tmp_path / "other", tiny_run_config(seed=1))
    other.pipeline()
    with pytest.raises(ValueError, match="not derived from"):
        privacy(finished, tmp_path / "o3", s, views={"x": other.folder})


def test_privacy_refuses_unfinished_runs_and_foreign_folders(finished, tmp_path, tiny_run_config):
    Run.create(tmp_path / "empty", tiny_run_config())
    with pytest.raises(ValueError, match="not a finished run"):
        privacy(tmp_path / "empty", tmp_path / "o1")
    (tmp_path / "o2").mkdir()
    (tmp_path / "o2" / "mine.txt").write_text("x")
    with pytest.raises(ValueError, match="already holds files this command does not replace"):
        privacy(finished, tmp_path / "o2")


def test_members_are_the_items_the_lora_saw():
    """The seeded batch order replayed: a step cap below one epoch leaves items unseen (no members)."""
    from perpcs.data import Item
    from perpcs.privacy import trained_items
    from perpcs.training import batches

    items = [Item(input=f"x{i}", output="y") for i in range(10)]
    s = TrainSettings(batch_size=4, seed=3)
    two = trained_items(items, s, {"steps": 2})
    first = [j for b in batches(list(range(10)), 4, 2, 3) for j in b]
    assert len(two) == 8 and [it.input for it in two] == [f"x{j}" for j in sorted(first)]
    assert len(trained_items(items, s, {"steps": 3})) == 10  # one epoch: every item
    assert len(trained_items(items, s, {"steps": 6, "best_epoch": 1})) == 10
    # retrieval copies (examples 10..18 are items 1..9 again): more examples, no item beyond the history
    assert {it.input for it in trained_items(items, s, {"steps": 5}, copies=True)} <= {it.input for it in items}


def test_private_preset_sits_under_config_and_set(tmp_path):
    from perpcs.overrides import build_config
    from perpcs.settings import PRESETS

    cfg = build_config(tmp_path, preset="private")
    assert cfg.model_dump(include=set(PRESETS["private"])) == PRESETS["private"]
    assert build_config(tmp_path, overrides=["key_noise=2"], preset="private").key_noise == 2
    with pytest.raises(ValueError, match="known presets"):
        build_config(tmp_path, preset="secret")
