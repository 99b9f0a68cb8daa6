"""Why does calibration's choice transfer badly from validation users to targets: too few users, or users unlike
the targets?

Three times the validation queries did not choose better (benchmarks/README.md), so the gap is not the number of
queries. Each evidence cell holds, per rule of the grid, the answers of its validation users (calibration) and of
its targets (the bench). This pools the two groups of users and draws random splits of them, of the same sizes:
- if the real split's regret (the targets' best rule minus the chosen one, in the primary metric) is typical of
  random splits, validation users are as good a sample of the targets as any, and the gap is the noise of
  choosing on few users;
- if it is worse than most random splits, validation users are unlike the targets.
It also chooses on fewer pseudo-validation users (the same pseudo-targets' size), and once on all the set's seeds'
validation users together, to show how the regret falls with the number of users. Three policies choose, each
from one `choose_rule` call: calibration's own (the simplest rule tied with the best of those that beat "none"),
the best of those outright ("gated best"), and the best by the primary metric with no test ("ungated best").
Reads run folders (`--out`); no model runs.

    python benchmarks/transfer_users.py --out /work/runs/evidence    # results/evidence/transfer-users.{json,md}
    python benchmarks/transfer_users.py --out /work/runs/evidence --results /work/runs/evidence-fresh  # fresh cells
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from filelock import FileLock

from evidence import ALL, RESULTS, finished_cells
from perpcs.calibration import choose_rule
from perpcs.evaluation import per_query, primary_metric, read_lamp_outputs
from perpcs.pipeline import Run
from perpcs.utils import read_json, write_json, write_text

# calibration's choice (the simplest rule tied with the best of those that beat "none"); the best of those outright,
# by the selection metric; and the best by the primary metric with no test at all, which the issue does not allow
POLICIES = ("calibrated", "gated best", "ungated best")


@dataclass
class Cell:
    """One cell's answers by user ({user: {"golds", "preds": {rule: {qid: answer}}}}), which users were validation
    users and which targets, and what calibration chose with (its alpha and bootstrap seed) and chose."""

    task: object
    rules: list[str]  # grid order, simplest first
    users: dict[str, dict]
    val: list[str]
    tgt: list[str]
    alpha: float
    boot: int
    chosen: str


def users_of(cell: Path) -> Cell:
    run = Run(cell / "run")
    cal = read_json(cell / "run" / "calibration.json")
    rules = list(cal["candidates"])  # the order calibration chose in (ties go to the earliest), not the order scored
    users: dict[str, dict] = {}
    for qid, gold in cal["golds"].items():  # validation query ids are "<user>#<i>"
        u = users.setdefault("v:" + qid.rsplit("#", 1)[0], {"golds": {}, "preds": {r: {} for r in rules}})
        u["golds"][qid] = gold
        for r in rules:
            u["preds"][r][qid] = cal["predictions"][r][qid]
    owner = {q.id: t.user_id for t in run.data.users for q in t.queries}
    _, golds = read_lamp_outputs(cell / "golds.json")
    answers = {r: read_lamp_outputs(cell / "preds" / f"{'non_personalized' if r == 'none' else r}.json")[1]
               for r in rules}
    for qid, gold in golds.items():
        u = users.setdefault("t:" + owner[qid], {"golds": {}, "preds": {r: {} for r in rules}})
        u["golds"][qid] = gold
        for r in rules:
            u["preds"][r][qid] = answers[r][qid]
    return Cell(run.data.task, rules, users, [u for u in users if u[0] == "v"], [u for u in users if u[0] == "t"],
                cal["alpha"], run.config.seed, cal["chosen"])


def merged(users: dict[str, dict], names: list[str], rules: list[str]) -> tuple[dict, dict]:
    golds = {q: g for n in names for q, g in users[n]["golds"].items()}
    return golds, {r: {q: a for n in names for q, a in users[n]["preds"][r].items()} for r in rules}


def _values(task, golds: dict, preds: dict) -> dict[str, float]:
    """Each rule's primary metric over the queries (the mean of per-query scores, as the bench)."""
    return {r: float(np.mean(list(per_query(task, golds, p).values()))) for r, p in preds.items()}


def values(task, users: dict[str, dict], names: list[str], rules: list[str]) -> dict[str, float]:
    return _values(task, *merged(users, names, rules))


