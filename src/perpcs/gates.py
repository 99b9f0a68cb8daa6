"""Piece gates (step 3): one vector g per piece, trained with the sharer's LoRA frozen.

While gates are attached, the LoRA branch of each module sees `x * sigmoid(x . g)` instead of `x`
(x: the module input at each token). This is done with a forward pre-hook on peft's per-adapter
`lora_dropout` module - the first thing the LoRA branch applies to x - so any architecture peft
wraps works without forking model code. The trained g is the piece's key at assembly time.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from perpcs.lora import lora_layers
from perpcs.settings import TrainSettings
from perpcs.training import Example, train


class Gates(nn.Module):
    """The gates of one sharer's pieces, zero-initialised (every gate starts at sigmoid(0) = 0.5)."""

    def __init__(self, peft_model, adapter: str = "default"):
        super().__init__()
        self.layers = lora_layers(peft_model, adapter)
        self.adapter = adapter
        self.positions = list(self.layers)
        # ParameterDict keys may not contain dots: index them by position order.
        self.g = nn.ParameterList(
            nn.Parameter(torch.zeros(m.lora_A[adapter].in_features, device=m.lora_A[adapter].weight.device))
            for m in self.layers.values())
        self._handles: list = []

    def attach(self) -> "Gates":
        self.detach()
        for g, layer in zip(self.g, self.layers.values()):
            self._handles.append(layer.lora_dropout[self.adapter].register_forward_pre_hook(_gate_hook(g)))
        return self

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def state(self) -> dict[str, torch.Tensor]:
        return {pos: g.detach().clone() for pos, g in zip(self.positions, self.g)}


def _gate_hook(g: nn.Parameter):
    def hook(module, args):
        x = args[0]
        return (x * torch.sigmoid(x @ g.to(x.dtype)).unsqueeze(-1),) + tuple(args[1:])
    return hook


def train_gates(peft_model, examples: Sequence[Example], settings: TrainSettings, pad_id: int,
                desc: str = "gates") -> tuple[dict[str, torch.Tensor], dict]:
    """Train only the gates of `peft_model`'s LoRA (frozen) on the sharer's own examples."""
    frozen = [(p, p.requires_grad) for p in peft_model.parameters()]
    for p, _ in frozen:
        p.requires_grad_(False)
    gates = Gates(peft_model).attach()
    try:
        stats = train(peft_model, list(gates.parameters()), examples, settings, pad_id, desc)
    finally:
        gates.detach()
        for p, flag in frozen:
            p.requires_grad_(flag)
    return gates.state(), stats
