"""Readable PyTorch reference for the Block AttnRes reads (design §2, §3).

Every fused kernel is tested against these functions. They are written for
clarity, not speed: each one is the math of the design notes, token by token,
with explicit backward formulas (no autograd) so that the kernels' backward
passes have something to be compared with as well.

Notation (per token; a *source* ``v`` is a tensor ``[..., d]``)::

    r_i = rsqrt(mean(v_i ** 2) + eps)      # key norm, no gain
    k_i = r_i * v_i
    s_i = w . k_i                          # no 1/sqrt(d)
    a   = softmax_i(s_i)                   # over the N sources
    o   = sum_i a_i v_i

Precision: all math runs in fp32 (fp64 when an input is fp64, so that fp64
``gradcheck`` is meaningful); outputs are cast back to the dtype of the tensor
they stand for (sources' dtype for values, query's dtype for query grads, the
compute dtype for ``lse``).

Shapes: the leading dims ``...`` of the sources are flattened into one token
axis ``T`` internally; ``N`` is the number of sources, ``S`` the number of
queries of a phase-1 block read.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor

__all__ = [
    "DEFAULT_EPS",
    "block_read_backward",
    "block_read_forward",
    "merge_backward",
    "merge_forward",
    "read_backward",
    "read_forward",
    "read_weights",
    "rms_key",
]

DEFAULT_EPS = 1e-6
"""Key-norm eps where nothing else is known (design §2: the model's own norm eps, else this)."""


def compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """The accumulation dtype for inputs of ``dtypes``: fp32, or fp64 if any is fp64."""
    out = torch.float32
    for dtype in dtypes:
        out = torch.promote_types(out, dtype)
    return out


def rms_key(v: Tensor, eps: float) -> Tensor:
    """Key of a source: ``v * rsqrt(mean(v ** 2, -1) + eps)``, no gain.

    Parameters
    ----------
    v : Tensor [..., d]
    eps : float

    Returns
    -------
    Tensor [..., d], fp32 (fp64 for an fp64 ``v``).
    """
    v = v.to(compute_dtype(v.dtype))
    return v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + eps)


def _stack_tokens(sources: Sequence[Tensor], dtype: torch.dtype) -> Tensor:
    """Stack ``N`` sources ``[..., d]`` into one ``[N, T, d]`` tensor of ``dtype``."""
    lead, d = sources[0].shape[:-1], sources[0].shape[-1]
    tokens = math.prod(lead)  # SymInt-friendly; 1 for a bare [d] source
    return torch.stack([v.to(dtype) for v in sources]).reshape(len(sources), tokens, d)


def _inv_rms(v: Tensor, eps: float) -> Tensor:
    """``r = rsqrt(mean(v ** 2, -1) + eps)`` of ``v [..., d]``, kept as ``[..., 1]``."""
    return torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + eps)


# --------------------------------------------------------------------------
# Plain read: all sources, one query (the simple per-layer variant)
# --------------------------------------------------------------------------


def _source_weights(v: Tensor, w: Tensor, eps: float) -> Tensor:
    """``a [N, T] = softmax_i(w . k_i)`` of stacked sources ``v [N, T, d]`` and a query ``w [d]``."""
    s = (rms_key(v, eps) * w).sum(-1)  # [N, T]
    return torch.softmax(s, dim=0)


def read_weights(sources: Sequence[Tensor], query: Tensor, eps: float) -> Tensor:
    """The read's weights ``alpha_i = softmax_i(w . k_i)`` per token.

    Parameters
    ----------
    sources : list of N Tensors [..., d], one shape and dtype
    query : Tensor [d]
    eps : float

    Returns
    -------
    alpha : Tensor [..., N], fp32 (fp64 for fp64 inputs); sums to 1 over the last dim.
    """
    dtype = compute_dtype(sources[0].dtype, query.dtype)
    a = _source_weights(_stack_tokens(sources, dtype), query.to(dtype), eps)  # [N, T]
    return a.t().reshape(*sources[0].shape[:-1], len(sources))


