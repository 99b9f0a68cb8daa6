"""Calibration: the pool chooses its own selection rule, by evidence from users it does not serve.

No rule wins on every kind of data: where users share one input distribution, trained gates carry
little about the target and activation keys do better; elsewhere a soft mix of many sharers, or the
task model alone, beats a near one-hot pick. So after the pool is built, every rule of a small grid
assembles recipes for *validation users* - sharer candidates that are neither sharers nor base users
nor targets: users the platform has, whose pieces are not in the pool - from all but their newest
history items, and is scored on those newest items (their queries are never used). Each rule is
assembled exactly as a target's recipe would be (`Assembler.recipe`), so what is scored is what
ships.

The choice: the best rule by the task's selection metric, but only among rules that beat "none"
(the non-personalized model) on the same validation queries by a paired test, Holm-corrected over
the grid at `alpha`, so that a pool of noise declines to personalize instead of crowning the luckiest
rule. Classification is judged by macro-F1 (accuracy can crown a constant answer by class balance)
and its paired test is a paired bootstrap of the F1 difference; the other kinds use the bench's sign
test on per-query scores. Among those rules, the best is not crowned on a difference that is only
noise: every rule the same paired test cannot tell from the best (p >= `alpha`, unadjusted, so ties
are generous) is tied with it, and the tie goes to the simplest, the earliest in RULES (the order is a
prior: the rule that was the default before calibration first, then one change at a time). A departure
from the simpler rule must show evidence on the validation users, not a lucky draw. A pool with no
validation users has no evidence, and declines too (its report says why and what to change).

Costs: rules that differ only in strength and `pick_by_loss` share one assembly; "none" and "average" need
no forward; `pick_by_loss` adds that many loss forwards per validation user. Rules with gate keys need a
second pool whose gates are trained (`Run.key_run("gate")`). Rules an earlier calibration of the same pool
and validation queries scored carry over (`reusable`), so a grown grid scores only its new rules. The grid
and the settings are in `rules` (`GRID`, `RULES`) and `settings` (`CalibrationSettings`); the table in `tables`.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from pydantic import BaseModel
from tqdm.auto import tqdm

from perpcs.data import Item, User
from perpcs.errors import InputError
from perpcs.evaluation import per_query, primary_metric, score
from perpcs.generation import generate
from perpcs.neighbours import NeighbourTable
from perpcs.rules import RULES
from perpcs.settings import MEAN_KEYS, CalibrationSettings
from perpcs.stats import RESAMPLES, bootstrap_ci, paired
from perpcs.tasks import Task, answer_budget
from perpcs.training import history_examples, output_losses


class ValidationUser(BaseModel):
    """A validation user's history split: assembly reads `context`, the rules are scored on `heldout`."""

    user_id: str
    context: list[Item]
    heldout: list[Item]
    profile: str | None = None


