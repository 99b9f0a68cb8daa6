"""Does assembly stay flat as the pool grows? Time, peak memory and key-index cost and recall of
assembling one target from pools of 10 to 100,000 sharers.

Shapes are the real base's (the default base, SmolLM2-135M: 30 layers x q, k, v, o = 120 positions
of width 576, LoRA r=8). Keys are real-sized, distinct and synthetic: per position a shared mean
plus a sharer's own offset in a 16-dimensional subspace plus isotropic noise, sized like real
activation keys (offsets about a sixth of the key's norm). Pieces share storage: the first 10
sharers have their own random fp32 pieces, and sharer i's manifest row points at sharer i mod 10's
file (a pool of 100,000 distinct 4.7 MB sharer files would take 470 GB). The key indexes are
written from the synthetic keys: the exhaustive one up to 10,000 sharers (at 100,000 it would be a
27 GB file), the approximate one at every size, with its top-3 recall against exhaustive scoring of
the same keys, measured on new users' keys drawn like the sharers' (by nprobe, and by how many of the
codes' best are re-scored). Assembly is timed with the exhaustive index up to 10,000 sharers and with the
approximate one from 1,000 on, with the seconds spent finding pieces (scoring keys or searching the index)
and reading the chosen pieces; the rest is the forward pass.

Each size's peak RSS is measured in a fresh process: load the base, one plain forward over the
history (the "model" memory), open the pool, assemble `--repeats` times, the first time with the
approximate index's files dropped from the page cache (a cold start). Time is measured
alternately in one process (every pool opened, one model, pool sizes in turn; the machine drifts
between processes). Pools go to `--work` (outside the repository) and are deleted at the end unless
`--keep`; every step's result is saved in OUT.partial.json, so a stopped run resumes where it stopped.

    python benchmarks/pool_scale.py --sharers 10 1000 10000 100000 --out benchmarks/results/pool-scale.json
"""

import argparse
import json
import math
import os
import random
import resource
import shutil
import sqlite3
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from perpcs.annindex import LARGE_POOL, RERANK, ApproximateIndex, build, index_path
from perpcs.assembly import Assembler
from perpcs.data import Item
from perpcs.keyindex import KeyIndex
from perpcs.models import load_base, prepare_base
from perpcs.pool import Pool
from perpcs.settings import AssemblySettings, LoraSettings
from perpcs.tasks import Task
from perpcs.training import collate, history_examples
from perpcs.utils import dir_bytes, read_json, write_json

TASK = Task(name="scale", kind="classification", labels=["yes", "no"], instruction="Does this user like it?")
FILES, RANK, QUERIES = 10, 16, 20
EXACT_UP_TO = 10_000  # the exhaustive index of 100,000 sharers would be a 27 GB file


