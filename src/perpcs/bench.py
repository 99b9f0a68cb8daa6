"""`perpcs bench`: Per-Pcs and its baselines side by side, with their costs, in one run.

Splits users (targets: the most active), runs the pipeline, personalises every target user with
every method, generates greedy answers to their queries, scores them, and writes
OUT/results.json, OUT/results.md (the table to read first, with CIs and paired comparisons: see
`stats`), OUT/results.png, OUT/selection.png (see `report`) and OUT/preds/<method>.json.
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
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from tqdm.auto import tqdm

from perpcs.baselines import METHODS, average_loras, generate, load_lora, prompts, split_method
from perpcs.calibration import calibration_lines, with_rule_fixed
from perpcs.costs import alternating_costs
from perpcs.data import User
from perpcs.evaluation import primary_metric, score, write_lamp_outputs
from perpcs.pipeline import PAPER_RULE, Run, RunConfig, check_later_steps, safe_name
from perpcs.prime import PrimeSettings, prime_user
from perpcs.recipe import Recipe, apply_lora, apply_recipe
from perpcs.mixing import mixing, mixing_lines
from perpcs.report import bench_statistics, results_plot, selection_plot, statistics_lines
from perpcs.selection import history_embeddings, nearest_users
from perpcs.stats import gain_share
from perpcs.tasks import answer_budget, cut_short
from perpcs.utils import dir_bytes, write_json, write_text


class BenchSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    methods: list[str] = list(METHODS)
    rag_k: int = 1
    retrieval_m: int = 1
    gen_batch_size: int = 16
    # name -> settings of steps 3-5 (e.g. {"key": "activation"}): each variant reuses the run's task
    # model and sharer LoRAs (`Run.derive`) and is reported as rows `name` and `name+rag`
    variants: dict[str, dict] = {}
    # OPPU (and oppu+rag) on the first M targets only, every other method on all: OPPU is the only
    # method that trains per target; comparisons with it use the queries they share
    oppu_targets: int | None = Field(None, ge=1)
    prime: PrimeSettings = PrimeSettings()
    # each target keeps only its newest K history items (OPPU trains on them, retrieval reads them;
    # Per-Pcs reads its run's `assembly.recent_k`): the history curve (`perpcs curve`)
    history_k: int | None = Field(None, ge=1)
    # targets whose OPPU training and assembly are also timed alternately in one process (perpcs.costs)
    cost_targets: int = 2

    @field_validator("methods")
    @classmethod
    def _known_methods(cls, methods: list[str]) -> list[str]:
        """Checked here, before the pipeline runs, not after it."""
        unknown = sorted(set(methods) - set(METHODS))
        if unknown:
            raise ValueError(f"unknown methods {unknown}; known: {', '.join(METHODS)}")
        if not methods:
            raise ValueError(f"no methods to run; known: {', '.join(METHODS)}")
        return methods

    @field_validator("variants")
    @classmethod
    def _variant_names(cls, variants: dict[str, dict]) -> dict[str, dict]:
        for name in variants:
            if name in METHODS or "+" in name or not name.replace("-", "").replace("_", "").isalnum():
                raise ValueError(f"variant name {name!r}: use letters, digits, - and _, and not a method's name")
        return variants


class _Personalized:
    """What a method gives one user: the model to generate with, the RAG depth, and its costs."""

    def __init__(self, model, rag_k: int = 0, seconds: float = 0.0, nbytes: int = 0):
        self.model, self.rag_k, self.seconds, self.nbytes = model, rag_k, seconds, nbytes


class Bench:
    def __init__(self, run: Run, settings: BenchSettings, out: Path):
        self.run, self.settings, self.out = run, settings, out
        self.model, self.tok = run.merged
        self.task = run.data.task
        self.budget = answer_budget(self.task, self.tok)

    @contextmanager
    def personalize(self, method: str, user: User):
        """Yield the user's personalised model for `method`; leave the merged model clean afterwards."""
        s, run = self.settings, self.run
        method, with_rag = split_method(method)
        rag_k = s.rag_k if with_rag else 0
        if method == "non_personalized" or not user.history:  # cold start: without history, the task model
            yield _Personalized(self.model, rag_k)
            return
        if method == "perpcs":
            recipe_path = run.recipe_path(user.user_id)
            recipe = Recipe.load(recipe_path)
            seconds = recipe.seconds if recipe.seconds is not None else \
                run.stats().get("assemble", {}).get("seconds_per_user", {}).get(user.user_id, float("nan"))  # older recipes
            peft_model = apply_recipe(self.model, recipe, self.pool)
            result = _Personalized(peft_model, rag_k, seconds, recipe_path.stat().st_size)
        elif method == "peft_retrieval":
            t0 = time.perf_counter()
            idx = nearest_users(history_embeddings([user])[0], self.sharer_embeddings, s.retrieval_m)
            chosen = [self.sharers[i] for i in idx]
            weights = average_loras([load_lora(run.sharer_dir(u) / "adapter") for u in chosen])
            seconds = time.perf_counter() - t0
            peft_model = apply_lora(self.model, run.config.lora.model_dump(), run.config.lora.r, weights)
            result = _Personalized(peft_model, rag_k, seconds, len(json.dumps([self.pool.pseudonym(u) for u in chosen])))
        elif method == "prime":
            t0 = time.perf_counter()
            peft_model, chosen, weights, losses = prime_user(run, self.model, self.tok, user, self.sharers,
                                                             self.sharer_embeddings, s.prime)
            seconds = time.perf_counter() - t0
            mix = {self.pool.pseudonym(u): round(float(w), 7) for u, w in zip(chosen, weights)}
            write_json(self.out / "prime" / f"{safe_name(user.user_id)}.json", {"weights": mix, "losses": losses})
            result = _Personalized(peft_model, rag_k, seconds, len(json.dumps(mix)))
        else:  # oppu
            peft_model, seconds, nbytes = self.oppu(user)
            result = _Personalized(peft_model, rag_k, seconds, nbytes)
        try:
            yield result
        finally:
            peft_model.unload()

    def oppu_dir(self, user_id: str) -> Path:
        k = self.settings.history_k  # OPPU of a truncated history is another LoRA, kept apart
        return self.run.folder / ("oppu" if k is None else f"oppu-newest{k}") / safe_name(user_id)

    def oppu(self, user: User):
        """Train (or reload) the user's own LoRA with the sharers' settings and budget."""
        from peft import PeftModel

        folder = self.oppu_dir(user.user_id)
        stats_path = folder / "stats.json"
        if stats_path.exists():
            peft_model = PeftModel.from_pretrained(self.model, folder / "adapter")
            stats = json.loads(stats_path.read_text())
        else:
            peft_model, stats = self.run.user_lora(user, desc=f"oppu {user.user_id}")
            peft_model.save_pretrained(folder / "adapter")
            write_json(stats_path, stats)
        return peft_model.eval(), stats["seconds"], dir_bytes(folder / "adapter")

    def evaluate(self, methods: dict[str, str] | None = None) -> dict:
        """{row name: results} for each method (`methods`: row name -> method; default: the settings')."""
        run, task = self.run, self.task
        methods = methods or {m: m for m in self.settings.methods}
        targets = [u.model_copy(update={"history": u.history[-self.settings.history_k:]}) if self.settings.history_k
                   else u for u in run.users(run.split["targets"])]
        self.pool = run.open_pool()
        self.sharers = [sel.user_id for sel in run.select()]
        self.sharer_embeddings = history_embeddings(run.users(self.sharers))
        golds = {q.id: q.output for u in targets for q in u.queries}
        write_lamp_outputs(self.out / "golds.json", task.name, golds)
        results = {}
        for name, method in methods.items():
            preds, seconds, nbytes, answers = {}, [], [], []
            users = targets[: self.settings.oppu_targets] if split_method(method)[0] == "oppu" else targets
            for user in tqdm(users, desc=f"bench: {name}"):
                with self.personalize(method, user) as p:
                    texts = generate(p.model, self.tok, prompts(task, user, p.rag_k), self.budget,
                                     self.settings.gen_batch_size)
                answers += texts
                preds.update({q.id: task.parse_output(t) for q, t in zip(user.queries, texts)})
                seconds.append(p.seconds)
                nbytes.append(p.nbytes)
            write_lamp_outputs(self.out / "preds" / f"{name}.json", task.name, preds)
            results[name] = {"metrics": score(task, {q: golds[q] for q in preds}, preds),
                               "personalize_seconds_per_user": statistics.mean(seconds),
                               "bytes_per_user": statistics.mean(nbytes),
                               "cut_short": cut_short(task, answers, self.tok, self.budget)}
        return results