def choices(task, users: dict[str, dict], names: list[str], rules: list[str], alpha: float, seed: int) -> dict:
    golds, preds = merged(users, names, rules)
    sign = 1 if primary_metric(task)[1] else -1
    val = _values(task, golds, preds)
    choice = choose_rule(task, golds, preds, alpha, seed)
    return {"calibrated": choice["chosen"], "gated best": choice["best"] or "none",
            "ungated best": max(rules, key=lambda r: (sign * val[r], -rules.index(r)))}


def regret(task, users, targets, rules, chosen: str) -> float:
    """The targets' best rule minus the chosen one, in the primary metric, signed so that larger is worse."""
    sign = 1 if primary_metric(task)[1] else -1
    val = values(task, users, targets, rules)
    return sign * (max(val.values(), key=lambda v: sign * v) - val[chosen])


def cell_probe(where: Path, cell: Cell, params: dict) -> dict:
    """The real split's choices and regrets; `params["draws"]` random splits' (the permutations drawn with
    `params["seed"]`), also with `params["sizes"]` pseudo-validation users. Choices use calibration's alpha and
    bootstrap seed, so that the real split's answers give its own choice."""
    draws, sizes, seed = params["draws"], params["sizes"], params["seed"]
    task, rules, users, val, tgt, alpha, boot = (cell.task, cell.rules, cell.users, cell.val, cell.tgt, cell.alpha,
                                                 cell.boot)
    real = choices(task, users, val, rules, alpha, boot)
    if real["calibrated"] != cell.chosen:
        raise SystemExit(f"{where}: choose_rule gives {real['calibrated']}, calibration.json says {cell.chosen}")
    rng = np.random.default_rng(seed)
    everyone = sorted(users)
    random = {p: [] for p in POLICIES}
    by_size = {k: {p: [] for p in POLICIES} for k in sizes if k + len(tgt) <= len(everyone)}
    for _ in range(draws):
        order = [everyone[i] for i in rng.permutation(len(everyone))]
        pseudo_t = order[: len(tgt)]
        for k in [len(val), *by_size]:
            chosen = choices(task, users, order[len(tgt): len(tgt) + k], rules, alpha, boot)
            for p in POLICIES:
                (random if k == len(val) else by_size[k])[p].append(regret(task, users, pseudo_t, rules, chosen[p]))
    return {"params": params,
            "validation_users": len(val), "targets": len(tgt), "rules": rules,
            "chosen": real, "regret": {p: regret(task, users, tgt, rules, real[p]) for p in POLICIES},
            "random_splits": random, "by_validation_users": {str(k): v for k, v in by_size.items()}}


def pooled_choice(loaded: dict[str, Cell], seed: int) -> dict:
    """One choice from every seed's validation users together (three times the users on the demo), and its regret
    on each seed's targets: what a larger validation population of the same kind would have chosen."""
    first = next(iter(loaded.values()))
    task, rules = first.task, first.rules
    # query ids prefixed with the seed: the imported sets' seeds read the same users, so their ids repeat
    users = {f"{s}/{n}": {"golds": {f"{s}/{q}": g for q, g in u["golds"].items()},
                          "preds": {r: {f"{s}/{q}": a for q, a in p.items()} for r, p in u["preds"].items()}}
             for s, c in loaded.items() for n, u in c.users.items()}
    val = [f"{s}/{n}" for s, c in loaded.items() for n in c.val]
    chosen = choices(task, users, val, rules, first.alpha, seed)
    return {"validation_users": len(val), "chosen": chosen,
            "regret": {p: float(np.mean([regret(task, users, [f"{s}/{n}" for n in c.tgt], rules, chosen[p])
                                         for s, c in loaded.items()])) for p in POLICIES}}


def set_summary(cells: dict[str, dict], pooled: dict) -> dict:
    """Over a set's seeds: the real splits' mean regret, random splits' (draw i averaged over the seeds), the
    share of random draws at least as bad as the real split (a one-sided permutation p), and the regret of one
    choice from all seeds' validation users."""
    out = {}
    for p in POLICIES:
        real = float(np.mean([c["regret"][p] for c in cells.values()]))
        rand = np.mean([c["random_splits"][p] for c in cells.values()], axis=0)
        sizes = sorted({k for c in cells.values() for k in c["by_validation_users"]}, key=int)
        curve = {k: float(np.mean([np.mean(c["by_validation_users"][k][p]) for c in cells.values()
                                   if k in c["by_validation_users"]])) for k in sizes}
        out[p] = {"real": real, "random_mean": float(rand.mean()),
                  "random_90": float(np.percentile(rand, 90)),
                  "p_real_worse": float((np.sum(rand >= real - 1e-12) + 1) / (len(rand) + 1)),
                  "by_validation_users": curve, "pooled_validation": pooled["regret"][p],
                  "pooled_choice": pooled["chosen"][p]}
    return out


