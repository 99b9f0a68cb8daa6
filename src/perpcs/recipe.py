"""Recipes: a target user's assembled PEFT as a few KB of (sharer, weight) per position.

A recipe names its pool and base fingerprint; with that pool it materialises into a standard
PEFT LoRA adapter (`adapter_config.json` + `adapter_model.safetensors`) that plain
`peft.PeftModel.from_pretrained(merged_base, folder)` loads, with no perpcs code.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator
from safetensors.torch import save_file

from perpcs.data import format_validation_error
from perpcs.errors import InputError
from perpcs.lora import apply_lora, inference_config, mix_pieces, pad_rank, peft_state_dict
from perpcs.recipe_format import is_packed, pack, unpack
from perpcs.settings import MAX_STRENGTH
from perpcs.utils import atomic_dir, atomic_path, write_text

FORMAT = "perpcs-recipe/1"
ADAPTER_FILES = {"adapter_config.json", "adapter_model.safetensors", "README.md"}  # what a peft adapter folder holds
# How far a position's weights may sum from 1 (assembly's are softmax weights averaged over batches; a
# binary recipe stores them as float16)
WEIGHT_SUM_TOLERANCE = 0.01
# LoRA ranks vLLM serves (its --max-lora-rank choices; LoRAX takes any): exported adapters are padded to one.
SERVED_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)


class Recipe(BaseModel):
    model_config = ConfigDict(extra="forbid")
    format: str = FORMAT
    pool_id: str
    base_fingerprint: str
    lora: dict
    mix: Literal["linear", "cat"] = "linear"
    top_k: int = Field(ge=1)
    user: str | None = None
    settings: dict = {}
    # alpha: the update is alpha * sum_j w_j B_j A_j (0: the non-personalized model)
    strength: float = Field(1.0, ge=0, le=MAX_STRENGTH, allow_inf_nan=False)
    strength_scores: dict[float, float] | None = None  # held-out score of each candidate alpha, when chosen
    # assembly.pick_by_loss: each tried sharer's mean loss on the history (the lowest is the recipe)
    pick_losses: dict[str, float] | None = None
    pieces: dict[str, list[tuple[str, float]]]
    seconds: float | None = Field(None, ge=0)  # time to assemble it (step 5), kept with it so a resumed run has it

    _source: str | None = PrivateAttr(None)  # the file it was loaded from, named by every refusal

    @field_validator("pieces")
    @classmethod
    def _weights(cls, pieces: dict[str, list[tuple[str, float]]]) -> dict[str, list[tuple[str, float]]]:
        """What assembly can produce: at a position, distinct sharers whose weights in [0, 1] sum to 1
        (a NaN weight would export NaNs, weights x1000 or a sharer listed twice a garbage update)."""
        for pos, chosen in pieces.items():
            for sid, w in chosen:
                if not math.isfinite(w):
                    raise ValueError(f"position {pos!r}, sharer {sid!r}: weight {w} is not a finite number")
                if not 0 <= w <= 1:
                    raise ValueError(f"position {pos!r}, sharer {sid!r}: weight {w} is not in [0, 1]")
            sharers = [sid for sid, _ in chosen]
            if len(set(sharers)) < len(sharers):
                raise ValueError(f"position {pos!r}: sharers {sorted({s for s in sharers if sharers.count(s) > 1})} "
                                 "are listed twice")
            total = sum(w for _, w in chosen)
            if chosen and abs(total - 1) > WEIGHT_SUM_TOLERANCE:
                raise ValueError(f"position {pos!r}: weights sum to {total:.6g}, not 1")
        return pieces

    @field_validator("pick_losses")
    @classmethod
    def _losses(cls, losses: dict[str, float] | None) -> dict[str, float] | None:
        for sid, loss in (losses or {}).items():
            if not (math.isfinite(loss) and loss >= 0):
                raise ValueError(f"sharer {sid!r}: loss {loss} is not a finite number >= 0")
        return losses

    @field_validator("lora")
    @classmethod
    def _lora_shape(cls, lora: dict) -> dict:
        """The LoRA an adapter is materialised with: r, alpha and target_modules, all given."""
        missing = [k for k in ("r", "alpha", "target_modules") if k not in lora]
        if missing:
            raise ValueError(f"missing {', '.join(missing)} (the pool's LoRA settings)")
        return lora

    @property
    def source(self) -> str:
        return self._source or "recipe"

    def __eq__(self, other: object) -> bool:
        """The same recipe, wherever it was loaded from."""
        return type(other) is type(self) and self.__dict__ == other.__dict__

    def save(self, path: str | Path) -> Path:
        """JSON for a `.json` path, else the compact binary layout (`recipe_format`)."""
        if Path(path).suffix == ".json":
            return write_text(path, self.model_dump_json(exclude_none=True))
        with atomic_path(path) as tmp:
            tmp.write_bytes(pack(self.model_dump(mode="json", exclude={"pieces"}, exclude_none=True), self.pieces))
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> "Recipe":
        """Either layout, told apart by the binary one's magic bytes."""
        path = Path(path)
        data = path.read_bytes()
        try:
            if is_packed(data):
                fields, pieces = unpack(data)
                recipe = cls.model_validate({**fields, "pieces": pieces})
            else:
                recipe = cls.model_validate(json.loads(data.decode("utf-8")))
        except ValidationError as e:
            raise InputError(format_validation_error(f"{path}: not a perpcs recipe", e)) from None
        except ValueError as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise InputError(f"{path}: not a perpcs recipe: {e}") from None
        if recipe.format != FORMAT:
            raise InputError(f"{path}: recipe format {recipe.format!r}, this perpcs reads {FORMAT!r}")
        recipe._source = str(path)
        return recipe

    def rank(self) -> int:
        """LoRA rank of the materialised adapter: r (linear), or r times the most pieces at a position (cat)."""
        r = int(self.lora["r"])
        return r if self.mix == "linear" else r * max(1, max(len(v) for v in self.pieces.values()))

    def peft_config(self, base_path: str | None = None):
        return inference_config(self.lora, self.rank(), base_path)


