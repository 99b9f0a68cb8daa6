"""The piece pool (method step 4): the (A, B, key) triples sharers contribute, on disk.

A piece's key is what assembly scores it by: its trained gate (the paper), or the sharer's mean activation at
that position, with its LoRA on (`key="activation"`) or off (`"task-activation"`; see `assembly.piece_scores`).
A pool is a folder:

    pool.sqlite                                   the manifest (tables meta, positions, sharers, shares)
    sharers/<sharer id>-<sha256[:12]>.safetensors  A, B and key of each piece that sharer shares

One file and a few manifest rows per sharer, so adding or removing a sharer rewrites nothing else and
a pool scales to thousands of sharers. Sharer files are named by their content hash and never
rewritten in place, so cached memory-mapped handles can never see changed bytes. Sharer ids are
salted pseudonyms; the pool holds no raw user id or text. The format is described in docs/pool.md.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import sqlite3
from collections import OrderedDict
from pathlib import Path
from typing import Any, get_args

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as save_tensors

from perpcs.annindex import PREFIX as ANN_PREFIX
from perpcs.errors import InputError
from perpcs.keyindex import PREFIX as KEY_INDEX_PREFIX
from perpcs.selection import share_mask
from perpcs.settings import KeyKind
from perpcs.utils import atomic_path, dir_bytes, plain_json, sha256_file

FORMAT_VERSION = 1
KEYS = get_args(KeyKind)
MANIFEST = "pool.sqlite"
SHARER_DIR = "sharers"
DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # what a piece may be stored as
_MAX_OPEN = 8192  # cached safe_open handles: one memory map each, no open file descriptor

_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE positions (idx INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE,
                        d_in INTEGER NOT NULL, d_out INTEGER NOT NULL);
CREATE TABLE sharers (idx INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE,
                      file TEXT NOT NULL, sha256 TEXT NOT NULL, nbytes INTEGER NOT NULL);
CREATE TABLE shares (position INTEGER NOT NULL REFERENCES positions(idx),
                     sharer INTEGER NOT NULL REFERENCES sharers(idx),
                     PRIMARY KEY (position, sharer)) WITHOUT ROWID;
CREATE INDEX shares_by_sharer ON shares (sharer);
"""


