"""An approximate key index for large pools: per position compact codes that propose candidates (faiss
IVF-PQ) and the fp16 vectors that score them exactly, of which only the rows proposed are read.

Exhaustive scoring (keyindex.py) reads every candidate's key at every position: at 100,000 sharers
of a 576-wide model that is 27 GB of fp32 keys per assembly pass. Both scores are inner products
of a per-position vector of each piece with one query, so an inner-product index reproduces their
top-k (see `assembly.piece_scores`):
- activation keys, s_j = sqrt(d) cos(m - c, k_j - c) with c the candidates' mean key (fixed for a
  fixed pool): index the unit vectors (k_j - c) / |k_j - c|, query (m - c) / |m - c|;
- gate keys, s_j = LN(g_j) . m / sqrt(d): index LN(g_j), query m / sqrt(d).
A search scans the product-quantized codes (4 bits per 4 dimensions: 72 bytes a 576-wide key) of
`nprobe` of the IVF lists, takes the best `rerank` by those approximate scores, and re-scores them on
their fp16 vectors (`rerank` rows read by position in the file). The codes are a sixteenth of the
fp16 vectors, so those of a whole pool stay in the page cache; the scores of the pieces found are
exact to fp16, and what is lost is recall: pieces in lists not probed, or ranked below `rerank` by their
codes. Positions with at most `rerank` candidates (or fewer than MIN_CODED) are scored in full.

Like the exhaustive index this is derived data named by the pool manifest's hash, and by the format,
`pool/ann2-<sha256[:16]>/` (an index of another format is not read, but rebuilt): index.json (format,
sharer table, per position its file) and per position `<i>.npz` (candidate rows into the sharer table,
centre), `<i>.f16` (the fp16 vectors [n, d], row j = candidate j, raw) and `<i>.faiss` (the codes, ids: rows;
empty where the position is scored in full), written last. A build writes positions one by one into a
`.partial` folder and resumes there; the finished folder replaces earlier manifests' and formats' ones.
"""

import json
import math
import os
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from perpcs.utils import atomic_path, sha256_file

PREFIX = "ann"  # every format's folder: ann-<hash> (the first), ann<FORMAT>-<hash>
FORMAT = 2  # folders of other formats are rebuilt
LARGE_POOL = 5_000  # sharers from which key_index="auto" uses this index (measured: benchmarks/README.md)
RERANK = 96  # candidates the codes propose per search, re-scored on their vectors (measured: benchmarks/README.md)
MIN_CODED = 256  # positions with fewer candidates are scored in full: cheaper than training codes


def index_path(pool) -> Path:
    return pool.path / f"{PREFIX}{FORMAT}-{sha256_file(pool.path / 'pool.sqlite')[:16]}"


