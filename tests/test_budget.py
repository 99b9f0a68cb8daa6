"""Per-user training budgets: epochs with a step cap, held-out newest items, early stopping to the best epoch."""

import pytest
import torch

from conftest import tiny_llama
from perpcs.data import Item
from perpcs.lora import lora_state
from perpcs.pipeline import Run
from perpcs.settings import LoraSettings, TrainSettings
from perpcs.tasks import Task
from perpcs.training import heldout_loss, history_examples, n_steps, split_heldout, train_lora
from perpcs.user_lora import train_user_lora

LORA = LoraSettings(r=2, alpha=4.0, dropout=0.0, target_modules=["q_proj", "v_proj"])
TASK = Task(name="t", kind="generation", instruction="Title it.", input_name="In", output_name="Out")


@pytest.mark.parametrize("n, settings, expected", [
    (60, TrainSettings(epochs=2, batch_size=4), 30),                  # 2 x ceil(60/4)
    (3, TrainSettings(epochs=2, batch_size=4), 2),                    # 2 x 1 batch: no 30 steps on 3 items
    (46, TrainSettings(epochs=2, batch_size=4), 24),                  # 2 x 12 batches (the last one of 2)
    (46, TrainSettings(epochs=0.5, batch_size=4), 6),
    (500, TrainSettings(epochs=2, max_steps=160, batch_size=4), 160),  # capped, still >= one epoch (125)
    (500, TrainSettings(steps=30, epochs=2, max_steps=160), 30),      # explicit steps win
])
def test_step_count_follows_epochs_and_cap(n, settings, expected):
    assert n_steps(settings, n) == expected


@pytest.mark.parametrize("n, held", [(3, 0), (9, 0), (10, 1), (59, 5), (200, 8)])
def test_heldout_items_are_the_newest_tenth_capped_at_8(n, held):
    items = list(range(n))
    train, val = split_heldout(items, TrainSettings(val_fraction=0.1, val_items=8))
    assert val == items[n - held:] and train == items[: n - held]
    assert split_heldout(items, TrainSettings()) == (items, [])  # no val_fraction: nothing held out


@pytest.mark.parametrize("patience, val_losses, kept_epoch", [
    (1, [2.0, 1.5, 1.7], 2),             # rises once: stop after epoch 3, keep epoch 2
    (2, [2.0, 1.5, 1.7, 1.8], 2),        # patience 2: stops after two epochs without improvement
    (1, [2.0, 1.9, 1.8, 1.7, 1.6], 5),   # never rises: all 5 epochs, keep the last
])
def test_early_stopping_keeps_the_best_epoch(tokenizer, monkeypatch, patience, val_losses, kept_epoch):
    """Held-out losses scripted per epoch: training stops after `patience` epochs without improvement
    and ends with exactly the weights of a run of `kept_epoch` epochs with the same seed."""
    train = history_examples(TASK, tokenizer, [Item(input=f"a{i}", output="xx") for i in range(8)])
    val = history_examples(TASK, tokenizer, [Item(input="a0", output="yy")])
    script = iter(val_losses)
    monkeypatch.setattr("perpcs.training.heldout_loss", lambda *a: next(script))
    settings = TrainSettings(lr=5e-2, epochs=5, batch_size=4, patience=patience, seed=1)
    model, stats = train_lora(tiny_llama(), train, LORA, settings, tokenizer.pad_token_id, val_examples=val)
    assert stats["val_losses"] == val_losses and stats["best_epoch"] == kept_epoch
    assert stats["steps"] == 2 * len(val_losses) and stats["stopped_early"] == (len(val_losses) < 5)
    ref_settings = settings.model_copy(update={"epochs": kept_epoch})
    ref, _ = train_lora(tiny_llama(), train, LORA, ref_settings, tokenizer.pad_token_id)
    kept, want = lora_state(model), lora_state(ref)
    assert all(torch.equal(kept[p][0], want[p][0]) and torch.equal(kept[p][1], want[p][1]) for p in want)


def test_heldout_loss_is_the_mean_of_each_examples_loss(tokenizer):
    from perpcs.training import collate, lm_loss

    model = tiny_llama()
    val = history_examples(TASK, tokenizer, [Item(input="a", output="yy"), Item(input="bbbb", output="z")])
    each = [lm_loss(model, collate([e], tokenizer.pad_token_id)).item() for e in val]
    assert heldout_loss(model, val, tokenizer.pad_token_id) == pytest.approx(sum(each) / 2)


def test_user_lora_holds_out_the_newest_history_items_never_the_queries(tiny_run_config, tmp_path, monkeypatch):
    config = tiny_run_config(sharer_train={"epochs": 1, "val_fraction": 0.2, "val_items": 8})
    run = Run.create(tmp_path / "run", config)
    user = run.data.users[0]
    tok = run.merged[1]  # step 0 trains before train_lora is replaced
    seen = {}
    monkeypatch.setattr("perpcs.user_lora.train_lora",
                        lambda model, examples, lora, settings, pad, desc, val_examples:
                        seen.update(examples=examples, val=val_examples))
    train_user_lora(run, user, desc="t")
    v = int(0.2 * len(user.history))
    assert v >= 1
    assert seen["val"] == history_examples(run.data.task, tok, user.history[-v:])
    assert seen["examples"] == history_examples(run.data.task, tok, user.history[:-v])
    query_inputs = {q.input for q in user.queries}
    assert not query_inputs & {it.input for it in user.history[-v:]}
