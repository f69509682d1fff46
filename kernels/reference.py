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
compute dtype for ``lse``). That holds inside an autocast region too: the
public functions run with autocast off (:func:`_outside_autocast`), since
autocast would otherwise run their matrix products in bf16/fp16 -- the ops
that call them are custom ops, which autocast passes through untouched.

Shapes: the leading dims ``...`` of the sources are flattened into one token
axis ``T`` internally; ``N`` is the number of sources, ``S`` the number of
queries of a phase-1 block read.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Optional, Sequence, TypeVar

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

_F = TypeVar("_F", bound=Callable)


def _first_tensor(values: Sequence) -> Optional[Tensor]:
    """The first tensor among ``values``, looking one level into lists (the sources)."""
    for value in values:
        if isinstance(value, Tensor):
            return value
        if isinstance(value, (list, tuple)) and value and isinstance(value[0], Tensor):
            return value[0]
    return None


def _outside_autocast(fn: _F) -> _F:
    """Run ``fn`` with autocast off for its tensors' device.

    The reads are custom ops, which autocast does not cast: their inputs arrive
    in the model's dtypes (the stream's, fp32 queries), but an eager call (the
    eager rewritten reference that ``verify`` compares with, a direct call) still
    runs their bodies inside the autocast region, where every matrix product
    (the scores ``v @ w``, the mix ``a @ v`` and their gradients) would drop to
    bf16/fp16. (A compiled graph runs with autocast off already: AOTAutograd
    baked the casts into the traced ops.) The math here keeps its own precision
    policy (fp32 accumulation, outputs in the inputs' dtypes), so autocast is
    switched off around it, not replaced.
    """

    @functools.wraps(fn)
    def without_autocast(*args, **kwargs):
        first = _first_tensor(args)
        device = None if first is None else first.device.type
        if device is None or not torch.amp.is_autocast_available(device) or not torch.is_autocast_enabled(device):
            return fn(*args, **kwargs)
        with torch.autocast(device, enabled=False):
            return fn(*args, **kwargs)

    return without_autocast  # type: ignore[return-value]


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


def _token_major(sources: Sequence[Tensor], dtype: torch.dtype) -> Tensor:
    """The N sources ``[..., d]`` as one ``[T, N, d]`` tensor of ``dtype``: per token, its N values side by side."""
    lead, d = sources[0].shape[:-1], sources[0].shape[-1]
    tokens = math.prod(lead)  # SymInt-friendly; 1 for a bare [d] source
    return torch.stack([v.to(dtype).reshape(tokens, d) for v in sources], dim=1)


def _inv_rms(v: Tensor, eps: float) -> Tensor:
    """``r = rsqrt(mean(v ** 2, -1) + eps)`` of ``v [..., d]``, kept as ``[..., 1]``."""
    norm = torch.linalg.vector_norm(v, dim=-1, keepdim=True)  # one read of v, no [..., d] temporary
    return torch.rsqrt(norm.square() / v.shape[-1] + eps)


