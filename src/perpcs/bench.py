"""`perpcs bench`: Per-Pcs and its baselines side by side, with their costs, in one run.

Splits users (targets: the most active), runs the pipeline, personalises every target user with
every method, generates greedy answers to their queries, scores them, and writes
OUT/results.json, OUT/results.md (the table to read first) and OUT/preds/<method>.json.
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
from pydantic import BaseModel, ConfigDict, field_validator
from tqdm.auto import tqdm

from perpcs.baselines import METHODS, average_loras, generate, load_lora, prompts, split_method
from perpcs.costs import alternating_costs
from perpcs.data import User
from perpcs.evaluation import primary_metric, score, write_lamp_outputs
from perpcs.pipeline import Run, RunConfig, check_later_steps, safe_name
from perpcs.recipe import Recipe, apply_lora, apply_recipe
from perpcs.selection import history_embeddings, nearest_users
from perpcs.training import train_lora
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

    @contextmanager
    def personalize(self, method: str, user: User):
        """Yield the user's personalised model for `method`; leave the merged model clean afterwards."""
        s, run = self.settings, self.run
        method, with_rag = split_method(method)
        rag_k = s.rag_k if with_rag else 0
        if method == "non_personalized":
            yield _Personalized(self.model, rag_k)
            return
        if method == "perpcs":
            recipe_path = run.recipe_path(user.user_id)
            seconds = run.stats()["assemble"]["seconds_per_user"][user.user_id]
            peft_model = apply_recipe(self.model, Recipe.load(recipe_path), self.pool)
            result = _Personalized(peft_model, rag_k, seconds, recipe_path.stat().st_size)
        elif method == "peft_retrieval":
            t0 = time.perf_counter()
            idx = nearest_users(history_embeddings([user])[0], self.sharer_embeddings, s.retrieval_m)
            chosen = [self.sharers[i] for i in idx]
            weights = average_loras([load_lora(run.sharer_dir(u) / "adapter") for u in chosen])
            seconds = time.perf_counter() - t0
            peft_model = apply_lora(self.model, run.config.lora.model_dump(), run.config.lora.r, weights)
            result = _Personalized(peft_model, rag_k, seconds, len(json.dumps([self.pool.pseudonym(u) for u in chosen])))
        else:  # oppu
            peft_model, seconds, nbytes = self.oppu(user)
            result = _Personalized(peft_model, rag_k, seconds, nbytes)
        try:
            yield result
        finally:
            peft_model.unload()

    def oppu(self, user: User):
        """Train (or reload) the user's own LoRA with the sharers' settings and budget."""
        from peft import PeftModel

        folder = self.run.folder / "oppu" / safe_name(user.user_id)
        stats_path = folder / "stats.json"
        if stats_path.exists():
            peft_model = PeftModel.from_pretrained(self.model, folder / "adapter")
            stats = json.loads(stats_path.read_text())
        else:
            c = self.run.config
            examples = self.run.examples(user, self.tok)
            peft_model, stats = train_lora(self.model, examples, c.lora, c.training("sharer_train", user.user_id),
                                           self.tok.pad_token_id, desc=f"oppu {user.user_id}")
            peft_model.save_pretrained(folder / "adapter")
            write_json(stats_path, stats)
        return peft_model.eval(), stats["seconds"], dir_bytes(folder / "adapter")

    def evaluate(self, methods: dict[str, str] | None = None) -> dict:
        """{row name: results} for each method (`methods`: row name -> method; default: the settings')."""
        run, task = self.run, self.task
        methods = methods or {m: m for m in self.settings.methods}
        targets = run.users(run.split["targets"])
        self.pool = run.open_pool()
        self.sharers = [sel.user_id for sel in run.select()]
        self.sharer_embeddings = history_embeddings(run.users(self.sharers))
        golds = {q.id: q.output for u in targets for q in u.queries}
        write_lamp_outputs(self.out / "golds.json", task.name, golds)
        results = {}
        for name, method in methods.items():
            preds, seconds, nbytes = {}, [], []
            for user in tqdm(targets, desc=f"bench: {name}"):
                with self.personalize(method, user) as p:
                    texts = generate(p.model, self.tok, prompts(task, user, p.rag_k), task.new_tokens,
                                     self.settings.gen_batch_size)
                preds.update({q.id: task.parse_output(t) for q, t in zip(user.queries, texts)})
                seconds.append(p.seconds)
                nbytes.append(p.nbytes)
            write_lamp_outputs(self.out / "preds" / f"{name}.json", task.name, preds)
            results[name] = {"metrics": score(task, golds, preds),
                               "personalize_seconds_per_user": statistics.mean(seconds),
                               "bytes_per_user": statistics.mean(nbytes)}
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
        same.append(sum(w for sid, w in weights if group_of[sid] == groups[uid]) / total)
        chance.append(sum(g == groups[uid] for g in group_of.values()) / len(group_of))
    return {"same_group_weight": statistics.mean(same), "same_group_chance": statistics.mean(chance),
            "sharer_groups": sorted(group_of.values())}


