"""PriME-style merging, a peer of Per-Pcs from after the paper (bench method `prime`).

The target's PEFT is a weighted mix of the whole LoRAs of the m sharers nearest to it by history
embedding (as `peft_retrieval` finds them); the weights are searched by CMA-ES (the `cma` package)
to minimise the LM loss on the target's newest history items, within a budget of loss evaluations
(10 by default, PriME's). No gradient and no LoRA of the target's own: a few forward passes.

Weights are the softmax of the CMA-ES vector: the search is unconstrained, the weights stay positive
and sum to 1 (a convex mix, as `lora.average_loras`; the start x = 0 is exactly that average).
A and B are each mixed with the weights, as the paper's linear mix.
"""

from __future__ import annotations

from typing import Callable, Sequence

import cma
import numpy as np
import torch

from perpcs.lora import Lora, apply_lora, install, lora_layers, mix_loras
from perpcs.settings import PrimeSettings
from perpcs.training import Example, collate, lm_loss


def softmax(x) -> np.ndarray:
    e = np.exp(np.asarray(x, dtype=np.float64) - np.max(x))
    return e / e.sum()


def search(loss: Callable[[np.ndarray], float], m: int, settings: PrimeSettings,
           seed: int) -> tuple[np.ndarray, list[float]]:
    """CMA-ES over m softmax logits: whole generations while they fit the budget; the best weights seen
    and every loss evaluated. One sharer needs no search (weight 1, no evaluation)."""
    if m == 1:
        return np.ones(1), []
    # cma reads seed 0 as "seed from the clock": keep it positive
    es = cma.CMAEvolutionStrategy(np.zeros(m), settings.sigma0,
                                  {"popsize": settings.popsize, "seed": seed % (2**31 - 1) + 1, "verbose": -9})
    tried: list[tuple[float, np.ndarray]] = []
    while len(tried) + settings.popsize <= settings.budget:
        xs = es.ask()
        losses = [loss(softmax(x)) for x in xs]
        es.tell(xs, losses)
        tried += zip(losses, (softmax(x) for x in xs))
    best = min(range(len(tried)), key=lambda i: tried[i][0])
    return tried[best][1], [f for f, _ in tried]


@torch.no_grad()
def merge(model, lora_config: dict, loras: Sequence[Lora], examples: Sequence[Example], pad_id: int,
          settings: PrimeSettings, seed: int):
    """Wrap `model` (in place; `.unload()` undoes it) in the mix of `loras` whose weights minimise the
    loss on `examples`: (peft model, weights, losses evaluated)."""
    peft_model = apply_lora(model, lora_config, int(lora_config["r"]), mix_loras(loras, [1 / len(loras)] * len(loras)))
    layers = lora_layers(peft_model)
    batch = collate(list(examples), pad_id, next(model.parameters()).device)

    def set_weights(weights):
        for pos, piece in mix_loras(loras, weights).items():
            install(layers[pos], piece)

    def loss(weights) -> float:
        set_weights(weights)
        return lm_loss(peft_model, batch).item()

    weights, losses = search(loss, len(loras), settings, seed)
    set_weights(weights)
    return peft_model, weights, losses
