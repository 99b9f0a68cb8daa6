"""PriME-style merging: the CMA-ES search keeps to its budget; the merge is a convex mix of whole LoRAs."""

import numpy as np
import pytest
import torch

from perpcs.lora import lora_state, mix_loras
from perpcs.prime import merge, search
from perpcs.settings import LoraSettings, PrimeSettings, TrainSettings
from perpcs.training import encode, train_lora


def test_search_counts_its_loss_evaluations_and_finds_the_better_sharer():
    calls = []

    def loss(w):  # the loss is lowest with all weight on sharer 2
        calls.append(w)
        return float((1 - w[2]) ** 2)

    weights, losses = search(loss, 3, PrimeSettings(budget=10, popsize=5), seed=0)
    assert len(calls) == len(losses) == 10
    assert np.isfinite(weights).all() and weights.sum() == pytest.approx(1) and (weights > 0).all()
    assert weights.argmax() == 2 and loss(weights) == min(losses)
    # a budget that is not a multiple of the population: whole generations only, never over
    calls.clear()
    assert len(search(loss, 3, PrimeSettings(budget=12, popsize=5), seed=0)[1]) == len(calls) == 10
    # seeded
    assert np.array_equal(search(loss, 3, PrimeSettings(), seed=4)[0], search(loss, 3, PrimeSettings(), seed=4)[0])
    assert search(loss, 1, PrimeSettings(), seed=0)[0].tolist() == [1.0]
    with pytest.raises(ValueError, match="less than one CMA-ES generation"):
        PrimeSettings(budget=4, popsize=5)


def test_mix_is_weighted_a_and_b():
    a = {"p": (torch.ones(2, 3), torch.ones(3, 2))}
    b = {"p": (torch.zeros(2, 3), 2 * torch.ones(3, 2))}
    A, B = mix_loras([a, b], [0.25, 0.75])["p"]
    assert torch.allclose(A, torch.full((2, 3), 0.25)) and torch.allclose(B, torch.full((3, 2), 1.75))


def test_merge_on_a_tiny_model(tiny_model, tokenizer):
    lora = LoraSettings(r=2, target_modules=["q_proj", "v_proj"])
    ex = [encode(tokenizer, f"question {i}", f"answer {i}", 64) for i in range(4)]
    loras = []
    for seed in range(3):
        peft_model, _ = train_lora(tiny_model, ex, lora, TrainSettings(steps=2, seed=seed, lr=1e-2), 0)
        loras.append(lora_state(peft_model))
        peft_model.unload()
    peft_model, weights, losses = merge(tiny_model, {**lora.model_dump(), "r": 2}, loras, ex, 0, PrimeSettings(), 3)
    assert len(losses) == 10 and np.isfinite(losses).all() and weights.sum() == pytest.approx(1)
    got = lora_state(peft_model)
    want = mix_loras(loras, weights)
    assert all(torch.allclose(got[p][0], want[p][0]) and torch.allclose(got[p][1], want[p][1]) for p in want)
    peft_model.unload()
