"""The real default base model, offline: prepare, load, generate, fingerprint (slow: loads 135M weights)."""

import pytest
import torch

from perpcs.models import fingerprint, load_base, lora_target_names, prepare_base


@pytest.fixture(scope="module")
def default_base():
    return prepare_base()


@pytest.mark.slow
def test_default_base_loads_offline_and_generates(default_base):
    assert (default_base / "config.json").exists()
    assert prepare_base() == default_base  # second call reuses the cached conversion
    model, tok = load_base(default_base)
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert {"q_proj", "k_proj", "v_proj", "o_proj"} <= set(lora_target_names(model))
    enc = tok("The capital of France is", return_tensors="pt")
    out = model.generate(**enc, max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
    text = tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in text


@pytest.mark.slow
def test_fingerprint_is_stable_and_sensitive(default_base):
    model, _ = load_base(default_base)
    fp = fingerprint(model)
    assert fingerprint(load_base(default_base)[0]) == fp
    with torch.no_grad():
        model.model.layers[3].self_attn.v_proj.weight[0, 0] += 1e-3
    assert fingerprint(model) != fp


def test_bad_specs_say_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="GGUF file not found"):
        prepare_base(str(tmp_path / "missing.gguf"))
    with pytest.raises(FileNotFoundError, match="no config.json"):
        prepare_base(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="no such model folder"):
        prepare_base("./nope")
