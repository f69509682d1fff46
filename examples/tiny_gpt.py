"""A tiny nanoGPT-style pre-norm GPT, small enough to read in one sitting.

This is the model the examples and the end-to-end tests rewrite into Block
AttnRes. It is deliberately plain: every block is

    x = x + attn(ln_1(x))
    x = x + mlp(ln_2(x))

so the residual stream is the value threaded through those two adds, and the
stream starts at ``b_0 = dropout(tok_emb(idx) + pos_emb(pos))``.

The submodule names (``tok_emb``, ``pos_emb``, ``drop``, ``blocks[i].ln_1``,
``blocks[i].attn``, ``blocks[i].ln_2``, ``blocks[i].mlp``, ``ln_f``,
``lm_head``) are part of its interface: ``tests/handwritten_attnres.py``
reads them to build an independent eager Block AttnRes of the same model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["GPTConfig", "TinyGPT", "loss_fn"]


@dataclass(frozen=True)
class GPTConfig:
    """Hyperparameters of :class:`TinyGPT`.

    The defaults give a byte-level model (vocabulary 256) of about 0.2M
    parameters that trains on a CPU in minutes.
    """

    vocab_size: int = 256
    n_layer: int = 4
    n_head: int = 4
    d_model: int = 64
    max_len: int = 128
    dropout: float = 0.0


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention.

    Parameters
    ----------
    cfg : GPTConfig
        ``d_model`` must be divisible by ``n_head``.
    """

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        if cfg.d_model % cfg.n_head != 0:
            raise ValueError(f"d_model={cfg.d_model} is not divisible by n_head={cfg.n_head}")
        self.n_head = cfg.n_head
        self.dropout = cfg.dropout
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.resid_drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Attend causally over the sequence.

        Parameters
        ----------
        x : Tensor [B, T, d]

        Returns
        -------
        Tensor [B, T, d]
        """
        B, T, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=-1)
        # [B, T, d] -> [B, n_head, T, d / n_head], the layout SDPA expects.
        q, k, v = (t.view(B, T, self.n_head, d // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True
        )
        y = y.transpose(1, 2).reshape(B, T, d)
        return self.resid_drop(self.proj(y))


class MLP(nn.Module):
    """Position-wise feed-forward network: ``d -> 4d -> GELU -> d``."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(cfg.d_model, 4 * cfg.d_model)
        self.proj = nn.Linear(4 * cfg.d_model, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the MLP; ``x`` is [B, T, d], returns [B, T, d]."""
        return self.drop(self.proj(F.gelu(self.fc(x))))


class Block(nn.Module):
    """One pre-norm transformer block: two residual steps (attention, MLP)."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.d_model)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.d_model)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Advance the residual stream ``x`` [B, T, d] by two steps."""
        x = x + self.attn(self.ln_1(x))
        x = x + self.mlp(self.ln_2(x))
        return x


class TinyGPT(nn.Module):
    """A byte-level pre-norm GPT.

    Parameters
    ----------
    cfg : GPTConfig
        Model hyperparameters.
    """

    def __init__(self, cfg: GPTConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg = cfg if cfg is not None else GPTConfig()
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.max_len, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        # Weight tying, as in GPT-2: halves the embedding parameters and is a
        # good regulariser at this size.
        self.lm_head.weight = self.tok_emb.weight
        self.apply(_init_weights)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Next-token logits.

        Parameters
        ----------
        idx : LongTensor [B, T]
            Token ids, ``T <= cfg.max_len``.

        Returns
        -------
        Tensor [B, T, vocab_size]
        """
        T = idx.shape[1]
        if T > self.cfg.max_len:
            raise ValueError(f"sequence length {T} exceeds max_len={self.cfg.max_len}")
        pos = torch.arange(T, device=idx.device)
        x = self.drop(self.tok_emb(idx) + self.pos_emb(pos))
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def _init_weights(module: nn.Module) -> None:
    # GPT-2's N(0, 0.02) init; PyTorch's default embedding init (N(0, 1)) would
    # make the tied lm_head produce huge initial logits.
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)


def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross entropy over all tokens.

    Parameters
    ----------
    logits : Tensor [B, T, V]
    targets : LongTensor [B, T]

    Returns
    -------
    Tensor []
        Scalar loss, in nats per token.
    """
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