def read_forward(sources: Sequence[Tensor], query: Tensor, eps: float, scale: float) -> Tensor:
    """``h = scale * sum_i softmax_i(w . k_i) v_i``.

    Parameters
    ----------
    sources : list of N Tensors [..., d], one shape and dtype
    query : Tensor [d]
        The pseudo-query ``w``.
    eps : float
        Key-norm eps.
    scale : float
        ``c_l``: 1 for a convex mix, N to reproduce a plain residual sum at
        zero query.

    Returns
    -------
    h : Tensor [..., d], dtype of the sources.
    """
    dtype = compute_dtype(sources[0].dtype, query.dtype)
    v = _stack_tokens(sources, dtype)  # [N, T, d]
    a = _source_weights(v, query.to(dtype), eps)  # [N, T]
    h = scale * (a.unsqueeze(-1) * v).sum(0)  # [T, d]
    return h.reshape(sources[0].shape).to(sources[0].dtype)


def read_backward(
    grad_h: Tensor, sources: Sequence[Tensor], query: Tensor, eps: float, scale: float
) -> tuple[list[Tensor], Tensor]:
    """Gradients of :func:`read_forward`, by the explicit formulas.

    With ``g = grad_h`` and ``o = sum_i a_i v_i`` (recomputed)::

        ds_i = scale * a_i * (g . v_i - g . o)
        dv_i = scale * a_i * g + ds_i * (r_i * w - s_i * r_i**2 * v_i / d)
        dw   = sum over tokens and i of ds_i * k_i

    Parameters
    ----------
    grad_h : Tensor [..., d]
    sources : list of N Tensors [..., d]
    query : Tensor [d]
    eps, scale : float

    Returns
    -------
    grad_sources : list of N Tensors [..., d], dtype of the sources
    grad_query : Tensor [d], dtype of the query
    """
    dtype = compute_dtype(sources[0].dtype, query.dtype, grad_h.dtype)
    d = sources[0].shape[-1]
    v = _stack_tokens(sources, dtype)  # [N, T, d]
    w = query.to(dtype)  # [d]
    g = grad_h.to(dtype).reshape(v.shape[1:])  # [T, d]

    r = _inv_rms(v, eps)  # [N, T, 1]
    k = r * v  # [N, T, d]
    s = (k * w).sum(-1, keepdim=True)  # [N, T, 1]
    a = torch.softmax(s, dim=0)  # [N, T, 1]
    o = (a * v).sum(0)  # [T, d]

    ds = scale * a * ((g * v).sum(-1, keepdim=True) - (g * o).sum(-1, keepdim=True))  # [N, T, 1]
    grad_sources = []
    for i, src in enumerate(sources):
        dv = scale * a[i] * g + ds[i] * (r[i] * w - s[i] * r[i].pow(2) * v[i] / d)  # [T, d]
        grad_sources.append(dv.reshape(src.shape).to(src.dtype))
    dw = (ds * k).sum((0, 1))  # [d]
    return grad_sources, dw.to(query.dtype)


# --------------------------------------------------------------------------
# Phase 1: S queries of a block against its completed sources
# --------------------------------------------------------------------------


def block_read_forward(
    sources: Sequence[Tensor], queries: Tensor, eps: float
) -> tuple[Tensor, Tensor]:
    """Phase 1 (design §3): every query of a block reads the completed sources once.

    ``o_q = sum_i softmax_i(w_q . k_i) v_i`` (no scale) and
    ``lse_q = logsumexp_i(w_q . k_i)``, which phase 2 needs to fold in the
    intra-block partial by online softmax.

    Parameters
    ----------
    sources : list of N Tensors [..., d], one shape and dtype
    queries : Tensor [S, d]
    eps : float

    Returns
    -------
    o : Tensor [S, ..., d], dtype of the sources
    lse : Tensor [S, ...], fp32 (fp64 for fp64 inputs)
    """
    dtype = compute_dtype(sources[0].dtype, queries.dtype)
    lead = sources[0].shape[:-1]
    v = _stack_tokens(sources, dtype)  # [N, T, d]
    w = queries.to(dtype)  # [S, d]
    s = torch.einsum("qd,ntd->qnt", w, rms_key(v, eps))  # [S, N, T]
    a = torch.softmax(s, dim=1)  # [S, N, T]
    o = torch.einsum("qnt,ntd->qtd", a, v)  # [S, T, d]
    lse = torch.logsumexp(s, dim=1)  # [S, T]
    num_queries = queries.shape[0]
    o = o.reshape(num_queries, *sources[0].shape).to(sources[0].dtype)
    return o, lse.reshape(num_queries, *lead)


