"""Which approximate index reads least per query at the recall assembly needs? Top-3 recall against
exhaustive scoring, search time and bytes touched per query of faiss index variants, on
pool_scale.py's synthetic keys (same generator, same seed, so the same keys as its pools).

Bytes touched per query are what a cold page cache would read from disk: the codes of the lists
probed (faiss's own count of distances computed, times the code size) plus, with re-ranking, the
fp16 vectors of the re-ranked rows. Search time is measured warm, one thread, all variants on the
same keys in one process.

    python benchmarks/ann_options.py --sharers 10000 --positions 6 --out benchmarks/results/ann-options-10000.json
    python benchmarks/ann_options.py --sharers 100000 --positions 4 --queries 100 --codes PQ144x4fs PQ96x4fs \
        --out benchmarks/results/ann-options-100000-fastscan.json
"""

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from perpcs.utils import write_json  # noqa: E402
from pool_scale import synthetic_keys  # noqa: E402

D = 576


def variants(n: int) -> list[dict]:
    """(codes, lists, HNSW coarse quantizer?, nprobe, re-ranked rows); PQ codes are always re-ranked exactly."""
    few, many = min(256, round(2 * math.sqrt(n))), round(4 * math.sqrt(n))
    out = [dict(codes="SQfp16", nlist=few, hnsw=False, nprobe=p, rerank=0) for p in (32, 64)]
    out += [dict(codes="SQfp16", nlist=many, hnsw=True, nprobe=p, rerank=0) for p in (64, 128)]
    out += [dict(codes="PQ64", nlist=few, hnsw=False, nprobe=p, rerank=r) for p in (32, 64) for r in (48, 96, 192)]
    out += [dict(codes="PQ64", nlist=many, hnsw=True, nprobe=p, rerank=r) for p in (64, 128) for r in (48, 96, 192)]
    out += [dict(codes=c, nlist=few, hnsw=False, nprobe=p, rerank=r) for c in ("PQ144x4fs", "PQ96x4fs")
            for p in (32, 64) for r in (48, 96, 192)]
    return out


def make(v: dict, x: np.ndarray, seed: int):
    import faiss

    quantizer = faiss.IndexHNSWFlat(D, 32, faiss.METRIC_INNER_PRODUCT) if v["hnsw"] else faiss.IndexFlatIP(D)
    if v["codes"] == "SQfp16":
        index = faiss.IndexIVFScalarQuantizer(quantizer, D, v["nlist"], faiss.ScalarQuantizer.QT_fp16,
                                              faiss.METRIC_INNER_PRODUCT)
    elif v["codes"].endswith("x4fs"):  # 4-bit codes scanned by SIMD lookups (faiss fast-scan)
        index = faiss.IndexIVFPQFastScan(quantizer, D, v["nlist"], int(v["codes"][2:-4]), 4, faiss.METRIC_INNER_PRODUCT)
    else:
        index = faiss.IndexIVFPQ(quantizer, D, v["nlist"], 64, 8, faiss.METRIC_INNER_PRODUCT)
    index.cp.seed, index.cp.niter, index.cp.min_points_per_centroid = seed, 10, 1
    sample = np.random.default_rng(seed).permutation(len(x))[: max(32 * v["nlist"], 16 * 256)]
    t0 = time.perf_counter()
    index.train(x[np.sort(sample)])
    index.add(x)
    return index, time.perf_counter() - t0, index.code_size


def main(a: argparse.Namespace) -> None:
    import faiss

    faiss.omp_set_num_threads(1)
    rows: dict[str, dict] = {}
    for i in range(a.positions):
        everyone = synthetic_keys(a.sharers, D, i, a.seed, a.queries)
        keys, queries = everyone[: a.sharers], everyone[a.sharers:]
        c = keys.mean(0)
        x = F.normalize(keys - c, dim=-1).numpy()
        q = F.normalize(queries - c, dim=-1).numpy()
        del everyone, keys
        want = torch.topk(torch.from_numpy(q @ x.T), 3, dim=1).indices.numpy()
        x16 = x.astype(np.float16)
        built: dict = {}
        for v in [v for v in variants(a.sharers) if not a.codes or v["codes"] in a.codes]:
            shape = (v["codes"], v["nlist"], v["hnsw"])
            if shape not in built:
                built[shape] = make(v, x, a.seed)
            index, build_s, code_size = built[shape]
            index.nprobe = v["nprobe"]
            if getattr(index.quantizer, "hnsw", None) is not None:
                faiss.downcast_index(index.quantizer).hnsw.efSearch = max(64, 2 * v["nprobe"])
            faiss.cvar.indexIVF_stats.reset()
            t0 = time.perf_counter()
            _, found = index.search(q, max(3, v["rerank"]))
            if v["rerank"]:
                exact = np.einsum("qrd,qd->qr", x16[found.clip(0)].astype(np.float32), q)
                exact[found < 0] = -np.inf
                found = np.take_along_axis(found, np.argsort(-exact, axis=1)[:, :3], axis=1)
            seconds = time.perf_counter() - t0
            # fast-scan does not count its distances: the probed share of the lists, for balanced lists
            scanned = faiss.cvar.indexIVF_stats.ndis / len(q) or len(x) * v["nprobe"] / v["nlist"]
            name = f"IVF{v['nlist']}{'_HNSW' if v['hnsw'] else ''},{v['codes']} nprobe {v['nprobe']}" + (
                f", re-rank {v['rerank']}" if v["rerank"] else "")
            r = rows.setdefault(name, {**v, "hits": 0, "total": 0, "ms": 0.0, "bytes": 0.0, "build_s": 0.0,
                                       "index_bytes": 0})
            r["hits"] += sum(len(set(f[:3]) & set(w)) for f, w in zip(found, want))
            r["total"] += want.size
            r["ms"] += 1000 * seconds / len(q) / a.positions
            r["bytes"] += (scanned * code_size + v["rerank"] * 2 * D) / a.positions
            r["build_s"] += build_s / a.positions
            r["index_bytes"] += faiss.serialize_index(index).nbytes / a.positions
        print(f"position {i} done", file=sys.stderr)
    for r in rows.values():
        r["recall_at_3"] = r["hits"] / r["total"]
    result = {"sharers": a.sharers, "positions": a.positions, "queries_per_position": a.queries, "seed": a.seed,
              "variants": rows}
    write_json(a.out, result)
    print(f"{'variant':48} recall@3  ms/query  KB/query  build s  index MB (per position)")
    for name, r in rows.items():
        print(f"{name:48} {r['recall_at_3']:.4f}  {r['ms']:8.2f}  {r['bytes'] / 1e3:8.0f}  {r['build_s']:7.1f}  "
              f"{r['index_bytes'] / 1e6:8.1f}")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sharers", type=int, default=10_000)
    ap.add_argument("--positions", type=int, default=6)
    ap.add_argument("--queries", type=int, default=50, help="new users' keys per position")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--codes", nargs="+", help="only these codes (SQfp16, PQ64, PQ144x4fs, PQ96x4fs)")
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    torch.set_num_threads(1)
    main(a)
