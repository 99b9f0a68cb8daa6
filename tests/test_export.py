"""Adapters for serving engines: a cat recipe exports at a rank vLLM serves, and the merged base exports as plain HF."""

import json

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from perpcs.errors import InputError
from perpcs.models import fingerprint, load_base
from perpcs.pipeline import Run
from perpcs.recipe import SERVED_RANKS, Recipe, apply_recipe, served_rank


def test_served_rank():
    assert [served_rank(r) for r in (1, 8, 9, 24, 64, 300, 512)] == [8, 8, 16, 32, 64, 320, 512]
    with pytest.raises(ValueError, match="above the largest"):
        served_rank(513)


def test_cat_adapter_padded_to_a_served_rank_and_base_exports(tmp_path, tiny_run_config):
    run = Run.create(tmp_path / "run", tiny_run_config(n_targets=1, assembly={"mix": "cat", "top_k": 3}))
    user = next(iter(run.pipeline()))
    recipe = Recipe.load(run.recipe_path(user))
    assert recipe.rank() == 24
    out = run.export(user, tmp_path / "adapter")
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == 32 in SERVED_RANKS and cfg["lora_alpha"] / cfg["r"] == recipe.lora["alpha"] / recipe.lora["r"]

    base = run.export_base(tmp_path / "base")
    loaded = AutoModelForCausalLM.from_pretrained(base).eval()
    merged, tok = load_base(run.merged_path)
    assert fingerprint(loaded) == run.merged_fingerprint
    ids = tok("Tags: a lonely android on a frozen moon", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        plain = merged(ids).logits
        padded = PeftModel.from_pretrained(loaded, out).eval()(ids).logits
        exact = apply_recipe(merged, recipe, run.open_pool())(ids).logits
    torch.testing.assert_close(padded, exact, rtol=1e-5, atol=1e-6)
    assert not torch.equal(padded, plain)
    with pytest.raises(InputError, match="folder already holds files this command does not replace"):
        run.export_base(tmp_path / "base")
    with pytest.raises(InputError, match="is, holds or is inside"):  # never into the run
        run.export_base(run.merged_path / "sub")


def test_paper_config_is_a_run_config(tmp_path):
    from pathlib import Path

    from perpcs.overrides import build_config

    cfg = build_config(tmp_path, None, 0, None, None, Path(__file__).parents[1] / "configs" / "paper.json", [])
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout) == (8, 8.0, 0.05)
    t = cfg.task_train
    assert (t.lr, t.epochs, t.steps, t.grad_clip) == (1e-4, 3, None, 0.3)
    assert (cfg.sharer_train.lr, cfg.sharer_train.steps, cfg.sharer_train.batch_size) == (2e-5, 100, 6)
    assert (cfg.gate_train.lr, cfg.gate_train.steps) == (2e-5, 200)
    a = cfg.assembly
    assert (a.top_k, a.temperature, a.recent_k, a.batch_size) == (3, 1.0, 2000, 16)
    assert cfg.device == "cuda" and cfg.retrieval_copies and cfg.max_len == 512