def positions(config) -> dict[str, tuple[int, int]]:
    """position -> (d_in, d_out) of q, k, v, o in every layer, from the model's config."""
    d, kv = config.hidden_size, config.num_key_value_heads * (config.hidden_size // config.num_attention_heads)
    shapes = {"q_proj": (d, d), "k_proj": (d, kv), "v_proj": (d, kv), "o_proj": (d, d)}
    return {f"model.layers.{i}.self_attn.{m}": s for i in range(config.num_hidden_layers) for m, s in shapes.items()}


def synthetic_keys(n: int, d: int, position: int, seed: int, new_users: int = 0) -> torch.Tensor:
    """n sharers' keys at one position [n, d] (and after them `new_users` more, drawn alike)."""
    g = torch.Generator().manual_seed(seed * 100_003 + position)
    mean, basis = 1 + torch.randn(d, generator=g), torch.randn(RANK, d, generator=g) / math.sqrt(RANK)
    m = n + new_users
    offsets = torch.randn(m, RANK, generator=g) @ basis
    return mean + 0.16 * (offsets + 0.3 * torch.randn(m, d, generator=g))


def make_pool(folder: Path, n: int, shapes: dict[str, tuple[int, int]], seed: int) -> None:
    """A pool of n sharers whose pieces share 10 files (see the module docstring)."""
    lora = LoraSettings()
    pool = Pool.create(folder, "random", lora.model_dump(), shapes, seed=seed, key="activation")
    g = torch.Generator().manual_seed(seed)
    for i in range(min(n, FILES)):
        pool.add_sharer(f"user{i}", {p: (0.01 * torch.randn(lora.r, d_in, generator=g),
                                         0.01 * torch.randn(d_out, lora.r, generator=g),
                                         torch.zeros(d_in)) for p, (d_in, d_out) in shapes.items()})
    pool.close()
    db = sqlite3.connect(folder / "pool.sqlite")
    with db:
        files = db.execute("SELECT file, sha256, nbytes FROM sharers ORDER BY idx").fetchall()
        db.executemany("INSERT INTO sharers (id, file, sha256, nbytes) VALUES (?, ?, ?, ?)",
                       ((f"x{i:09d}", *files[i % FILES]) for i in range(FILES, n)))
        db.execute("INSERT INTO shares SELECT p.idx, s.idx FROM positions p, sharers s WHERE s.id LIKE 'x%'")
    db.close()


def build_indexes(folder: Path, seed: int) -> dict:
    """The key index the pool uses, and the approximate one with its top-3 recall; seconds and bytes."""
    pool = Pool.open(folder, verify=False)
    n, sharers, d = len(pool), pool.sharers(), pool.shapes[pool.positions[0]][0]
    out: dict = {}
    if n <= EXACT_UP_TO:
        t0 = time.perf_counter()
        keys = {pos: (list(range(n)), synthetic_keys(n, d, i, seed)) for i, pos in enumerate(pool.positions)}
        KeyIndex.write(KeyIndex.path_of(pool), sharers, {p: s[0] for p, s in pool.shapes.items()}, keys)
        out["exact_index"] = {"seconds": time.perf_counter() - t0, "bytes": KeyIndex.path_of(pool).stat().st_size}
        del keys
    exact_top: dict[str, list[set[str]]] = {}
    queries: dict[str, torch.Tensor] = {}

    def keys_at(pos: str):
        i = pool.positions.index(pos)
        everyone = synthetic_keys(n, d, i, seed, QUERIES)
        keys, queries[pos] = everyone[:n], everyone[n:].clone()  # a view would keep all n keys alive
        c = keys.mean(0)
        scores = F.normalize(queries[pos] - c, dim=-1) @ F.normalize(keys - c, dim=-1).T  # sqrt(d) cos, unscaled
        exact_top[pos] = [{sharers[j] for j in row} for row in torch.topk(scores, min(3, n), dim=1).indices.tolist()]
        return list(range(n)), keys

    t0 = time.perf_counter()
    folder_ann = build(index_path(pool), sharers, "activation", pool.positions, keys_at, seed)
    nprobe = AssemblySettings().nprobe
    out["approximate_index"] = {"seconds": time.perf_counter() - t0, "bytes": dir_bytes(folder_ann),
                                "code_bytes": ApproximateIndex(folder_ann, nprobe).code_bytes()}

    def recall(nprobe: int, rerank: int) -> float:
        index, hits = ApproximateIndex(folder_ann, nprobe, rerank), 0
        for pos, rows in exact_top.items():
            hits += sum(len(set(index.search(pos, q, 3)[0]) & want) for q, want in zip(queries[pos], rows))
        return hits / sum(len(w) for rows in exact_top.values() for w in rows)

    out["approximate_index"]["recall_at_3"] = {p: recall(p, RERANK) for p in sorted({nprobe, 16, 32})}
    out["approximate_index"]["recall_at_3_by_rerank"] = {r: recall(nprobe, r) for r in (RERANK // 2, 2 * RERANK)}
    out["approximate_index"]["queries"] = QUERIES * len(exact_top)  # resumed builds check the positions they built
    pool.close()
    return out


def history(n: int, seed: int) -> list[Item]:
    rng = random.Random(seed)
    words = "film book song night city river light story game road garden music winter".split()
    return [Item(input=" ".join(rng.choice(words) for _ in range(30)), output=rng.choice(TASK.labels))
            for _ in range(n)]


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KB on Linux


def timed(obj, name: str, into: list[float]) -> None:
    """Wrap the method `name` of `obj` so that the seconds of its calls add up in into[-1]."""
    method = getattr(obj, name)

    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return method(*args, **kwargs)
        finally:
            into[-1] += time.perf_counter() - t0
    setattr(obj, name, wrapper)


def evict(folder: Path) -> None:
    """Drop the files under `folder` from the page cache (written back first), as if read for the first time."""
    for f in folder.rglob("*"):
        if f.is_file():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fdatasync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def measure(pool_dir: Path, items: int, repeats: int, seed: int, key_index: str) -> dict:
    """In this (fresh) process: load the base, open the pool, assemble one synthetic target `repeats` times,
    the first with the approximate index's files out of the page cache (a cold start)."""
    model, tok = load_base(prepare_base())
    with torch.no_grad():  # the model's own footprint: weights paged in (memory-mapped) and one plain forward
        batch = collate(history_examples(TASK, tok, history(items, seed)), tok.pad_token_id)
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    model_mb = rss_mb()
    t0 = time.perf_counter()
    pool = Pool.open(pool_dir, verify=False)  # shared files: hashing them 100,000 times says nothing
    open_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    assembler = Assembler(model, pool, AssemblySettings(key_index=key_index), seed=seed)
    index_seconds = time.perf_counter() - t0
    if assembler.approximate:
        evict(index_path(pool))
    seconds, find, read = [], [], []
    timed(assembler, "_scores", find)
    timed(pool, "piece", read)
    for r in range(repeats):
        find.append(0.0)
        read.append(0.0)
        t0 = time.perf_counter()
        assembler.recipe(TASK, tok, history(items, seed + r))
        seconds.append(time.perf_counter() - t0)
    return {"sharers": len(pool), "approximate": assembler.approximate, "open_seconds": open_seconds,
            "index_seconds": index_seconds, "assembly_seconds": seconds, "find_seconds": find, "read_seconds": read,
            "model_rss_mb": model_mb,
            "peak_rss_mb": rss_mb(), "rss_over_model_mb": rss_mb() - model_mb}


def alternate(runs: list[tuple[Path, str]], items: int, repeats: int, seed: int) -> list[dict[str, list[float]]]:
    """In one process, on one model: assembly seconds from each (pool, key_index) in turn, `repeats` rounds,
    with the seconds spent finding pieces (scoring keys, or searching the index) and reading the chosen
    ones; the rest is the forward pass and mixing."""
    model, tok = load_base(prepare_base())
    pools = [(Pool.open(d, verify=False), key_index) for d, key_index in runs]
    out = [{"seconds": [], "find_seconds": [], "read_seconds": []} for _ in pools]
    for r in tqdm(range(repeats), desc="alternating rounds"):
        for (pool, key_index), o in zip(pools, out):
            assembler = Assembler(model, pool, AssemblySettings(key_index=key_index), seed=seed)
            o["find_seconds"].append(0.0)
            o["read_seconds"].append(0.0)
            timed(assembler, "_scores", o["find_seconds"])
            timed(pool, "piece", o["read_seconds"])
            t0 = time.perf_counter()
            assembler.recipe(TASK, tok, history(items, seed + r))
            o["seconds"].append(time.perf_counter() - t0)
            del pool.piece  # the wrapper, an instance attribute
            model = assembler.unload()
    return out


def step(state: dict, partial: Path, key: str, fn):
    """fn() once: its result is saved in `partial` and found there by a resumed run."""
    if key not in state:
        state[key] = fn()
        write_json(partial, state)
    return state[key]


def in_process(*args: str) -> dict | list:
    proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(a: argparse.Namespace) -> None:
    model, _ = load_base(prepare_base())
    shapes = positions(model.config)
    del model
    partial = a.out.with_suffix(".partial.json")
    state = read_json(partial) if partial.exists() else {}
    common = ["--items", str(a.items), "--seed", str(a.seed)]
    pools = {n: a.work / f"pool-{n}" for n in a.sharers}
    for n in a.sharers:
        if f"{n}/pool" not in state:
            shutil.rmtree(pools[n], ignore_errors=True)
        t0 = time.perf_counter()
        step(state, partial, f"{n}/pool", lambda: (make_pool(pools[n], n, shapes, a.seed),
                                                   {"seconds": time.perf_counter() - t0,
                                                    "bytes": dir_bytes(pools[n])})[1])
        step(state, partial, f"{n}/indexes", lambda: build_indexes(pools[n], a.seed))
        print(f"{n} sharers: {json.dumps(state[f'{n}/indexes'])}", file=sys.stderr)
    if a.until == "build":
        return
    runs = [(n, "exact") for n in a.sharers if n <= EXACT_UP_TO] + [(n, "approximate") for n in a.sharers if n >= 1000]
    for n, key_index in runs:
        step(state, partial, f"{n}/{key_index}/measure",
             lambda: in_process("--measure", str(pools[n]), "--key-index", key_index, "--repeats", str(a.repeats),
                                *common))
    if a.until == "measure":
        return
    alternating = step(state, partial, "alternating", lambda: in_process(
        "--alternate", *[f"{pools[n]}={k}" for n, k in runs], "--repeats", str(2 * a.repeats), *common))
    result = {"positions": len(shapes), "lora_r": LoraSettings().r, "history_items": a.items, "repeats": a.repeats,
              "torch_threads": torch.get_num_threads(), "large_pool": LARGE_POOL, "nprobe": AssemblySettings().nprobe,
              "rerank": RERANK,
              "indexes": {n: {"pool": state[f"{n}/pool"], **state[f"{n}/indexes"]} for n in a.sharers}, "runs": []}
    for (n, key_index), times in zip(runs, alternating):
        m, seconds = state[f"{n}/{key_index}/measure"], times["seconds"]
        result["runs"].append({"sharers": n, "key_index": key_index, "default": (n >= LARGE_POOL) == m["approximate"],
                               "alternating_seconds": seconds, "alternating_median_seconds": statistics.median(seconds),
                               "find_median_seconds": statistics.median(times["find_seconds"]),
                               "read_median_seconds": statistics.median(times["read_seconds"]),
                               "own_process_seconds": min(m["assembly_seconds"]),
                               "own_process_first_seconds": m["assembly_seconds"][0],
                               "own_process_first_find_seconds": m["find_seconds"][0], "peak_rss_mb": m["peak_rss_mb"],
                               "model_rss_mb": m["model_rss_mb"], "rss_over_model_mb": m["rss_over_model_mb"],
                               "assembler_open_seconds": m["index_seconds"]})
    default = {r["sharers"]: r for r in result["runs"] if r["default"]}
    lo, hi = default[min(default)], default[max(default)]
    result["time_growth"] = hi["alternating_median_seconds"] / lo["alternating_median_seconds"]
    write_json(a.out, result)
    plot(result, a.out.with_suffix(".png"))
    for r in result["runs"]:
        print(f"{r['sharers']:>6} sharers, {r['key_index']} index{' (the default)' if r['default'] else ''}: assembly "
              f"{r['alternating_median_seconds']:.2f} s (alternating; finding pieces {r['find_median_seconds']:.2f} s, "
              f"reading them {r['read_median_seconds']:.2f} s), peak RSS +{r['rss_over_model_mb']:.0f} MB over "
              "the model")
    for n, ix in result["indexes"].items():
        ann = ix["approximate_index"]
        print(f"{n:>6} sharers: approximate index {ann['seconds']:.0f} s to build, {ann['bytes'] / 1e6:.0f} MB "
              f"({ann['code_bytes'] / 1e6:.0f} MB of codes), top-3 recall by nprobe {ann['recall_at_3']}, by rerank "
              f"{ann['recall_at_3_by_rerank']}")
    print(f"time growth {min(default)} -> {max(default)} sharers, default index: {result['time_growth']:.2f}x "
          f"(alternating); wrote {a.out} and {a.out.with_suffix('.png')}")
    if not a.keep:
        for folder in pools.values():
            shutil.rmtree(folder, ignore_errors=True)


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b, c) = plt.subplots(1, 3, figsize=(13, 3.6))
    for key_index, style in (("exact", "o-"), ("approximate", "s--")):
        runs = [r for r in result["runs"] if r["key_index"] == key_index]
        label = f"{key_index} index"
        a.plot([r["sharers"] for r in runs], [r["alternating_median_seconds"] for r in runs], style, label=label)
        a.plot([r["sharers"] for r in runs], [r["find_median_seconds"] for r in runs], style[0] + ":",
               label=f"{label}: finding pieces", alpha=0.6)
        b.plot([r["sharers"] for r in runs], [r["rss_over_model_mb"] for r in runs], style, label=label)
    a.set(xscale="log", xlabel="sharers", ylabel="assembly seconds (one target, alternating)", ylim=(0, None))
    b.set(xscale="log", xlabel="sharers", ylabel="peak RSS over the model (MB)", ylim=(0, None))
    a.legend(fontsize=8)
    b.legend(fontsize=8)
    sizes = [int(n) for n in result["indexes"]]
    for nprobe in next(iter(result["indexes"].values()))["approximate_index"]["recall_at_3"]:
        c.plot(sizes, [ix["approximate_index"]["recall_at_3"][nprobe] for ix in result["indexes"].values()], "o-",
               label=f"nprobe {nprobe}, rerank {result['rerank']}")
    for rerank in next(iter(result["indexes"].values()))["approximate_index"]["recall_at_3_by_rerank"]:
        c.plot(sizes, [ix["approximate_index"]["recall_at_3_by_rerank"][rerank] for ix in result["indexes"].values()],
               "x--", label=f"nprobe {result['nprobe']}, rerank {rerank}")
    c.axhline(0.99, color="grey", lw=0.8, ls=":")
    c.set(xscale="log", xlabel="sharers", ylabel="approximate top-3 recall vs exhaustive", ylim=(0.8, 1.005))
    c.legend(fontsize=8)
    fig.suptitle(f"Assembly vs pool size ({result['positions']} positions, r={result['lora_r']}, "
                 f"{result['history_items']} history items; approximate index from {result['large_pool']} sharers)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sharers", type=int, nargs="+", default=[10, 1000, 10000, 100000])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/pool-scale.json"))
    ap.add_argument("--work", type=Path, default=Path("/tmp/perpcs-pool-scale"), help="where the pools are built")
    ap.add_argument("--keep", action="store_true", help="keep the pools (they take up to tens of GB)")
    ap.add_argument("--until", choices=["build", "measure", "all"], default="all",
                    help="stop after building pools and indexes, or after the per-size processes (resume later)")
    ap.add_argument("--items", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--key-index", default="exact", help=argparse.SUPPRESS)
    ap.add_argument("--measure", type=Path, help=argparse.SUPPRESS)  # internal: one measurement, in a fresh process
    ap.add_argument("--alternate", nargs="+", help=argparse.SUPPRESS)  # internal: POOL=KEY_INDEX ..., in turn
    a = ap.parse_args()
    torch.set_num_threads(1)
    if a.alternate:
        print(json.dumps(alternate([(Path(s.rsplit("=", 1)[0]), s.rsplit("=", 1)[1]) for s in a.alternate],
                                   a.items, a.repeats, a.seed)))
    elif a.measure:
        print(json.dumps(measure(a.measure, a.items, a.repeats, a.seed, a.key_index)))
    else:
        main(a)
