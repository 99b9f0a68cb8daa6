"""Training examples and the one small training loop used by every step that trains.

Step 0 (task LoRA), step 2 (sharer LoRA), step 3 (gates) and the OPPU baseline all train with
the causal-LM loss on the *output* tokens only (prompt tokens are masked with -100); they differ
only in which parameters are trainable. LoRA layers come from `peft`.
"""

from __future__ import annotations

import inspect
import math
import random
import time
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from perpcs.data import Item
from perpcs.lora import training_config
from perpcs.retrieval import bm25_top
from perpcs.settings import LoraSettings, TrainSettings
from perpcs.tasks import Task

IGNORE = -100


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]


def encode(tokenizer, prompt: str, target: str, max_len: int) -> Example:
    """Prompt + target (+ EOS) with only the target tokens as labels; long prompts lose their start."""
    p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    t = tokenizer(target, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        t = t + [tokenizer.eos_token_id]
    t = t[:max_len]
    p = p[max(0, len(p) - (max_len - len(t))):]
    return Example(p + t, [IGNORE] * len(p) + t)


def history_examples(task: Task, tokenizer, history: Sequence[Item], max_len: int = 256,
                     retrieval_copies: bool = False, profile: str | None = None) -> list[Example]:
    """Training examples from a user's history, as in step 2 of the method.

    Each item becomes one example; with `retrieval_copies`, each item but the first is added a
    second time with the profile and its single most similar *earlier* item (BM25) in the prompt,
    so the model also learns to use retrieved history.
    """
    out = [encode(tokenizer, task.format_prompt(it.input), task.format_target(it.output), max_len) for it in history]
    if retrieval_copies:
        for i in range(1, len(history)):
            j = bm25_top([h.input for h in history[:i]], history[i].input, 1)[0]
            prompt = task.format_prompt(history[i].input, [history[j]], profile)
            out.append(encode(tokenizer, prompt, task.format_target(history[i].output), max_len))
    return out


def collate(batch: Sequence[Example], pad_id: int, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Right-pad a batch; padding is masked out of attention and loss."""
    n = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), n), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), n), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(batch), n), dtype=torch.long)
    for i, e in enumerate(batch):
        ids[i, : len(e.input_ids)] = torch.tensor(e.input_ids)
        labels[i, : len(e.labels)] = torch.tensor(e.labels)
        mask[i, : len(e.input_ids)] = 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}


def _label_logits(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits [B, K, V], their next tokens [B, K], IGNORE where none is a label) at the K positions where some
    row predicts a label token: the loss covers only the output tokens, yet the default forward projects every
    position onto the vocabulary, a large share of a small model's time on a CPU. Models whose forward has no
    `logits_to_keep` project every position."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    labels = batch["labels"]
    if "logits_to_keep" not in inspect.signature(base.forward).parameters:
        return model(**batch).logits[:, :-1], labels[:, 1:]
    keep = (labels[:, 1:] != IGNORE).any(0).nonzero().squeeze(1)  # positions whose next token is a label
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=keep).logits
    return logits, labels[:, keep + 1]


def lm_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """`model(**batch).loss`: the mean loss over the batch's output tokens."""
    logits, targets = _label_logits(model, batch)
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE)


def example_losses(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Each row's mean loss over its own output tokens [B]: a batch scores its examples as one at a time would."""
    logits, targets = _label_logits(model, batch)
    each = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE,
                           reduction="none").view(targets.shape)
    counted = (targets != IGNORE).sum(1)
    return each.sum(1) / counted.clamp(min=1)


def batches(examples: Sequence[Example], batch_size: int, steps: int, seed: int) -> Iterable[list[Example]]:
    """`steps` batches drawn epoch by epoch from a seeded shuffle (the last partial batch is kept)."""
    rng = random.Random(seed)
    done = 0
    while done < steps:
        order = list(range(len(examples)))
        rng.shuffle(order)
        for i in range(0, len(order), batch_size):
            if done == steps:
                return
            yield [examples[j] for j in order[i : i + batch_size]]
            done += 1


def batch_indices(n: int, settings: TrainSettings, steps: int) -> Iterable[list[int]]:
    """The examples (indices) of each step: `batches`, or with `dp_noise` the Poisson sample DP-SGD's
    accounting assumes (each example in each step with probability batch_size / n; a step may be empty)."""
    if not settings.dp_noise:
        return batches(list(range(n)), settings.batch_size, steps, settings.seed)
    from opacus.utils.uniform_sampler import UniformWithReplacementSampler

    return UniformWithReplacementSampler(num_samples=n, sample_rate=min(1.0, settings.batch_size / n), steps=steps,
                                         generator=torch.Generator().manual_seed(settings.seed))


def n_steps(settings: TrainSettings, n_examples: int) -> int:
    if settings.steps is not None:
        return settings.steps
    steps = max(1, math.ceil(settings.epochs * math.ceil(n_examples / settings.batch_size)))  # batches per epoch
    return steps if settings.max_steps is None else min(steps, settings.max_steps)


def split_heldout(items: Sequence, settings: TrainSettings) -> tuple[list, list]:
    """(items to train on, the newest items held out to stop on): see `TrainSettings`."""
    v = min(settings.val_items, int(settings.val_fraction * len(items)))
    return list(items[: len(items) - v]), list(items[len(items) - v :])


@torch.no_grad()
def output_losses(model, examples: Sequence[Example], pad_id: int, batch_size: int = 1) -> list[float]:
    """Each example's mean output-token loss (no gradient, dropout off), `batch_size` per forward."""
    device = next(model.parameters()).device
    model.eval()
    return [x for i in range(0, len(examples), batch_size)
            for x in example_losses(model, collate(examples[i : i + batch_size], pad_id, device)).tolist()]


def heldout_loss(model, examples: Sequence[Example], pad_id: int, batch_size: int = 1) -> float:
    """Mean over examples of each one's output-token loss (`output_losses`)."""
    return sum(output_losses(model, examples, pad_id, batch_size)) / len(examples)


def train(model, params: list[torch.nn.Parameter], examples: Sequence[Example], settings: TrainSettings,
          pad_id: int, desc: str = "train", val_examples: Sequence[Example] = ()) -> dict:
    """AdamW on `params` only (everything else must already be frozen); returns loss and time, and
    with `val_examples` the held-out loss after each epoch, the epoch kept and whether it stopped early.
    With `dp_noise`, DP-SGD (opacus): each example's gradient clipped to `dp_clip`, Gaussian noise of std
    dp_noise * dp_clip on their sum, Poisson-sampled steps (`batch_indices`); `perpcs.dp.sgd_epsilon` accounts."""
    if not examples:
        raise ValueError(f"{desc}: no training examples")
    device = next(model.parameters()).device
    steps = n_steps(settings, len(examples))
    per_epoch = math.ceil(len(examples) / settings.batch_size)
    opt = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    torch.manual_seed(settings.seed)  # dropout masks
    forward, loss_of = model, lm_loss
    if settings.dp_noise:
        from opacus import GradSampleModule
        from opacus.optimizers import DPOptimizer

        forward, loss_of = GradSampleModule(model), lambda m, b: example_losses(m, b).mean()  # per-example grads
        opt = DPOptimizer(opt, noise_multiplier=settings.dp_noise, max_grad_norm=settings.dp_clip,
                          expected_batch_size=settings.batch_size,
                          generator=torch.Generator(device).manual_seed(settings.seed))
    model.train()
    losses, val_losses, best, done, t0 = [], [], None, 0, time.perf_counter()
    bar = tqdm(batch_indices(len(examples), settings, steps), total=steps, desc=desc, leave=False)
    for batch in bar:
        if batch:
            loss = loss_of(forward, collate([examples[j] for j in batch], pad_id, device))
            loss.backward()
            losses.append(loss.item())
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
        else:  # an empty Poisson sample: the step adds noise only
            for p in params:
                p.grad_sample = torch.zeros((0, *p.shape), device=p.device)
        if settings.grad_clip and not settings.dp_noise:
            torch.nn.utils.clip_grad_norm_(params, settings.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        done += 1
        if val_examples and (done % per_epoch == 0 or done == steps):
            val_losses.append(heldout_loss(model, val_examples, pad_id))
            model.train()
            if best is None or val_losses[-1] < val_losses[best]:
                best, kept = len(val_losses) - 1, [p.detach().clone() for p in params]
            elif len(val_losses) - 1 - best >= settings.patience:
                break
    if forward is not model:
        forward._close()  # opacus's hooks and per-example gradients off the model
    model.eval()
    tail = losses[-max(1, len(losses) // 5):] or [math.nan]
    stats = {"steps": done, "epochs": done / per_epoch, "first_loss": losses[0] if losses else math.nan,
             "final_loss": sum(tail) / len(tail)}
    if val_examples:
        with torch.no_grad():
            for p, k in zip(params, kept):
                p.copy_(k)
        stats.update(val_items=len(val_examples), val_losses=val_losses, best_epoch=best + 1,
                     stopped_early=done < steps)
    return {**stats, "seconds": time.perf_counter() - t0}


def add_lora(model, lora: LoraSettings, seed: int):
    """Wrap `model` with a fresh peft LoRA (seeded init); only the LoRA weights are trainable."""
    from peft import get_peft_model

    torch.manual_seed(seed)
    return get_peft_model(model, training_config(lora))


def train_lora(model, examples: Sequence[Example], lora: LoraSettings, settings: TrainSettings, pad_id: int,
               desc: str = "lora", val_examples: Sequence[Example] = ()):
    """Train a fresh LoRA on `model`; returns (peft model, stats). `peft_model.unload()` gives the base back."""
    peft_model = add_lora(model, lora, settings.seed)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    stats = train(peft_model, params, examples, settings, pad_id, desc, val_examples)
    return peft_model, stats
