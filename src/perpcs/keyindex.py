"""The pool's keys stacked per position in one file, so assembly reads a position's keys in one read.

A pool keeps each sharer's keys in that sharer's own file; gathering one position's keys means one
read per sharer, which at thousands of sharers takes as long as the forward pass itself
(benchmarks/README.md). The index is derived data, a cache: `pool/keys-<sha256 of pool.sqlite>.safetensors`
holds the sharer table once (metadata) and per position the candidates' keys [n, d_in] and their
indices into the table (int32). Any change to the pool's manifest (a sharer added, removed or
re-added) changes the name, so a stale index is never read; it is rebuilt on first use and the
index files this module wrote for earlier manifests are removed. A position's keys are read when the
forward pass reaches it, through a handle closed at once, so memory never holds (or keeps mapped)
every sharer's keys; the build reads one sharer file at a time (Pool.sharer_keys) for the same reason.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from perpcs.utils import atomic_path, sha256_file

PREFIX = "keys-"


class KeyIndex:
    def __init__(self, path: Path):
        self.path = path
        with safe_open(path, framework="pt", device="cpu") as f:
            meta = f.metadata()
            self._names = set(f.keys())
        self.sharers: list[str] = json.loads(meta["sharers"])
        self._dims: dict[str, int] = json.loads(meta["dims"])

    @classmethod
    def of(cls, pool) -> "KeyIndex":
        """The index of `pool` as it is now: opened if written already, else built (one pass over the sharer files)."""
        path = cls.path_of(pool)
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
            tensors[f"{pos}.keys"] = k
            tensors[f"{pos}.sharers"] = torch.tensor(rows, dtype=torch.int32)
        with atomic_path(path) as tmp:
            save_file(tensors, tmp, metadata={"sharers": json.dumps(sharers), "dims": json.dumps(dims)})

    def keys(self, position: str) -> tuple[list[str], torch.Tensor]:
        """(candidate sharer ids, their keys [n, d_in]) at `position`, as `Pool.keys` gives them."""
        if f"{position}.keys" not in self._names:
            return [], torch.empty(0, self._dims[position])
        with safe_open(self.path, framework="pt", device="cpu") as f:  # closed at once: no page stays mapped
            rows = f.get_tensor(f"{position}.sharers").tolist()
            return [self.sharers[i] for i in rows], f.get_tensor(f"{position}.keys")
