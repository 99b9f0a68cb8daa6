import json
from collections import Counter, defaultdict

import pytest
from typer.testing import CliRunner

from perpcs.cli import app
from perpcs.data import load_dataset
from perpcs.synth import KINDS, MOVIE_TAGS, rule, save_synthetic, synthesize


def items(ds):
    """(user_id, position, input, output, hidden content) for every history item and query."""
    for u in ds.users:
        for pos, (it, lat) in enumerate(zip([*u.history, *u.queries], ds.latent[u.user_id])):
            yield u.user_id, pos, it.input, it.output, lat


def rule_rate(ds, kind):
    rows = list(items(ds))
    return sum(out == rule(kind, ds.groups[uid], lat) for uid, _, _, out, lat in rows) / len(rows)


@pytest.mark.parametrize("kind", KINDS)
def test_same_seed_same_files_other_seed_other_files(kind, tmp_path):
    def files(seed, name):
        folder = save_synthetic(synthesize(kind, n_users=12, seed=seed), tmp_path / name)
        return [(folder / f).read_bytes() for f in ("task.json", "users.jsonl", "groups.json")]

    assert files(3, "a") == files(3, "b")
    assert files(3, "a")[1] != files(4, "c")[1]


@pytest.mark.parametrize("kind", KINDS)
def test_sizes_ranges_and_valid_outputs(kind, tmp_path):
    ds = synthesize(kind, n_users=20, seed=1, history=(5, 9), n_queries=3, groups=4)
    assert [u.user_id for u in ds.users] == [f"u{i:02d}" for i in range(20)]
    assert all(5 <= len(u.history) <= 9 and len(u.queries) == 3 and u.profile is None for u in ds.users)
    assert len({len(u.history) for u in ds.users}) > 1
    assert sorted(Counter(ds.groups.values()).values()) == [5, 5, 5, 5]  # balanced
    for uid, _, text, out, _ in items(ds):
        assert ds.task.output_problem(out) is None
        assert 15 <= len(text.split()) <= 35, text
    inputs = [text for *_, text, _, _ in items(ds)]
    assert len(set(inputs)) == len(inputs)  # nothing repeats, so no query is a history item
    loaded = load_dataset(save_synthetic(ds, tmp_path))  # round trip through the checked contract
    assert loaded.users == ds.users and loaded.task == ds.task
    lines = [json.loads(line) for line in (tmp_path / "users.jsonl").read_text().splitlines()]
    assert all(set(line) == {"user_id", "history", "queries"} for line in lines)  # the truth is not there
    assert json.loads((tmp_path / "groups.json").read_text()) == ds.groups


@pytest.mark.parametrize("kind", KINDS)
def test_group_rule_holds_at_one_minus_noise(kind):
    assert rule_rate(synthesize(kind, n_users=12, seed=0, noise=0.0), kind) == 1.0
    assert rule_rate(synthesize(kind, n_users=60, seed=0, noise=0.2), kind) == pytest.approx(0.8, abs=0.03)
    assert rule_rate(synthesize(kind, n_users=6, seed=0, noise=1.0), kind) == 0.0


def test_classification_rule_by_hand():
    ds = synthesize("classification", n_users=8, seed=5, noise=0.0)
    assert {rule("classification", g, "space") for g in range(4)} == {"sci-fi", "action", "comedy",
                                                                       "thought-provoking"}
    for uid, _, text, out, lat in items(ds):
        assert out == MOVIE_TAGS[lat][ds.groups[uid]]
    assert rule("rating", 1, "1") == "1" and rule("rating", 2, "5") == "5" and rule("rating", 3, "4") == "5"
    assert rule("generation", 3, "city council|open|second location|Riverside") == \
        "Will city council open second location in Riverside?"


def majority_accuracy(rows, key):
    """Accuracy of predicting, for each key, the most common output of that key."""
    votes = defaultdict(Counter)
    for row in rows:
        votes[key(row)][row[3]] += 1
    return sum(c.most_common(1)[0][1] for c in votes.values()) / len(rows)


@pytest.mark.parametrize("kind", ["classification", "rating"])
def test_premise_one_model_for_all_loses_to_knowing_the_group(kind):
    """Per content category: a vote over all users vs a vote within the user's group."""
    ds = synthesize(kind, n_users=60, seed=2, noise=0.1)
    rows = list(items(ds))
    shared = majority_accuracy(rows, key=lambda r: r[4])
    personal = majority_accuracy(rows, key=lambda r: (ds.groups[r[0]], r[4]))
    assert personal > 0.85
    assert shared < personal - 0.25
    if kind == "classification":
        assert shared < 0.35  # groups disagree on every category: about one group in four is right


def test_premise_generation_one_style_for_all_loses_to_the_users_style():
    ds = synthesize("generation", n_users=60, seed=2, noise=0.1)
    rows = list(items(ds))
    best_shared = max(sum(out == rule("generation", g, lat) for *_, out, lat in rows) for g in range(4)) / len(rows)
    personal = rule_rate(ds, "generation")
    assert personal > 0.85 and best_shared < 0.35


def test_history_is_a_user_fingerprint():
    """A user's history alone names the group: the group whose rule fits it best is the true one."""
    ds = synthesize("classification", n_users=40, seed=3, history=(20, 20), noise=0.1)
    for u in ds.users:
        lats = ds.latent[u.user_id][:len(u.history)]
        fit = [sum(it.output == rule("classification", g, lat) for it, lat in zip(u.history, lats)) for g in range(4)]
        assert max(range(4), key=fit.__getitem__) == ds.groups[u.user_id]


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown kind 'poems'"):
        synthesize("poems")
    with pytest.raises(ValueError, match="groups must be 1..4"):
        synthesize("rating", groups=5)
    with pytest.raises(ValueError, match="history"):
        synthesize("rating", history=(10, 5))
    with pytest.raises(ValueError, match="noise"):
        synthesize("rating", noise=1.5)
    with pytest.raises(ValueError, match="ran out of new items"):
        synthesize("classification", n_users=400, history=(60, 60))


def test_cli(tmp_path):
    out = tmp_path / "synth"
    result = CliRunner().invoke(app, ["data", "synth", "--kind", "generation", "--out", str(out), "--users", "8",
                                      "--seed", "7", "--history", "20", "30", "--groups", "2"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout[result.stdout.index("{"):])
    assert summary["users"] == 8 and summary["queries"] == 32 and summary["group_sizes"] == {"0": 4, "1": 4}
    ds = load_dataset(out)
    assert ds.task.name == "synth-headlines" and ds.task.max_new_tokens == 20
    assert set(json.loads((out / "groups.json").read_text()).values()) == {0, 1}
    bad = CliRunner().invoke(app, ["data", "synth", "--kind", "poems", "--out", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "unknown kind" in bad.output
