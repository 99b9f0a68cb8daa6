"""An approximate key index for large pools: per position a faiss IVF index over the keys as assembly
scores them, memory-mapped from disk while the forward pass is at that position.

Exhaustive scoring (keyindex.py) reads every candidate's key at every position: at 100,000 sharers
of a 576-wide model that is 27 GB of fp32 keys per assembly pass. Both scores are inner products
of a per-position vector of each piece with one query, so an inner-product index reproduces their
top-k (see `assembly.piece_scores`):
- activation keys, s_j = sqrt(d) cos(m - c, k_j - c) with c the candidates' mean key (fixed for a
  fixed pool): index the unit vectors (k_j - c) / |k_j - c|, query (m - c) / |m - c|;
- gate keys, s_j = LN(g_j) . m / sqrt(d): index LN(g_j), query m / sqrt(d).
Vectors are stored in fp16 (faiss's scalar quantizer), so the scores of the pieces found are exact to
fp16; what is lost is recall, pieces in clusters the query does not probe (`nprobe` of `nlist`).
Only the top-k candidates' pieces are then read from the sharer files.

Like the exhaustive index this is derived data named by the pool manifest's hash,
`pool/ann-<sha256[:16]>/`: index.json (sharer table, per position its file, centre and count) and
per position `<i>.faiss` (ids: rows of the position's candidate list) and `<i>.npz` (candidate
rows into the sharer table, centre). A build writes positions one by one into a `.partial` folder
and resumes there; the finished folder replaces earlier manifests' ones.
"""

import json
import math
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from perpcs.utils import atomic_path, sha256_file

PREFIX = "ann-"
LARGE_POOL = 5_000  # sharers from which key_index="auto" uses this index (measured: benchmarks/README.md)


def index_path(pool) -> Path:
    return pool.path / f"{PREFIX}{sha256_file(pool.path / 'pool.sqlite')[:16]}"


