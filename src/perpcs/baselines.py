"""The methods Per-Pcs is compared with, all on the same merged task-adapted model and prompts.

Each method turns a target user into (model adapter weights or none, prompts); generation and
scoring are shared (see `evaluation` and `bench`):
- non_personalized: the merged model alone;
- rag: BM25 top-k of the user's own history items in the prompt, no user parameters;
- peft_retrieval: the whole LoRA of the sharer(s) whose mean history embedding is closest;
- oppu: a LoRA trained on the user's own history (One PEFT Per User), the quality reference;
- perpcs: the assembled recipe;
- prime: PriME-style merging, CMA-ES weights over the 3 nearest sharers' whole LoRAs (see `prime`).
`X+rag` is method X with the same BM25 retrieval in the prompt as `rag` (so a PEFT method is also
compared where it can read the user's history, as the reference trains it to with retrieval copies).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from safetensors.torch import load_file

from perpcs.data import User
from perpcs.retrieval import bm25_top
from perpcs.tasks import Task

METHODS = ["non_personalized", "rag", "peft_retrieval", "peft_retrieval+rag", "oppu", "oppu+rag", "perpcs", "perpcs+rag", "prime"]


def split_method(method: str) -> tuple[str, bool]:
    """('oppu', True) for 'oppu+rag'; 'rag' is the non-personalized model with retrieval."""
    if method == "rag":
        return "non_personalized", True
    return method.removesuffix("+rag"), method.endswith("+rag")


def prompts(task: Task, user: User, rag_k: int = 0) -> list[str]:
    """The user's query prompts; with rag_k > 0, each with its BM25 top-k history items (and profile)."""
    corpus = [it.input for it in user.history]
    out = []
    for q in user.queries:
        retrieved = [user.history[i] for i in bm25_top(corpus, q.input, rag_k)] if rag_k else []
        out.append(task.format_prompt(q.input, retrieved, user.profile if rag_k else None))
    return out


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


def load_lora(adapter_dir: str | Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{position: (A, B)} from a peft adapter folder."""
    sd = load_file(str(Path(adapter_dir) / "adapter_model.safetensors"))
    out = {}
    for key, a in sd.items():
        if key.endswith(".lora_A.weight"):
            pos = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            out[pos] = (a, sd[key.replace(".lora_A.", ".lora_B.")])
    return out


def average_loras(loras: Sequence[dict[str, tuple[torch.Tensor, torch.Tensor]]]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Whole-PEFT retrieval over m sharers: A and B averaged separately (as the paper's linear mix)."""
    return {pos: (sum(l[pos][0] for l in loras) / len(loras), sum(l[pos][1] for l in loras) / len(loras))
            for pos in loras[0]}