def block_read_backward(
    grad_o: Optional[Tensor],
    grad_lse: Optional[Tensor],
    sources: Sequence[Tensor],
    queries: Tensor,
    eps: float,
) -> tuple[list[Tensor], Tensor]:
    """Gradients of :func:`block_read_forward`, by the explicit formulas.

    With ``g_q = grad_o[q]``, ``glse_q = grad_lse[q]`` (``None`` means zero)::

        ds_qi = a_qi * (g_q . v_i - g_q . o_q) + a_qi * glse_q
        dv_i  = sum_q a_qi g_q + sum_q ds_qi * (r_i * w_q - s_qi * r_i**2 * v_i / d)
        dw_q  = sum over tokens and i of ds_qi * k_i

    Parameters
    ----------
    grad_o : Tensor [S, ..., d] or None
    grad_lse : Tensor [S, ...] or None
    sources : list of N Tensors [..., d]
    queries : Tensor [S, d]
    eps : float

    Returns
    -------
    grad_sources : list of N Tensors [..., d], dtype of the sources
    grad_queries : Tensor [S, d], dtype of the queries
    """
    dtype = compute_dtype(sources[0].dtype, queries.dtype)
    d = sources[0].shape[-1]
    v = _stack_tokens(sources, dtype)  # [N, T, d]
    w = queries.to(dtype)  # [S, d]
    num_queries, tokens = queries.shape[0], v.shape[1]

    r = _inv_rms(v, eps)  # [N, T, 1]
    k = r * v  # [N, T, d]
    s = torch.einsum("qd,ntd->qnt", w, k)  # [S, N, T]
    a = torch.softmax(s, dim=1)  # [S, N, T]

    if grad_o is None:
        g = torch.zeros(num_queries, tokens, d, dtype=dtype, device=v.device)
    else:
        g = grad_o.to(dtype).reshape(num_queries, tokens, d)  # [S, T, d]
    if grad_lse is None:
        glse = torch.zeros(num_queries, 1, tokens, dtype=dtype, device=v.device)
    else:
        glse = grad_lse.to(dtype).reshape(num_queries, 1, tokens)  # [S, 1, T]

    o = torch.einsum("qnt,ntd->qtd", a, v)  # [S, T, d]
    g_dot_v = torch.einsum("qtd,ntd->qnt", g, v)  # [S, N, T]
    g_dot_o = (g * o).sum(-1).unsqueeze(1)  # [S, 1, T]
    ds = a * (g_dot_v - g_dot_o) + a * glse  # [S, N, T]

    grad_sources = []
    for i, src in enumerate(sources):
        a_i, ds_i, s_i = a[:, i], ds[:, i], s[:, i]  # [S, T]
        dv = (
            torch.einsum("qt,qtd->td", a_i, g)  # sum_q a_qi g_q
            + r[i] * torch.einsum("qt,qd->td", ds_i, w)  # sum_q ds_qi r_i w_q
            - (ds_i * s_i).sum(0).unsqueeze(-1) * r[i].pow(2) * v[i] / d
        )  # [T, d]
        grad_sources.append(dv.reshape(src.shape).to(src.dtype))
    dw = torch.einsum("qnt,ntd->qd", ds, k)  # [S, d]
    return grad_sources, dw.to(queries.dtype)


# --------------------------------------------------------------------------
# Phase 2: per layer, merge phase 1's (o, lse) with the intra-block partial
# --------------------------------------------------------------------------


