import sqlite3

import pytest
import torch
from safetensors import safe_open

from perpcs.pool import MANIFEST, Pool
from perpcs.selection import share_mask
from perpcs.utils import sha256_file

R = 2
POSITIONS = {f"model.layers.{i}.self_attn.{m}": (d_in, d_out)
             for i in range(2) for m, d_in, d_out in [("q_proj", 8, 8), ("v_proj", 8, 4)]}
CONFIG = {"r": R, "lora_alpha": 4, "target_modules": ["q_proj", "v_proj"], "lora_dropout": 0.05}


def make_pieces(seed):
    g = torch.Generator().manual_seed(seed)
    return {p: (torch.randn(R, d_in, generator=g), torch.randn(d_out, R, generator=g), torch.randn(d_in, generator=g))
            for p, (d_in, d_out) in POSITIONS.items()}


@pytest.fixture
def pool(tmp_path):
    return Pool.create(tmp_path / "pool", "base-abc", CONFIG, POSITIONS, seed=0)


def shared_pieces(pool, sid):
    """Every (A, B) a sharer shares, in position order."""
    return {p: pool.piece(sid, p) for p in pool.positions if sid in pool.candidates(p)}


def test_round_trip_bitwise(tmp_path, pool):
    pieces = {u: make_pieces(i) for i, u in enumerate(["alice", "bob"])}
    ids = [pool.add_sharer(u, p) for u, p in pieces.items()]
    pool.close()
    with Pool.open(tmp_path / "pool", "base-abc", CONFIG) as back:
        assert back.sharers() == ids and len(back) == 2
        assert back.positions == list(POSITIONS) and back.shapes == POSITIONS
        assert back.lora_config == CONFIG and back.base_fingerprint == "base-abc"
        for p in POSITIONS:
            cands, gates = back.keys(p)
            assert cands == ids == back.candidates(p)
            assert torch.equal(gates, torch.stack([pieces[u][p][2] for u in pieces]))
        for sid, u in zip(ids, pieces):
            for p, (A, B) in shared_pieces(back, sid).items():
                assert torch.equal(A, pieces[u][p][0]) and torch.equal(B, pieces[u][p][1])
                assert all(torch.equal(x, y) for x, y in zip(back.piece(sid, p), (A, B)))
        assert back.nbytes() >= sum(back.sharer_nbytes(s) for s in ids) > 0
        assert back.sharer_nbytes(ids[0]) == (back.path / back._sharer(ids[0])[1]).stat().st_size


def test_share_mask_respected_and_unshared_not_stored(pool):
    q0, v0, q1, v1 = POSITIONS
    a = pool.add_sharer("alice", make_pieces(0), share={q0, v1})
    b = pool.add_sharer("bob", make_pieces(1), share={v1})
    assert pool.candidates(q0) == [a] and pool.candidates(v1) == [a, b]
    assert pool.candidates(v0) == [] and pool.keys(v0)[1].shape == (0, 8)
    assert list(shared_pieces(pool, a)) == [q0, v1]
    with pytest.raises(ValueError, match="does not share position"):
        pool.piece(b, q0)
    with safe_open(pool.path / pool._sharer(b)[1], framework="pt") as f:
        assert sorted(f.keys()) == [f"{v1}.gate", f"{v1}.lora_A", f"{v1}.lora_B"]
    # "which sharers share P" is answered from the (position, sharer) primary key
    plan = sqlite3.connect(pool.path / MANIFEST).execute(
        "EXPLAIN QUERY PLAN SELECT sharer FROM shares WHERE position = 0").fetchall()
    assert "SEARCH shares USING PRIMARY KEY (position=?)" in str(plan)


def test_readd_replaces_keeps_order(pool):
    a = pool.add_sharer("alice", make_pieces(0))
    b = pool.add_sharer("bob", make_pieces(1))
    old = pool._sharer(a)[1]
    new = make_pieces(2)
    assert pool.add_sharer("alice", new) == a
    assert pool.sharers() == [a, b] and not (pool.path / old).exists()
    p = next(iter(POSITIONS))
    assert torch.equal(pool.piece(a, p)[0], new[p][0])
    assert len(list((pool.path / "sharers").iterdir())) == 2


def test_remove_rewrites_no_other_file(pool):
    ids = [pool.add_sharer(u, make_pieces(i)) for i, u in enumerate(["a", "b", "c"])]
    files = {s: pool.path / pool._sharer(s)[1] for s in ids}
    before = {s: (f.stat().st_mtime_ns, sha256_file(f)) for s, f in files.items()}
    pool.remove_sharer(ids[1])
    assert pool.sharers() == [ids[0], ids[2]] and not files[ids[1]].exists()
    assert all(ids[1] not in pool.candidates(p) for p in POSITIONS)
    for s in (ids[0], ids[2]):
        assert (files[s].stat().st_mtime_ns, sha256_file(files[s])) == before[s]
    with pytest.raises(ValueError, match="no sharer"):
        pool.remove_sharer(ids[1])