def lists_for(n: int) -> int:
    """IVF lists for n vectors: about 2 sqrt(n), at most 256, each with at least ~32 training points."""
    return max(1, min(256, round(2 * math.sqrt(n)), n // 32))


def subvectors(d: int) -> int:
    """Sub-vectors of a code: d / 4 where 4 divides d (4 bits for 4 dimensions: half a byte), else the most
    below that which divide d."""
    return max(m for m in range(1, max(1, d // 4) + 1) if d % m == 0)


def codes(x: np.ndarray, seed: int):
    """The IVF index of the vectors x [n, d] (n >= MIN_CODED) with 4-bit PQ codes scanned by SIMD lookups
    (faiss fast-scan: 16 centroids a sub-vector train and encode in a second where 8-bit codes take
    minutes), ids 0..n-1."""
    import faiss

    n, d = x.shape
    nlist = lists_for(n)
    index = faiss.IndexIVFPQFastScan(faiss.IndexFlatIP(d), d, nlist, subvectors(d), 4, faiss.METRIC_INNER_PRODUCT)
    for cp in (index.cp, index.pq.cp):  # min 1 point a centroid: small positions train without warnings
        cp.seed, cp.niter, cp.min_points_per_centroid = seed, 10, 1
    sample = np.random.default_rng(seed).permutation(n)[: 32 * nlist]
    index.train(x[np.sort(sample)])
    index.add(x)
    return index


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
    meta = {"format": FORMAT, "kind": kind, "sharers": sharers, "positions": {}}
    for i, pos in enumerate(positions):
        file = part / f"{i}.faiss"
        if not file.exists():
            rows, keys = keys_at(pos)
            index = None
            if rows:
                vectors, c = indexed_vectors(keys, kind)
                x = vectors.numpy().astype(np.float32)
                with atomic_path(part / f"{i}.npz") as tmp, open(tmp, "wb") as f:
                    np.savez(f, rows=np.asarray(rows, dtype=np.int32),
                             centre=np.zeros(0, np.float32) if c is None else c.numpy())
                with atomic_path(part / f"{i}.f16") as tmp:
                    x.astype(np.float16).tofile(tmp)
                index = codes(x, seed) if len(x) >= MIN_CODED else None
            with atomic_path(file) as tmp:
                if index is None:
                    tmp.write_bytes(b"")
                else:
                    faiss.write_index(index, str(tmp))
        meta["positions"][pos] = i
    with atomic_path(part / "index.json") as tmp:
        tmp.write_text(json.dumps(meta))
    if folder.exists():
        shutil.rmtree(folder)
    part.rename(folder)
    return folder


def read_rows(path: Path, rows: np.ndarray, d: int) -> np.ndarray:
    """Rows of an [n, d] fp16 file, one read each with readahead off: a memory map would fault in the
    pages around every row, tens of times the bytes asked for."""
    size = 2 * d
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        data = b"".join(os.pread(fd, size, int(j) * size) for j in rows)
    finally:
        os.close(fd)
    return np.frombuffer(data, np.float16).reshape(len(rows), d)


class ApproximateIndex:
    """The approximate index of one pool, opened; `search` reads one position's files at a time."""

    def __init__(self, folder: Path, nprobe: int, rerank: int = RERANK):
        self.folder, self.nprobe, self.rerank = folder, nprobe, rerank
        meta = json.loads((folder / "index.json").read_text())
        if meta.get("format") != FORMAT:
            raise ValueError(f"{folder}: an approximate index of format {meta.get('format', 1)}, not {FORMAT}")
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
            for old in pool.path.glob(f"{PREFIX}*-*"):
                if old != folder and old.is_dir() and not old.name.endswith((".partial", ".keys")):
                    shutil.rmtree(old)
        return cls(folder, nprobe)

    def search(self, position: str, mean: torch.Tensor, k: int) -> tuple[list[str], torch.Tensor]:
        """(sharer ids, scores) of the best `k` candidates found at `position` for the target mean LN(h) `mean`,
        best first; the scores are those `piece_scores` gives them, to fp16."""
        import faiss

        i = self._file[position]
        if not (self.folder / f"{i}.f16").exists():
            return [], torch.empty(0)
        with np.load(self.folder / f"{i}.npz") as z:
            rows, centre = z["rows"], torch.from_numpy(z["centre"])
        mean = mean.float().cpu()
        d = mean.numel()
        if self.kind == "gate":
            q, scale = mean / math.sqrt(d), 1.0
        else:
            q, scale = F.normalize(mean - centre, dim=0, eps=1e-8), math.sqrt(d)
        file = self.folder / f"{i}.faiss"
        if len(rows) <= self.rerank or file.stat().st_size == 0:
            found = np.arange(len(rows))
            vectors = np.fromfile(self.folder / f"{i}.f16", np.float16).reshape(len(rows), d)
        else:
            index = faiss.read_index(str(file), faiss.IO_FLAG_MMAP)  # unmapped when dropped
            index.nprobe = min(self.nprobe, index.nlist)
            found = index.search(q.numpy()[None].astype(np.float32), self.rerank)[1][0]
            found = np.sort(found[found >= 0])
            vectors = read_rows(self.folder / f"{i}.f16", found, d)
        scores = torch.from_numpy(vectors.astype(np.float32)) @ q
        top = torch.topk(scores, min(k, len(found)))
        return [self.sharers[rows[j]] for j in found[top.indices.numpy()]], scale * top.values

    def nbytes(self) -> int:
        return sum(f.stat().st_size for f in self.folder.iterdir())

    def code_bytes(self) -> int:
        """Bytes of the codes, what a search scans (the rest, fp16 vectors, is read by row)."""
        return sum(f.stat().st_size for f in self.folder.glob("*.faiss"))
