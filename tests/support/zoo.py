"""Tiny models with random weights (no downloads), shared by the tests.

Each factory returns ``(model, example_args, example_kwargs)`` in fp32.
"""

from __future__ import annotations

import torch
from torch import nn

VOCAB = 64


def tiny_gpt(n_layer: int = 2, d_model: int = 32, seq: int = 9):
    from tiny_gpt import GPTConfig, TinyGPT

    torch.manual_seed(0)
    model = TinyGPT(GPTConfig(vocab_size=VOCAB, n_layer=n_layer, n_head=4, d_model=d_model, max_len=32))
    return model, (torch.randint(0, VOCAB, (2, seq)),), {}


def hf_gpt2(n_layer: int = 2, seq: int = 7):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=n_layer, n_head=4, n_positions=32,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )
    return GPT2LMHeadModel(config), (torch.randint(0, VOCAB, (2, seq)),), {"use_cache": False}


def hf_llama(n_layer: int = 2, seq: int = 7):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=n_layer,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )
    return LlamaForCausalLM(config), (torch.randint(0, VOCAB, (2, seq)),), {"use_cache": False}


def hf_bert(n_layer: int = 2, seq: int = 7):
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=n_layer, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=64,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    return BertModel(config), (torch.randint(0, VOCAB, (2, seq)),), {}


class PlainMLP(nn.Module):
    """No residual stream at all."""

    def __init__(self, d: int = 16, depth: int = 3):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(d, d) for _ in range(depth))

    def forward(self, x):
        for layer in self.layers:
            x = torch.relu(layer(x))
        return x


def plain_mlp():
    torch.manual_seed(0)
    return PlainMLP(), (torch.randn(2, 5, 16),), {}


CAUSAL_LMS = {"tiny_gpt": tiny_gpt, "gpt2": hf_gpt2, "llama": hf_llama}
