"""The compact binary recipe: what a target user stores instead of an adapter (sizes: benchmarks/README.md).

A JSON recipe spells every position name and sharer id at every use; a safetensors file needs one
JSON header entry per tensor. This layout writes each name once and the rest as packed numbers:

    b"PCSR"  u8 version  zlib(
        u32 n, JSON header of n bytes: every Recipe field but `pieces`, plus
              "positions" (in recipe order) and "sharers" (the sharer-id table)
        u16 count per position, u32 sharer index per piece, f16 weight per piece (little-endian)
    )

Fields are carried by name in the header, so a field added to `Recipe` later travels without a new
version. Weights are stored as float16: the only difference from the JSON recipe (tested).
This module knows bytes and plain values only; `recipe.Recipe.save/load` use it.
"""

from __future__ import annotations

import json
import struct
import zlib

import numpy as np

MAGIC = b"PCSR"
VERSION = 1
EXTENSION = ".recipe"


def pack(fields: dict, pieces: dict[str, list[tuple[str, float]]]) -> bytes:
    """Bytes of a recipe: `fields` (JSON values) and {position: [(sharer id, weight), ...]}."""
    sharers = sorted({sid for chosen in pieces.values() for sid, _ in chosen})
    row = {sid: i for i, sid in enumerate(sharers)}
    header = json.dumps({**fields, "positions": list(pieces), "sharers": sharers}, separators=(",", ":")).encode()
    flat = [pair for chosen in pieces.values() for pair in chosen]
    body = b"".join([struct.pack("<I", len(header)), header,
                     np.array([len(c) for c in pieces.values()], "<u2").tobytes(),
                     np.array([row[sid] for sid, _ in flat], "<u4").tobytes(),
                     np.array([w for _, w in flat], "<f2").tobytes()])
    return MAGIC + bytes([VERSION]) + zlib.compress(body, 9)


def is_packed(data: bytes) -> bool:
    return data[:4] == MAGIC


def unpack(data: bytes) -> tuple[dict, dict[str, list[tuple[str, float]]]]:
    """(fields, pieces) of `pack`'s bytes; ValueError on anything else."""
    if not is_packed(data):
        raise ValueError("not a binary perpcs recipe (no PCSR magic)")
    if data[4] != VERSION:
        raise ValueError(f"binary recipe version {data[4]}, this perpcs reads version {VERSION}")
    try:
        body = zlib.decompress(data[5:])
        (n,) = struct.unpack_from("<I", body)
        header = json.loads(body[4 : 4 + n])
        positions, sharers = header.pop("positions"), header.pop("sharers")
        at = 4 + n
        counts = np.frombuffer(body, "<u2", len(positions), at)
        at += counts.nbytes
        total = int(counts.sum())
        index = np.frombuffer(body, "<u4", total, at)
        weights = np.frombuffer(body, "<f2", total, at + index.nbytes)
        pairs = iter(zip([sharers[i] for i in index.tolist()], weights.astype(np.float32).tolist()))
    except (zlib.error, struct.error, ValueError, KeyError, TypeError, IndexError) as e:
        raise ValueError(f"corrupt binary recipe: {e}") from None
    return header, {pos: [next(pairs) for _ in range(c)] for pos, c in zip(positions, counts.tolist())}
