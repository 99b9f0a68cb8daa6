"""Which selection rule should be the default? Per-query paired evidence on a finished run, no new LoRA.

From SRC (a run folder whose steps 0-2 are done, e.g. `perpcs pipeline ... --run SRC` or a bench's
OUT/run), every rule is derived with `Run.derive` (same task model, same sharer LoRAs) into
OUT/<rule>/run and scored on the same users: the run's targets and every sharer candidate that
was not selected as a sharer (neither trained the task model nor is in the pool), so one set of
sharers gives many more scored queries than its targets alone. Methods: non_personalized,
peft_retrieval and Per-Pcs under each rule (default: the paper's, activation keys + exact mix,
and the same with the strength chosen per target on held-out history items).

Per method: mean primary metric with a 95% bootstrap CI; per pair: queries better / worse / tied,
a two-sided sign test (scipy.stats.binomtest) and a 95% paired bootstrap CI of the mean difference.
Writes OUT/rule-probe.json and OUT/rule-probe.md.

    python benchmarks/rule_probe.py SRC_RUN OUT [--rule NAME:KEY=VALUE,...] [--max-users N]
"""

import argparse
import shutil
import statistics
import time
from pathlib import Path

import numpy as np
from scipy.stats import binomtest, bootstrap
from tqdm.auto import tqdm

from perpcs.bench import Bench
from perpcs.evaluation import primary_metric, score
from perpcs.generation import generate
from perpcs.overrides import parse_variants
from perpcs.pipeline import Run
from perpcs.retrieval import prompts
from perpcs.rules import PAPER_RULE
from perpcs.selection import history_embeddings
from perpcs.settings import BenchSettings
from perpcs.utils import write_json, write_text

RULES = {  # in the order they run (results are written after each)
    "act-cat-auto": {"key": "activation", "assembly": {"mix": "cat", "strength": "auto"}},
    "act-cat": {"key": "activation", "assembly": {"mix": "cat", "strength": 1.0}},
    "paper": PAPER_RULE,
}


def derive_rule(src: Run, folder: Path, overrides: dict, donors: list[Run]) -> Run:
    """`src` derived with `overrides`; a pool built with the same key by an earlier rule is copied
    (with the sharers' step-3 stats), so that only assembly runs again."""
    run = src.derive(folder, src.config.updated(overrides))
    donor = next((d for d in donors if d.config.key == run.config.key and (d.pool_path / "pool.sqlite").exists()), None)
    if donor and not run.pool_path.exists():
        shutil.copytree(donor.pool_path, run.pool_path)
        for sel in run.select():
            shutil.copy(donor.sharer_dir(sel.user_id) / "stats.json", run.sharer_dir(sel.user_id) / "stats.json")
    run.build_pool()
    return run


def predictions(bench: Bench, method: str, users) -> tuple[dict[str, str], list[float]]:
    preds, seconds = {}, []
    for user in tqdm(users, desc=f"probe: {method}"):
        with bench.personalize(method, user) as p:
            texts = generate(p.model, bench.tok, prompts(bench.task, user, p.rag_k), bench.task.new_tokens,
                             bench.settings.gen_batch_size)
        preds.update({q.id: bench.task.parse_output(t) for q, t in zip(user.queries, texts)})
        seconds.append(p.seconds)
    return preds, seconds


def per_query(task, golds: dict[str, str], preds: dict[str, str]) -> np.ndarray:
    """The primary metric of each query on its own, signed so that higher is better."""
    name, higher = primary_metric(task)
    values = [score(task, {q: g}, {q: preds[q]})[name] for q, g in golds.items()]
    return np.array(values) * (1 if higher else -1)


def ci(values: np.ndarray, seed: int) -> list[float]:
    if np.ptp(values) == 0:
        return [float(values[0])] * 2
    r = bootstrap((values,), np.mean, n_resamples=5000, confidence_level=0.95, random_state=seed)
    return [float(r.confidence_interval.low), float(r.confidence_interval.high)]


def paired(a: np.ndarray, b: np.ndarray, seed: int) -> dict:
    d = a - b
    wins, losses = int((d > 0).sum()), int((d < 0).sum())
    p = binomtest(wins, wins + losses).pvalue if wins + losses else 1.0
    return {"better": wins, "worse": losses, "tied": int((d == 0).sum()), "sign_test_p": float(p),
            "mean_difference": float(d.mean()), "difference_ci95": ci(d, seed)}


