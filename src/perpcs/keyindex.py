"""The pool's keys stacked per position in one file, so assembly reads a position's keys in one read.

A pool keeps each sharer's keys in that sharer's own file; gathering one position's keys means one read per
sharer, which at thousands of sharers takes as long as the forward pass itself (benchmarks/README.md). The
index is derived data, a cache: `pool/keys-<sha256 of pool.sqlite>.safetensors` holds the sharer table once
(metadata) and per position the candidates' keys [n, d_in] and their indices into the table (int32). Any
change to the pool's manifest (a sharer added, removed or re-added) changes the name, so a stale index is
never read; it is rebuilt on first use and the index files this module wrote for earlier manifests are
removed. The file's metadata holds the sha256 of its content, checked when it is opened, so a changed index
(rows swapped: another sharer's piece for a user) is refused like a changed sharer file; the keys read are
checked for shape and finiteness. A position's keys are read when the forward pass reaches it, through a
handle closed at once, so memory never holds (or keeps mapped) every sharer's keys; the build reads one sharer
file at a time (Pool.sharer_keys) for the same reason.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from perpcs.errors import InputError
from perpcs.utils import atomic_path, sha256_file

PREFIX = "keys-"
# Indexes this process checked, with the (mtime, size) they had: a server opens the index once per request,
# and hashing it each time would cost as much as reading every key
_VERIFIED: dict[Path, tuple[int, int]] = {}


class KeyIndex:
    def __init__(self, path: Path):
        self.path = path
        seen = (path.stat().st_mtime_ns, path.stat().st_size)
        try:
            with safe_open(path, framework="pt", device="cpu") as f:
                meta = f.metadata()
                self._names = set(f.keys())
                fresh = _VERIFIED.get(path) != seen
                digest = _digest(meta["sharers"], meta["dims"], self._names, f.get_tensor) if fresh else None
            self.sharers: list[str] = json.loads(meta["sharers"])
            self._dims: dict[str, int] = json.loads(meta["dims"])
        except (SafetensorError, KeyError, TypeError, ValueError) as e:
            raise InputError(f"{path}: not a readable key index ({e}); delete it and perpcs rebuilds it") from None
        if fresh and meta.get("sha256") != digest:
            raise InputError(f"{path}: the key index does not match the sha256 it was written with (changed or "
                             "corrupted); delete it and perpcs rebuilds it from the sharer files")
        _VERIFIED[path] = seen

    @classmethod
    def of(cls, pool) -> "KeyIndex":
        """The index of `pool` as it is now: opened if written already, else built (one pass over the sharer files)."""
        path = cls.path_of(pool)
        if path.exists() and _unsealed(path):  # an index of an older perpcs, without its hash: rebuilt
            path.unlink()
        if not path.exists():
            sharers = pool.sharers()  # in the order `candidates(pos)` gives them
            rows: dict[str, list[int]] = {pos: [] for pos in pool.positions}
            keys: dict[str, list[torch.Tensor]] = {pos: [] for pos in pool.positions}
            for i, sid in enumerate(sharers):
                for pos, key in pool.sharer_keys(sid).items():
                    rows[pos].append(i)
                    keys[pos].append(key)
            cls.write(path, sharers, {pos: d_in for pos, (d_in, _) in pool.shapes.items()},
                      {pos: (rows[pos], torch.stack(keys.pop(pos))) for pos in pool.positions if rows[pos]})
            for old in pool.path.glob(f"{PREFIX}*.safetensors"):
                if old != path:
                    old.unlink(missing_ok=True)
        return cls(path)

    @staticmethod
    def path_of(pool) -> Path:
        return pool.path / f"{PREFIX}{sha256_file(pool.path / 'pool.sqlite')[:16]}.safetensors"

    @staticmethod
    def write(path: Path, sharers: list[str], dims: dict[str, int],
              keys: dict[str, tuple[list[int], torch.Tensor]]) -> None:
        """The index file: per position (rows into `sharers`, keys [n, d_in]); positions left out have none."""
        tensors = {}
        for pos, (rows, k) in keys.items():
            tensors[f"{pos}.keys"] = k.contiguous()
            tensors[f"{pos}.sharers"] = torch.tensor(rows, dtype=torch.int32)
        meta = {"sharers": json.dumps(sharers), "dims": json.dumps(dims)}
        with atomic_path(path) as tmp:
            save_file(tensors, tmp, metadata={**meta, "sha256": _digest(meta["sharers"], meta["dims"], tensors,
                                                                        tensors.__getitem__)})

    def keys(self, position: str) -> tuple[list[str], torch.Tensor]:
        """(candidate sharer ids, their keys [n, d_in]) at `position`, as `Pool.keys` gives them."""
        if f"{position}.keys" not in self._names:
            return [], torch.empty(0, self._dims[position])
        with safe_open(self.path, framework="pt", device="cpu") as f:  # closed at once: no page stays mapped
            rows, keys = f.get_tensor(f"{position}.sharers").tolist(), f.get_tensor(f"{position}.keys")
        if (list(keys.shape) != [len(rows), self._dims[position]] or not keys.is_floating_point()
                or not bool(torch.isfinite(keys).all()) or not all(0 <= i < len(self.sharers) for i in rows)):
            raise InputError(f"{self.path}: position {position}: {len(rows)} rows and keys of shape "
                             f"{list(keys.shape)}, not finite keys of length {self._dims[position]} of "
                             f"{len(self.sharers)} sharers; delete the index and perpcs rebuilds it")
        return [self.sharers[i] for i in rows], keys


def _digest(sharers: str, dims: str, names, get) -> str:
    """sha256 of an index's content: its sharer table, dims and every tensor `get(name)` (name, dtype, shape, bytes)."""
    h = hashlib.sha256(f"{sharers}\n{dims}\n".encode())
    for name in sorted(names):
        t = get(name).contiguous()
        h.update(f"{name}:{t.dtype}:{list(t.shape)}\n".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _unsealed(path: Path) -> bool:
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            return "sha256" not in (f.metadata() or {})
    except SafetensorError:
        return False  # opened (and refused) by KeyIndex
