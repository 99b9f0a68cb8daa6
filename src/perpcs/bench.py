"""`perpcs bench`: Per-Pcs and its baselines side by side, with their costs, in one run.

Splits users (targets: the most active), runs the pipeline, personalises every target user with
every method, generates greedy answers to their queries, scores them, and writes
OUT/results.json, OUT/results.md (the table to read first, with CIs and paired comparisons: see
`stats`), OUT/results.png, OUT/selection.png (see `report`) and OUT/preds/<method>.json. A bench into
the same folder resumes: the pipeline's finished steps and the finished rows (OUT/rows, see `resume`) are reused.
Seconds are `time.perf_counter` around the personalisation work only (model loading is reported
separately); bytes are what must be stored for that user.
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from functools import partial
from pathlib import Path

import torch
from tqdm.auto import tqdm

from perpcs.costs import alternating_costs
from perpcs.data import User
from perpcs.evaluation import primary_metric, score, write_lamp_outputs
from perpcs.generation import generate
from perpcs.methods import Context, Personalized, method_of
from perpcs.mixing import mixing
from perpcs.pipeline import Run
from perpcs.recipe import Recipe
from perpcs.report import bench_statistics, results_plot, selection_plot
from perpcs.results import AlternatingCosts, BenchResults, MethodResult
from perpcs.resume import keep, kept
from perpcs.retrieval import prompts
from perpcs.rules import with_rule_fixed
from perpcs.runfolder import RunFolder
from perpcs.settings import BenchSettings, RunConfig, check_later_steps
from perpcs.tables import results_table
from perpcs.tasks import answer_budget, cut_short
from perpcs.user_lora import oppu_dir
from perpcs.utils import check_output_dir, write_text


class Bench:
    """Every row of a bench on one run: personalise each target, generate its answers, score them."""

    def __init__(self, run: RunFolder, settings: BenchSettings, out: Path):
        self.run, self.settings, self.out = run, settings, out
        self.ctx = Context(run, settings, out)
        self.model, self.tok = self.ctx.model, self.ctx.tok
        self.task = run.data.task
        self.budget = answer_budget(self.task, self.tok)

    @contextmanager
    def personalize(self, row: str, user: User):
        """Yield the user's personalised model for the row's method; leave the merged model clean afterwards."""
        cls, with_rag = method_of(row)
        rag_k = self.settings.rag_k if with_rag else 0
        if not user.history:  # cold start: without history, the task model
            yield Personalized(self.model, rag_k=rag_k)
            return
        self.ctx.prepare(cls.needs)
        p = cls(self.ctx).personalize(user)
        p.rag_k = rag_k
        try:
            yield p
        finally:
            if p.model is not self.model:
                p.model.unload()

    def evaluate(self, rows: dict[str, str] | None = None) -> dict:
        """{row name: results} for each row (`rows`: row name -> method row; default: the settings')."""
        run, task, k = self.run, self.task, self.settings.history_k
        rows = rows or {m: m for m in self.settings.methods}
        targets = [u.model_copy(update={"history": u.history[-k:]}) if k else u
                   for u in run.users(run.split["targets"])]
        golds = {q.id: q.output for u in targets for q in u.queries}
        write_lamp_outputs(self.out / "golds.json", task.name, golds)
        results = {}
        for name, row in rows.items():
            cls, _ = method_of(row)
            users = targets[: self.settings.oppu_targets] if cls.trains_per_target else targets
            key = self.row_key(row, users)
            kept_at, preds_at = self.out / "rows" / f"{name}.json", self.out / "preds" / f"{name}.json"
            if (done := kept(kept_at, key, MethodResult, preds_at)) is not None:
                print(f"bench: {name}: kept from {kept_at}", flush=True)
                results[name] = done
                continue
            self.ctx.prepare(cls.needs)
            preds, seconds, nbytes, answers = {}, [], [], []
            for user in tqdm(users, desc=f"bench: {name}"):
                with self.personalize(row, user) as p:
                    texts = generate(p.model, self.tok, prompts(task, user, p.rag_k), self.budget,
                                     self.settings.gen_batch_size)
                answers += texts
                preds.update({q.id: task.parse_output(t) for q, t in zip(user.queries, texts)})
                seconds.append(p.seconds)
                nbytes.append(p.nbytes)
            write_lamp_outputs(preds_at, task.name, preds)
            results[name] = {"metrics": score(task, {q: golds[q] for q in preds}, preds),
                             "personalize_seconds_per_user": statistics.mean(seconds),
                             "bytes_per_user": statistics.mean(nbytes),
                             "cut_short": cut_short(task, answers, self.tok, self.budget)}
            keep(kept_at, key, results[name], preds_at)
        return results

    def row_key(self, row: str, users: list[User]) -> dict:
        """Everything a row's answers depend on, so that a resumed bench reuses a row only when nothing changed
        (`run`: the run's settings with the rule calibration chose, which a recalibrated run may change)."""
        return {"row": row, "run": self.run.rule.model_dump(mode="json"), "task_model": self.run.merged_fingerprint,
                "bench": self.settings.model_dump(mode="json", exclude={"methods", "variants", "cost_targets"}),
                "users": [u.user_id for u in users], "queries": [q.id for u in users for q in u.queries]}


def group_diagnostics(run: RunFolder, groups: dict[str, int], recipes: dict[str, Recipe] | None = None) -> dict:
    """For data with known latent groups (synthetic): how much of each recipe's weight goes to sharers
    of the target's own group, against the share of such sharers in the pool (what random picking gives)."""
    pool = run.open_pool()
    group_of = {pool.pseudonym(s.user_id): groups[s.user_id] for s in run.selection()}
    same, chance = [], []
    for uid in run.split["targets"]:
        recipe = recipes[uid] if recipes else Recipe.load(run.recipe_path(uid))
        weights = [(sid, w) for chosen in recipe.pieces.values() for sid, w in chosen]
        total = sum(w for _, w in weights)
        if total:  # a recipe without pieces (the pool declined) has no weight to attribute
            same.append(sum(w for sid, w in weights if group_of[sid] == groups[uid]) / total)
            chance.append(sum(g == groups[uid] for g in group_of.values()) / len(group_of))
    return {"same_group_weight": statistics.mean(same) if same else None,
            "same_group_chance": statistics.mean(chance) if chance else None,
            "sharer_groups": sorted(group_of.values())}


# What a bench writes into its output folder (and finds there when it resumes); `perpcs demo` adds its data
OUTPUTS = {"run", "variants", "preds", "rows", "prime", "golds.json", "results.json", "results.md", "results.png",
           "selection.png", "selection-*.png", "data"}
BUDGET_KEYS = ("steps", "epochs", "best_epoch", "stopped_early", "val_losses", "seconds")


def per_user(run: RunFolder) -> dict:
    """What each user got: the training budget of every sharer and OPPU LoRA (epochs, steps, early
    stop, held-out losses) and the strength chosen for each target's recipe."""
    def budget(stats: dict) -> dict:
        return {k: stats[k] for k in BUDGET_KEYS if k in stats}

    return {"sharers": {s.user_id: budget(json.loads((run.sharer_dir(s.user_id) / "lora.json").read_text()))
                        for s in run.selection()},
            "oppu": {u: budget(json.loads(p.read_text())) for u in run.split["targets"]
                     if (p := oppu_dir(run, u) / "stats.json").exists()},
            "strength": {u: Recipe.load(run.recipe_path(u)).strength for u in run.split["targets"]}}


def bench(data: str | Path, out: str | Path, config: RunConfig, settings: BenchSettings) -> dict:
    """Run the pipeline and every method; write OUT/results.json and OUT/results.md."""
    out = Path(out)
    check_output_dir(out, OUTPUTS)
    variants = {name: check_later_steps(config, config.updated(with_rule_fixed(overrides)))
                for name, overrides in settings.variants.items()}  # bad settings fail here, before any work
    run = Run.create(out / "run", config)
    run.pipeline()
    t0 = time.perf_counter()
    b = Bench(run, settings, out)
    load_seconds = time.perf_counter() - t0
    # first, so that the bench's OPPU reuses the adapters trained while timing (no target trains twice)
    timed = run.split["targets"][:settings.cost_targets]
    costs_key = {"run": run.rule.model_dump(mode="json"), "users": timed, "history_k": settings.history_k}
    costs_at = out / "rows" / "costs.json"
    costs = kept(costs_at, costs_key, AlternatingCosts) if timed else None
    if costs is not None:
        print(f"costs: kept from {costs_at}", flush=True)
    elif timed:
        costs = alternating_costs(run, timed, oppu_dir=partial(oppu_dir, run, history_k=settings.history_k))
        keep(costs_at, costs_key, costs)
    methods = b.evaluate()
    stats = run.stats()
    name, higher = primary_metric(run.data.task)
    results = {
        "dataset": str(data), "task": run.data.task.name, "kind": run.data.task.kind,
        "base_model": config.base or "SmolLM2-135M-Instruct (default)", "base_fingerprint": run.merged_fingerprint,
        "seed": config.seed, "n_targets": len(run.split["targets"]), "n_sharers": len(run.select()),
        "n_queries": sum(len(u.queries) for u in run.users(run.split["targets"])),
        "oppu_targets": settings.oppu_targets,
        "primary_metric": {"name": name, "higher_is_better": higher},
        "methods": methods,
        "one_time": {"task_adapt_seconds": stats["task_adapt"]["seconds"],
                     "sharer_lora_seconds": stats["build_pool"]["sharer_lora_seconds"],
                     "gate_seconds": stats["build_pool"]["gate_seconds"],
                     "pool_bytes": stats["build_pool"]["pool_bytes"],
                     "model_load_seconds": stats["task_adapt"].get("base_load_seconds", 0.0) + load_seconds},
        "machine": {"platform": platform.platform(), "processor": platform.machine(),
                    "torch_threads": torch.get_num_threads(), "device": run.device},
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "config": config.model_dump(),
        "per_user": per_user(run),
    }
    groups_file = Path(data) / "groups.json"
    groups = json.loads(groups_file.read_text()) if groups_file.exists() else None
    if groups:
        results["diagnostics"] = group_diagnostics(run, groups)
    if settings.variants:
        results["variants"] = {}
    for vname, vconfig in variants.items():
        vrun = run.derive(out / "variants" / vname / "run", vconfig)
        vrun.pipeline()
        rows = {vname: "perpcs", **({f"{vname}+rag": "perpcs+rag"} if "perpcs+rag" in settings.methods else {})}
        methods.update(Bench(vrun, settings, out).evaluate(rows))
        vstats = vrun.stats()["build_pool"]
        results["variants"][vname] = {
            "settings": settings.variants[vname], "gate_seconds": vstats["gate_seconds"],
            "pool_bytes": vstats["pool_bytes"],
            **({"diagnostics": group_diagnostics(vrun, groups)} if groups else {})}
    results["statistics"] = bench_statistics(out, results)
    results_plot(results, out / "results.png")
    selection_plot(run, out / "selection.png", groups)
    for vname in variants:
        selection_plot(Run(out / "variants" / vname / "run"), out / f"selection-{vname}.png", groups)
    if costs:
        results["alternating_costs"] = costs
    if (cal := run.calibrate()) is not None:
        results["calibration"] = {k: v for k, v in cal.items() if k not in ("predictions", "golds")}
    results["mixing"] = {"perpcs": mixing(run), **{v: mixing(Run(out / "variants" / v / "run")) for v in variants}}
    typed = BenchResults.model_validate(results)
    typed.save(out / "results.json")
    results = typed.as_json()
    write_text(out / "results.md", results_table(results))
    return results
