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
