"""Step 5 for a run folder's users: recipes assembled with the run's rule and pool, each saved as it is made.

The method's scoring, choosing and mixing is `assembly.Assembler`; this is the glue around it that knows a run
folder (its chosen rule, pool, neighbour table, data and recipe paths), for `Run.assemble`, Ray workers and
`perpcs serve`.
"""

from __future__ import annotations

import time

from tqdm.auto import tqdm

from perpcs.assembly import Assembler
from perpcs.data import Item
from perpcs.errors import InputError
from perpcs.recipe import Recipe
from perpcs.runfolder import RunFolder


def assemble_users(run: RunFolder, user_ids: list[str]) -> dict[str, float]:
    """Step 5 for these users of the run's data, each recipe saved as it is made; seconds per user."""
    if not user_ids:
        return {}
    model, tok = run.merged
    assembler = Assembler.for_run(model, run.open_pool(), run.config, run.rule.assembly, run.neighbour_table())
    seconds = {}
    try:
        for uid in tqdm(user_ids, desc="step 5: assemble"):
            user = run.data.user(uid)
            t0 = time.perf_counter()
            recipe = assembler.recipe(run.data.task, tok, user.history, user.profile, user=uid)
            seconds[uid] = recipe.seconds = time.perf_counter() - t0
            recipe.save(run.recipe_path(uid))
    finally:
        assembler.unload()
    return seconds


def assemble_history(run: RunFolder, user_id: str, history: list[Item], profile: str | None = None) -> Recipe:
    """The recipe of a user who is not in the run's data, from the history given (not kept); saved with the
    others (under the run's lock), so `export` and `perpcs serve` find it. A user of the data set is refused:
    its recipe is the one its own history there gives."""
    path = run.recipe_path(user_id)  # refuses an id that is no text
    if any(u.user_id == user_id for u in run.data.users):
        raise InputError(f"user {user_id!r} is in the run's data set {run.config.data}: its recipe ({path}) is "
                         "assembled from its history there (`perpcs assemble --users`); give the new history a "
                         "user id of its own")
    with run.writing():
        model, tok = run.merged
        assembler = Assembler.for_run(model, run.open_pool(), run.config, run.rule.assembly, run.neighbour_table())
        try:
            recipe = assembler.recipe(run.data.task, tok, history, profile, user=user_id)
        finally:
            assembler.unload()
        recipe.save(path)
    return recipe
