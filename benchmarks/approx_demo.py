"""Do recipes found through the approximate key index score like the exhaustive ones? On a finished run
(a copy: recipes of the run are not touched, but the pool gets its approximate index), every target is
assembled with the run's selection rule twice, `key_index` exact and approximate, on one model in one
process; both recipes answer the target's queries greedily, scored per query by the task's metric.

Reports both means with their bootstrap CIs, the paired comparison (sign test, CI of the difference),
whether the two recipes chose the same sharers at every position, and their largest weight gap.

    python benchmarks/approx_demo.py --run /tmp/yours/demo-run --out benchmarks/results/approx-demo.json
"""

import argparse
from pathlib import Path

import torch

from perpcs.assembly import Assembler
from perpcs.evaluation import per_query, primary_metric
from perpcs.generation import generate
from perpcs.pipeline import Run
from perpcs.recipe import Recipe, apply_recipe
from perpcs.retrieval import prompts
from perpcs.settings import BenchSettings
from perpcs.stats import bootstrap_ci, paired
from perpcs.tasks import answer_budget
from perpcs.utils import write_json

INDEXES = ("exact", "approximate")


def compare(a: dict[str, Recipe], b: dict[str, Recipe]) -> tuple[bool, float]:
    """(whether the two sets of recipes chose the same sharers in the same order at every position, the
    largest gap between their weights)."""
    same, gap = True, 0.0
    for u, recipe in a.items():
        for pos, chosen in recipe.pieces.items():
            other = b[u].pieces.get(pos, [])
            same &= [s for s, _ in chosen] == [s for s, _ in other]
            gap = max([gap] + [abs(w - v) for (_, w), (_, v) in zip(chosen, other)])
    return same, gap


def main(a: argparse.Namespace) -> None:
    run = Run(a.run)
    model, tok = run.merged
    pool, task = run.open_pool(), run.data.task
    targets = run.users(run.split["targets"])
    budget, batch = answer_budget(task, tok), BenchSettings().gen_batch_size
    recipes, scores = {}, {}
    for key_index in INDEXES:
        settings = run.rule.assembly.model_copy(update={"key_index": key_index})
        assembler = Assembler.for_run(model, pool, run.config, settings)
        recipes[key_index] = {u.user_id: assembler.recipe(task, tok, u.history, u.profile, user=u.user_id)
                              for u in targets}
        model = assembler.unload()
        preds = {}
        for u in targets:
            peft_model = apply_recipe(model, recipes[key_index][u.user_id], pool)
            texts = generate(peft_model, tok, prompts(task, u), budget, batch)
            model = peft_model.unload()
            preds.update({q.id: task.parse_output(t) for q, t in zip(u.queries, texts)})
        scores[key_index] = per_query(task, {q.id: q.output for u in targets for q in u.queries}, preds)
    metric, higher = primary_metric(task)
    same, gap = compare(recipes["exact"], recipes["approximate"])
    saved = (compare(recipes["exact"], {u: Recipe.load(run.recipe_path(u)) for u in recipes["exact"]})
             if all(run.recipe_path(u).exists() for u in recipes["exact"]) else None)
    result = {"run": str(a.run), "sharers": len(pool), "targets": len(targets), "rule": run.rule.assembly.model_dump(),
              "metric": metric, "higher_is_better": higher,
              **{k: {"mean": sum(s.values()) / len(s), "ci": bootstrap_ci(s.values()), "n": len(s)}
                 for k, s in scores.items()},
              "approximate_vs_exact": paired(scores["approximate"], scores["exact"], higher),
              "same_sharers_everywhere": same, "max_weight_gap": gap,
              "exact_vs_the_runs_recipes": saved and {"same_sharers_everywhere": saved[0], "max_weight_gap": saved[1]}}
    write_json(a.out, result)
    for k in INDEXES:
        lo, hi = result[k]["ci"]
        print(f"{k:>11} index: {metric} {result[k]['mean']:.4f}, 95% CI {lo:.4f}-{hi:.4f} ({result[k]['n']} queries)")
    print(f"approximate vs exact: {result['approximate_vs_exact']}; same sharers at every position: {same}, "
          f"largest weight gap {gap:.2e}; wrote {a.out}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, required=True, help="a copy of a finished run (its pool gets an index)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/approx-demo.json"))
    torch.set_num_threads(1)
    main(ap.parse_args())
