"""How much a pool's recipes mix sharers, and how personal they are.

Two numbers make the failure modes of a selection rule visible without reading code:
- the effective number of sharers at a position, exp(entropy of its weights): 1 is one-hot (a rule
  that behaves like retrieving one sharer's whole LoRA), k is an even mix of k;
- the spread between targets: at each position, the total-variation distance of a target's weights
  from the average target's (0: every target gets the same mix - collaboration, not personalization;
  1: disjoint picks), averaged over positions and targets.
"""

from __future__ import annotations

import math
import re
import statistics

from perpcs.recipe import Recipe


def layer_of(position: str) -> int:
    found = re.search(r"layers\.(\d+)\.", position)
    return int(found.group(1)) if found else -1


def effective_sharers(weights: list[tuple[str, float]]) -> float:
    """exp(entropy) of one position's weights (normalised); 0 for a position with no piece."""
    total = sum(w for _, w in weights)
    if total <= 0:
        return 0.0
    return math.exp(-sum(p * math.log(p) for _, w in weights if (p := w / total) > 0))


def spread(recipes: dict[str, Recipe]) -> float | None:
    """Mean total-variation distance of each target's weights from the average target's (None under 2 targets)."""
    if len(recipes) < 2:
        return None
    distances = []
    for pos in next(iter(recipes.values())).pieces:
        mixes = [dict(r.pieces.get(pos, [])) for r in recipes.values()]
        names = set().union(*mixes)
        mean = {n: statistics.mean(m.get(n, 0.0) for m in mixes) for n in names}
        distances += [0.5 * sum(abs(m.get(n, 0.0) - mean[n]) for n in names) for m in mixes]
    return statistics.mean(distances) if distances else None


def per_layer(recipe: Recipe) -> dict[int, float]:
    """Mean effective sharers of a recipe's positions, layer by layer (the curve of `selection.png`)."""
    layers: dict[int, list[float]] = {}
    for pos, chosen in recipe.pieces.items():
        layers.setdefault(layer_of(pos), []).append(effective_sharers(chosen))
    return {layer: statistics.mean(v) for layer, v in sorted(layers.items())}


def summarize(recipes: dict[str, Recipe]) -> dict:
    """Per target: mean effective sharers over positions; the mean over targets; the spread.

    Per-layer curves stay out: a bench keeps this for every Per-Pcs row, and with 30 layers x targets x
    rules they made most of a results file (`per_layer` draws them from the recipes instead).
    """
    per_target = {}
    for uid, r in recipes.items():
        eff = [effective_sharers(chosen) for chosen in r.pieces.values()]
        per_target[uid] = statistics.mean(eff) if eff else 0.0
    return {"effective_sharers": per_target,
            "effective_sharers_mean": statistics.mean(per_target.values()) if per_target else None,
            "spread": spread(recipes)}


def mixing(run) -> dict:
    """`summarize` of a run's target recipes (`run`: a run folder whose recipes exist)."""
    return summarize({u: Recipe.load(run.recipe_path(u)) for u in run.split["targets"]})