def group_diagnostics(run: Run, groups: dict[str, int], recipes: dict[str, Recipe] | None = None) -> dict:
    """For data with known latent groups (synthetic): how much of each recipe's weight goes to sharers
    of the target's own group, against the share of such sharers in the pool (what random picking gives)."""
    pool = run.open_pool()
    group_of = {pool.pseudonym(s.user_id): groups[s.user_id] for s in run.select()}
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


BUDGET_KEYS = ("steps", "epochs", "best_epoch", "stopped_early", "val_losses", "seconds")


def per_user(run: Run) -> dict:
    """What each user got: the training budget of every sharer and OPPU LoRA (epochs, steps, early
    stop, held-out losses) and the strength chosen for each target's recipe."""
    def budget(stats: dict) -> dict:
        return {k: stats[k] for k in BUDGET_KEYS if k in stats}

    oppu = run.folder / "oppu"
    return {"sharers": {s.user_id: budget(json.loads((run.sharer_dir(s.user_id) / "lora.json").read_text()))
                        for s in run.select()},
            "oppu": {u: budget(json.loads(p.read_text())) for u in run.split["targets"]
                     if (p := oppu / safe_name(u) / "stats.json").exists()},
            "strength": {u: Recipe.load(run.recipe_path(u)).strength for u in run.split["targets"]}}


