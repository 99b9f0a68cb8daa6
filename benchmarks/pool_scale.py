"""Does assembly stay flat as the pool grows? Time and peak memory of assembling one target from pools
of 10, 100, 1000 sharers.

Pieces and keys are random, of the real base's shapes (the default base, SmolLM2-135M: 30 layers x
q, k, v, o = 120 positions, LoRA r=8, fp32 as sharers store them): this measures time and memory,
not quality. Each pool is built in a temporary folder; each measurement runs in a fresh process
(so its peak RSS is its own), loads the base and runs one plain forward over the history (the
"model" memory: weights paged in, one forward's working memory), opens the pool (sha256 of every sharer file, as
`Run.open_pool` does), makes the Assembler (which builds the pool's key index on first use, once
per pool), then assembles a synthetic target of `--items` history items `--repeats` times. The
processes run in rounds over the pool sizes. Time is also measured alternately in one process (all
pools opened, one model, pool sizes in turn): the machine drifts between processes, and the time
growth reported is this alternating one.

    python benchmarks/pool_scale.py --sharers 10 100 1000 --out benchmarks/results/pool-scale.json
"""

import argparse
import json
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from perpcs.assembly import Assembler
from perpcs.data import Item
from perpcs.models import load_base, prepare_base
from perpcs.pool import Pool
from perpcs.settings import AssemblySettings, LoraSettings
from perpcs.tasks import Task
from perpcs.training import collate, history_examples
from perpcs.utils import write_json

TASK = Task(name="scale", kind="classification", labels=["yes", "no"], instruction="Does this user like it?")


