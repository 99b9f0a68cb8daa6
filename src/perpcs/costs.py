"""What personalizing one user costs with OPPU and with Per-Pcs, measured so the two compare.

A bench times OPPU and assembly in phases minutes apart, and a shared machine's speed drifts in
between (benchmarks/README.md). Here both run for the same target, one right after the other, in
one process, on the same merged model and threads: OPPU training with the sharers' settings (what
the bench's OPPU does; nothing trained is kept) and assembly with the run's pool and settings. Each
target gives one ratio; the spread of the ratios says how much the drift still moves them. The same
pass writes each OPPU adapter with `save_pretrained` and each recipe in the run's format, to
temporary folders, so the storage ratio is measured in the same run too.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable, Sequence

from tqdm.auto import tqdm

from perpcs.assembly import Assembler
from perpcs.lora import save_adapter
from perpcs.recipe_format import EXTENSION
from perpcs.runfolder import RunFolder
from perpcs.settings import AssemblySettings
from perpcs.user_lora import train_user_lora
from perpcs.utils import dir_bytes


def oppu_seconds(run: RunFolder, user_id: str, keep: Path | None = None):
    """(the model, unwrapped again; seconds) of training `user_id`'s own LoRA as the bench's OPPU does;
    with `keep`, the adapter is written there as the bench keeps it (`keep/adapter` by `save_pretrained`,
    `keep/stats.json`), after the clock stops."""
    peft_model, stats = train_user_lora(run, run.data.user(user_id), desc=f"oppu {user_id}")
    if keep is not None:
        save_adapter(peft_model, stats, keep)
    return peft_model.unload(), stats["seconds"]


def assembly_seconds(run: RunFolder, model, tok, user_id: str, keep: Path | None = None, pool=None,
                     settings: AssemblySettings | None = None):
    """(the model, unwrapped again; seconds) of assembling `user_id`'s recipe from `run`'s pool with its
    settings (or the given ones), the Assembler (pool and key index opened) made before the clock
    starts, as in bulk assembly."""
    user = run.data.user(user_id)
    settings = settings or run.rule.assembly
    assembler = Assembler.for_run(model, pool or run.open_pool(), run.config, settings, run.neighbour_table(settings))
    try:
        t0 = time.perf_counter()
        recipe = assembler.recipe(run.data.task, tok, user.history, user.profile, user=user_id)
        seconds = time.perf_counter() - t0
    finally:
        model = assembler.unload()
    if keep is not None:
        recipe.save(keep)
    return model, seconds


def spread(values: Sequence[float]) -> dict:
    """Median, quartiles and range of `values`."""
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive") if len(values) > 1 else (values[0],) * 3
    return {"median": statistics.median(values), "q1": q1, "q3": q3, "min": min(values), "max": max(values)}


def alternating_costs(run: RunFolder, user_ids: Sequence[str], pool=None, settings: AssemblySettings | None = None,
                      oppu_dir: Callable[[str], Path] | None = None) -> dict:
    """OPPU training and Per-Pcs assembly (the run's pool and settings, or the given ones) timed
    alternately per target in this process, with the per-target time ratios (OPPU / assembly) and
    their spread, and the on-disk size of each. `oppu_dir(user)`: where the bench keeps that user's
    OPPU; an OPPU trained here is kept there if none is yet, so the bench does not train it twice."""
    model, tok = run.merged
    settings = settings or run.rule.assembly
    per_user = {}
    with tempfile.TemporaryDirectory() as tmp:
        for uid in tqdm(user_ids, desc="costs: OPPU and assembly, alternately"):
            keep, recipe = Path(tmp) / f"{len(per_user)}-oppu", Path(tmp) / f"{len(per_user)}{EXTENSION}"
            if oppu_dir is not None and not (oppu_dir(uid) / "stats.json").exists():
                keep = oppu_dir(uid)
            model, oppu = oppu_seconds(run, uid, keep)
            model, assembly = assembly_seconds(run, model, tok, uid, recipe, pool, settings)
            per_user[uid] = {"oppu_seconds": oppu, "assembly_seconds": assembly, "time_ratio": oppu / assembly,
                             "oppu_adapter_bytes": dir_bytes(keep / "adapter"), "recipe_bytes": recipe.stat().st_size}
    values = list(per_user.values())
    return {"users": per_user,
            "time_ratio": spread([v["time_ratio"] for v in values]),
            "storage_ratio": spread([v["oppu_adapter_bytes"] / v["recipe_bytes"] for v in values]),
            "history_budget": {"recent_k": settings.recent_k, "budget_tokens": settings.budget_tokens}}
