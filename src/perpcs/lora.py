"""LoRA weights as perpcs handles them: {position: (A, B)}, where a position is a module name inside the base.

One place for what every method does with LoRAs: peft configs, peft's key names, mixing pieces or
whole LoRAs, installing (A, B) into a wrapped model, and keeping a trained adapter on disk
(`load_or_train`) so that a resumed run or bench trains it once, and keeping many adapters by name
in one model for mixed-adapter batches (`AdapterCache`).
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Hashable, Sequence

import torch
from safetensors.torch import load_file

from perpcs.settings import LoraSettings
from perpcs.utils import read_json, write_json

Lora = dict[str, tuple[torch.Tensor, torch.Tensor]]
PREFIX = "base_model.model."  # peft's prefix of a module name in a wrapped model and in its adapter files


def position(name: str) -> str:
    """The position of a module named inside a peft model or an adapter file."""
    return name.removeprefix(PREFIX)


def _config(target_modules: Sequence[str], r: int, alpha: float, dropout: float, base_path: str | None = None):
    from peft import LoraConfig

    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(target_modules), bias="none",
                      task_type="CAUSAL_LM", base_model_name_or_path=base_path)


def training_config(lora: LoraSettings):
    """The peft config of a LoRA to train."""
    return _config(lora.target_modules, lora.r, lora.alpha, lora.dropout)


def inference_config(lora: dict, rank: int, base_path: str | None = None):
    """A peft LoraConfig of `rank` whose scaling alpha / rank equals the sharers' alpha / r (no dropout: inference)."""
    return _config(lora["target_modules"], rank, float(lora["alpha"]) * rank / int(lora["r"]), 0.0, base_path)


def lora_layers(peft_model, adapter: str = "default") -> dict[str, torch.nn.Module]:
    """{position: peft LoraLayer} for every module that carries `adapter`."""
    from peft.tuners.lora import LoraLayer

    return {position(name): m for name, m in peft_model.named_modules()
            if isinstance(m, LoraLayer) and adapter in m.lora_A}


@torch.no_grad()
def lora_state(peft_model) -> Lora:
    """{position: (A, B)} of the active adapter."""
    return {pos: (m.lora_A["default"].weight.detach().clone(), m.lora_B["default"].weight.detach().clone())
            for pos, m in lora_layers(peft_model).items()}


def load_lora(adapter_dir: str | Path) -> Lora:
    """{position: (A, B)} from a peft adapter folder."""
    sd = load_file(str(Path(adapter_dir) / "adapter_model.safetensors"))
    return {position(key.removesuffix(".lora_A.weight")): (a, sd[key.replace(".lora_A.", ".lora_B.")])
            for key, a in sd.items() if key.endswith(".lora_A.weight")}


def peft_state_dict(weights: Lora) -> dict[str, torch.Tensor]:
    """peft's on-disk key names for {position: (A, B)}."""
    sd = {}
    for pos, (A, B) in weights.items():
        sd[f"{PREFIX}{pos}.lora_A.weight"] = A.contiguous()
        sd[f"{PREFIX}{pos}.lora_B.weight"] = B.contiguous()
    return sd


def pad_rank(A: torch.Tensor, B: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) with zero rows of A and columns of B up to `rank`: B A, the update, is unchanged."""
    extra = rank - A.shape[0]
    return torch.cat([A, A.new_zeros(extra, A.shape[1])], 0), torch.cat([B, B.new_zeros(B.shape[0], extra)], 1)


def mix_pieces(pieces: Sequence[tuple[torch.Tensor, torch.Tensor]], weights: Sequence[float], mix: str,
               rank: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mix (A_j, B_j) with weights w_j.

    `linear` (the paper): A = sum w_j A_j, B = sum w_j B_j (mixed separately).
    `cat` (exact): A = [w_1 A_1; ...; w_k A_k], B = [B_1 ... B_k], so B A = sum w_j B_j A_j;
    zero-padded to `rank` rows so every position has the same LoRA rank.
    """
    if mix == "linear":
        return (sum(w * a for (a, _), w in zip(pieces, weights)), sum(w * b for (_, b), w in zip(pieces, weights)))
    A = torch.cat([w * a for (a, _), w in zip(pieces, weights)], 0)
    B = torch.cat([b for _, b in pieces], 1)
    return pad_rank(A, B, rank) if rank is not None else (A, B)


