"""Differentially private activation keys (`key_noise`): a clipped Gaussian mechanism on each key.

An activation key is a mean over the sharer's n examples of one vector per example (its mean LN(h)
at that position). With each example's vector clipped to L2 norm `clip * sqrt(d)` (|LN(h)| is about
sqrt(d), so `clip=1` bounds without cutting), replacing one example moves the mean by at most
Delta = 2 * clip * sqrt(d) / n. Adding N(0, sigma^2 I) with sigma = key_noise * Delta makes the key
(epsilon, delta)-DP under the **replace-one** relation (two histories of the same length that differ
in one example; n is public), with epsilon from the analytic Gaussian mechanism (Balle & Wang, ICML
2018, Theorem 8), exact for every epsilon, unlike sigma = Delta sqrt(2 ln(1.25/delta)) / epsilon
(Dwork & Roth, Theorem A.1), which holds only for epsilon < 1 and is looser. The P keys a sharer
releases are P such mechanisms on the same data; their composition is one Gaussian mechanism with
sensitivity sqrt(P) * Delta (the keys concatenated), so all keys together are
(epsilon(key_noise / sqrt(P)), delta)-DP. The unit protected is one example: one history item
without `retrieval_copies` (with it an item is in several examples, which `RunConfig` refuses).

DP-SGD for sharer LoRAs (`sharer_train.dp_noise`, trained in `training.train` with opacus) protects the
pieces themselves, and so every model assembled from them: T Poisson-sampled steps at rate q = batch_size / n,
each clipped per example and noised, are (epsilon, delta)-DP under **add/remove-one** by opacus's RDP
accountant (`sgd_epsilon`). The pool records the largest epsilon over its sharers (`lora_privacy`).
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
import torch
from scipy.optimize import brentq
from scipy.stats import norm

from perpcs.settings import TrainSettings
from perpcs.training import IGNORE, Example, n_steps


def gaussian_delta(epsilon: float, z: float) -> float:
    """The smallest delta at which N(0, (z Delta)^2) noise is (epsilon, delta)-DP (analytic Gaussian mechanism)."""
    a, b = 1 / (2 * z), epsilon * z
    return float(norm.cdf(a - b) - np.exp(epsilon + norm.logcdf(-a - b)))


def gaussian_epsilon(z: float, delta: float) -> float:
    """The smallest epsilon at which noise of std z * sensitivity is (epsilon, delta)-DP; inf for z = 0."""
    if z <= 0:
        return math.inf
    if gaussian_delta(0.0, z) <= delta:
        return 0.0
    hi = 1.0
    while gaussian_delta(hi, z) > delta:
        hi *= 2
    return float(brentq(lambda e: gaussian_delta(e, z) - delta, 0.0, hi, xtol=1e-9))


def classic_sigma(epsilon: float, delta: float, sensitivity: float) -> float:
    """Dwork & Roth's sigma for (epsilon, delta)-DP, epsilon < 1: the textbook bound, for comparison."""
    return sensitivity * math.sqrt(2 * math.log(1.25 / delta)) / epsilon


def counted_examples(examples: list[Example]) -> int:
    """How many examples an activation key averages (those with a token that predicts an output token)."""
    return sum(any(label != IGNORE for label in e.labels[1:]) for e in examples)


def key_generator(seed: int, user_id: str) -> torch.Generator:
    """The noise of one sharer's keys: seeded by the run's seed and the user (same seed, same keys)."""
    digest = hashlib.sha256(f"{seed}:key_noise:{user_id}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "big"))


def noisy_keys(keys: dict[str, torch.Tensor], n: int, clip: float, z: float,
               generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Keys (means of n vectors, each already clipped to `clip * sqrt(d)`) plus the mechanism's noise."""
    out = {}
    for pos, k in keys.items():
        sigma = z * 2 * clip * math.sqrt(k.shape[-1]) / n
        out[pos] = k + sigma * torch.randn(k.shape, generator=generator, dtype=k.dtype)
    return out


def key_privacy(z: float, clip: float, delta: float, positions: int) -> dict:
    """What the pool records about its keys' noise: the settings and the epsilon per key and for all keys."""
    return {"mechanism": "gaussian, per-example clipping, replace-one", "key_noise": z, "key_clip": clip,
            "delta": delta, "epsilon_per_key": gaussian_epsilon(z, delta),
            "epsilon_all_keys": gaussian_epsilon(z / math.sqrt(positions), delta), "positions": positions}


def sgd_epsilon(z: float, sample_rate: float, steps: int, delta: float) -> float:
    """The epsilon of `steps` DP-SGD steps at noise multiplier z and Poisson rate `sample_rate` (opacus, RDP)."""
    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    accountant.history = [(z, min(1.0, sample_rate), steps)]
    return float(accountant.get_epsilon(delta))


def lora_privacy(settings: TrainSettings, n_examples: list[int]) -> dict:
    """What the pool records about its pieces' DP-SGD: the settings and the largest epsilon over its sharers, each
    trained on n examples for at most `n_steps` steps (early stopping only lowers it); no sharer's own n."""
    eps = [sgd_epsilon(settings.dp_noise, settings.batch_size / n, n_steps(settings, n), settings.dp_delta)
           for n in n_examples]
    return {"mechanism": "DP-SGD (opacus): per-example clipping, Poisson sampling, add/remove-one, RDP accountant",
            "dp_noise": settings.dp_noise, "dp_clip": settings.dp_clip, "delta": settings.dp_delta,
            "batch_size": settings.batch_size, "epsilon": max(eps), "sharers": len(eps)}
