"""Neighbour quality (not in the paper): the sharer that did best for the validation users most like a target.

Calibration already reads validation users, whose newest items it holds out. Once per pool every sharer's whole
LoRA answers those held-out queries (`scores`, by the task's per-query metric), and each validation user's key is
its mean LN(module input) over the tokens that predict answers, per position, on the task model with nothing
installed (`keys`). A target needs one forward for its own key; its k nearest validation users (cosine of keys
centred on the validation users' mean, averaged over positions) then name the sharers with the best mean score
over them. Why: on the demo the keys find a target's taste group but not which of the group's sharers learned it
well, and users like the target have already shown which (benchmarks/README.md, "Neighbour quality").
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from perpcs.errors import InputError
from perpcs.utils import atomic_path, read_json, write_json

SCORES, USERS = "neighbours.safetensors", "neighbours.json"


@dataclass
class NeighbourTable:
    users: list[str]  # validation users, one row each
    sharers: list[str]  # the pool's sharer ids, one column each
    scores: torch.Tensor  # [users, sharers]: each sharer's whole LoRA, mean per-query metric on the user's items
    keys: dict[str, torch.Tensor]  # position -> [users, d]
    higher_is_better: bool = True  # False for a metric like MAE
    items: int | None = None  # the history budget (newest items) the keys were read over, so a target reads as many

    def __post_init__(self):
        problem = self.problem()
        if problem:
            raise ValueError(problem)

    def problem(self) -> str | None:
        """What makes the table unusable, or None."""
        n, s = len(self.users), len(self.sharers)
        if not n or not s:
            return f"needs at least one validation user and one sharer, has {n} and {s}"
        if len(set(self.users)) != n or len(set(self.sharers)) != s:
            return "validation users and sharers must each be named once"
        if list(self.scores.shape) != [n, s]:
            return f"scores have shape {list(self.scores.shape)}, expected [{n}, {s}] (users x sharers)"
        if not self.keys:
            return "no key positions"
        for pos, k in self.keys.items():
            if k.dim() != 2 or k.shape[0] != n:
                return f"keys at {pos} have shape {list(k.shape)}, expected [{n}, d]"
        if not all(bool(torch.isfinite(t).all()) for t in (self.scores, *self.keys.values())):
            return "scores or keys hold NaN or infinite values"
        return None

    def similarities(self, target: dict[str, torch.Tensor]) -> torch.Tensor:
        """[users]: mean over positions of cos(target - c, user - c), c the validation users' mean key there."""
        missing = set(self.keys) - set(target)
        if missing:
            raise ValueError(f"the target's key has no position {sorted(missing)[0]}")
        total = torch.zeros(len(self.users))
        for pos, k in self.keys.items():
            c = k.float().mean(0)
            total += F.cosine_similarity(k.float() - c, (target[pos].float() - c).unsqueeze(0), dim=-1)
        return total / len(self.keys)

    def nearest(self, target: dict[str, torch.Tensor], k: int, exclude: str | None = None) -> list[str]:
        """The k validation users most like the target (ties by id); `exclude` (a validation user scored as if
        it were a target, in calibration) is left out of its own neighbours."""
        sims = self.similarities(target).tolist()
        order = sorted(range(len(self.users)), key=lambda i: (-sims[i], self.users[i]))
        near = [self.users[i] for i in order if self.users[i] != exclude][:k]
        if not near:
            raise ValueError("no validation user is left to read")
        return near

    def pick(self, target: dict[str, torch.Tensor], k: int, exclude: str | None = None, top: int = 1) -> list[str]:
        """The `top` sharers with the best mean score over the target's k nearest validation users, best first
        (ties by id)."""
        rows = [self.users.index(u) for u in self.nearest(target, k, exclude)]
        mean = self.scores[rows].float().mean(0).tolist()
        sign = 1 if self.higher_is_better else -1
        order = sorted(range(len(self.sharers)), key=lambda j: (-sign * mean[j], self.sharers[j]))
        return [self.sharers[j] for j in order[:top]]

    def save_pretrained(self, folder: str | Path) -> None:
        """FOLDER/neighbours.safetensors (scores, keys) and FOLDER/neighbours.json (who the rows and columns are)."""
        folder = Path(folder)
        tensors = {"scores": self.scores.contiguous(), **{f"keys.{p}": k.contiguous() for p, k in self.keys.items()}}
        with atomic_path(folder / SCORES) as tmp:
            save_file(tensors, str(tmp))
        write_json(folder / USERS, {"users": self.users, "sharers": self.sharers,
                                    "positions": list(self.keys), "higher_is_better": self.higher_is_better,
                                    "items": self.items})

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> "NeighbourTable":
        """The table `save_pretrained` wrote, checked: a bad file is an InputError naming it."""
        folder = Path(folder)
        for name in (USERS, SCORES):
            if not (folder / name).is_file():
                raise InputError(f"{folder / name}: no neighbour table here (calibration writes it)")
        meta = read_json(folder / USERS)
        if not isinstance(meta, dict) or not all(isinstance(meta.get(f), list) for f in ("users", "sharers",
                                                                                         "positions")):
            raise InputError(f"{folder / USERS}: expected lists 'users', 'sharers' and 'positions'")
        try:
            tensors = load_file(str(folder / SCORES))
        except (OSError, SafetensorError) as e:
            raise InputError(f"{folder / SCORES}: could not be read ({e})") from None
        missing = [n for n in ("scores", *(f"keys.{p}" for p in meta["positions"])) if n not in tensors]
        if missing:
            raise InputError(f"{folder / SCORES}: tensor {missing[0]} is missing")
        try:
            return cls(users=[str(u) for u in meta["users"]], sharers=[str(s) for s in meta["sharers"]],
                       scores=tensors["scores"], keys={p: tensors[f"keys.{p}"] for p in meta["positions"]},
                       higher_is_better=bool(meta.get("higher_is_better", True)),
                       items=meta["items"] if isinstance(meta.get("items"), int) else None)
        except ValueError as e:
            raise InputError(f"{folder}: neighbour table: {e}") from None
