"""How much history must assembly read? Per-Pcs quality against the history budget (newest items first).

For each pool given and each budget (`assembly.recent_k`; `all` = the whole history), assembles every
target of the run with the run's other settings, answers the targets' queries greedily and scores
each query with the task's primary metric. The 95% CI of full-history assembly comes from a
bootstrap over queries (scipy.stats.bootstrap, percentile); the chosen budget is the smallest whose mean
lies inside it. The paired difference to full history (same queries) is bootstrapped too.
Nothing is written inside the runs read: each pool is copied to OUT/pools/NAME (its key index is
written there). Usage:

    python benchmarks/history_budget.py --pool gate=/work/runs/demo0/run \\
        --pool act-cat=/work/runs/cost/act-cat/run --budgets 4 8 16 32 all --costs 2 \\
        --out /work/runs/cost/budget --results benchmarks/results/history-budget.json

With `--costs N`, OPPU training and assembly at the chosen budget are then timed alternately for the
first N targets (perpcs.costs), with the OPPU adapter and recipe sizes.
"""

import argparse
import shutil
import time
from pathlib import Path

import numpy as np
from scipy.stats import bootstrap
from tqdm.auto import tqdm

from perpcs.assembly import Assembler
from perpcs.costs import alternating_costs
from perpcs.evaluation import primary_metric, score
from perpcs.generation import generate
from perpcs.pipeline import Run
from perpcs.pool import Pool
from perpcs.recipe import apply_recipe
from perpcs.retrieval import prompts
from perpcs.utils import write_json


def copied_pool(run: Run, folder: Path) -> Pool:
    """A copy of the run's pool in `folder`, so that files written beside it (the key index) land there.
    A copy, not links: a pool refuses sharer files that resolve outside its folder."""
    if not folder.exists():
        folder.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(run.pool_path, folder, ignore=shutil.ignore_patterns("keys-*"))
    return Pool.open(folder, run.merged_fingerprint, run.config.lora.model_dump())


def per_query(run: Run, pool: Pool, budget: int) -> tuple[dict[str, float], list[float]]:
    """{query id: primary metric} of Per-Pcs with history budget `budget`, and assembly seconds per target."""
    model, tok = run.merged
    task = run.data.task
    metric, _ = primary_metric(task)
    targets = run.users(run.split["targets"])
    assembler = Assembler.for_run(model, pool, run.config, run.config.assembly.model_copy(update={"recent_k": budget}))
    recipes, seconds = {}, []
    for user in targets:
        t0 = time.perf_counter()
        recipes[user.user_id] = assembler.recipe(task, tok, user.history, user.profile, user=user.user_id)
        seconds.append(time.perf_counter() - t0)
    model = assembler.unload()
    values = {}
    for user in targets:
        peft_model = apply_recipe(model, recipes[user.user_id], pool)
        texts = generate(peft_model, tok, prompts(task, user, 0), task.new_tokens)
        model = peft_model.unload()
        for q, t in zip(user.queries, texts):
            values[q.id] = score(task, {q.id: q.output}, {q.id: task.parse_output(t)})[metric]
    return values, seconds


def ci(values: np.ndarray, seed: int) -> tuple[float, float]:
    r = bootstrap((values,), np.mean, confidence_level=0.95, n_resamples=9999, method="percentile",
                  random_state=np.random.default_rng(seed))
    return float(r.confidence_interval.low), float(r.confidence_interval.high)


def paired_ci(a: np.ndarray, b: np.ndarray, seed: int) -> tuple[float, float]:
    r = bootstrap((a, b), lambda x, y: np.mean(x) - np.mean(y), paired=True, confidence_level=0.95,
                  n_resamples=9999, method="percentile", random_state=np.random.default_rng(seed))
    return float(r.confidence_interval.low), float(r.confidence_interval.high)


def main(pools: dict[str, str], budgets: list[str], out: Path, results: Path, seed: int, costs: int) -> None:
    report = {"budgets": budgets, "seed": seed, "pools": {}}
    for name, folder in pools.items():
        run = Run(folder)
        pool = copied_pool(run, out / "pools" / name)
        longest = max(len(u.history) for u in run.users(run.split["targets"]))
        rows = {}
        for b in tqdm(budgets, desc=f"{name}: budgets"):
            values, seconds = per_query(run, pool, longest if b == "all" else int(b))
            rows[b] = {"values": values, "assembly_seconds": seconds}
        full = np.array(list(rows["all"]["values"].values()))
        lo, hi = ci(full, seed)
        chosen = None
        for b in budgets:
            v = np.array([rows[b]["values"][q] for q in rows["all"]["values"]])
            rows[b].update(mean=float(v.mean()), n=len(v), inside_full_ci=bool(lo <= v.mean() <= hi),
                           diff_to_full_ci=paired_ci(v, full, seed) if b != "all" else (0.0, 0.0),
                           mean_assembly_seconds=float(np.mean(rows[b]["assembly_seconds"])))
            if chosen is None and rows[b]["inside_full_ci"]:
                chosen = b
        report["pools"][name] = {"run": str(folder), "config": run.config.model_dump(), "full_ci": (lo, hi),
                                 "metric": primary_metric(run.data.task)[0], "chosen": chosen, "budgets": rows}
        if costs:  # OPPU vs assembly at the chosen budget, alternately in this process (perpcs.costs)
            settings = run.config.assembly.model_copy(update={"recent_k": longest if chosen == "all" else int(chosen)})
            report["pools"][name]["alternating_costs"] = alternating_costs(run, run.split["targets"][:costs], pool,
                                                                           settings)
        a = report["pools"][name].get("alternating_costs")
        print(f"{name}: full history {rows['all']['mean']:.3f} (95% CI {lo:.3f}-{hi:.3f}, {len(full)} queries); "
              + "; ".join(f"{b}: {rows[b]['mean']:.3f} ({rows[b]['mean_assembly_seconds']:.1f} s/target)"
                          for b in budgets)
              + f"; smallest inside: {chosen}"
              + (f"; at {chosen}: OPPU / assembly {a['time_ratio']['median']:.1f}x (median of {len(a['users'])}, "
                 f"{a['time_ratio']['min']:.1f}-{a['time_ratio']['max']:.1f}), adapter / recipe "
                 f"{a['storage_ratio']['median']:.0f}x" if a else ""), flush=True)
        write_json(results, report)  # after each pool: a later failure keeps what was measured
    plot(report, results.with_suffix(".png"))
    print(f"wrote {results} and {results.with_suffix('.png')}")


def plot(report: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    labels = report["budgets"]
    for name, p in report["pools"].items():
        line = ax.plot(labels, [p["budgets"][b]["mean"] for b in labels], "o-", label=name)[0]
        ax.axhspan(*p["full_ci"], color=line.get_color(), alpha=0.15)
    ax.set(xlabel="history budget (newest items)", ylabel=next(iter(report["pools"].values()))["metric"],
           title="Per-Pcs vs history budget (band: 95% CI of full history)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pool", action="append", required=True, help="NAME=RUN_FOLDER (repeat)")
    ap.add_argument("--budgets", nargs="+", default=["4", "8", "16", "32", "all"])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--results", type=Path, default=Path("benchmarks/results/history-budget.json"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--costs", type=int, default=0,
                    help="also time OPPU vs assembly at the chosen budget for N targets")
    a = ap.parse_args()
    if "all" not in a.budgets:
        ap.error("--budgets must include 'all' (the full history the others are compared with)")
    main(dict(p.split("=", 1) for p in a.pool), a.budgets, a.out, a.results, a.seed, a.costs)