def positions(config) -> dict[str, tuple[int, int]]:
    """position -> (d_in, d_out) of q, k, v, o in every layer, from the model's config."""
    d, kv = config.hidden_size, config.num_key_value_heads * (config.hidden_size // config.num_attention_heads)
    shapes = {"q_proj": (d, d), "k_proj": (d, kv), "v_proj": (d, kv), "o_proj": (d, d)}
    return {f"model.layers.{i}.self_attn.{m}": s for i in range(config.num_hidden_layers) for m, s in shapes.items()}


def build(folder: Path, n: int, shapes: dict[str, tuple[int, int]], seed: int) -> float:
    """A pool of `n` sharers with random pieces and gate keys; returns the seconds it took."""
    t0 = time.perf_counter()
    lora = LoraSettings()
    pool = Pool.create(folder, "random", lora.model_dump(), shapes, seed=seed)
    g = torch.Generator().manual_seed(seed)
    for i in tqdm(range(n), desc=f"pool of {n}"):
        pool.add_sharer(f"user{i}", {p: (0.01 * torch.randn(lora.r, d_in, generator=g),
                                         0.01 * torch.randn(d_out, lora.r, generator=g),
                                         torch.randn(d_in, generator=g)) for p, (d_in, d_out) in shapes.items()})
    pool.close()
    return time.perf_counter() - t0


def history(n: int, seed: int) -> list[Item]:
    rng = random.Random(seed)
    words = "film book song night city river light story game road garden music winter".split()
    return [Item(input=" ".join(rng.choice(words) for _ in range(30)), output=rng.choice(TASK.labels))
            for _ in range(n)]


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KB on Linux


def rss_now_mb() -> dict[str, float]:
    """Resident memory now, anonymous (tensors) and file-backed (memory maps), from /proc (Linux)."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return {k: int(fields[k].split()[0]) / 1024 for k in ("RssAnon", "RssFile") if k in fields}


def measure(pool_dir: Path, items: int, repeats: int, seed: int) -> dict:
    """In this (fresh) process: load the base, open the pool, assemble one synthetic target `repeats` times."""
    model, tok = load_base(prepare_base())
    with torch.no_grad():  # the model's own footprint: weights paged in (memory-mapped) and one plain forward
        batch = collate(history_examples(TASK, tok, history(items, seed)), tok.pad_token_id)
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    model_mb = rss_mb()
    t0 = time.perf_counter()
    pool = Pool.open(pool_dir)
    open_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    assembler = Assembler(model, pool, AssemblySettings(), seed=seed)
    index_seconds = time.perf_counter() - t0
    seconds = []
    for r in range(repeats):
        t0 = time.perf_counter()
        assembler.recipe(TASK, tok, history(items, seed + r))
        seconds.append(time.perf_counter() - t0)
    return {"sharers": len(pool), "open_seconds": open_seconds, "index_seconds": index_seconds,
            "assembly_seconds": seconds, "model_rss_mb": model_mb, "peak_rss_mb": rss_mb(),
            "rss_at_end_mb": rss_now_mb()}


def alternate(pool_dirs: list[Path], items: int, repeats: int, seed: int) -> list[list[float]]:
    """In one process, on one model: assembly seconds from each pool in turn, `repeats` rounds (the
    machine drifts between processes; within one, every pool size sees the same drift)."""
    model, tok = load_base(prepare_base())
    pools = [Pool.open(d) for d in pool_dirs]
    seconds: list[list[float]] = [[] for _ in pools]
    for r in range(repeats):
        for i, pool in enumerate(pools):
            assembler = Assembler(model, pool, AssemblySettings(), seed=seed)
            t0 = time.perf_counter()
            assembler.recipe(TASK, tok, history(items, seed + r))
            seconds[i].append(time.perf_counter() - t0)
            model = assembler.unload()
    return seconds


def main(sizes: list[int], out: Path, items: int, repeats: int, rounds: int, seed: int) -> None:
    model, _ = load_base(prepare_base())
    shapes = positions(model.config)
    del model
    result = {"positions": len(shapes), "lora_r": LoraSettings().r, "history_items": items, "repeats": repeats,
              "torch_threads": torch.get_num_threads(), "sizes": {}}
    with tempfile.TemporaryDirectory(prefix="pool-scale-") as tmp:
        pools = {}
        for n in sizes:
            pools[n] = Path(tmp) / f"pool-{n}"
            result["sizes"][n] = {"build_seconds": build(pools[n], n, shapes, seed), "runs": []}
            result["sizes"][n]["pool_bytes"] = sum(f.stat().st_size for f in pools[n].rglob("*") if f.is_file())
        for _ in tqdm(range(rounds), desc="rounds over pool sizes"):
            for n in sizes:
                proc = subprocess.run([sys.executable, __file__, "--measure", str(pools[n]), "--items", str(items),
                                       "--repeats", str(repeats), "--seed", str(seed)],
                                      capture_output=True, text=True, check=True)
                result["sizes"][n]["runs"].append(json.loads(proc.stdout.strip().splitlines()[-1]))
        proc = subprocess.run([sys.executable, __file__, "--alternate", *map(str, pools.values()),
                               "--items", str(items), "--repeats", str(2 * repeats), "--seed", str(seed)],
                              capture_output=True, text=True, check=True)
        for n, seconds in zip(sizes, json.loads(proc.stdout.strip().splitlines()[-1])):
            result["sizes"][n]["alternating_seconds"] = seconds
    for n, s in result["sizes"].items():
        runs = s["runs"]
        s["alternating_median_seconds"] = statistics.median(s["alternating_seconds"])
        s["assembly_seconds"] = statistics.median(min(r["assembly_seconds"]) for r in runs)
        s["peak_rss_mb"] = max(r["peak_rss_mb"] for r in runs)
        s["model_rss_mb"] = min(r["model_rss_mb"] for r in runs)
        s["rss_over_model_mb"] = max(r["peak_rss_mb"] - r["model_rss_mb"] for r in runs)
    lo, hi = result["sizes"][min(sizes)], result["sizes"][max(sizes)]
    result["time_growth"] = hi["alternating_median_seconds"] / lo["alternating_median_seconds"]
    result["time_growth_separate_processes"] = hi["assembly_seconds"] / lo["assembly_seconds"]
    write_json(out, result)
    plot(result, out.with_suffix(".png"))
    for n, s in result["sizes"].items():
        print(f"{n:>6} sharers: assembly {s['alternating_median_seconds']:.2f} s (alternating in one process; "
              f"{s['assembly_seconds']:.2f} s in its own), peak RSS {s['peak_rss_mb']:.0f} MB "
              f"(model {s['model_rss_mb']:.0f} MB, +{s['rss_over_model_mb']:.0f} MB), key index "
              f"{statistics.median(r['index_seconds'] for r in s['runs']):.2f} s once per pool")
    print(f"time growth {min(sizes)} -> {max(sizes)} sharers: {result['time_growth']:.2f}x (alternating; "
          f"{result['time_growth_separate_processes']:.2f}x across processes); wrote {out} and "
          f"{out.with_suffix('.png')}")


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = [int(n) for n in result["sizes"]]
    s = list(result["sizes"].values())
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.5))
    a.plot(sizes, [x["alternating_median_seconds"] for x in s], "o-", label="alternating, one process")
    a.plot(sizes, [x["assembly_seconds"] for x in s], "s--", label="each size in its own process")
    a.legend()
    a.set(xscale="log", xlabel="sharers in the pool", ylabel="assembly seconds (one target)", ylim=(0, None))
    b.plot(sizes, [x["peak_rss_mb"] for x in s], "o-", label="peak RSS")
    b.plot(sizes, [x["model_rss_mb"] for x in s], "s--", label="after loading the model")
    b.set(xscale="log", xlabel="sharers in the pool", ylabel="MB", ylim=(0, None))
    b.legend()
    fig.suptitle(f"Assembly vs pool size ({result['positions']} positions, r={result['lora_r']}, "
                 f"{result['history_items']} history items)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sharers", type=int, nargs="+", default=[10, 100, 1000])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/pool-scale.json"))
    ap.add_argument("--items", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--measure", type=Path, help=argparse.SUPPRESS)  # internal: one measurement, in a fresh process
    ap.add_argument("--alternate", type=Path, nargs="+", help=argparse.SUPPRESS)  # internal: time, pools in turn
    a = ap.parse_args()
    if a.alternate:
        print(json.dumps(alternate(a.alternate, a.items, a.repeats, a.seed)))
    elif a.measure:
        print(json.dumps(measure(a.measure, a.items, a.repeats, a.seed)))
    else:
        main(a.sharers, a.out, a.items, a.repeats, a.rounds, a.seed)