def lists_for(n: int) -> int:
    """IVF lists for n vectors: about 2 sqrt(n), at most 256, each with at least ~32 training points."""
    return max(1, min(256, round(2 * math.sqrt(n)), n // 32))


def indexed_vectors(keys: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(the vectors whose inner product with the query is the score, the centre c or None)."""
    keys = keys.float()
    if kind == "gate":
        return F.layer_norm(keys, (keys.shape[-1],)), None
    c = keys.double().mean(0).float()
    return F.normalize(keys - c, dim=-1, eps=1e-8), c


def build(folder: Path, sharers: list[str], kind: str, positions: list[str],
          keys_at: Callable[[str], tuple[list[int], torch.Tensor]], seed: int = 0) -> Path:
    """Write the index into `folder` from `keys_at(position)` -> (rows into `sharers`, keys [n, d]).
    Resumable: positions already in `folder`.partial are kept."""
    import faiss

    faiss.omp_set_num_threads(torch.get_num_threads())
    part = folder.with_name(folder.name + ".partial")
    part.mkdir(parents=True, exist_ok=True)
    meta = {"kind": kind, "sharers": sharers, "positions": {}}
    for i, pos in enumerate(positions):
        file = part / f"{i}.faiss"
        if not file.exists():
            rows, keys = keys_at(pos)
            if rows:
                vectors, c = indexed_vectors(keys, kind)
                x = vectors.numpy().astype(np.float32)
                nlist = lists_for(len(x))
                index = faiss.IndexIVFScalarQuantizer(faiss.IndexFlatIP(x.shape[1]), x.shape[1], nlist,
                                                      faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT)
                index.cp.seed, index.cp.niter, index.cp.min_points_per_centroid = seed, 10, 1  # 1: tiny pools
                sample = np.random.default_rng(seed).permutation(len(x))[: 32 * nlist]
                index.train(x[np.sort(sample)])
                index.add(x)
                with atomic_path(part / f"{i}.npz") as tmp, open(tmp, "wb") as f:
                    np.savez(f, rows=np.asarray(rows, dtype=np.int32),
                             centre=np.zeros(0, np.float32) if c is None else c.numpy())
                with atomic_path(file) as tmp:
                    faiss.write_index(index, str(tmp))
            else:
                with atomic_path(file) as tmp:
                    tmp.write_bytes(b"")
        meta["positions"][pos] = i
    with atomic_path(part / "index.json") as tmp:
        tmp.write_text(json.dumps(meta))
    if folder.exists():
        shutil.rmtree(folder)
    part.rename(folder)
    return folder


class ApproximateIndex:
    """The approximate index of one pool, opened; `search` reads one position's index at a time."""

    def __init__(self, folder: Path, nprobe: int):
        self.folder, self.nprobe = folder, nprobe
        meta = json.loads((folder / "index.json").read_text())
        self.kind, self.sharers = meta["kind"], meta["sharers"]
        self._file: dict[str, int] = meta["positions"]

    @classmethod
    def of(cls, pool, nprobe: int) -> "ApproximateIndex":
        """The index of `pool` as it is now: opened if built, else built with one pass over the sharer files
        (each position's keys go to a temporary fp32 file first, so memory holds one position's keys)."""
        folder = index_path(pool)
        if not (folder / "index.json").exists():
            sharers = pool.sharers()
            order = {sid: i for i, sid in enumerate(sharers)}
            rows = {pos: [order[s] for s in pool.candidates(pos)] for pos in pool.positions}
            scratch = folder.with_name(folder.name + ".keys")
            scratch.mkdir(exist_ok=True)
            maps = {pos: np.lib.format.open_memmap(scratch / f"{i}.npy", "w+", np.float32,
                                                   (len(rows[pos]), pool.shapes[pos][0]))
                    for i, pos in enumerate(pool.positions) if rows[pos]}
            filled = {pos: 0 for pos in maps}
            for sid in sharers:
                for pos, key in pool.sharer_keys(sid).items():
                    maps[pos][filled[pos]] = key.numpy()
                    filled[pos] += 1
            for m in maps.values():
                m.flush()
            del maps
            build(folder, sharers, pool.key, pool.positions,
                  lambda pos: (rows[pos], torch.from_numpy(np.load(scratch / f"{pool.positions.index(pos)}.npy"))
                               if rows[pos] else torch.empty(0)), pool.seed)
            shutil.rmtree(scratch)
            for old in pool.path.glob(f"{PREFIX}*"):
                if old != folder and old.is_dir() and not old.name.endswith((".partial", ".keys")):
                    shutil.rmtree(old)
        return cls(folder, nprobe)

    def search(self, position: str, mean: torch.Tensor, k: int) -> tuple[list[str], torch.Tensor]:
        """(sharer ids, scores) of the best `k` candidates found at `position` for the target mean LN(h) `mean`,
        best first; the scores are those `piece_scores` gives them."""
        import faiss

        i = self._file[position]
        if (self.folder / f"{i}.faiss").stat().st_size == 0:
            return [], torch.empty(0)
        with np.load(self.folder / f"{i}.npz") as z:
            rows, centre = z["rows"], torch.from_numpy(z["centre"])
        mean = mean.float().cpu()
        d = mean.numel()
        if self.kind == "gate":
            q, scale = mean / math.sqrt(d), 1.0
        else:
            q, scale = F.normalize(mean - centre, dim=0, eps=1e-8), math.sqrt(d)
        index = faiss.read_index(str(self.folder / f"{i}.faiss"), faiss.IO_FLAG_MMAP)  # unmapped when dropped
        index.nprobe = min(self.nprobe, index.nlist)
        scores, found = index.search(q.numpy()[None].astype(np.float32), min(k, len(rows)))
        keep = found[0] >= 0
        return ([self.sharers[rows[j]] for j in found[0][keep]],
                torch.from_numpy(scale * scores[0][keep]).float())

    def nbytes(self) -> int:
        return sum(f.stat().st_size for f in self.folder.iterdir())
