"""A LoRA trained on one user's own history: a sharer's (step 2) and OPPU's, the same way and budget.

The budget is `sharer_train`'s: epochs with a step cap, stopped on the user's newest items (held out
of training). OPPU adapters are kept in the run folder (`oppu_dir`), so the bench and its cost
measurement train each one once.
"""

from __future__ import annotations

from pathlib import Path

from perpcs.data import User
from perpcs.dp import sgd_epsilon
from perpcs.runfolder import RunFolder, safe_name
from perpcs.training import history_examples, split_heldout, train_lora


def train_user_lora(run: RunFolder, user: User, desc: str):
    """(peft model on the run's merged model, stats) of a fresh LoRA on `user`'s history."""
    c = run.config
    model, tok = run.merged
    settings = c.training("sharer_train", user.user_id)
    items, heldout = split_heldout(user.history, settings)
    examples = history_examples(run.data.task, tok, items, c.max_len, c.retrieval_copies, user.profile)
    val = history_examples(run.data.task, tok, heldout, c.max_len, False, user.profile)
    trained = train_lora(model, examples, c.lora, settings, tok.pad_token_id, desc=desc, val_examples=val)
    if settings.dp_noise:  # the steps it took, this user's own epsilon (the pool records only the largest)
        trained[1]["dp_epsilon"] = sgd_epsilon(settings.dp_noise, settings.batch_size / len(examples),
                                               trained[1]["steps"], settings.dp_delta)
    return trained


def oppu_dir(run: RunFolder, user_id: str, history_k: int | None = None) -> Path:
    """Where a target's OPPU adapter is kept; OPPU of a truncated history is another LoRA, kept apart."""
    return run.folder / ("oppu" if history_k is None else f"oppu-newest{history_k}") / safe_name(user_id)