def validation_users(candidates: list[User], sharers: set[str], settings: CalibrationSettings) -> list[ValidationUser]:
    """The most active candidates that are not sharers (ties by id), each with at least 2 history items; their
    newest items are dealt out as queries one per user in turn until `settings.queries` are dealt or each user
    is at its cap (`settings.items`, and half its history)."""
    users = sorted((u for u in candidates if u.user_id not in sharers and len(u.history) >= 2),
                   key=lambda u: (-len(u.history), u.user_id))[: settings.max_users]
    caps = [min(settings.items, len(u.history) // 2) for u in users]
    held = [0] * len(users)
    budget = settings.queries
    while budget > 0 and any(h < c for h, c in zip(held, caps)):
        for i, cap in enumerate(caps):
            if budget > 0 and held[i] < cap:
                held[i] += 1
                budget -= 1
    return [ValidationUser(user_id=u.user_id, context=u.history[:-n], heldout=u.history[-n:], profile=u.profile)
            for u, n in zip(users, held) if n]


def selection_metric(task: Task, macro_f1: bool = True) -> tuple[str, bool]:
    """What the choice maximises: macro-F1 for classification, else the primary metric (`macro_f1=False`: the
    primary metric for classification too, as `benchmarks/decision_probe.py` tries)."""
    return ("f1", True) if macro_f1 and task.kind == "classification" else primary_metric(task)


def _f1_paired(task: Task, golds: dict[str, str], a: dict[str, str], b: dict[str, str], seed: int) -> dict:
    """Paired bootstrap of macro-F1(a) - macro-F1(b) over the same resampled queries; two-sided p."""
    ids = list(golds)
    index = {label: i for i, label in enumerate(task.labels)}
    n_labels = len(task.labels)
    y = np.array([index[golds[i].strip()] for i in ids])
    pa, pb = (np.array([index.get(p[i].strip(), -1) for i in ids]) for p in (a, b))

    def f1(rows: np.ndarray, pred: np.ndarray) -> np.ndarray:  # rows [R, n] of query indices
        yt, yp = y[rows], pred[rows]
        out = np.zeros(rows.shape[0])
        for c in range(n_labels):
            tp = ((yt == c) & (yp == c)).sum(1)
            denom = (yt == c).sum(1) + (yp == c).sum(1)
            out += np.where(denom > 0, 2 * tp / np.maximum(denom, 1), 0.0)
        return out / n_labels

    rows = np.random.default_rng(seed).integers(0, len(ids), size=(RESAMPLES, len(ids)))
    full = np.arange(len(ids))[None]
    diff = float((f1(full, pa) - f1(full, pb))[0])
    boot = f1(rows, pa) - f1(rows, pb)
    # two-sided, counting the observed difference as one resample so that p is never 0
    p = min(1.0, 2 * (min(int((boot <= 0).sum()), int((boot >= 0).sum())) + 1) / (RESAMPLES + 1))
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return {"n": len(ids), "p": p, "diff": diff, "ci": [float(lo), float(hi)], "test": "paired bootstrap of macro-F1"}


def holm(pvalues: dict[str, float]) -> dict[str, float]:
    """Holm-adjusted p-values (step-down, monotone)."""
    order = sorted(pvalues, key=pvalues.get)
    adjusted, running = {}, 0.0
    for i, name in enumerate(order):
        running = max(running, min(1.0, (len(order) - i) * pvalues[name]))
        adjusted[name] = running
    return adjusted


def comparer(task: Task, golds: dict[str, str], preds: dict[str, dict[str, str]], seed: int = 0,
             macro_f1: bool = True):
    """compare(a, b): calibration's paired test of rule a against rule b on the validation answers (the macro-F1
    bootstrap for classification, else the sign test on per-query scores)."""
    metric, higher = selection_metric(task, macro_f1)
    scores = {name: per_query(task, golds, p) for name, p in preds.items()}
    if metric != "f1":
        return _sign_test(scores, higher, seed), scores
    return (lambda a, b: _f1_paired(task, golds, preds[a], preds[b], seed)), scores


def _sign_test(scores: dict[str, dict[str, float]], higher: bool, seed: int):
    """compare(a, b): the bench's sign test of rule a against rule b on their per-query scores."""
    return lambda a, b: {**paired(scores[a], scores[b], higher, seed), "test": "sign test"}


def choose_rule(task: Task, golds: dict[str, str], preds: dict[str, dict[str, str]], alpha: float,
                seed: int = 0, macro_f1: bool = True) -> dict:
    """Each rule's metrics, CI and paired comparison with "none"; the choice (see the module's docstring)."""
    metric, higher = selection_metric(task, macro_f1)
    compare, scores = comparer(task, golds, preds, seed, macro_f1)
    table = {name: {"metrics": score(task, golds, p), "ci": list(bootstrap_ci(scores[name].values(), seed)),
                    "answers": len(set(p.values())),
                    "top_answer_share": max(list(p.values()).count(v) for v in p.values()) / len(p)}
             for name, p in preds.items()}
    return _choose(table, compare, metric, higher, alpha)


def choose_by_loss(losses: dict[str, dict[str, float]], alpha: float, seed: int = 0) -> dict:
    """`choose_rule` with each validation query scored by its output's loss under the rule (statistic
    "likelihood"): the same tests and tie rule, on a continuous score, so the sign test rarely sees a tie."""
    table = {name: {"metrics": {"loss": float(np.mean(list(q.values()))), "n": len(q)},
                    "ci": list(bootstrap_ci(q.values(), seed))} for name, q in losses.items()}
    return _choose(table, _sign_test(losses, False, seed), "loss", False, alpha)


# What a calibration keeps per rule and validation query, by `calibration.statistic`: answers, or losses.
MEASURED = {"metric": "predictions", "likelihood": "losses"}


def choose(task: Task, golds: dict[str, str], measured: dict[str, dict], statistic: str, alpha: float,
           seed: int = 0) -> dict:
    """The choice from every rule's answers (`choose_rule`) or losses (`choose_by_loss`), as `statistic` says."""
    if statistic == "likelihood":
        return choose_by_loss(measured, alpha, seed)
    return choose_rule(task, golds, measured, alpha, seed)


def _choose(table: dict[str, dict], compare, metric: str, higher: bool, alpha: float) -> dict:
    """The choice from each rule's row (`table`, simplest rule first, "none" among them) and a paired test
    `compare(a, b)`: every rule tested against none (Holm), the best of those that beat it, and the simplest
    rule the test cannot tell from the best. Adds each row's comparisons to `table`."""
    sign = 1 if higher else -1
    for name in table:
        if name != "none":
            table[name]["vs_none"] = compare(name, "none")
    adjusted = holm({n: r["vs_none"]["p"] for n, r in table.items() if n != "none"})
    for name, p_holm in adjusted.items():
        table[name]["vs_none"]["p_holm"] = p_holm
    order = list(table)
    better = [n for n in order if n != "none" and sign * table[n]["vs_none"]["diff"] > 0 and adjusted[n] < alpha]
    best, tied = None, []
    if better:
        best = max(better, key=lambda n: (sign * table[n]["metrics"][metric], -order.index(n)))
        for n in better:
            if n != best:
                table[n]["vs_best"] = compare(n, best)
        tied = [n for n in better if n == best or table[n]["vs_best"]["p"] >= alpha]
    chosen = tied[0] if tied else "none"
    return {"chosen": chosen, "declined": chosen == "none", "best": best, "tied_with_best": tied,
            "metric": metric, "higher_is_better": higher, "alpha": alpha, "candidates": table}


def candidates(config) -> tuple[list[str], dict[str, str]]:
    """The rules of `config.calibration.rules` to score, and those left out with why. With `key_noise` the pool
    promises DP keys; a gate is trained, not a noised mean, so rules with gate keys would publish keys the
    promise does not cover: they are not candidates."""
    left_out = {n: "key_noise covers activation keys only; gates would not be DP"
                for n in config.calibration.rules
                if config.key_noise and RULES[n].get("key", config.key) not in MEAN_KEYS and n != "none"}
    return [n for n in config.calibration.rules if n not in left_out], left_out


def _prompts(task: Task, items: list[Item]) -> list[str]:
    return [task.format_prompt(it.input) for it in items]


def reusable(scored: dict | None, rules: list[str], golds: dict[str, str], field: str = "predictions") -> dict:
    """The predictions (`field`; "losses" for the likelihood statistic) of `rules` that an earlier calibration on
    the same pool, task model and validation queries (`scored`: its calibration.json, e.g. the source of a derived
    run) already made with the same rule definition: a grid grown by a rule then scores only that rule."""
    if not scored or field not in scored:
        return {}
    if scored.get("golds") != golds:
        raise ValueError("the earlier calibration scored other validation queries: its predictions do not carry over")
    return {n: scored[field][n] for n in rules
            if n in scored[field] and (n == "none" or scored["grid"].get(n) == RULES[n])}


def run_validation_users(run) -> list[ValidationUser]:
    """The run's validation users: candidates that are not its sharers (`validation_users`)."""
    return validation_users(run.users(run.split["candidates"]), {x.user_id for x in run.select()},
                            run.config.calibration)


def neighbour_table(run, users: list[ValidationUser], settings) -> NeighbourTable:
    """What select="neighbours" reads (`perpcs.neighbours`), built once per run and kept in RUN/neighbours: each
    validation user's key (`Assembler.bare_means` over the items `settings` read) and every sharer's whole LoRA
    scored on its held-out items by the task's per-query metric. Costs a generation per held-out item and sharer."""
    from perpcs.assembly import Assembler

    ids = [u.user_id for u in users]
    if (run.neighbours_path / "neighbours.json").exists():
        table = NeighbourTable.from_pretrained(run.neighbours_path)
        if table.users != ids or table.items != settings.recent_k:
            raise InputError(f"{run.neighbours_path}: built for other validation users or another history budget "
                             f"(its keys read {table.items} items, this rule {settings.recent_k}); remove it to build "
                             "it again")
        return table
    model, tok = run.merged
    task = run.data.task
    pool = run.own_pool()
    sharers = pool.sharers()
    budget = answer_budget(task, tok)
    assembler = Assembler.for_run(model, pool, run.config, settings)
    scores = torch.zeros(len(users), len(sharers))
    try:
        keys = [assembler.bare_means(assembler.examples(task, tok, u.context, u.profile), tok.pad_token_id)
                for u in tqdm(users, desc="neighbour table: validation keys")]
        for j, sid in enumerate(tqdm(sharers, desc="neighbour table: sharers")):
            assembler.install_weights(assembler.whole(sid), 1.0)
            for i, u in enumerate(users):
                texts = generate(assembler.model, tok, _prompts(task, u.heldout), budget)
                golds = {str(k): it.output for k, it in enumerate(u.heldout)}
                scores[i, j] = float(np.mean(list(per_query(task, golds, {str(k): task.parse_output(t)
                                                                        for k, t in enumerate(texts)}).values())))
    finally:
        assembler.unload()
    table = NeighbourTable(users=ids, sharers=sharers, scores=scores,
                           keys={p: torch.stack([k[p] for k in keys]) for p in pool.positions},
                           higher_is_better=primary_metric(task)[1], items=settings.recent_k)
    table.save_pretrained(run.neighbours_path)
    return table


def calibrate(run, scored: dict | None = None) -> dict:
    """Score every rule of `run.config.calibration.rules` on the run's validation users and choose one.

    `run` is a `pipeline.Run` whose pool is built; `run.key_run(key)` gives the run holding the pool of
    each key kind the rules need. `scored`: an earlier calibration whose predictions carry over (`reusable`)."""
    from perpcs.assembly import Assembler

    s = run.config.calibration
    rules, left_out = candidates(run.config)
    task = run.data.task
    likelihood, field = s.statistic == "likelihood", MEASURED[s.statistic]
    t0 = time.perf_counter()
    users = run_validation_users(run)
    if not users:  # no evidence: the pool declines, and says why and what to do
        reason = ("no validation users: every sharer candidate is a sharer or has under 2 history items; lower "
                  "n_sharers, or fix the rule (e.g. --set key=activation)")
        metric, higher = ("loss", False) if likelihood else selection_metric(task)
        return {"chosen": "none", "declined": True, "reason": reason, "best": None, "tied_with_best": [],
                "metric": metric, "higher_is_better": higher, "alpha": s.alpha, "candidates": {},
                "rule": RULES["none"], "grid": {n: RULES[n] for n in rules}, "left_out": left_out,
                "validation": {"users": [], "queries": 0, "heldout_items": {}},
                "cost": {"seconds": time.perf_counter() - t0, "assembly_forwards": 0, "generations": 0, "reused": []},
                field: {}, "golds": {}}
    model, tok = run.merged
    budget = answer_budget(task, tok)
    golds = {f"{u.user_id}#{i}": it.output for u in users for i, it in enumerate(u.heldout)}
    preds: dict[str, dict] = reusable(scored, rules, golds, field)
    reused, forwards, table_generations = sorted(preds), 0, 0
    queries = {u.user_id: history_examples(task, tok, u.heldout, run.config.max_len) for u in users if likelihood}

    def answer(m, u: ValidationUser) -> list:
        """What the rule installed in `m` gives each of u's queries: its loss, or its parsed answer."""
        if likelihood:
            return output_losses(m, queries[u.user_id], tok.pad_token_id, run.config.assembly.batch_size)
        return [task.parse_output(t) for t in generate(m, tok, _prompts(task, u.heldout), budget)]

    def store(name: str, out: dict[str, list]) -> None:
        preds[name] = {f"{u.user_id}#{i}": x for u in users for i, x in enumerate(out[u.user_id])}

    if "none" not in preds:
        store("none", {u.user_id: answer(model, u) for u in users})
    families: dict[tuple, list[str]] = {}  # rules that differ only in strength and pick_by_loss share one assembly
    for name in rules:
        if name not in preds:
            rule = run.config.updated(RULES[name])
            family = (rule.key, rule.assembly.model_copy(update={"strength": 1.0, "pick_by_loss": 0}).model_dump_json())
            families.setdefault(family, []).append(name)
    for names in families.values():
        rule = run.config.updated(RULES[names[0]])
        shared = rule.assembly.model_copy(update={"pick_by_loss": 0})
        table = None
        if shared.select == "neighbours":  # a validation user is not its own neighbour (recipe's `user`)
            built = (run.neighbours_path / "neighbours.json").exists()
            table = neighbour_table(run, users, shared)
            table_generations += 0 if built else len(golds) * len(table.sharers)
        assembler = Assembler.for_run(model, run.key_pool(rule.key), run.config, shared, table)
        measured: dict[str, dict[str, list]] = {n: {} for n in names}
        try:
            for u in tqdm(users, desc=f"calibrate: {', '.join(names)}"):
                recipe = assembler.recipe(task, tok, u.context, u.profile, user=u.user_id)
                forwards += shared.select not in ("all", "none")
                weights = {pos: dict(chosen) for pos, chosen in recipe.pieces.items()}
                for n in names:
                    settings, chosen = run.config.updated(RULES[n]).assembly, weights
                    if settings.pick_by_loss:  # as Assembler.recipe picks: on the examples the keys read
                        chosen, losses = assembler.pick_by_loss(weights, assembler.examples(task, tok, u.context,
                                                                                            u.profile),
                                                                tok.pad_token_id, settings.pick_by_loss)
                        forwards += len(losses)
                    assembler.install_weights(chosen, settings.strength)
                    measured[n][u.user_id] = answer(assembler.model, u)
        finally:
            assembler.unload()
        for n in names:
            store(n, measured[n])
    scored_now = len(golds) * (len(rules) - len(reused))  # answers or loss forwards this calibration made
    result = choose(task, golds, {n: preds[n] for n in rules}, s.statistic, s.alpha, run.config.seed)
    result.update(rule=RULES[result["chosen"]], grid={n: RULES[n] for n in rules}, left_out=left_out,
                  validation={"users": [u.user_id for u in users], "queries": len(golds),
                              "heldout_items": {u.user_id: len(u.heldout) for u in users},
                              # how alike validation users and targets are, in what assembly reads
                              "context_items_mean": float(np.mean([len(u.context) for u in users])),
                              "target_history_items_mean": float(np.mean(
                                  [len(t.history) for t in run.users(run.split["targets"])]))},
                  cost={"seconds": time.perf_counter() - t0, "assembly_forwards": forwards,
                        "generations": (0 if likelihood else scored_now) + table_generations,
                        **({"loss_forwards": scored_now} if likelihood else {}),
                        "reused": reused},
                  statistic=s.statistic, **{field: preds}, golds=golds)
    return result