def test_open_refuses_mismatches(tmp_path, pool):
    sid = pool.add_sharer("alice", make_pieces(0))
    pool.close()
    path = tmp_path / "pool"
    with pytest.raises(ValueError, match="'base-abc'.*'base-xyz'"):
        Pool.open(path, base_fingerprint="base-xyz")
    with pytest.raises(ValueError, match=r"differs from the pool's in lora_alpha, r \("):
        Pool.open(path, lora_config={**CONFIG, "r": 4, "lora_alpha": 8})
    Pool.open(path, lora_config={"r": R, "target_modules": {"v_proj", "q_proj"}}).close()  # sets compare as lists
    with pytest.raises(FileExistsError):
        Pool.create(path, "base-abc", CONFIG, POSITIONS)
    with pytest.raises(FileNotFoundError, match=MANIFEST):
        Pool.open(tmp_path / "nowhere")
    [f] = (path / "sharers").iterdir()
    data = bytearray(f.read_bytes())
    data[-1] ^= 1
    f.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=f"{f.name}.*sha256.*{sid}"):
        Pool.open(path)
    Pool.open(path, verify=False).close()
    f.unlink()
    with pytest.raises(FileNotFoundError, match=f.name):
        Pool.open(path)


def test_shape_and_position_validation(pool):
    pieces = make_pieces(0)
    p = list(POSITIONS)[1]
    A, B, g = pieces[p]
    sid = pool.pseudonym("alice")
    with pytest.raises(ValueError, match=rf"sharer 'alice' \({sid}\): position {p}: lora_B has shape \[2, 4\], "
                                         r"the pool's pieces \[4, 2\] \(LoRA r=2\); refused"):
        pool.add_sharer("alice", {**pieces, p: (A, B.T, g)})
    # a diverged sharer, pieces of another rank, integer pieces, a key of the wrong length: each refused by name
    bad = [((A, B * float("nan"), g), "lora_B holds NaN or infinite values"),
           ((A[:1], B[:, :1], g), r"lora_A has shape \[1, 8\], the pool's pieces \[2, 8\]"),
           ((A.to(torch.int8), B, g), "lora_A is int8, not a float32"),
           ((A, B, g[:-1]), r"has shape \[7\], the pool's pieces \[8\]")]
    for triple, message in bad:
        with pytest.raises(ValueError, match=rf"sharer 'alice' .*{message}"):
            pool.add_sharer("alice", {**pieces, p: triple})
    with pytest.raises(ValueError, match="'layers.0.q'"):
        pool.add_sharer("alice", {"layers.0.q": pieces[p]})
    with pytest.raises(ValueError, match="gives no piece"):
        pool.add_sharer("alice", {p: pieces[p]}, share={list(POSITIONS)[0]})
    assert len(pool) == 0 and not any((pool.path / "sharers").glob("*"))


def test_share_mask_sizes_and_determinism():
    pos = [f"p{i}" for i in range(10)]
    assert [len(share_mask(pos, rho, 0, 3)) for rho in (0, 0.01, 0.25, 0.3, 0.5, 1)] == [0, 1, 3, 3, 5, 10]
    assert share_mask(pos, 1.0, 0) == set(pos)
    assert share_mask(pos, 0.5, 7, "u1") == share_mask(pos, 0.5, 7, "u1")
    masks = {frozenset(share_mask(pos, 0.5, 7, f"u{i}")) for i in range(20)}
    assert len(masks) > 1  # sharers differ
    assert len({frozenset(share_mask(pos, 0.5, seed, "u1")) for seed in range(20)}) > 1  # seeds differ
    with pytest.raises(ValueError):
        share_mask(pos, 1.5, 0)


def test_default_mask_uses_pool_ratio(tmp_path):
    pool = Pool.create(tmp_path / "p", "b", CONFIG, POSITIONS, seed=3, sharing_ratio=0.5)
    sid = pool.add_sharer("alice", make_pieces(0))
    assert set(shared_pieces(pool, sid)) == share_mask(list(POSITIONS), 0.5, 3, "alice")
    assert Pool.open(tmp_path / "p").sharing_ratio == 0.5


def test_pseudonyms(tmp_path, pool):
    sid = pool.add_sharer("alice", make_pieces(0))
    assert sid != "alice" and "alice" not in sid and sid == pool.pseudonym("alice")
    assert sid.startswith("s") and len(sid) == 13 and pool.pseudonym("bob") != sid
    pool.close()
    assert Pool.open(tmp_path / "pool").pseudonym("alice") == sid  # stable for this pool
    other = Pool.create(tmp_path / "other", "base-abc", CONFIG, POSITIONS)
    assert other.pseudonym("alice") != sid  # salted per pool: not linkable across pools
    # no raw user id anywhere on disk
    for f in (tmp_path / "pool").rglob("*"):
        assert not f.is_file() or b"alice" not in f.read_bytes()
