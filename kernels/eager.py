"""The reads of :mod:`.reference`, arranged for eager execution (the extern ops' bodies).

Where the Triton kernels do not apply (CPU, fp64) a compiled graph calls the
reads as opaque ``attnres::reference_*`` ops (see :mod:`.ops`), which run
eagerly, one ATen call after another. The reference is written token-major for
reading: it stacks the N sources into one ``[T, N, d]`` tensor and takes the
per-token products as batched ``[N, d] x [d, S]`` matrix products. Eagerly,
both are slow: the stack copies every source, and a batch of T tiny matrix
products costs several times a pass over the same bytes (about 5x for the
backward of a block read of 6 sources on one CPU thread).

Here the same formulas run source by source: each source is read where it
lies, its scores against the S queries are one ``[T, d] x [d, S]`` matrix
product, and every ``[T, d]`` term is one multiply or multiply-add over the
source. Only the per-token scores and weights ``[T, N, S]`` are ever stacked.
Same signatures, dtypes and precision policy as :mod:`.reference` (fp32 math,
fp64 for fp64 inputs, outputs in their inputs' dtypes); the tests compare the
two (``tests/kernels/test_eager.py``).

Shapes: ``T`` tokens (the sources' leading dims, flattened), ``d`` hidden,
``N`` sources, ``S`` queries.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor

from .reference import _inv_rms, _outside_autocast, compute_dtype

__all__ = [
    "block_read_backward",
    "block_read_forward",
    "merge_backward",
    "merge_forward",
    "read_backward",
    "read_forward",
]


def _tokens(v: Tensor) -> int:
    return math.prod(v.shape[:-1])


def _flat(v: Tensor, dtype: torch.dtype) -> Tensor:
    """``v [..., d]`` as ``[T, d]`` in ``dtype`` (a view where it can be)."""
    return v.to(dtype).reshape(_tokens(v), v.shape[-1])


def _row_dot(x: Tensor, y: Tensor) -> Tensor:
    """Per-token dot products ``[T, 1]`` of ``x, y [T, d]``."""
    return (x * y).sum(-1, keepdim=True)


def _scores(vs: Sequence[Tensor], w: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """``s [T, N, S]`` (``s_iq = r_i (w_q . v_i)``) and ``r [T, N, 1]`` of the sources ``vs [T, d]``."""
    r = torch.stack([_inv_rms(v, eps) for v in vs], dim=1)  # [T, N, 1]
    return torch.stack([v @ w.t() for v in vs], dim=1) * r, r


def _columns(a: Tensor) -> Tensor:
    """``a [T, N, S]`` as ``[N, S, T, 1]`` (a view): ``_columns(a)[i, q]`` scales a ``[T, d]`` row by row."""
    return a.permute(1, 2, 0).unsqueeze(-1)


def _mix(vs: Sequence[Tensor], a: Tensor) -> Tensor:
    """``o [S, T, d]``, ``o_q = sum_i a[:, i, q] v_i``, for the weights ``a [T, N, S]``."""
    cols = _columns(a)
    o = vs[0].new_empty((a.shape[2], *vs[0].shape))
    for q in range(a.shape[2]):
        torch.mul(vs[0], cols[0, q], out=o[q])
        for i in range(1, len(vs)):
            o[q].addcmul_(vs[i], cols[i, q])
    return o


# --------------------------------------------------------------------------
# Phase 1 and the plain read
# --------------------------------------------------------------------------


@_outside_autocast
def block_read_forward(sources: Sequence[Tensor], queries: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """:func:`.reference.block_read_forward`: ``o [S, ..., d]`` (sources' dtype), ``lse [S, ...]`` (fp32)."""
    first = sources[0]
    dtype = compute_dtype(first.dtype, queries.dtype)
    vs = [_flat(v, dtype) for v in sources]
    s, _ = _scores(vs, queries.to(dtype), eps)  # [T, N, S]
    o = _mix(vs, torch.softmax(s, dim=1))  # [S, T, d]
    lse = torch.logsumexp(s, dim=1).t().contiguous()  # [S, T]
    num_queries = queries.shape[0]
    return o.reshape(num_queries, *first.shape).to(first.dtype), lse.reshape(num_queries, *first.shape[:-1])


@_outside_autocast
def block_read_backward(
    grad_o: Optional[Tensor],
    grad_lse: Optional[Tensor],
    sources: Sequence[Tensor],
    queries: Tensor,
    eps: float,
) -> tuple[list[Tensor], Tensor]:
    """:func:`.reference.block_read_backward`, by the same formulas, source by source.

    ``ds [T, N, S]`` comes from the per-token products ``g_q . v_i``; then per
    source ``dv_i = sum_q a_qi g_q + (ds_i r_i) @ W - (sum_q ds_qi s_qi) r_i^2 v_i / d``
    and ``dW += (ds_i r_i)^T @ v_i``: one matrix product each, the rest
    multiply-adds over ``[T, d]``.
    """
    first = sources[0]
    dtype = compute_dtype(first.dtype, queries.dtype)
    d, tokens, num_queries = first.shape[-1], _tokens(first), queries.shape[0]
    vs = [_flat(v, dtype) for v in sources]
    w = queries.to(dtype)  # [S, d]
    s, r = _scores(vs, w, eps)  # [T, N, S], [T, N, 1]
    a = torch.softmax(s, dim=1)
    g = None if grad_o is None else grad_o.to(dtype).reshape(num_queries, tokens, d)  # [S, T, d]

    ds = torch.zeros_like(a)  # [T, N, S]
    if g is not None:
        g_dot_v = torch.stack([torch.stack([(v * g_q).sum(-1) for g_q in g], -1) for v in vs], 1)  # [T, N, S]: g_q . v_i
        ds = a * (g_dot_v - (a * g_dot_v).sum(1, keepdim=True))  # g_q . o_q = sum_i a_qi (g_q . v_i)
    if grad_lse is not None:
        ds = ds + a * grad_lse.to(dtype).reshape(num_queries, tokens).t().unsqueeze(1)
    ds_r = ds * r  # [T, N, S]
    shrink = -(ds * s).sum(-1, keepdim=True) * r.square() / d  # [T, N, 1]

    a_cols = _columns(a)
    grad_w = w.new_zeros(w.shape)
    grad_sources = []
    for i, (v, source) in enumerate(zip(vs, sources)):
        dv = ds_r[:, i] @ w  # [T, d]: sum_q ds_qi r_i w_q
        if g is not None:
            for q in range(num_queries):
                dv.addcmul_(g[q], a_cols[i, q])
        dv.addcmul_(v, shrink[:, i])
        grad_w.addmm_(ds_r[:, i].t(), v)
        grad_sources.append(dv.reshape(source.shape).to(source.dtype))
    return grad_sources, grad_w.to(queries.dtype)


@_outside_autocast
def read_forward(sources: Sequence[Tensor], query: Tensor, eps: float, scale: float) -> Tensor:
    """:func:`.reference.read_forward`: ``h = scale * sum_i softmax_i(w . k_i) v_i`` ``[..., d]``."""
    first = sources[0]
    dtype = compute_dtype(first.dtype, query.dtype)
    vs = [_flat(v, dtype) for v in sources]
    s, _ = _scores(vs, query.to(dtype).unsqueeze(0), eps)  # [T, N, 1]
    return _mix(vs, scale * torch.softmax(s, dim=1))[0].reshape(first.shape).to(first.dtype)


@_outside_autocast
def read_backward(
    grad_h: Tensor, sources: Sequence[Tensor], query: Tensor, eps: float, scale: float
) -> tuple[list[Tensor], Tensor]:
    """:func:`.reference.read_backward`: :func:`block_read_backward` of ``scale * grad_h``."""
    dtype = compute_dtype(sources[0].dtype, query.dtype, grad_h.dtype)
    grad_o = (scale * grad_h.to(dtype)).unsqueeze(0)  # [1, ..., d]
    grad_sources, grad_queries = block_read_backward(grad_o, None, sources, query.unsqueeze(0), eps)
    return grad_sources, grad_queries[0]


# --------------------------------------------------------------------------
# Phase 2
# --------------------------------------------------------------------------


def _merge_weights(p: Tensor, lse: Tensor, w: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(r_p, s_p, b_o, b_p)``, each ``[T, 1]``, of the partial ``p [T, d]`` and phase 1's ``lse [T, 1]``."""
    r_p = _inv_rms(p, eps)
    s_p = (p @ w).unsqueeze(-1) * r_p
    m = torch.logaddexp(lse, s_p)
    return r_p, s_p, torch.exp(lse - m), torch.exp(s_p - m)


@_outside_autocast
def merge_forward(
    o: Tensor, lse: Tensor, partial: Optional[Tensor], query: Tensor, eps: float, scale: float
) -> Tensor:
    """:func:`.reference.merge_forward`: ``h = scale * (b_o o + b_p p)`` ``[..., d]``, dtype of ``o``."""
    dtype = compute_dtype(o.dtype, lse.dtype, query.dtype)
    if partial is None:
        return (scale * o.to(dtype)).to(o.dtype)
    p = _flat(partial, dtype)
    _, _, b_o, b_p = _merge_weights(p, lse.to(dtype).reshape(-1, 1), query.to(dtype), eps)
    h = torch.mul(_flat(o, dtype), scale * b_o).addcmul_(p, scale * b_p)
    return h.reshape(o.shape).to(o.dtype)


@_outside_autocast
def merge_backward(
    grad_h: Tensor,
    h: Tensor,
    lse: Tensor,
    partial: Optional[Tensor],
    query: Tensor,
    eps: float,
    scale: float,
) -> tuple[Tensor, Tensor, Optional[Tensor], Tensor]:
    """:func:`.reference.merge_backward`: ``(grad_o, grad_lse, grad_partial, grad_query)`` from the output ``h``."""
    dtype = compute_dtype(h.dtype, lse.dtype, query.dtype, grad_h.dtype)
    if partial is None:
        return (scale * grad_h.to(dtype)).to(h.dtype), torch.zeros_like(lse), None, torch.zeros_like(query)
    d = h.shape[-1]
    g, p, w = _flat(grad_h, dtype), _flat(partial, dtype), query.to(dtype)
    r_p, s_p, b_o, b_p = _merge_weights(p, lse.to(dtype).reshape(-1, 1), w, eps)
    ds_p = scale * b_p * (_row_dot(g, p) - _row_dot(g, _flat(h, dtype)) / scale)  # [T, 1]
    ds_r = ds_p * r_p
    grad_p = torch.mul(g, scale * b_p).addcmul_(ds_r, w).addcmul_(p, ds_r * s_p * r_p / d, value=-1)
    return (
        torch.mul(g, scale * b_o).reshape(h.shape).to(h.dtype),
        (-ds_p).reshape(lse.shape).to(lse.dtype),
        grad_p.reshape(partial.shape).to(partial.dtype),
        (p.t() @ ds_r[:, 0]).to(query.dtype),
    )
