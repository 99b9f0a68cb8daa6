"""Greedy generation, batched: what every method's answers, assembly's strength choice and the server share."""

from __future__ import annotations

from typing import Sequence

import torch


@torch.no_grad()
def generate(model, tokenizer, texts: Sequence[str], max_new_tokens: int, batch_size: int = 16,
             adapter_names: Sequence[str] | None = None, **options) -> list[str]:
    """Greedy continuations of `texts`, batched with left padding; `adapter_names`: each text's adapter
    in a peft model holding several (peft's mixed-adapter batches); `options` go to model.generate
    (sampling: do_sample, temperature, top_p; a streamer)."""
    device = next(model.parameters()).device
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    out = []
    try:
        for i in range(0, len(texts), batch_size):
            enc = tokenizer(list(texts[i : i + batch_size]), return_tensors="pt", padding=True,
                            add_special_tokens=False).to(device)
            per_row = {"adapter_names": list(adapter_names[i : i + batch_size])} if adapter_names else {}
            ids = model.generate(**enc, **per_row, max_new_tokens=max_new_tokens, **{"do_sample": False, **options},
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
            out += tokenizer.batch_decode(ids[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
    return out
