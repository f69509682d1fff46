"""An independent, hand-written eager Block AttnRes of ``examples/tiny_gpt.TinyGPT``.

Written straight from design.md §2 in plain PyTorch, with no import of
``attnres_compile``: it is the oracle the compiler pass is compared against, so
it must not share code (or bugs) with it. It reads the model's submodules by
name (``tok_emb``, ``pos_emb``, ``drop``, ``blocks[i].ln_1/attn/ln_2/mlp``,
``ln_f``, ``lm_head``) and re-runs them with the residual adds replaced by
softmax reads over block summaries.

Layers are residual steps in execution order: layer ``2i`` is block i's
attention, layer ``2i + 1`` its MLP, so ``L = 2 * n_layer``. ``queries`` has one
row per layer plus a last row for the final read.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:  # only for the annotation: keeps examples/ off the import path
    from tiny_gpt import TinyGPT

__all__ = ["attnres_read", "block_attnres_logits"]

SCALES = ("count", "mean")


def attnres_read(sources: list[torch.Tensor], query: torch.Tensor, eps: float, scale: str) -> torch.Tensor:
    """One AttnRes read: a softmax over sources, scored by a pseudo-query.

    Parameters
    ----------
    sources : list of Tensor [B, T, d]
        The values ``v_i`` (completed blocks, then the partial if any).
    query : Tensor [d]
        The layer's pseudo-query ``w_l``.
    eps : float
        Eps of the keys' RMS norm.
    scale : {"count", "mean"}
        ``c = len(sources)`` or ``c = 1``.

    Returns
    -------
    Tensor [B, T, d]
        ``c * sum_i softmax_i(w . rmsnorm(v_i)) v_i``, in the sources' dtype.
    """
    v = torch.stack(sources).float()  # [S, B, T, d]
    k = v * torch.rsqrt(v.pow(2).mean(dim=-1, keepdim=True) + eps)  # no gain, no 1/sqrt(d)
    s = (k * query.float()).sum(dim=-1)  # [S, B, T]
    alpha = torch.softmax(s, dim=0)  # over sources, fp32
    c = float(len(sources)) if scale == "count" else 1.0
    h = c * (alpha.unsqueeze(-1) * v).sum(dim=0)
    return h.to(sources[0].dtype)


def _embed(model: TinyGPT, idx: torch.Tensor) -> torch.Tensor:
    """``b_0``: the stream before the first layer, [B, T] ids -> [B, T, d]."""
    pos = torch.arange(idx.shape[1], device=idx.device)
    return model.drop(model.tok_emb(idx) + model.pos_emb(pos))


def _layers(model: TinyGPT) -> Iterator[tuple[nn.Module, nn.Module]]:
    """``(pre-norm, branch)`` of every residual step, in execution order."""
    for block in model.blocks:
        yield block.ln_1, block.attn
        yield block.ln_2, block.mlp


def _check_args(queries: torch.Tensor, n_layers: int, d: int, block_size: int, scale: str) -> None:
    if queries.shape != (n_layers + 1, d):
        raise ValueError(f"queries must be [{n_layers + 1}, {d}] (one per layer + final), got {list(queries.shape)}")
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")


def block_attnres_logits(
    model: TinyGPT,
    idx: torch.Tensor,
    queries: torch.Tensor,
    block_size: int,
    eps: float,
    scale: str = "count",
) -> torch.Tensor:
    """Run ``model`` as a Block AttnRes transformer.

    Parameters
    ----------
    model : TinyGPT
        Supplies every weight; only its residual wiring is replaced.
    idx : LongTensor [B, T]
        Token ids.
    queries : Tensor [L + 1, d]
        Row ``l`` is layer ``l``'s pseudo-query (``L = 2 * n_layer``), the last
        row the final read's.
    block_size : int
        Layers per block; the last block may be shorter. ``1`` is Full AttnRes,
        ``>= L`` a single block.
    eps : float
        Eps of the keys' RMS norm.
    scale : {"count", "mean"}
        Read scale ``c``; with zero queries ``"count"`` reproduces ``model(idx)``.

    Returns
    -------
    Tensor [B, T, vocab_size]
        Logits; differentiable w.r.t. ``queries`` and the model's parameters.
    """
    layers = list(_layers(model))
    L = len(layers)
    _check_args(queries, L, model.tok_emb.embedding_dim, block_size, scale)

    blocks = [_embed(model, idx)]  # completed sources b_0, b_1, ...
    partial = None  # sum of f over the current block's earlier layers
    for l, (norm, branch) in enumerate(layers):
        sources = blocks if partial is None else [*blocks, partial]
        f = branch(norm(attnres_read(sources, queries[l], eps, scale)))
        # f feeds only the partial; there is no running stream any more.
        partial = f if partial is None else partial + f
        if (l + 1) % block_size == 0 or l == L - 1:
            blocks.append(partial)
            partial = None

    h = attnres_read(blocks, queries[L], eps, scale)
    return model.lm_head(model.ln_f(h))