def bench(data: str | Path, out: str | Path, config: RunConfig, settings: BenchSettings) -> dict:
    """Run the pipeline and every method; write OUT/results.json and OUT/results.md."""
    out = Path(out)
    variants = {name: check_later_steps(config, config.updated(overrides))
                for name, overrides in settings.variants.items()}  # bad settings fail here, before any work
    run = Run.create(out / "run", config)
    run.pipeline()
    t0 = time.perf_counter()
    b = Bench(run, settings, out)
    load_seconds = time.perf_counter() - t0
    methods = b.evaluate()
    stats = run.stats()
    name, higher = primary_metric(run.data.task)
    results = {
        "dataset": str(data), "task": run.data.task.name, "kind": run.data.task.kind,
        "base_model": config.base or "SmolLM2-135M-Instruct (default)", "base_fingerprint": run.merged_fingerprint,
        "seed": config.seed, "n_targets": len(run.split["targets"]), "n_sharers": len(run.select()),
        "n_queries": sum(len(u.queries) for u in run.users(run.split["targets"])),
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
        methods.update(Bench(vrun, settings, out).evaluate({vname: "perpcs", f"{vname}+rag": "perpcs+rag"}))
        vstats = vrun.stats()["build_pool"]
        results["variants"][vname] = {
            "settings": settings.variants[vname], "gate_seconds": vstats["gate_seconds"], "pool_bytes": vstats["pool_bytes"],
            **({"diagnostics": group_diagnostics(vrun, groups)} if groups else {})}
    if settings.cost_targets:
        results["alternating_costs"] = alternating_costs(run, run.split["targets"][:settings.cost_targets])
    write_json(out / "results.json", results)
    write_text(out / "results.md", results_table(results))
    return results


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def gain_share(methods: dict, name: str, primary: str) -> float | None:
    """The share of OPPU's gain over non_personalized that method `name` reaches on the primary metric
    (None without a gain); a method with retrieval (+rag) is measured from rag to oppu+rag when both ran."""
    lo, hi = methods["non_personalized"], methods["oppu"]
    if split_method(name)[1] and "rag" in methods and "oppu+rag" in methods:
        lo, hi = methods["rag"], methods["oppu+rag"]
    gain = hi["metrics"][primary] - lo["metrics"][primary]
    return (methods[name]["metrics"][primary] - lo["metrics"][primary]) / gain if gain else None


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
    for name, m in methods.items():
        row = [name, *(f"{m['metrics'][k]:.4f}" for k in metric_names),
               f"{m['personalize_seconds_per_user']:.2f}", _fmt_bytes(m["bytes_per_user"])]
        kind = split_method(name)[0]
        if oppu:
            t, b = m["personalize_seconds_per_user"], m["bytes_per_user"]
            row += [f"{oppu['personalize_seconds_per_user'] / t:.1f}x less" if t and kind != "oppu" else "-",
                    f"{oppu['bytes_per_user'] / b:.0f}x less" if b and kind != "oppu" else "-"]
        if oppu and base:
            share = gain_share(methods, name, primary)
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
        *(["", "Share of OPPU's gain: from non_personalized to oppu; for methods with retrieval (+rag), "
               "from rag to oppu+rag."] if oppu and base and rag_pair else []),
        "",
        f"One-time costs: task adaptation {o['task_adapt_seconds']:.0f} s, sharer LoRAs {o['sharer_lora_seconds']:.0f} s, "
        f"gates {o['gate_seconds']:.0f} s, pool {_fmt_bytes(o['pool_bytes'])}; model loading {o['model_load_seconds']:.0f} s.",
        *([f"Known latent groups: {d['same_group_weight']:.0%} of the assembled weight comes from sharers of the "
           f"target's own group (random picking: {d['same_group_chance']:.0%})."] if (d := r.get("diagnostics")) else []),
        *([f"Timed alternately in one process for {len(a['users'])} targets (perpcs.costs, history budget "
           f"{a['history_budget']}): OPPU takes {a['time_ratio']['median']:.1f}x the time of Per-Pcs assembly "
           f"(median; min {a['time_ratio']['min']:.1f}x, max {a['time_ratio']['max']:.1f}x); its adapter "
           f"is {a['storage_ratio']['median']:.0f}x the recipe on disk."] if (a := r.get("alternating_costs")) else []),
        *(f"Variant {name}: {json.dumps(v['settings'])}, same task model and sharer LoRAs; piece keys "
          f"{v['gate_seconds']:.0f} s, pool {_fmt_bytes(v['pool_bytes'])}"
          + (f"; {v['diagnostics']['same_group_weight']:.0%} of its assembled weight from the target's own group."
             if "diagnostics" in v else ".")
          for name, v in r.get("variants", {}).items()),
        "",
    ])


# The demo's data size and budgets: chosen so that `perpcs demo` runs in about 15 minutes on 2 CPU cores.
# The variant: Per-Pcs with activation keys and the exact (cat) mix, next to the paper's rule (see README).
DEMO_CONFIG = {"users": 48, "queries": 12, "run": {"n_targets": 5, "n_sharers": 6, "task_train": {"steps": 25}},
               "variants": {"perpcs-act-cat": {"key": "activation", "assembly": {"mix": "cat"}}}}
