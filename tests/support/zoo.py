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


# ---------------------------------------------------------------- the family zoo
#
# One tiny config per architecture family (design §4), random weights, 2 layers,
# d 32, eager attention, every dropout off unless a factory says otherwise. Each
# factory returns ``(model, example_args, example_kwargs)`` in fp32.

SEQ = 7
IMAGE = 16  # 16x16 pixels in 8x8 patches: 4 patch tokens + CLS


def _token_ids(seq: int = SEQ) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, seq))


def _eager(config):
    """Eager attention: the same graph on every torch version, no SDPA kernel choice."""
    config._attn_implementation = "eager"
    return config


def hf_mixtral(n_layer: int = 2, seq: int = SEQ):
    """Sequential pre-norm with a sparse MoE MLP (routed experts summed inside the branch)."""
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    config = _eager(MixtralConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=n_layer,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        num_local_experts=4, num_experts_per_tok=2, router_jitter_noise=0.0,
    ))
    return MixtralForCausalLM(config), (_token_ids(seq),), {"use_cache": False}


def hf_gpt_neox(n_layer: int = 2, seq: int = SEQ):
    """Parallel residual: ``x + attn(ln1(x)) + mlp(ln2(x))``."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(0)
    config = _eager(GPTNeoXConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=n_layer,
        num_attention_heads=4, max_position_embeddings=64, use_parallel_residual=True,
        hidden_dropout=0.0, attention_dropout=0.0,
    ))
    return GPTNeoXForCausalLM(config), (_token_ids(seq),), {"use_cache": False}


def hf_gemma2(n_layer: int = 2, seq: int = SEQ):
    """Sandwich norms: pre-norm and a post-branch norm in each branch, ``(1 + w)`` gains."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    config = _eager(Gemma2Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=n_layer,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
        sliding_window=4,
    ))
    return Gemma2ForCausalLM(config), (_token_ids(seq),), {"use_cache": False}


def hf_olmo2(n_layer: int = 2, seq: int = SEQ):
    """Post-branch norms only: each branch reads the raw stream and ends in an RMSNorm."""
    from transformers import Olmo2Config, Olmo2ForCausalLM

    torch.manual_seed(0)
    config = _eager(Olmo2Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=n_layer,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    ))
    return Olmo2ForCausalLM(config), (_token_ids(seq),), {"use_cache": False}


def hf_t5(n_layer: int = 2, seq: int = SEQ):
    """Encoder–decoder: one stream per stack; cross-attention reads the encoder output."""
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    config = _eager(T5Config(
        vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=n_layer, num_decoder_layers=n_layer,
        num_heads=4, dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0,
    ))
    decoder_ids = _token_ids(seq - 2)
    return T5ForConditionalGeneration(config), (_token_ids(seq),), {"decoder_input_ids": decoder_ids, "use_cache": False}


def _pixels() -> torch.Tensor:
    return torch.randn(2, 3, IMAGE, IMAGE)


def hf_vit(n_layer: int = 2):
    """Vision transformer: pre-norm LayerNorm blocks over patch tokens, classifier on CLS."""
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    config = _eager(ViTConfig(
        hidden_size=32, num_hidden_layers=n_layer, num_attention_heads=4, intermediate_size=64,
        image_size=IMAGE, patch_size=8, num_labels=5,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    ))
    return ViTForImageClassification(config), (_pixels(),), {}


def hf_dinov2(n_layer: int = 2, drop_path_rate: float = 0.1):
    """Vision transformer with LayerScale and DropPath between branch and add (off in eval)."""
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    config = _eager(Dinov2Config(
        hidden_size=32, num_hidden_layers=n_layer, num_attention_heads=4, mlp_ratio=2,
        image_size=IMAGE, patch_size=8, layerscale_value=0.5, drop_path_rate=drop_path_rate,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    ))
    return Dinov2Model(config), (_pixels(),), {}


def timm_style_vit(n_layer: int = 2):
    """Vision transformer written like timm's: in-place LayerScale and per-sample DropPath."""
    from vision_styles import TimmStyleViT

    torch.manual_seed(0)
    return TimmStyleViT(image=IMAGE, patch=8, dim=32, depth=n_layer, drop_path=0.1, inplace=True), (_pixels(),), {}


# Every architecture family of design §4 that the pass rewrites, by model.
FAMILIES = {
    "tiny_gpt": ("sequential pre-norm", tiny_gpt),
    "gpt2": ("sequential pre-norm", hf_gpt2),
    "llama": ("sequential pre-norm", hf_llama),
    "mixtral": ("sequential pre-norm, MoE", hf_mixtral),
    "gpt_neox": ("parallel residual", hf_gpt_neox),
    "gemma2": ("sandwich norms", hf_gemma2),
    "olmo2": ("post-branch norms", hf_olmo2),
    "t5": ("encoder-decoder", hf_t5),
    "vit": ("vision", hf_vit),
    "dinov2": ("vision, LayerScale + DropPath", hf_dinov2),
    "timm_style_vit": ("vision, in-place LayerScale + DropPath", timm_style_vit),
}
"""name -> (family, factory); each factory returns ``(model, example_args, example_kwargs)``."""


def set_random_queries(model: nn.Module, seed: int = 0) -> None:
    """Fill a prepared model's queries with rows of std 1/sqrt(d) (O(1) read scores), in place."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for q in model.attnres.queries:
            q.copy_(torch.randn(q.shape, generator=gen) / q.shape[-1] ** 0.5)