def mix_loras(loras: Sequence[Lora], weights: Sequence[float]) -> Lora:
    """Whole LoRAs mixed position by position, A and B each with `weights` (the linear mix)."""
    return {pos: mix_pieces([lora[pos] for lora in loras], weights, "linear") for pos in loras[0]}


def average_loras(loras: Sequence[Lora]) -> Lora:
    """Whole-PEFT retrieval over m sharers: the linear mix with equal weights."""
    return mix_loras(loras, [1 / len(loras)] * len(loras))


@torch.no_grad()
def install(layer, piece: tuple[torch.Tensor, torch.Tensor], adapter: str = "default") -> None:
    """Write (A, B) into a peft LoRA layer's adapter weights."""
    A, B = piece
    layer.lora_A[adapter].weight.copy_(A)
    layer.lora_B[adapter].weight.copy_(B)


@torch.no_grad()
def clear(layer, adapter: str = "default") -> None:
    """No update at this layer: its B is zero."""
    layer.lora_B[adapter].weight.zero_()


def apply_lora(model, lora: dict, rank: int, weights: Lora):
    """Wrap a merged base (in place) in a peft model carrying the given LoRA weights; `.unload()` undoes it."""
    from peft import get_peft_model, set_peft_model_state_dict

    peft_model = get_peft_model(model, inference_config(lora, rank))
    result = set_peft_model_state_dict(peft_model, peft_state_dict(weights))
    if result.unexpected_keys:
        raise ValueError(f"LoRA positions not in the model: {result.unexpected_keys[:5]}")
    return peft_model.eval()


def save_adapter(peft_model, stats: dict, folder: Path, stats_name: str = "stats.json") -> None:
    """A trained adapter kept as FOLDER/adapter (peft's `save_pretrained`) with its training stats."""
    peft_model.save_pretrained(folder / "adapter")
    write_json(folder / stats_name, stats)


def load_or_train(model, folder: Path, train: Callable[[], tuple], stats_name: str = "stats.json"):
    """(peft model, stats) of the adapter kept in `folder`, trained by `train()` and kept there if it
    is not there yet; the stats file is written last, so it marks a finished adapter."""
    from peft import PeftModel

    if (folder / stats_name).exists():
        return PeftModel.from_pretrained(model, folder / "adapter"), read_json(folder / stats_name)
    peft_model, stats = train()
    save_adapter(peft_model, stats, folder, stats_name)
    return peft_model, stats


class AdapterCache:
    """LoRA adapters kept by name in one peft model around `model`, one per key, each with the version
    it was built from; the least recently used go first (`evict`). `peft` is None while it is empty."""

    def __init__(self, model):
        self.model, self.peft = model, None
        self.entries: OrderedDict[Hashable, tuple[str, Hashable]] = OrderedDict()  # key -> (name, version)
        self._names = (f"a{i}" for i in itertools.count())

    def __len__(self) -> int:
        return len(self.entries)

    def get(self, key: Hashable, version: Hashable) -> str | None:
        """The adapter name of `key` if it was built from `version` (now the most recently used), else None."""
        name, built = self.entries.get(key, (None, None))
        if name is None or built != version:
            return None
        self.entries.move_to_end(key)
        return name

    def put(self, key: Hashable, version: Hashable, config, state_dict: dict) -> str:
        """Add the adapter of `key` (peft `config`, weights in peft's key names); returns its name."""
        from peft import get_peft_model, set_peft_model_state_dict

        self.drop(key)
        name = next(self._names)
        if self.peft is None:
            self.peft = get_peft_model(self.model, config, adapter_name=name).eval()
        else:
            self.peft.add_adapter(name, config)
        set_peft_model_state_dict(self.peft, state_dict, adapter_name=name)
        self.entries[key] = (name, version)
        return name

    def drop(self, key: Hashable) -> None:
        if key not in self.entries:
            return
        name, _ = self.entries.pop(key)
        if self.entries:
            self.peft.delete_adapter(name)
        else:  # peft keeps at least one adapter: take the LoRA layers out instead
            self.model, self.peft = self.peft.unload(), None

    def evict(self, keep: set, size: int) -> None:
        """Drop the least recently used adapters not in `keep` until at most `size` remain (or only `keep`)."""
        extra = max(0, len(self.entries) - size)
        for key in [k for k in self.entries if k not in keep][:extra]:
            self.drop(key)
