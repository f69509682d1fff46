"""Phase 2 of the two-phase read in Triton: fold the intra-block partial into phase 1's read.

Math (per token; reference: :func:`reference.merge_forward` / ``_backward``)::

    r_p  = rsqrt(mean(p ** 2) + eps)          s_p = r_p * (w . p)
    m    = logaddexp(lse, s_p)                b_o = exp(lse - m), b_p = exp(s_p - m)
    h    = scale * (b_o o + b_p p)

Backward, from the forward's output ``h`` (``hbar = h / scale = b_o o + b_p p``;
the layer's norm keeps ``h`` anyway, so phase 1's ``o`` need not be kept) and
``g = grad_h``::

    ds_p     = scale * b_p (g . p - g . hbar)
    grad_o   = scale * b_o g
    grad_lse = scale * b_o (g . o - g . hbar) = -ds_p      (b_o + b_p = 1)
    grad_p   = scale * b_p g + ds_p (r_p w - s_p r_p**2 p / d)
    grad_w   = sum over tokens of ds_p r_p p

Launch: one program per block of ``BLOCK_T`` tokens, two sweeps over d in
``BLOCK_D`` columns (reductions, then the outputs; with whole rows per tile the
second sweep re-reads what the first has just loaded). The backward is
persistent (``2 * SMs`` programs striding over the token blocks), each program
accumulating its query grads in its own fp32 slot of ``[programs, d]``, summed
after the launch. A layer without a partial (``h = scale * o``) needs
no kernel: the op keeps that case on aten ops, which Inductor fuses.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import wrap_triton

from .triton_common import load_tile, persistent_programs, pow2

__all__ = ["merge_backward", "merge_forward"]


# --------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------


@triton.jit
def _merge_fwd_kernel(
    o_ptr,    # [T, D] phase 1's mix for this query
    lse_ptr,  # [T] fp32 its log-sum-exp
    p_ptr,    # [T, D] the intra-block partial
    w_ptr,    # [D] the query
    h_ptr,    # [T, D] out
    T, D, eps, scale,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    tok = pid.to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)  # [BT]
    tok_ok = tok < T

    # Sweep 1: the partial's score.
    sumsq = tl.zeros([BLOCK_T], tl.float32)
    w_dot_p = tl.zeros([BLOCK_T], tl.float32)
    for d0 in range(0, D, BLOCK_D):
        col = d0 + tl.arange(0, BLOCK_D)
        col_ok = col < D
        p = load_tile(p_ptr, tok, col, tok_ok, col_ok, D)  # [BT, BD]
        w = tl.load(w_ptr + col, mask=col_ok, other=0.0).to(tl.float32)  # [BD]
        sumsq += tl.sum(p * p, 1)
        w_dot_p += tl.sum(p * w[None, :], 1)
    s_p = w_dot_p * tl.rsqrt(sumsq / D + eps)  # [BT]
    lse = tl.load(lse_ptr + tok, mask=tok_ok, other=0.0).to(tl.float32)
    m = tl.maximum(lse, s_p)
    m = m + tl.log(tl.exp(lse - m) + tl.exp(s_p - m))
    b_o = scale * tl.exp(lse - m)  # [BT]
    b_p = scale * tl.exp(s_p - m)

    # Sweep 2: h = scale * (b_o o + b_p p).
    for d0 in range(0, D, BLOCK_D):
        col = d0 + tl.arange(0, BLOCK_D)
        col_ok = col < D
        o = load_tile(o_ptr, tok, col, tok_ok, col_ok, D)
        p = load_tile(p_ptr, tok, col, tok_ok, col_ok, D)
        h = b_o[:, None] * o + b_p[:, None] * p
        tl.store(h_ptr + tok[:, None] * D + col[None, :], h.to(h_ptr.dtype.element_ty),
                 mask=tok_ok[:, None] & col_ok[None, :])


@triton.jit
def _merge_bwd_kernel(
    g_ptr,       # [T, D] grad of h
    h_ptr,       # [T, D] the forward's output
    lse_ptr,     # [T] fp32
    p_ptr,       # [T, D]
    w_ptr,       # [D]
    go_ptr,      # [T, D] out: grad of o
    glse_ptr,    # [T] out: grad of lse
    gp_ptr,      # [T, D] out: grad of the partial
    dw_ptr,      # [programs, D] fp32, zero-initialised: per-program query grads (accumulated)
    T, D, eps, scale,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # Persistent: a fixed number of programs strides over the token blocks, so the
    # query-grad partials are [programs, D] however many tokens there are.
    pid = tl.program_id(0)
    for blk in range(pid, tl.cdiv(T, BLOCK_T), tl.num_programs(0)):
        tok = (blk * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)  # [BT]
        tok_ok = tok < T

        # Sweep 1: sum of squares of p, w . p, g . h, g . p.
        sumsq = tl.zeros([BLOCK_T], tl.float32)
        w_dot_p = tl.zeros([BLOCK_T], tl.float32)
        g_dot_h = tl.zeros([BLOCK_T], tl.float32)
        g_dot_p = tl.zeros([BLOCK_T], tl.float32)
        for d0 in range(0, D, BLOCK_D):
            col = d0 + tl.arange(0, BLOCK_D)
            col_ok = col < D
            g = load_tile(g_ptr, tok, col, tok_ok, col_ok, D)  # [BT, BD]
            h = load_tile(h_ptr, tok, col, tok_ok, col_ok, D)
            p = load_tile(p_ptr, tok, col, tok_ok, col_ok, D)
            w = tl.load(w_ptr + col, mask=col_ok, other=0.0).to(tl.float32)  # [BD]
            sumsq += tl.sum(p * p, 1)
            w_dot_p += tl.sum(p * w[None, :], 1)
            g_dot_h += tl.sum(g * h, 1)
            g_dot_p += tl.sum(g * p, 1)
        r_p = tl.rsqrt(sumsq / D + eps)  # [BT]
        s_p = w_dot_p * r_p
        lse = tl.load(lse_ptr + tok, mask=tok_ok, other=0.0).to(tl.float32)
        m = tl.maximum(lse, s_p)
        m = m + tl.log(tl.exp(lse - m) + tl.exp(s_p - m))
        b_o = scale * tl.exp(lse - m)  # [BT], scale folded in
        b_p = scale * tl.exp(s_p - m)
        ds_p = b_p * (g_dot_p - g_dot_h / scale)  # [BT]
        tl.store(glse_ptr + tok, (-ds_p).to(glse_ptr.dtype.element_ty), mask=tok_ok)
        p_coef = -ds_p * s_p * r_p * r_p / D  # [BT]

        # Sweep 2: grad_o, grad_p and this block's share of grad_w.
        for d0 in range(0, D, BLOCK_D):
            col = d0 + tl.arange(0, BLOCK_D)
            col_ok = col < D
            offsets = tok[:, None] * D + col[None, :]
            mask = tok_ok[:, None] & col_ok[None, :]
            g = load_tile(g_ptr, tok, col, tok_ok, col_ok, D)
            p = load_tile(p_ptr, tok, col, tok_ok, col_ok, D)
            w = tl.load(w_ptr + col, mask=col_ok, other=0.0).to(tl.float32)
            tl.store(go_ptr + offsets, (b_o[:, None] * g).to(go_ptr.dtype.element_ty), mask=mask)
            grad_p = b_p[:, None] * g + (ds_p * r_p)[:, None] * w[None, :] + p_coef[:, None] * p
            tl.store(gp_ptr + offsets, grad_p.to(gp_ptr.dtype.element_ty), mask=mask)
            # This program's own slot: no other program writes it, no atomics.
            dw_offsets = pid.to(tl.int64) * D + col
            dw = tl.load(dw_ptr + dw_offsets, mask=col_ok, other=0.0) + tl.sum((ds_p * r_p)[:, None] * p, 0)
            tl.store(dw_ptr + dw_offsets, dw, mask=col_ok)


# --------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------


TILE_ELEMENTS = 4096
"""fp32 elements of the largest ``[BLOCK_T, BLOCK_D]`` tile."""


def _tiles(d: int) -> tuple[int, int, int]:
    """``(BLOCK_T, BLOCK_D, num_warps)``: starting points, not tuned on a GPU.

    Few tokens and whole rows where they fit (d <= TILE_ELEMENTS): the second
    sweep then re-reads what the first has just loaded, which is still in cache.
    """
    block_d = min(pow2(d), TILE_ELEMENTS)
    block_t = max(1, min(4, TILE_ELEMENTS // block_d))
    return block_t, block_d, 4 if block_t * block_d <= 2048 else 8


def merge_forward(o: Tensor, lse: Tensor, partial: Tensor, query: Tensor, eps: float, scale: float) -> Tensor:
    """Phase 2 forward in Triton (a partial is required; see the module docstring).

    Parameters
    ----------
    o : Tensor [..., d] (fp32/bf16/fp16)
    lse : Tensor [...], fp32
    partial : Tensor [..., d], dtype of ``o``
    query : Tensor [d]
    eps, scale : float

    Returns
    -------
    h : Tensor [..., d], dtype of ``o``.
    """
    o, lse, partial, query = (t.contiguous() for t in (o, lse, partial, query))
    tokens, d = math.prod(o.shape[:-1]), int(o.shape[-1])
    h = torch.empty_like(o)
    block_t, block_d, num_warps = _tiles(d)
    wrap_triton(_merge_fwd_kernel)[(triton.cdiv(tokens, block_t),)](
        o, lse, partial, query, h, tokens, d, eps, scale,
        BLOCK_T=block_t, BLOCK_D=block_d, num_warps=num_warps,
    )
    return h


def merge_backward(
    grad_h: Tensor, h: Tensor, lse: Tensor, partial: Tensor, query: Tensor, eps: float, scale: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Phase 2 backward in Triton (with a partial); same contract as :func:`reference.merge_backward`.

    Parameters
    ----------
    grad_h, h, partial : Tensor [..., d]
        ``h`` is the forward's output.
    lse : Tensor [...], fp32
    query : Tensor [d]
    eps, scale : float

    Returns
    -------
    grad_o : Tensor [..., d], dtype of ``h``
    grad_lse : Tensor [...], dtype of ``lse``
    grad_partial : Tensor [..., d], dtype of ``partial``
    grad_query : Tensor [d], dtype of ``query``
    """
    grad_h, h, lse, partial, query = (t.contiguous() for t in (grad_h, h, lse, partial, query))
    tokens, d = math.prod(h.shape[:-1]), int(h.shape[-1])
    block_t, block_d, num_warps = _tiles(d)
    num_programs = persistent_programs(h.device)
    grad_o, grad_lse, grad_p = torch.empty_like(h), torch.empty_like(lse), torch.empty_like(partial)
    dw_partial = torch.zeros((num_programs, d), dtype=torch.float32, device=h.device)
    wrap_triton(_merge_bwd_kernel)[(num_programs,)](
        grad_h, h, lse, partial, query, grad_o, grad_lse, grad_p, dw_partial,
        tokens, d, eps, scale,
        BLOCK_T=block_t, BLOCK_D=block_d, num_warps=num_warps,
    )
    return grad_o, grad_lse, grad_p, dw_partial.sum(0).to(query.dtype)