def bench(data: str | Path, out: str | Path, config: RunConfig, settings: BenchSettings) -> dict:
    """Run the pipeline and every method; write OUT/results.json and OUT/results.md."""
    out = Path(out)
    variants = {name: check_later_steps(config, config.updated(with_rule_fixed(overrides)))
                for name, overrides in settings.variants.items()}  # bad settings fail here, before any work
    run = Run.create(out / "run", config)
    run.pipeline()
    t0 = time.perf_counter()
    b = Bench(run, settings, out)
    load_seconds = time.perf_counter() - t0
    # first, so that the bench's OPPU reuses the adapters trained while timing (no target trains twice)
    costs = (alternating_costs(run, run.split["targets"][:settings.cost_targets], oppu_dir=b.oppu_dir)
             if settings.cost_targets else None)
    methods = b.evaluate()
    stats = run.stats()
    name, higher = primary_metric(run.data.task)
    results = {
        "dataset": str(data), "task": run.data.task.name, "kind": run.data.task.kind,
        "base_model": config.base or "SmolLM2-135M-Instruct (default)", "base_fingerprint": run.merged_fingerprint,
        "seed": config.seed, "n_targets": len(run.split["targets"]), "n_sharers": len(run.select()),
        "n_queries": sum(len(u.queries) for u in run.users(run.split["targets"])), "oppu_targets": settings.oppu_targets,
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
            "settings": settings.variants[vname], "gate_seconds": vstats["gate_seconds"], "pool_bytes": vstats["pool_bytes"],
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
    write_json(out / "results.json", results)
    write_text(out / "results.md", results_table(results))
    return results


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def results_table(r: dict) -> str:
    """The markdown table a person reads first: method x metrics x cost, with ratios to OPPU."""
    methods = r["methods"]
    metric_names = [k for k in next(iter(methods.values()))["metrics"] if k != "n"]
    primary = r["primary_metric"]["name"]
    oppu, base = methods.get("oppu"), methods.get("non_personalized")
    rag_pair = "rag" in methods and "oppu+rag" in methods
    head = ["method", *metric_names, "personalize s/user", "bytes/user"]
    if oppu:
        head += ["time vs OPPU", "storage vs OPPU"]
    if oppu and base:
        head.append("share of OPPU's gain")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    higher = r["primary_metric"]["higher_is_better"]
    shares = ({m: st["gain_share"] for m, st in r["statistics"]["methods"].items()} if "statistics" in r else
              {m: gain_share({k: v["metrics"][primary] for k, v in methods.items()}, m, higher) for m in methods})
    for name, m in methods.items():
        row = [name, *(f"{m['metrics'][k]:.4f}" for k in metric_names),
               f"{m['personalize_seconds_per_user']:.2f}", _fmt_bytes(m["bytes_per_user"])]
        kind = split_method(name)[0]
        if oppu:
            t, b = m["personalize_seconds_per_user"], m["bytes_per_user"]
            row += [f"{oppu['personalize_seconds_per_user'] / t:.1f}x less" if t and kind != "oppu" else "-",
                    f"{oppu['bytes_per_user'] / b:.0f}x less" if b and kind != "oppu" else "-"]
        if oppu and base:
            share = shares[name]
            row.append("-" if share is None else f"{share + 0.0:.0%}")  # + 0.0: no '-0%'
        lines.append("| " + " | ".join(row) + " |")
    o = r["one_time"]
    return "\n".join([
        f"# perpcs bench: {r['task']} ({r['kind']}), {r['n_targets']} target users, {r['n_queries']} queries, "
        f"{r['n_sharers']} sharers, seed {r['seed']}",
        "",
        f"Primary metric: {primary} ({'higher' if r['primary_metric']['higher_is_better'] else 'lower'} is better). "
        f"Base: {r['base_model']} on {r['machine']['device']}, {r['date']}."
        + (f" History budget of assembly: the {a['recent_k']} newest items"
           + (f", at most {a['budget_tokens']} tokens." if a.get("budget_tokens") else ".")
           if (a := r.get("config", {}).get("assembly")) else ""),
        "",
        *lines,
        *(["", "Share of OPPU's gain: from non_personalized to oppu" + ("; for methods with retrieval (+rag), "
               "from rag to oppu+rag" if rag_pair else "") + "; shown only where OPPU's gain is positive."]
          if oppu and base else []),
        *(["", f"OPPU ran on the first {r['oppu_targets']} targets only ({oppu['metrics']['n']} queries); "
               "every other method on all targets."] if oppu and r.get("oppu_targets") else []),
        "",
        f"One-time costs: task adaptation {o['task_adapt_seconds']:.0f} s, sharer LoRAs {o['sharer_lora_seconds']:.0f} s, "
        f"gates {o['gate_seconds']:.0f} s, pool {_fmt_bytes(o['pool_bytes'])}; model loading {o['model_load_seconds']:.0f} s.",
        *([f"Known latent groups: {d['same_group_weight']:.0%} of the assembled weight comes from sharers of the "
           f"target's own group (random picking: {d['same_group_chance']:.0%})."]
          if (d := r.get("diagnostics")) and d["same_group_weight"] is not None else []),
        *([f"Timed alternately in one process for {len(a['users'])} targets (perpcs.costs, history budget "
           f"{a['history_budget']}): OPPU takes {a['time_ratio']['median']:.1f}x the time of Per-Pcs assembly "
           f"(median; min {a['time_ratio']['min']:.1f}x, max {a['time_ratio']['max']:.1f}x); its adapter "
           f"is {a['storage_ratio']['median']:.0f}x the recipe on disk."] if (a := r.get("alternating_costs")) else []),
        *(f"Variant {name}: {json.dumps(v['settings'])}, same task model and sharer LoRAs; piece keys "
          f"{v['gate_seconds']:.0f} s, pool {_fmt_bytes(v['pool_bytes'])}"
          + (f"; {v['diagnostics']['same_group_weight']:.0%} of its assembled weight from the target's own group."
             if v.get("diagnostics", {}).get("same_group_weight") is not None else ".")
          for name, v in r.get("variants", {}).items()),
        *(["", "![results: metric with CI against personalization seconds](results.png)",
           "![selection: assembled weight by sharer and layer, per target](selection.png)",
           *(f"![selection of variant {name}](selection-{name}.png)" for name in r.get("variants", {})),
           *statistics_lines(r)] if "statistics" in r else []),
        *(["", *mixing_lines(r["mixing"])] if "mixing" in r else []),
        *(["", *calibration_lines(c, c["cost"].get("other_key_pool_seconds"))] if (c := r.get("calibration")) else []),
        "",
    ])


# The demo's data size and budgets: chosen so that `perpcs demo` runs in about 15 minutes on 2 CPU cores.
# Per-Pcs with the default rule, and the paper's rule beside it as a variant (see README).
DEMO_CONFIG = {"users": 48, "queries": 12, "run": {"n_targets": 5, "n_sharers": 6, "task_train": {"steps": 25}},
               "variants": {"perpcs-paper": PAPER_RULE}}