def main(src: Path, out: Path, rules: dict[str, dict], max_users: int | None, seed: int) -> dict:
    base = Run(src)
    sharers = {s.user_id for s in base.select()}
    users = base.users(base.split["targets"] + [u for u in base.split["candidates"] if u not in sharers])
    users = [u for u in users if u.queries][:max_users]
    task = base.data.task
    golds = {q.id: q.output for u in users for q in u.queries}
    settings = BenchSettings()
    scores, info, derived = {}, {}, [base]
    for name, overrides in {"baselines": {}, **rules}.items():
        run = derive_rule(base, out / name / "run", overrides, derived)
        derived.append(run)
        bench = Bench(run, settings, out / name)
        bench.ctx.pool, bench.ctx.sharers = run.open_pool(), sorted(sharers)
        bench.ctx.sharer_embeddings = history_embeddings(run.users(bench.ctx.sharers))
        if name == "baselines":
            methods = {"non_personalized": "non_personalized", "peft_retrieval": "peft_retrieval"}
        else:
            t0 = time.perf_counter()
            recipes = run.assemble([u.user_id for u in users])
            info[name] = {"settings": overrides, "assemble_wall_seconds": time.perf_counter() - t0,
                          "strengths": [r.strength for r in recipes.values()]}
            methods = {name: "perpcs"}
        for row, method in methods.items():
            preds, seconds = predictions(bench, method, users)
            write_json(out / "preds" / f"{row}.json", preds)
            scores[row] = per_query(task, golds, preds)
            info.setdefault(row, {})["personalize_seconds_per_user"] = statistics.mean(seconds)
            result = summary(out, src, task, users, golds, scores, info, seed)
    print(table(result))
    print(f"results: {out / 'rule-probe.json'}, {out / 'rule-probe.md'}")
    return result


def summary(out: Path, src: Path, task, users, golds, scores: dict, info: dict, seed: int) -> dict:
    """The rows scored so far, with CIs and every pairwise comparison; written out each time."""
    metric, higher = primary_metric(task)
    sign = 1 if higher else -1
    result = {"src": str(src), "task": task.name, "kind": task.kind, "metric": metric, "higher_is_better": higher,
              "users": len(users), "queries": len(golds), "seed": seed, "rules": info,
              "methods": {m: {"mean": sign * float(v.mean()), "ci95": sorted(sign * x for x in ci(v, seed))}
                          for m, v in scores.items()},
              "paired": {f"{a} vs {b}": paired(scores[a], scores[b], seed)
                         for i, a in enumerate(scores) for b in list(scores)[:i]}}
    write_json(out / "rule-probe.json", result)
    write_text(out / "rule-probe.md", table(result))
    return result


def table(r: dict) -> str:
    lines = [f"# Rule probe: {r['task']} ({r['kind']}), {r['users']} users, {r['queries']} queries, seed {r['seed']}",
             "", f"Source run: `{r['src']}`. Primary metric: {r['metric']} "
             f"({'higher' if r['higher_is_better'] else 'lower'} is better).", "",
             "| method | mean | 95% CI | personalize s/user | strengths chosen |", "|---|---|---|---|---|"]
    for m, v in r["methods"].items():
        s = r["rules"].get(m, {}).get("strengths")
        counts = ", ".join(f"{a:g}: {s.count(a)}" for a in sorted(set(s))) if s else "-"
        lines.append(f"| {m} | {v['mean']:.4f} | [{v['ci95'][0]:.4f}, {v['ci95'][1]:.4f}] | "
                     f"{r['rules'][m]['personalize_seconds_per_user']:.2f} | {counts} |")
    lines += ["", "Paired per query (better / worse / tied; sign test; 95% bootstrap CI of the mean difference, "
              "signed so that > 0 means the first is better):", "", "| comparison | better / worse / tied | p | CI |",
              "|---|---|---|---|"]
    for k, v in r["paired"].items():
        lines.append(f"| {k} | {v['better']} / {v['worse']} / {v['tied']} | {v['sign_test_p']:.3g} | "
                     f"[{v['difference_ci95'][0]:.4f}, {v['difference_ci95'][1]:.4f}] |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src", type=Path, help="run folder with steps 0-2 done")
    ap.add_argument("out", type=Path)
    ap.add_argument("--rule", action="append", default=[], help="NAME:KEY=VALUE,... (default: the three rules above)")
    ap.add_argument("--max-users", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    main(a.src, a.out, parse_variants(a.rule) if a.rule else RULES, a.max_users, a.seed)