def merge_forward(
    o: Tensor, lse: Tensor, partial: Optional[Tensor], query: Tensor, eps: float, scale: float
) -> Tensor:
    """Phase 2 (design §3): fold the partial ``p`` into phase 1's read by online softmax.

    ``s_p = w . rmsnorm(p)``, ``m = logaddexp(lse, s_p)``,
    ``h = scale * (exp(lse - m) o + exp(s_p - m) p)``; ``h = scale * o`` when
    the layer has no partial (the first layer of a block).

    Parameters
    ----------
    o : Tensor [..., d]
        Phase 1's output for this layer's query.
    lse : Tensor [...]
        Phase 1's log-sum-exp for this layer's query.
    partial : Tensor [..., d] or None
    query : Tensor [d]
    eps, scale : float

    Returns
    -------
    h : Tensor [..., d], dtype of ``o``.
    """
    dtype = compute_dtype(o.dtype, lse.dtype, query.dtype)
    if partial is None:
        return (scale * o.to(dtype)).to(o.dtype)
    p = partial.to(dtype)  # [..., d]
    s_p = (rms_key(p, eps) * query.to(dtype)).sum(-1)  # [...]
    lse = lse.to(dtype)
    m = torch.logaddexp(lse, s_p)  # [...]
    b_o = torch.exp(lse - m).unsqueeze(-1)  # [..., 1]
    b_p = torch.exp(s_p - m).unsqueeze(-1)  # [..., 1]
    h = scale * (b_o * o.to(dtype) + b_p * p)
    return h.to(o.dtype)


def merge_backward(
    grad_h: Tensor,
    o: Tensor,
    lse: Tensor,
    partial: Optional[Tensor],
    query: Tensor,
    eps: float,
    scale: float,
) -> tuple[Tensor, Tensor, Optional[Tensor], Tensor]:
    """Gradients of :func:`merge_forward`, by the explicit formulas.

    With ``b_o = exp(lse - m)``, ``b_p = exp(s_p - m)``,
    ``hbar = b_o o + b_p p`` and ``g = grad_h``::

        grad_o       = scale * b_o * g
        grad_lse     = scale * b_o * (g . o - g . hbar)
        ds_p         = scale * b_p * (g . p - g . hbar)
        grad_partial = scale * b_p * g + ds_p * (r_p * w - s_p * r_p**2 * p / d)
        grad_query   = sum over tokens of ds_p * k_p

    Without a partial: ``grad_o = scale * g``, ``grad_lse = 0``, ``grad_query = 0``.

    Parameters
    ----------
    grad_h : Tensor [..., d]
    o : Tensor [..., d]
    lse : Tensor [...]
    partial : Tensor [..., d] or None
    query : Tensor [d]
    eps, scale : float

    Returns
    -------
    grad_o : Tensor [..., d], dtype of ``o``
    grad_lse : Tensor [...], dtype of ``lse``
    grad_partial : Tensor [..., d] (dtype of ``partial``) or None
    grad_query : Tensor [d], dtype of ``query``
    """
    dtype = compute_dtype(o.dtype, lse.dtype, query.dtype, grad_h.dtype)
    g = grad_h.to(dtype)  # [..., d]
    if partial is None:
        grad_o = (scale * g).to(o.dtype)
        return grad_o, torch.zeros_like(lse), None, torch.zeros_like(query)

    d = o.shape[-1]
    o_ = o.to(dtype)
    p = partial.to(dtype)
    w = query.to(dtype)
    r_p = _inv_rms(p, eps)  # [..., 1]
    k_p = r_p * p  # [..., d]
    s_p = (k_p * w).sum(-1, keepdim=True)  # [..., 1]
    lse_ = lse.to(dtype).unsqueeze(-1)  # [..., 1]
    m = torch.logaddexp(lse_, s_p)
    b_o = torch.exp(lse_ - m)  # [..., 1]
    b_p = torch.exp(s_p - m)  # [..., 1]
    g_dot_hbar = (g * (b_o * o_ + b_p * p)).sum(-1, keepdim=True)  # [..., 1]

    grad_o = scale * b_o * g
    grad_lse = scale * b_o * ((g * o_).sum(-1, keepdim=True) - g_dot_hbar)
    ds_p = scale * b_p * ((g * p).sum(-1, keepdim=True) - g_dot_hbar)  # [..., 1]
    grad_p = scale * b_p * g + ds_p * (r_p * w - s_p * r_p.pow(2) * p / d)
    tokens = math.prod(p.shape[:-1])
    grad_w = (ds_p * k_p).reshape(tokens, d).sum(0)  # [d]
    return (
        grad_o.to(o.dtype),
        grad_lse.squeeze(-1).to(lse.dtype),
        grad_p.to(partial.dtype),
        grad_w.to(query.dtype),
    )