def _scores(v: Tensor, w: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """``s [T, N, S]``, ``s_qi = w_q . k_i = r_i (w_q . v_i)``, and ``r [T, N, 1]``.

    ``v [T, N, d]``: the sources per token; ``w [S, d]``: the queries.
    """
    r = _inv_rms(v, eps)
    return (v @ w.t()) * r, r


# --------------------------------------------------------------------------
# Phase 1: S queries of a block against its completed sources
# --------------------------------------------------------------------------
# Per token the read is a tiny attention over the N sources, so the math is
# written token-major: batched matrix products over tokens of [S, N] and
# [N, d] matrices, a few ATen calls whatever N and S are.


@_outside_autocast
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
    v = _token_major(sources, dtype)  # [T, N, d]
    s, _ = _scores(v, queries.to(dtype), eps)  # [T, N, S]
    a = torch.softmax(s, dim=1)  # [T, N, S]
    o = a.transpose(1, 2) @ v  # [T, S, d]
    lse = torch.logsumexp(s, dim=1)  # [T, S]
    num_queries, lead = queries.shape[0], sources[0].shape[:-1]
    o = o.transpose(0, 1).contiguous().reshape(num_queries, *sources[0].shape)  # [S, ..., d]
    return o.to(sources[0].dtype), lse.t().contiguous().reshape(num_queries, *lead)


@_outside_autocast
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
    v = _token_major(sources, dtype)  # [T, N, d]
    w = queries.to(dtype)  # [S, d]
    tokens, num_queries = v.shape[0], w.shape[0]

    s, r = _scores(v, w, eps)  # [T, N, S], [T, N, 1]
    a = torch.softmax(s, dim=1)  # [T, N, S]
    if grad_o is None:
        g = torch.zeros(tokens, num_queries, d, dtype=dtype, device=v.device)
    else:
        g = grad_o.to(dtype).reshape(num_queries, tokens, d).transpose(0, 1).contiguous()  # [T, S, d]
    g_dot_v = v @ g.transpose(1, 2)  # [T, N, S]: g_q . v_i
    g_dot_o = (a * g_dot_v).sum(1, keepdim=True)  # [T, 1, S]: g_q . o_q = sum_i a_qi (g_q . v_i)
    ds = a * (g_dot_v - g_dot_o)  # [T, N, S]; exactly 0 for a single source
    if grad_lse is not None:
        ds = ds + a * grad_lse.to(dtype).reshape(num_queries, tokens).t().unsqueeze(1)

    # In place on dv, which nothing else holds: each term is one pass over [T, N, d].
    dv = a @ g  # [T, N, d]: sum_q a_qi g_q
    dv.addcmul_(r, ds @ w)  # + sum_q ds_qi r_i w_q
    dv.addcmul_((ds * s).sum(-1, keepdim=True) * r.square() / d, v, value=-1)  # - sum_q ds_qi s_qi r_i^2 v_i / d
    dw = (ds * r).reshape(-1, num_queries).t() @ v.reshape(-1, d)  # [S, d]: sum over tokens and i of ds_qi k_i
    # Each gradient its own tensor, not a view into dv: callers (the ops) may not return aliases.
    grad_sources = [dv[:, i].reshape(src.shape).to(src.dtype, copy=True) for i, src in enumerate(sources)]
    return grad_sources, dw.to(queries.dtype)


# --------------------------------------------------------------------------
# Plain read: all sources, one query (phase 1 with S = 1, scaled)
# --------------------------------------------------------------------------


@_outside_autocast
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
    s, _ = _scores(_token_major(sources, dtype), query.to(dtype).unsqueeze(0), eps)  # [T, N, 1]
    return torch.softmax(s[..., 0], dim=1).reshape(*sources[0].shape[:-1], len(sources))


@_outside_autocast
def read_forward(sources: Sequence[Tensor], query: Tensor, eps: float, scale: float) -> Tensor:
    """``h = scale * sum_i softmax_i(w . k_i) v_i``: :func:`block_read_forward` with one query, scaled.

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
    o, _ = block_read_forward(sources, query.unsqueeze(0), eps)
    dtype = compute_dtype(sources[0].dtype, query.dtype)
    return (scale * o[0].to(dtype)).to(sources[0].dtype)


@_outside_autocast
def read_backward(
    grad_h: Tensor, sources: Sequence[Tensor], query: Tensor, eps: float, scale: float
) -> tuple[list[Tensor], Tensor]:
    """Gradients of :func:`read_forward`: :func:`block_read_backward` of ``scale * grad_h``.

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
    grad_o = (scale * grad_h.to(dtype)).unsqueeze(0)  # [1, ..., d]
    grad_sources, grad_queries = block_read_backward(grad_o, None, sources, query.unsqueeze(0), eps)
    return grad_sources, grad_queries[0]


# --------------------------------------------------------------------------
# Phase 2: per layer, merge phase 1's (o, lse) with the intra-block partial
# --------------------------------------------------------------------------


@_outside_autocast
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
    """Gradients of :func:`merge_forward`, by the explicit formulas, from its output ``h``.

    The backward reads the merge's output rather than phase 1's ``o``: the
    layer's norm keeps ``h`` for its own backward anyway, so nothing
    stream-sized is saved for the merge but the partial. With
    ``b_o = exp(lse - m)``, ``b_p = exp(s_p - m)`` (``b_o + b_p = 1``),
    ``hbar = h / scale = b_o o + b_p p`` and ``g = grad_h``::

        ds_p         = scale * b_p * (g . p - g . hbar)
        grad_o       = scale * b_o * g
        grad_lse     = scale * b_o * (g . o - g . hbar) = -ds_p
        grad_partial = scale * b_p * g + ds_p * (r_p * w - s_p * r_p**2 * p / d)
        grad_query   = sum over tokens of ds_p * k_p

    Without a partial: ``grad_o = scale * g``, ``grad_lse = 0``, ``grad_query = 0``.

    Parameters
    ----------
    grad_h : Tensor [..., d]
    h : Tensor [..., d]
        :func:`merge_forward`'s output.
    lse : Tensor [...]
    partial : Tensor [..., d] or None
    query : Tensor [d]
    eps, scale : float

    Returns
    -------
    grad_o : Tensor [..., d], dtype of ``h``
    grad_lse : Tensor [...], dtype of ``lse``
    grad_partial : Tensor [..., d] (dtype of ``partial``) or None
    grad_query : Tensor [d], dtype of ``query``
    """
    dtype = compute_dtype(h.dtype, lse.dtype, query.dtype, grad_h.dtype)
    g = grad_h.to(dtype)  # [..., d]
    if partial is None:
        grad_o = (scale * g).to(h.dtype)
        return grad_o, torch.zeros_like(lse), None, torch.zeros_like(query)

    d = h.shape[-1]
    p = partial.to(dtype)
    w = query.to(dtype)
    r_p = _inv_rms(p, eps)  # [..., 1]
    k_p = r_p * p  # [..., d]
    s_p = (k_p * w).sum(-1, keepdim=True)  # [..., 1]
    lse_ = lse.to(dtype).unsqueeze(-1)  # [..., 1]
    m = torch.logaddexp(lse_, s_p)
    b_o = torch.exp(lse_ - m)  # [..., 1]
    b_p = torch.exp(s_p - m)  # [..., 1]
    g_dot_hbar = (g * h.to(dtype)).sum(-1, keepdim=True) / scale  # [..., 1]

    ds_p = scale * b_p * ((g * p).sum(-1, keepdim=True) - g_dot_hbar)  # [..., 1]
    grad_o = scale * b_o * g
    grad_p = scale * b_p * g + ds_p * (r_p * w - s_p * r_p.pow(2) * p / d)
    tokens = math.prod(p.shape[:-1])
    grad_w = (ds_p * k_p).reshape(tokens, d).sum(0)  # [d]
    return (
        grad_o.to(h.dtype),
        (-ds_p).squeeze(-1).to(lse.dtype),
        grad_p.to(partial.dtype),
        grad_w.to(query.dtype),
    )