class Pool:
    """A pool folder, opened. Build one with `Pool.create`, open one with `Pool.open`."""

    def __init__(self, path: Path, db: sqlite3.Connection):
        self.path, self._db = path, db
        self.manifest = manifest = path / MANIFEST
        meta = dict(self._sql("SELECT key, value FROM meta"))
        if meta.get("format_version") != str(FORMAT_VERSION):
            raise InputError(f"{manifest}: pool format version {meta.get('format_version')!r}, "
                             f"this perpcs reads version {FORMAT_VERSION}")
        try:
            self.base_fingerprint: str = meta["base_fingerprint"]
            self.lora_config: dict = json.loads(meta["lora_config"])
            self.sharing_ratio = float(meta["sharing_ratio"])
            self.seed = int(meta["seed"])
            self.key: KeyKind = meta.get("key", "gate")  # pools written before activation keys have gates
            self.key_privacy: dict | None = json.loads(meta["key_privacy"]) if "key_privacy" in meta else None
            self.lora_privacy: dict | None = json.loads(meta["lora_privacy"]) if "lora_privacy" in meta else None
            self._salt = meta["salt"]
        except KeyError as e:
            raise InputError(f"{manifest}: not a perpcs pool manifest (table meta has no row {e})") from None
        except ValueError as e:
            raise InputError(f"{manifest}: table meta holds an unreadable value ({e})") from None
        if self.key not in KEYS:
            raise InputError(f"{manifest}: unknown piece key {self.key!r} (known: {', '.join(KEYS)})")
        r = self.lora_config.get("r") if isinstance(self.lora_config, dict) else None
        if not isinstance(r, int) or isinstance(r, bool) or r <= 0 or not 0 < self.sharing_ratio <= 1:
            raise InputError(f"{manifest}: table meta: lora_config needs a positive int 'r' and sharing_ratio is in "
                             f"(0, 1]; got lora_config {self.lora_config!r}, sharing_ratio {self.sharing_ratio}")
        rows = self._sql("SELECT idx, name, d_in, d_out FROM positions ORDER BY idx").fetchall()
        if not rows or not all(isinstance(d, int) and d > 0 for *_, d_in, d_out in rows for d in (d_in, d_out)):
            raise InputError(f"{manifest}: table positions: expected one row or more of positive d_in and d_out")
        self.shapes: dict[str, tuple[int, int]] = {name: (d_in, d_out) for _, name, d_in, d_out in rows}
        self.positions: list[str] = list(self.shapes)
        self._pos_idx = {name: idx for idx, name, _, _ in rows}
        self._handles: OrderedDict[str, Any] = OrderedDict()

    def _sql(self, query: str, params: tuple = ()) -> sqlite3.Cursor:
        """A manifest query; a manifest without its tables or columns (or no database at all) is an InputError."""
        try:
            return self._db.execute(query, params)
        except sqlite3.DatabaseError as e:
            raise InputError(f"{self.path / MANIFEST}: not a readable perpcs pool manifest ({e})") from None

    # --- create / open ---

    @classmethod
    def create(cls, path: str | os.PathLike, base_fingerprint: str, lora_config: dict,
               positions: dict[str, tuple[int, int]], seed: int = 0, sharing_ratio: float = 1.0,
               key: KeyKind = "gate", key_privacy: dict | None = None, lora_privacy: dict | None = None) -> Pool:
        """A new, empty pool. `positions` (position -> (d_in, d_out)) in forward order, layer 0 first;
        `seed` and `sharing_ratio` choose the share mask of sharers added without an explicit one;
        `key` says what the pieces' keys are (a trained gate, or the sharer's mean activation);
        `key_privacy`, the DP noise on them if any (`dp.key_privacy`: settings and epsilon, delta); `lora_privacy`,
        the pieces' DP-SGD if any (`dp.lora_privacy`)."""
        path = Path(path)
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise FileExistsError(f"{path}: exists and is not an empty folder; refusing to create a pool there")
        lora_config = plain_json(lora_config, "lora_config")
        r = lora_config.get("r")
        if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
            raise ValueError(f"lora_config: 'r' must be a positive int, got {r!r}")
        if not positions:
            raise ValueError("positions: a pool needs at least one piece position")
        for name, shape in positions.items():
            if not (isinstance(name, str) and name and len(shape) == 2
                    and all(isinstance(d, int) and d > 0 for d in shape)):
                raise ValueError(f"positions: {name!r} -> {shape!r}: expected a module name -> (d_in, d_out) "
                                 "of positive ints")
        if not 0.0 < sharing_ratio <= 1.0:
            raise ValueError(f"sharing_ratio must be in (0, 1], got {sharing_ratio}")
        if key not in KEYS:
            raise ValueError(f"key must be one of {', '.join(KEYS)}, got {key!r}")
        meta = {"format_version": str(FORMAT_VERSION), "base_fingerprint": base_fingerprint,
                "lora_config": json.dumps(lora_config, sort_keys=True), "sharing_ratio": repr(float(sharing_ratio)),
                "seed": str(seed), "salt": secrets.token_hex(16), "key": key}
        for name, record in (("key_privacy", key_privacy), ("lora_privacy", lora_privacy)):
            if record is not None:
                meta[name] = json.dumps(record, sort_keys=True)
        path.mkdir(parents=True, exist_ok=True)
        with atomic_path(path / MANIFEST) as tmp:
            db = sqlite3.connect(tmp)
            try:
                db.executescript(_SCHEMA)
                with db:
                    db.executemany("INSERT INTO meta VALUES (?, ?)", meta.items())
                    db.executemany("INSERT INTO positions VALUES (?, ?, ?, ?)",
                                   [(i, name, d_in, d_out)
                                    for i, (name, (d_in, d_out)) in enumerate(positions.items())])
            finally:
                db.close()
        return cls.open(path, verify=False)

    @classmethod
    def open(cls, path: str | os.PathLike, base_fingerprint: str | None = None,
             lora_config: dict | None = None, verify: bool = True) -> Pool:
        """Open a pool, refusing one built for another base model or LoRA config, and (if `verify`)
        one whose sharer files do not match their manifest hashes."""
        path = Path(path)
        manifest = path / MANIFEST
        if not manifest.is_file():
            raise FileNotFoundError(f"{manifest}: no pool manifest here (make a pool with Pool.create)")
        db = sqlite3.connect(manifest)
        try:
            db.execute("PRAGMA foreign_keys = ON")
            pool = cls(path, db)
            pool._check(base_fingerprint, lora_config, verify)
        except BaseException:
            db.close()
            raise
        return pool

    def _check(self, base_fingerprint: str | None, lora_config: dict | None, verify: bool) -> None:
        manifest = self.path / MANIFEST
        if base_fingerprint is not None and base_fingerprint != self.base_fingerprint:
            raise ValueError(f"{manifest}: pool was built on base model {self.base_fingerprint!r}, "
                             f"not on the given {base_fingerprint!r}")
        if lora_config is not None:  # only the keys the caller gives are compared
            given = plain_json(lora_config, "lora_config")
            diff = [k for k in sorted(given) if self.lora_config.get(k, ...) != given[k]]
            if diff:
                raise ValueError(f"{manifest}: LoRA config differs from the pool's in {', '.join(diff)} ("
                                 + "; ".join(f"{k}: pool {self.lora_config.get(k)!r}, given {given[k]!r}" for k in diff)
                                 + ")")
        inside = self.path.resolve()
        for sid, file, digest in self._sql("SELECT id, file, sha256 FROM sharers ORDER BY idx").fetchall():
            # Pools travel between parties: a manifest naming `../x` or `/x` must not make perpcs read
            # (or, removing the sharer, delete) a file outside the pool folder.
            f = self.path / file
            if Path(file).is_absolute() or not f.resolve().is_relative_to(inside):
                raise InputError(f"{manifest}: file {file!r} of sharer {sid} is outside the pool folder {self.path}")
            if verify:
                if not f.is_file():
                    raise FileNotFoundError(f"{f}: file of sharer {sid} is missing (listed in {manifest})")
                if sha256_file(f) != digest:
                    raise ValueError(f"{f}: sha256 does not match {manifest} (file changed or corrupted); "
                                     f"restore it or remove sharer {sid}")

    def close(self) -> None:
        self._handles.clear()
        self._db.close()

    def __enter__(self) -> Pool:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # --- sharers ---

    @property
    def pool_id(self) -> str:
        """A stable id for this pool (derived from its secret salt), carried by recipes made from it."""
        return "pool-" + hashlib.sha256(("pool:" + self._salt).encode()).hexdigest()[:16]

    def pseudonym(self, user_id: str) -> str:
        """The pool's sharer id for a user: salted, so it neither reveals nor links the user id across pools."""
        return "s" + hashlib.sha256((self._salt + str(user_id)).encode()).hexdigest()[:12]

    def add_sharer(self, user_id: str, pieces: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
                   share: set[str] | None = None) -> str:
        """Store the pieces (A [r, d_in], B [d_out, r], key [d_in]) a user shares; returns its sharer id.

        `share` defaults to `share_mask` at the pool's sharing ratio and seed; unshared pieces are not
        stored. Re-adding a user replaces its pieces and keeps its place in the sharer order.
        """
        sid = self.pseudonym(user_id)
        self._check_pieces(pieces, f"sharer {user_id!r} ({sid})")
        if share is None:
            share = share_mask([p for p in self.positions if p in pieces], self.sharing_ratio, self.seed, user_id)
        missing = sorted(set(share) - pieces.keys())
        if missing:
            raise ValueError(f"sharer {sid}: shares {', '.join(missing)} but gives no piece there")
        if not share:
            raise ValueError(f"sharer {sid}: shares no piece")
        shared = [p for p in self.positions if p in share]
        tensors = {}
        for p in shared:
            for name, t in zip(("lora_A", "lora_B", self.key), pieces[p]):
                tensors[f"{p}.{name}"] = t.detach().cpu().contiguous()
        data = save_tensors(tensors, metadata={"format": "pt", "perpcs_pool_format": str(FORMAT_VERSION),
                                               "sharer": sid})
        digest = hashlib.sha256(data).hexdigest()
        file = f"{SHARER_DIR}/{sid}-{digest[:12]}.safetensors"
        with atomic_path(self.path / file) as tmp:
            tmp.write_bytes(data)
        old = self._sql("SELECT idx, file FROM sharers WHERE id = ?", (sid,)).fetchone()
        with self._db:
            if old:
                self._sql("UPDATE sharers SET file = ?, sha256 = ?, nbytes = ? WHERE idx = ?",
                          (file, digest, len(data), old[0]))
                self._sql("DELETE FROM shares WHERE sharer = ?", (old[0],))
                idx = old[0]
            else:
                idx = self._sql("INSERT INTO sharers (id, file, sha256, nbytes) VALUES (?, ?, ?, ?)",
                                (sid, file, digest, len(data))).lastrowid
            self._db.executemany("INSERT INTO shares VALUES (?, ?)", [(self._pos_idx[p], idx) for p in shared])
        if old and old[1] != file:
            self._drop(old[1])
        return sid

    def _check_pieces(self, pieces: dict, who: str) -> None:
        """What enters the pool: at each of its positions A [r, d_in], B [d_out, r] and key [d_in], floating
        point and finite (a sharer whose training diverged is refused here, not found in an adapter later)."""
        for p, triple in pieces.items():
            if p not in self.shapes:
                raise InputError(f"{who}: position {p!r} is not one of this pool's {len(self.positions)} positions "
                                 f"(they look like {self.positions[0]!r})")
            if not isinstance(triple, (tuple, list)) or len(triple) != 3:
                raise InputError(f"{who}: position {p}: expected tensors (A, B, {self.key})")
            for name, t in zip(("lora_A", "lora_B", self.key), triple):
                problem = self.tensor_problem(p, name, t)
                if problem:
                    raise InputError(f"{who}: position {p}: {problem}; refused from the pool")

    def tensor_problem(self, position: str, name: str, t: Any) -> str | None:
        """What is wrong with tensor `name` (lora_A, lora_B or the key) of a piece at `position`, or None."""
        r, (d_in, d_out) = self.lora_config["r"], self.shapes[position]
        want = {"lora_A": [r, d_in], "lora_B": [d_out, r]}.get(name, [d_in])
        if not isinstance(t, torch.Tensor):
            return f"{name} is a {type(t).__name__}, not a tensor"
        if list(t.shape) != want:
            return f"{name} has shape {list(t.shape)}, the pool's pieces {want} (LoRA r={r})"
        if t.dtype not in DTYPES:
            return f"{name} is {str(t.dtype).removeprefix('torch.')}, not a float32, float16 or bfloat16 tensor"
        if not bool(torch.isfinite(t).all()):
            return (f"{name} holds NaN or infinite values (did the sharer's training diverge? lower "
                    "sharer_train.lr)")
        return None

    def _read(self, h: Any, file: str, position: str, name: str) -> torch.Tensor:
        """One tensor of a sharer file, checked as when it entered the pool: a file whose hash was recomputed
        after tampering still cannot give a wrong piece."""
        try:
            t = h.get_tensor(f"{position}.{name}")
        except SafetensorError as e:
            raise InputError(f"{self.path / file}: tensor {position}.{name} is missing or unreadable ({e})") from None
        problem = self.tensor_problem(position, name, t)
        if problem:
            raise InputError(f"{self.path / file}: tensor {position}.{name}: {problem}")
        return t

    def remove_sharer(self, sharer_id: str) -> None:
        idx, file = self._sharer(sharer_id)
        with self._db:
            self._sql("DELETE FROM shares WHERE sharer = ?", (idx,))
            self._sql("DELETE FROM sharers WHERE idx = ?", (idx,))
        self._drop(file)

    def _drop(self, file: str) -> None:
        self._handles.pop(file, None)
        (self.path / file).unlink(missing_ok=True)

    def sharers(self) -> list[str]:
        """Sharer ids in the order they were first added."""
        return [sid for (sid,) in self._sql("SELECT id FROM sharers ORDER BY idx").fetchall()]

    def __len__(self) -> int:
        return self._sql("SELECT COUNT(*) FROM sharers").fetchone()[0]

    def _sharer(self, sharer_id: str) -> tuple[int, str]:
        row = self._sql("SELECT idx, file FROM sharers WHERE id = ?", (sharer_id,)).fetchone()
        if row is None:
            raise ValueError(f"{self.path}: no sharer {sharer_id!r} in this pool")
        return row

    def _position(self, position: str) -> int:
        if position not in self._pos_idx:
            raise ValueError(f"{self.path}: no position {position!r} in this pool")
        return self._pos_idx[position]

    # --- reading pieces ---

    def _candidates(self, position: str) -> list[tuple[str, str]]:
        return self._sql(
            "SELECT s.id, s.file FROM shares JOIN sharers s ON s.idx = shares.sharer "
            "WHERE shares.position = ? ORDER BY shares.sharer", (self._position(position),)).fetchall()

    def candidates(self, position: str) -> list[str]:
        """Ids of the sharers that share `position`, in the order they were first added."""
        return [sid for sid, _ in self._candidates(position)]

    def keys(self, position: str) -> tuple[list[str], torch.Tensor]:
        """The candidates of `position` and their keys stacked [n, d_in]; reads only the key tensors."""
        rows = self._candidates(position)
        if not rows:
            return [], torch.empty(0, self.shapes[position][0])
        keys = [self._read(self._open(f), f, position, self.key) for _, f in rows]
        return [sid for sid, _ in rows], torch.stack(keys)

    def piece(self, sharer_id: str, position: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) of one shared piece; reads only those two tensors."""
        idx, file = self._sharer(sharer_id)
        shared = self._sql("SELECT 1 FROM shares WHERE position = ? AND sharer = ?",
                           (self._position(position), idx)).fetchone()
        if shared is None:
            raise ValueError(f"{self.path}: sharer {sharer_id} does not share position {position}")
        h = self._open(file)
        return self._read(h, file, position, "lora_A"), self._read(h, file, position, "lora_B")

    def positions_of(self, sharer_id: str) -> list[str]:
        """The positions one sharer shares, in position order."""
        return self._shared(self._sharer(sharer_id)[0])

    def _shared(self, idx: int) -> list[str]:
        name = {i: pos for pos, i in self._pos_idx.items()}
        return [name[i] for (i,) in self._sql("SELECT position FROM shares WHERE sharer = ? ORDER BY position",
                                              (idx,)).fetchall()]

    def sharer_keys(self, sharer_id: str) -> dict[str, torch.Tensor]:
        """{position: key} of one sharer's shared pieces, through a handle closed afterwards: building the
        key index (keyindex.py) over thousands of sharers then does not keep their files mapped."""
        idx, file = self._sharer(sharer_id)
        shared = self._shared(idx)
        with self._map(file) as h:
            # cloned: a tensor read from a memory map may keep the whole file mapped while it lives
            return {pos: self._read(h, file, pos, self.key).clone() for pos in shared}

    def _open(self, file: str) -> Any:
        """A cached safe_open handle (LRU): opening thousands of files per position is slow.
        Correct because a sharer file's name carries its content hash and is never rewritten."""
        h = self._handles.pop(file, None)
        if h is None:
            h = self._map(file)
        self._handles[file] = h
        if len(self._handles) > _MAX_OPEN:
            self._handles.popitem(last=False)
        return h

    def _map(self, file: str) -> Any:
        """A new handle on a sharer file; one that is no safetensors (a bad pool, hash or not) is an InputError."""
        try:
            return safe_open(self.path / file, framework="pt", device="cpu")
        except SafetensorError as e:
            raise InputError(f"{self.path / file}: not a readable safetensors file ({e})") from None

    # --- size ---

    def nbytes(self) -> int:
        """Bytes on disk of the pool: manifest and sharer files, not the key indexes (caches made on first use)
        nor calibration's report (`calibration.json`, written once the pool is built)."""
        extra = [*self.path.glob(f"{KEY_INDEX_PREFIX}*.safetensors"), *self.path.glob("calibration.json")]
        return (dir_bytes(self.path) - sum(f.stat().st_size for f in extra)
                - sum(dir_bytes(f) for f in self.path.glob(f"{ANN_PREFIX}*") if f.is_dir()))

    def sharer_nbytes(self, sharer_id: str) -> int:
        return self._sql("SELECT nbytes FROM sharers WHERE idx = ?", (self._sharer(sharer_id)[0],)).fetchone()[0]