def materialize(recipe: Recipe, pool) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{position: (A, B)} of the recipe's PEFT, reading only the selected pieces."""
    check_pool(recipe, pool)
    rank = recipe.rank()
    out = {}
    for pos, chosen in recipe.pieces.items():
        if not chosen:  # no sharer shares this position: no update there
            d_in, d_out = pool.shapes[pos]
            out[pos] = (torch.zeros(rank, d_in), torch.zeros(d_out, rank))
            continue
        pieces = [pool.piece(sid, pos) for sid, _ in chosen]
        A, B = mix_pieces(pieces, [w for _, w in chosen], recipe.mix, rank)
        out[pos] = (A, recipe.strength * B)
        if not (torch.isfinite(A).all() and torch.isfinite(out[pos][1]).all()):  # finite pieces can overflow
            raise InputError(f"{recipe.source}: position {pos}: the mixed update overflows (not finite)")
    return out


def check_pool(recipe: Recipe, pool) -> None:
    """Refuse a recipe that does not match the pool it is materialised from, naming its file and field: another
    pool, another LoRA, not every position of the pool, a sharer that does not share a position, or some
    positions without pieces where sharers share them (only the non-personalized recipe has none at all)."""
    where = recipe.source
    if recipe.pool_id != pool.pool_id or recipe.base_fingerprint != pool.base_fingerprint:
        raise InputError(f"{where}: recipe was assembled from pool {recipe.pool_id} on base "
                         f"{recipe.base_fingerprint}, not from this pool {pool.pool_id} on base "
                         f"{pool.base_fingerprint}")
    if recipe.lora != pool.lora_config:
        diff = sorted(k for k in {*recipe.lora, *pool.lora_config} if recipe.lora.get(k) != pool.lora_config.get(k))
        raise InputError(f"{where}: field 'lora': differs from the pool's LoRA in "
                         + "; ".join(f"{k} (recipe {recipe.lora.get(k)!r}, pool {pool.lora_config.get(k)!r})"
                                     for k in diff))
    missing, extra = sorted(set(pool.positions) - set(recipe.pieces)), sorted(set(recipe.pieces) - set(pool.positions))
    if missing or extra:
        raise InputError(f"{where}: field 'pieces': the recipe names {len(recipe.pieces)} positions, the pool has "
                         f"{len(pool.positions)} (missing {missing[:3]}, unknown {extra[:3]})")
    personalized = any(recipe.pieces.values())
    for pos, chosen in recipe.pieces.items():
        candidates = set(pool.candidates(pos))
        foreign = [sid for sid, _ in chosen if sid not in candidates]
        if foreign:
            raise InputError(f"{where}: field 'pieces.{pos}': sharer {foreign[0]} does not share this position "
                             f"in the pool {pool.path}")
        if personalized and candidates and not chosen:
            raise InputError(f"{where}: field 'pieces.{pos}': no piece, where {len(candidates)} sharers share one "
                             "(a recipe keeps every position or none)")


def apply_recipe(model, recipe: Recipe, pool):
    """The merged base carrying the recipe's PEFT, in memory."""
    return apply_lora(model, recipe.lora, recipe.rank(), materialize(recipe, pool))


def served_rank(rank: int) -> int:
    """The smallest rank in SERVED_RANKS that holds `rank`."""
    for r in SERVED_RANKS:
        if r >= rank:
            return r
    raise ValueError(f"LoRA rank {rank} is above the largest vLLM serves ({SERVED_RANKS[-1]}): lower top_k or r")


def export_adapter(recipe: Recipe, pool, out: str | Path, base_path: str | None = None,
                   replace: bool = False) -> Path:
    """Write a standard PEFT adapter folder, LoRA weights only (atomically: temp folder, then rename).
    Its rank is padded up to one vLLM serves, alpha scaled with it, so the update is the recipe's.
    `replace`: the caller checked that an existing `out` may go (e.g. a previous adapter)."""
    weights = materialize(recipe, pool)  # refuses a foreign pool before anything is written
    rank = served_rank(recipe.rank())
    weights = {pos: pad_rank(A, B, rank) for pos, (A, B) in weights.items()}
    with atomic_dir(out, replace=replace) as tmp:
        inference_config(recipe.lora, rank, base_path).save_pretrained(tmp)
        save_file(peft_state_dict(weights), tmp / "adapter_model.safetensors",
                  metadata={"format": "pt", "perpcs_pool": recipe.pool_id, "base_fingerprint": recipe.base_fingerprint})
    return Path(out)