def table(summary: dict) -> str:
    lines = ["# Transfer from validation users to targets: real split against random splits of the same users",
             "",
             "Per set, the targets' regret (their best rule of the grid minus the chosen one, primary metric, larger "
             "is worse), averaged over the seeds, for the real split and for random splits of the same users into "
             "groups of the same sizes (`benchmarks/transfer_users.py`). p: the share of random splits at least as "
             "bad as the real one.", "",
             "| set | seeds | users (validation / targets) | policy | real split | random splits: mean (90th pct) "
             "| p | regret by pseudo-validation users | every seed's validation users: choice, regret |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, s in summary.items():
        sizes = "; ".join(f"{c['validation_users']}/{c['targets']}" for c in s["cells"].values())
        for p in POLICIES:
            r = s["summary"][p]
            curve = ", ".join(f"{k}: {v:.3f}" for k, v in r["by_validation_users"].items())
            lines.append(f"| {name} | {len(s['cells'])} | {sizes} | {p} | {r['real']:.3f} | {r['random_mean']:.3f} "
                         f"({r['random_90']:.3f}) | {r['p_real_worse']:.2g} | {curve} | {r['pooled_choice']}, "
                         f"{r['pooled_validation']:.3f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="the suite's run folders (<out>/<set>/seed-<n>/)")
    ap.add_argument("--sets", nargs="+", default=list(ALL))
    ap.add_argument("--draws", type=int, default=100, help="random splits per cell")
    ap.add_argument("--sizes", type=int, nargs="+", default=[4, 8],
                    help="pseudo-validation users for the regret curve (the pseudo-targets keep the real size)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--results", type=Path, default=RESULTS,
                    help="where the kept cells are, and where this writes (fresh cells: evidence.py's --results)")
    a = ap.parse_args()
    if a.draws < 1:
        raise SystemExit(f"--draws {a.draws}: must be at least 1")
    if not a.results.is_dir():
        raise SystemExit(f"--results {a.results}: no such folder")
    results, table_md = a.results / "transfer-users.json", a.results / "transfer-users.md"
    done = read_json(results) if results.exists() else {}
    # what a kept cell must have been drawn with to be reused (rule order and bootstrap seed: calibration's own)
    params = {"draws": a.draws, "sizes": a.sizes, "seed": a.seed, "policies": list(POLICIES), "order": "grid",
              "bootstrap": "run seed"}
    summary = {}
    for name in a.sets:
        cells, loaded = {}, {}
        for kept in finished_cells(name, a.results):
            seed = kept.name.rsplit("seed", 1)[1]
            cell = a.out / name / f"seed-{seed}"
            if not (cell / "preds").is_dir() or not (cell / "run" / "calibration.json").exists():
                print(f"{name}/{seed}: no run folder with bench answers in {cell}, skipped", flush=True)
                continue
            loaded[seed] = users_of(cell)
            old = done.get(name, {}).get("cells", {}).get(seed)
            if old and old.get("params") == params:  # a cell already drawn with these settings is kept
                cells[seed] = old
                continue
            cells[seed] = cell_probe(cell, loaded[seed], params)
            c = cells[seed]
            print(f"{name}/{seed}: {c['validation_users']} validation users, {c['targets']} targets; chose "
                  f"{c['chosen']['calibrated']}, regret {c['regret']['calibrated']:.3f}, random splits "
                  f"{np.mean(c['random_splits']['calibrated']):.3f}", flush=True)
        if cells:
            summary[name] = {"cells": cells, "summary": set_summary(cells, pooled_choice(loaded, a.seed))}
            with FileLock(a.out / "transfer-users.lock"):  # several workers, one results file
                every = (read_json(results) if results.exists() else {}) | {name: summary[name]}
                write_json(results, every)
                write_text(table_md, table(every))
    print(f"wrote {results} and {table_md}")


if __name__ == "__main__":
    main()
