"""Shared fixtures: tiny random-weight causal LMs built from a config, so unit tests run in seconds."""

import pytest
import torch


def tiny_llama(seed: int = 0, layers: int = 2, hidden: int = 32, vocab: int = 128):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval()


class ByteTokenizer:
    """A minimal tokenizer (one id per byte, shifted past 3 special ids) with the calls we use."""

    pad_token_id, bos_token_id, eos_token_id = 0, 1, 2
    pad_token, eos_token = "<pad>", "</s>"
    padding_side = "left"

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [3 + (b % 125) for b in text.encode()]}

    def decode(self, ids, skip_special_tokens=True):
        return bytes((i - 3) for i in ids if i >= 3).decode(errors="replace")

    def batch_decode(self, rows, skip_special_tokens=True):
        return [self.decode(r) for r in rows]


@pytest.fixture
def tiny_model():
    return tiny_llama()


@pytest.fixture
def tokenizer():
    return ByteTokenizer()


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory):
    """A tiny random Llama saved as an HF folder with the default base's real tokenizer: usable as `--base`."""
    from transformers import AutoTokenizer

    from perpcs.models import prepare_base

    try:
        source = prepare_base()
    except FileNotFoundError as e:
        pytest.skip(f"default base's tokenizer unavailable: {e}")
    tok = AutoTokenizer.from_pretrained(str(source))
    folder = tmp_path_factory.mktemp("tiny_base")
    model = tiny_llama(vocab=len(tok))
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    for cfg in (model.config, model.generation_config):
        cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id = tok.bos_token_id, tok.eos_token_id, pad
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """12 synthetic classification users (6-10 history items, 2 queries each)."""
    from perpcs.synth import save_synthetic, synthesize

    return save_synthetic(synthesize("classification", n_users=12, seed=0, history=(6, 10), n_queries=2),
                          tmp_path_factory.mktemp("tiny_data"))


@pytest.fixture(scope="session")
def tiny_run_config(tiny_data, tiny_base):
    """Make a RunConfig on the tiny base and data with tiny budgets (2 targets, 3 sharers, 1-2 steps). Calibration
    is off unless a test sets `calibration`: on a random model every rule is noise, the pool would decline and
    every recipe would be empty."""
    from perpcs.settings import RunConfig

    def make(**overrides) -> RunConfig:
        cfg = dict(data=str(tiny_data), base=str(tiny_base), n_targets=2, n_sharers=3, min_sharer_items=1,
                   task_train={"steps": 2}, sharer_train={"steps": 2}, gate_train={"steps": 1},
                   calibration={"enabled": False})
        return RunConfig(**{**cfg, **overrides})
    return make


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory, tiny_run_config):
    """A tiny finished run (steps 0-5) with a fixed rule, for tests that copy it and corrupt its recipes and pool."""
    from perpcs.pipeline import Run

    folder = tmp_path_factory.mktemp("run") / "run"
    Run.create(folder, tiny_run_config(calibration={"enabled": False})).pipeline()
    return folder


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for modules that train many tiny models (less overhead, and leaves a core free)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class Invocation:
    """A CLI run: `exit_code`, `output` and `exception`; unpacks as (exit code, output with whitespace
    squashed, since rich wraps long messages)."""

    def __init__(self, result):
        self.exit_code, self.output, self.exception = result.exit_code, result.output, result.exception

    def __iter__(self):
        return iter((self.exit_code, " ".join(self.output.split())))


@pytest.fixture
def cli():
    """`cli("bench", "--quick", ...)`: the perpcs command run in-process (typer's CliRunner)."""
    from typer.testing import CliRunner

    from perpcs.cli import app

    return lambda *args: Invocation(CliRunner().invoke(app, [str(a) for a in args]))
