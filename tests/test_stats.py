"""Statistics of the bench, against hand-computed answers."""

import os
import subprocess
import sys

import pytest

from perpcs.evaluation import per_query, score
from perpcs.stats import bootstrap_ci, gain_share, method_statistics, paired
from perpcs.tasks import get_task


def test_per_query_scores_follow_lamp_rules_and_average_to_the_metric():
    acc = get_task("LaMP-2")
    label = acc.labels[0]
    assert per_query(acc, {"a": label, "b": label}, {"a": label, "b": "nonsense"}) == {"a": 1.0, "b": 0.0}
    mae = get_task("LaMP-3")  # scale 1-5: unparsable answers count as the farther end from the gold
    golds, preds = {"a": "2", "b": "2", "c": "4"}, {"a": "4", "b": "??", "c": "5"}
    assert per_query(mae, golds, preds) == {"a": 2.0, "b": 3.0, "c": 1.0}
    assert score(mae, golds, preds)["mae"] == pytest.approx(2.0)
    gen = get_task("LaMP-5")
    golds, preds = {"a": "one two three four", "b": "x y"}, {"a": "one two", "b": "z"}
    r1 = per_query(gen, golds, preds)
    assert r1 == pytest.approx({"a": 2 / 3, "b": 0.0})  # P 1, R 1/2: F 2/3
    assert score(gen, golds, preds)["rouge-1"] == pytest.approx(sum(r1.values()) / 2)
    # a method may score a subset of the queries (OPPU on --oppu-targets)
    assert per_query(mae, {"a": "2", "b": "2"}, {"b": "2"}) == {"b": 0.0}
    with pytest.raises(ValueError, match="no gold output"):
        per_query(mae, {"a": "2"}, {"z": "2"})
    with pytest.raises(ValueError, match="not one of the task's labels"):
        per_query(acc, {"a": "nope"}, {"a": label})


def test_bootstrap_ci_contains_the_mean_and_shrinks_with_n():
    small = [0, 1] * 10
    lo, hi = bootstrap_ci(small, seed=1)
    assert lo < 0.5 < hi and 0 <= lo and hi <= 1
    lo2, hi2 = bootstrap_ci(small * 10, seed=1)
    assert lo < lo2 < 0.5 < hi2 < hi
    assert bootstrap_ci(small, seed=1) == (lo, hi)  # seeded
    assert bootstrap_ci([0.3, 0.3, 0.3]) == (0.3, 0.3)


def test_paired_counts_and_sign_test():
    a = {str(i): 1.0 for i in range(12)}
    b = {**{str(i): 0.0 for i in range(9)}, "9": 1.0, "10": 1.0, "11": 2.0}  # 9 wins, 2 ties, 1 loss
    r = paired(a, b, higher=True)
    assert (r["n"], r["wins"], r["losses"], r["ties"]) == (12, 9, 1, 2)
    assert r["p"] == pytest.approx(22 / 1024)  # 2 * P(X <= 1), X ~ Bin(10, 1/2) = 2 * 11 / 1024
    assert r["diff"] == pytest.approx(8 / 12) and r["ci"][0] > 0
    # lower is better (MAE): the same numbers are 1 win, 9 losses
    r = paired(a, b, higher=False)
    assert (r["wins"], r["losses"], r["ties"]) == (1, 9, 2) and r["p"] == pytest.approx(22 / 1024)
    # only the queries both scored are paired
    assert paired(a, {"0": 0.0, "x": 5.0}, True)["n"] == 1
    assert paired(a, {"x": 5.0}, True) is None


def test_gain_share_only_for_a_positive_gain():
    assert gain_share({"non_personalized": 0.5, "oppu": 0.7, "perpcs": 0.6}, "perpcs") == pytest.approx(0.5)
    # OPPU worse than non-personalized: no share (the old table said 92% for a method worse than both)
    assert gain_share({"non_personalized": 0.5, "oppu": 0.4, "perpcs": 0.41}, "perpcs") is None
    assert gain_share({"non_personalized": 0.5, "oppu": 0.5, "perpcs": 0.6}, "perpcs") is None
    # lower is better: MAE 1.0 -> 0.6 is a gain of 0.4; 0.8 reaches half of it
    lower = {"non_personalized": 1.0, "oppu": 0.6, "perpcs": 0.8}
    assert gain_share(lower, "perpcs", higher=False) == pytest.approx(0.5)
    assert gain_share({"non_personalized": 1.0, "oppu": 1.2, "perpcs": 0.8}, "perpcs", higher=False) is None
    # +rag rows: from rag to oppu+rag
    m = {"non_personalized": 0.5, "oppu": 0.7, "rag": 0.6, "oppu+rag": 0.8, "perpcs+rag": 0.7}
    assert gain_share(m, "perpcs+rag") == pytest.approx(0.5)


def test_method_statistics_compares_with_oppu_on_its_queries():
    scores = {"non_personalized": {"1": 0.0, "2": 0.0, "3": 1.0, "4": 0.0},
              "oppu": {"1": 1.0, "2": 1.0},  # OPPU on a subset
              "perpcs": {"1": 1.0, "2": 0.0, "3": 1.0, "4": 1.0}}
    s = method_statistics(scores, higher=True)
    assert s["perpcs"]["n"] == 4 and s["perpcs"]["mean"] == 0.75
    assert s["perpcs"]["vs"]["oppu"]["n"] == 2 and s["perpcs"]["vs"]["non_personalized"]["wins"] == 2
    assert "peft_retrieval" not in s["perpcs"]["vs"] and "oppu" not in s["oppu"]["vs"]
    assert s["perpcs"]["gain_share"] == pytest.approx(0.5)  # on queries 1-2: 0 -> 1 for OPPU, 0.5 for perpcs
    assert s["oppu"]["gain_share"] == 1.0 and s["non_personalized"]["gain_share"] == 0.0


_SUBSET_SCRIPT = """
import random
from perpcs.stats import method_statistics
shares = []
for seed in range(20):
    r = random.Random(seed)
    q = [f"{s}/u{i}#{j}" for s in range(3) for i in range(20) for j in range(5)]
    sc = {m: {k: r.random() + up for k in q} for m, up in (("non_personalized", 0.0), ("perpcs", 0.3))}
    sc["oppu"] = {k: r.random() + 0.6 for k in q[:40]}  # OPPU on a subset, as in the bench
    shares.append(method_statistics(sc, higher=True)["perpcs"]["gain_share"])
print(repr(shares))
"""


def test_method_statistics_is_the_same_in_every_process():
    """Same scores, same numbers to the last bit: no mean may follow a set's hash order (PYTHONHASHSEED)."""
    out = {subprocess.run([sys.executable, "-c", _SUBSET_SCRIPT], env={**os.environ, "PYTHONHASHSEED": str(h)},
                          capture_output=True, text=True, check=True).stdout for h in (1, 2, 3)}
    assert len(out) == 1, out
