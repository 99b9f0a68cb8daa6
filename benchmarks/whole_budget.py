"""How much history does a whole-sharer pick need? `task-whole`'s pick per demo target at several history budgets.

`assembly.select=whole` makes one decision per target, the sharer whose task-model keys are nearest the target's
mean over its history, so the pick is only as good as that mean. For each demo cell and budget (the newest N
history items) this assembles every target with the `task-whole` rule at that budget and reports which sharer it
picks, whether the sharer is of the target's taste group (groups.json), and that sharer's whole-LoRA accuracy on
the target's queries from results/sharer-ceiling.json: the accuracy `task-whole` scores, since its recipe is that
LoRA at weight 1, with no generation here. Assembly seconds per target are measured alternately by budget in one
process; compare them as ratios. Reads the evidence suite's run folders (`evidence.py --out OUT`, or
`grid_refresh.py --rebuild`); builds a cell's task-activation key pool if it has none (one forward per sharer).

    OMP_NUM_THREADS=1 python benchmarks/whole_budget.py --out /work/runs/evidence --budgets 4 8 16 32 64 all
"""

import argparse
import statistics
import time
from pathlib import Path

from perpcs.assembly import Assembler
from perpcs.pipeline import Run
from perpcs.rules import RULES
from perpcs.utils import read_json, write_json

RESULTS = Path(__file__).resolve().parent / "results"


def budget_items(b: str) -> int | None:
    if b == "all":
        return None
    if not b.isdigit() or int(b) < 1:
        raise SystemExit(f"--budgets {b!r}: a budget is a count of items (1 or more) or 'all'")
    return int(b)


def picks(cell: Path, ceiling: dict, budgets: list[str]) -> dict:
    run = Run(cell / "run")
    groups = read_json(Path(run.config.data) / "groups.json")
    model, tok = run.merged
    pool = run.key_pool("task-activation")
    user_of = {pool.pseudonym(s.user_id): s.user_id for s in run.select()}
    targets = run.users(run.split["targets"])
    rule = run.config.updated(RULES["task-whole"]).assembly
    longest = max(len(t.history) for t in targets)
    settings = {b: rule.model_copy(update={"recent_k": budget_items(b) or longest}) for b in budgets}
    assembler = Assembler.for_run(model, pool, run.config, rule)  # the budget changes which items it reads, only
    out = {b: {} for b in budgets}
    for t in targets:
        for b in budgets:  # alternately, so that the machine's drift falls on every budget alike
            assembler.settings = settings[b]
            t0 = time.perf_counter()
            recipe = assembler.recipe(run.data.task, tok, t.history, t.profile, user=t.user_id)
            seconds = time.perf_counter() - t0
            (sid,) = {s for chosen in recipe.pieces.values() for s, _ in chosen}
            pick = user_of[sid]
            out[b][t.user_id] = {"pick": pick, "own_group": groups[pick] == groups[t.user_id], "seconds": seconds,
                                 "items": min(len(t.history), budget_items(b) or longest),
                                 "accuracy": ceiling[t.user_id]["sharers"][pick]}
    assembler.unload()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("runs/evidence"), help="the evidence suite's run folders")
    ap.add_argument("--cells", nargs="+", default=["demo/0", "demo/1", "demo/2"], help="SET/SEED of demo cells")
    ap.add_argument("--budgets", nargs="+", default=["4", "8", "16", "32", "64", "all"])
    ap.add_argument("--results", type=Path, default=RESULTS / "whole-budget.json")
    a = ap.parse_args()
    for b in a.budgets:
        budget_items(b)
    ceiling = read_json(RESULTS / "sharer-ceiling.json")["cells"]
    every = {spec: picks(a.out / spec.split("/")[0] / f"seed-{spec.split('/')[1]}", ceiling[spec], a.budgets)
             for spec in a.cells}
    summary = {}
    for b in a.budgets:
        rows = [r for c in every.values() for r in c[b].values()]
        summary[b] = {"targets": len(rows), "own_group": sum(r["own_group"] for r in rows),
                      "accuracy": statistics.mean(r["accuracy"] for r in rows),
                      "mean_items": statistics.mean(r["items"] for r in rows),
                      "seconds_ratio_to_first": statistics.mean(r["seconds"] for r in rows) / statistics.mean(
                          r["seconds"] for c in every.values() for r in c[a.budgets[0]].values())}
        print(b, summary[b], flush=True)
    write_json(a.results, {"budgets": a.budgets, "cells": every, "summary": summary})
    print(f"wrote {a.results}")


if __name__ == "__main__":
    main()
