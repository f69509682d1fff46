"""Phase 1 of the two-phase read in Triton: S queries against N completed sources.

Math (per token; reference: :func:`reference.block_read_forward` / ``_backward``)::

    r_i    = rsqrt(mean(v_i ** 2) + eps)
    s_qi   = r_i * (w_q . v_i)
    lse_q  = logsumexp_i s_qi                 a_qi = exp(s_qi - lse_q)
    o_q    = scale * sum_i a_qi v_i

Backward, with ``g_q = scale * grad_o[q]`` and ``gl_q = grad_lse[q]``::

    ds_qi  = a_qi * (g_q . v_i - g_q . o_q / scale + gl_q)
    dv_i   = sum_q a_qi g_q + r_i * sum_q ds_qi w_q - (sum_q ds_qi s_qi) r_i**2 v_i / d
    dw_q   = sum over tokens and i of ds_qi r_i v_i

(``o_q / scale`` is the unscaled mix; the kernels never materialise it in the
backward: ``g_q . o_q / scale = sum_i a_qi g_q . v_i``.)

Launch: one program per block of ``BLOCK_T`` tokens, all S queries in the
program, so each source is read for every query at once. The forward keeps
whole rows (``pow2(d)`` columns) when its ``[S, BLOCK_T, d]`` accumulator fits
in registers (``ROW_KERNEL_MAX_ELEMENTS``): one sweep over the sources, an
online softmax, each source read exactly once. Otherwise, and in the backward,
a program makes two sweeps over d in ``BLOCK_D`` columns: the first gathers the
per-token reductions (sum of squares, ``w_q . v_i``, ``g_q . v_i``), the second
writes the outputs, re-reading the program's tiles (``N * BLOCK_T * d``
elements), which should mostly hit L2. Tokens and d are masked, never padded.
The tiled kernels are persistent: ``2 * SMs`` programs stride over the token
blocks (few programs in flight keep what the second sweep re-reads in L2); the
backward's programs accumulate their query grads in their own fp32 slot of
``[programs, S, d]`` (no atomics), summed after the launch.

More than ``MAX_SOURCES`` sources: the sources are split into near-equal
chunks. Forward: each chunk's launch folds the previous chunks' ``(o, lse)``
(kept in fp32) into its online softmax, so the last launch writes the result.
Backward: a first launch per chunk writes that chunk's ``lse_c`` and
``g . o_c``; they are combined (``lse = logsumexp_c lse_c``) and a second
launch per chunk, given the combined values, writes the chunk's source grads.
More than ``MAX_QUERIES`` queries are split into query chunks (each re-reads
the sources).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import wrap_triton

from .triton_common import (
    load_tile, padded_sources, persistent_programs, pick_source, pow2, source_chunks,
)

__all__ = ["MAX_QUERIES", "ROW_KERNEL_MAX_ELEMENTS", "block_read_backward", "block_read_forward"]

MAX_QUERIES = 16
"""Queries per launch; more are split into launches of at most this many."""

# Statistics of the backward: computed in the launch (one chunk of sources holds
# them all), computed and stored only (first launch of a chunked backward), or
# given (second launch of a chunked backward).
STATS_COMPUTE, STATS_STORE_ONLY, STATS_GIVEN = 0, 1, 2


# --------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------


@triton.jit
def _block_read_fwd_kernel(
    v0, v1, v2, v3, v4, v5, v6, v7, v8, v9, v10, v11, v12, v13, v14, v15,  # sources [T, D]
    w_ptr,         # [S, D] queries
    prev_o_ptr,    # [S, T, D] fp32: unscaled mix of the earlier source chunks (HAS_PREV)
    prev_lse_ptr,  # [S, T] fp32: their log-sum-exp (HAS_PREV)
    o_ptr,         # [S, T, D] out: scale * mix
    lse_ptr,       # [S, T] fp32 out
    T, D, eps, scale,
    N: tl.constexpr, S: tl.constexpr, N_PAD: tl.constexpr, S_PAD: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, HAS_PREV: tl.constexpr,
):
    # Persistent, like the backward: few programs in flight keep the tiles that the
    # second sweep re-reads in L2.
    q = tl.arange(0, S_PAD)  # [S_PAD]
    q_ok = q < S
    n = tl.arange(0, N_PAD)  # [N_PAD]
    for blk in range(tl.program_id(0), tl.cdiv(T, BLOCK_T), tl.num_programs(0)):
        tok = (blk * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)  # [BT]
        tok_ok = tok < T
        q_tok_ok = q_ok[:, None] & tok_ok[None, :]  # [S_PAD, BT]

        # Sweep 1: sum of squares and w_q . v_i of every source, per token.
        sumsq = tl.zeros([N_PAD, BLOCK_T], tl.float32)
        dots = tl.zeros([N_PAD, S_PAD, BLOCK_T], tl.float32)
        for d0 in range(0, D, BLOCK_D):
            col = d0 + tl.arange(0, BLOCK_D)
            col_ok = col < D
            w = tl.load(w_ptr + q[:, None] * D + col[None, :],
                        mask=q_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)  # [S_PAD, BD]
            for i in tl.static_range(N):
                v = load_tile(pick_source(i, v0, v1, v2, v3, v4, v5, v6, v7, v8, v9, v10, v11, v12,
                                          v13, v14, v15), tok, col, tok_ok, col_ok, D)  # [BT, BD]
                is_i = n == i
                sumsq += tl.where(is_i[:, None], tl.sum(v * v, 1)[None, :], 0.0)
                w_dot_v = tl.sum(w[:, None, :] * v[None, :, :], 2)  # [S_PAD, BT]
                dots += tl.where(is_i[:, None, None], w_dot_v[None, :, :], 0.0)

        # Softmax over the sources (and the earlier chunks' mass), in fp32.
        r = tl.rsqrt(sumsq / D + eps)  # [N_PAD, BT]
        s = tl.where((n < N)[:, None, None], dots * r[:, None, :], float("-inf"))  # [N_PAD, S_PAD, BT]
        m = tl.max(s, 0)  # [S_PAD, BT]
        stat_offsets = q[:, None] * T + tok[None, :]  # [S_PAD, BT]
        if HAS_PREV:
            prev_lse = tl.load(prev_lse_ptr + stat_offsets, mask=q_tok_ok, other=0.0)
            m = tl.maximum(m, prev_lse)
        total = tl.sum(tl.exp(s - m[None, :, :]), 0)
        if HAS_PREV:
            total += tl.exp(prev_lse - m)
        lse = m + tl.log(total)  # [S_PAD, BT]
        a = tl.exp(s - lse[None, :, :])  # [N_PAD, S_PAD, BT], 0 on padded sources
        tl.store(lse_ptr + stat_offsets, lse, mask=q_tok_ok)

        # Sweep 2: o_q = scale * (sum_i a_qi v_i [+ exp(prev_lse - lse) prev_o]).
        out_rows = q[:, None] * T + tok[None, :]  # [S_PAD, BT]
        for d0 in range(0, D, BLOCK_D):
            col = d0 + tl.arange(0, BLOCK_D)
            col_ok = col < D
            out_offsets = out_rows[:, :, None] * D + col[None, None, :]  # [S_PAD, BT, BD]
            out_mask = q_tok_ok[:, :, None] & col_ok[None, None, :]
            acc = tl.zeros([S_PAD, BLOCK_T, BLOCK_D], tl.float32)
            if HAS_PREV:
                prev_o = tl.load(prev_o_ptr + out_offsets, mask=out_mask, other=0.0)
                acc += tl.exp(prev_lse - lse)[:, :, None] * prev_o
            for i in tl.static_range(N):
                v = load_tile(pick_source(i, v0, v1, v2, v3, v4, v5, v6, v7, v8, v9, v10, v11, v12,
                                          v13, v14, v15), tok, col, tok_ok, col_ok, D)  # [BT, BD]
                a_i = tl.sum(tl.where((n == i)[:, None, None], a, 0.0), 0)  # [S_PAD, BT]
                acc += a_i[:, :, None] * v[None, :, :]
            tl.store(o_ptr + out_offsets, (scale * acc).to(o_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _block_read_fwd_rows_kernel(
    v0, v1, v2, v3, v4, v5, v6, v7, v8, v9, v10, v11, v12, v13, v14, v15,  # sources [T, D]
    w_ptr,         # [S, D] queries
    prev_o_ptr,    # [S, T, D] fp32: unscaled mix of the earlier source chunks (HAS_PREV)
    prev_lse_ptr,  # [S, T] fp32: their log-sum-exp (HAS_PREV)
    o_ptr,         # [S, T, D] out: scale * mix
    lse_ptr,       # [S, T] fp32 out
    T, D, eps, scale,
    N: tl.constexpr, S: tl.constexpr, S_PAD: tl.constexpr,
    BLOCK_T: tl.constexpr, D_PAD: tl.constexpr, HAS_PREV: tl.constexpr,
):
    """One sweep, whole rows: each source row is loaded once and folded into an
    online softmax whose accumulator ``[S_PAD, BLOCK_T, D_PAD]`` stays in registers."""
    pid = tl.program_id(0)
    tok = pid.to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)  # [BT]
    tok_ok = tok < T
    q = tl.arange(0, S_PAD)
    q_ok = q < S
    col = tl.arange(0, D_PAD)
    col_ok = col < D
    q_tok_ok = q_ok[:, None] & tok_ok[None, :]  # [S_PAD, BT]
    stat_offsets = q[:, None] * T + tok[None, :]  # [S_PAD, BT]
    out_offsets = stat_offsets[:, :, None] * D + col[None, None, :]  # [S_PAD, BT, D_PAD]
    out_mask = q_tok_ok[:, :, None] & col_ok[None, None, :]
    w_mask = q_ok[:, None] & col_ok[None, :]

    if HAS_PREV:  # resume the earlier chunks' softmax: running max lse, mass 1
        m = tl.load(prev_lse_ptr + stat_offsets, mask=q_tok_ok, other=0.0)
        total = tl.full([S_PAD, BLOCK_T], 1.0, tl.float32)
        acc = tl.load(prev_o_ptr + out_offsets, mask=out_mask, other=0.0)
    else:
        m = tl.full([S_PAD, BLOCK_T], float("-inf"), tl.float32)
        total = tl.zeros([S_PAD, BLOCK_T], tl.float32)
        acc = tl.zeros([S_PAD, BLOCK_T, D_PAD], tl.float32)
    for i in tl.static_range(N):
        v = load_tile(pick_source(i, v0, v1, v2, v3, v4, v5, v6, v7, v8, v9, v10, v11, v12,
                                  v13, v14, v15), tok, col, tok_ok, col_ok, D)  # [BT, D_PAD]
        # The queries are re-read per source (cache hits) so that registers go to acc.
        w = tl.load(w_ptr + q[:, None] * D + col[None, :], mask=w_mask, other=0.0).to(tl.float32)
        r = tl.rsqrt(tl.sum(v * v, 1) / D + eps)  # [BT]
        s = tl.sum(w[:, None, :] * v[None, :, :], 2) * r[None, :]  # [S_PAD, BT]
        m_new = tl.maximum(m, s)
        rescale = tl.exp(m - m_new)
        weight = tl.exp(s - m_new)
        total = total * rescale + weight
        acc = acc * rescale[:, :, None] + weight[:, :, None] * v[None, :, :]
        m = m_new
    tl.store(lse_ptr + stat_offsets, m + tl.log(total), mask=q_tok_ok)
    o = acc * (scale / total)[:, :, None]
    tl.store(o_ptr + out_offsets, o.to(o_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _block_read_bwd_kernel(
    v0, v1, v2, v3, v4, v5, v6, v7, v8, v9, v10, v11, v12, v13, v14, v15,  # sources [T, D]
    dv0, dv1, dv2, dv3, dv4, dv5, dv6, dv7, dv8, dv9, dv10, dv11, dv12, dv13, dv14,
    dv15,          # out: source grads [T, D]
    w_ptr,         # [S, D] queries
    g_ptr,         # [S, T, D] grad of o
    glse_ptr,      # [S, T] grad of lse (HAS_GLSE)
    lse_ptr,       # [S, T] fp32 lse over all sources: read (STATS_GIVEN) or written (STORE_ONLY)
    g_dot_o_ptr,   # [S, T] fp32 (scale * grad_o) . unscaled mix: read or written, like lse
    dw_ptr,        # [programs, S, D] fp32, zero-initialised: per-program query grads (accumulated)
    T, D, eps, scale,
    N: tl.constexpr, S: tl.constexpr, N_PAD: tl.constexpr, S_PAD: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, HAS_GLSE: tl.constexpr,
    STATS: tl.constexpr,
):
    # Persistent: a fixed number of programs strides over the token blocks, so the
    # query-grad partials are [programs, S, D] however many tokens there are.
    pid = tl.program_id(0)
    q = tl.arange(0, S_PAD)
    q_ok = q < S
    n = tl.arange(0, N_PAD)
    real = n < N  # [N_PAD]
    for blk in range(pid, tl.cdiv(T, BLOCK_T), tl.num_programs(0)):
        tok = (blk * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)  # [BT]
        tok_ok = tok < T
        q_tok_ok = q_ok[:, None] & tok_ok[None, :]  # [S_PAD, BT]
        g_rows = q[:, None] * T + tok[None, :]  # [S_PAD, BT]

        # Sweep 1: sum of squares, w_q . v_i and g_q . v_i per token.
        sumsq = tl.zeros([N_PAD, BLOCK_T], tl.float32)
        w_dots = tl.zeros([N_PAD, S_PAD, BLOCK_T], tl.float32)
        g_dots = tl.zeros([N_PAD, S_PAD, BLOCK_T], tl.float32)
        for d0 in range(0, D, BLOCK_D):
            col = d0 + tl.arange(0, BLOCK_D)
            col_ok = col < D
            w = tl.load(w_ptr + q[:, None] * D + col[None, :],
                        mask=q_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)  # [S_PAD, BD]
            g = scale * tl.load(g_ptr + g_rows[:, :, None] * D + col[None, None, :],
                                mask=q_tok_ok[:, :, None] & col_ok[None, None, :],
                                other=0.0).to(tl.float32)  # [S_PAD, BT, BD]
            for i in tl.static_range(N):
                v = load_tile(pick_source(i, v0, v1, v2, v3, v4, v5, v6, v7, v8, v9, v10, v11,
                                          v12, v13, v14, v15), tok, col, tok_ok, col_ok, D)  # [BT, BD]
                is_i = n == i
                sumsq += tl.where(is_i[:, None], tl.sum(v * v, 1)[None, :], 0.0)
                w_dots += tl.where(is_i[:, None, None], tl.sum(w[:, None, :] * v[None, :, :], 2)[None], 0.0)
                g_dots += tl.where(is_i[:, None, None], tl.sum(g * v[None, :, :], 2)[None], 0.0)

        r = tl.rsqrt(sumsq / D + eps)  # [N_PAD, BT]
        s = tl.where(real[:, None, None], w_dots * r[:, None, :], 0.0)  # [N_PAD, S_PAD, BT]
        if STATS == 2:
            lse = tl.load(lse_ptr + g_rows, mask=q_tok_ok, other=0.0)  # [S_PAD, BT]
            a = tl.where(real[:, None, None], tl.exp(s - lse[None, :, :]), 0.0)
            g_dot_o = tl.load(g_dot_o_ptr + g_rows, mask=q_tok_ok, other=0.0)
        else:
            masked = tl.where(real[:, None, None], s, float("-inf"))
            m = tl.max(masked, 0)
            lse = m + tl.log(tl.sum(tl.exp(masked - m[None, :, :]), 0))  # [S_PAD, BT]
            a = tl.exp(masked - lse[None, :, :])  # [N_PAD, S_PAD, BT]
            g_dot_o = tl.sum(a * g_dots, 0)  # [S_PAD, BT]
        if STATS == 1:
            tl.store(lse_ptr + g_rows, lse, mask=q_tok_ok)
            tl.store(g_dot_o_ptr + g_rows, g_dot_o, mask=q_tok_ok)
        else:
            ds = g_dots - g_dot_o[None, :, :]
            if HAS_GLSE:
                glse = tl.load(glse_ptr + g_rows, mask=q_tok_ok, other=0.0).to(tl.float32)
                ds += glse[None, :, :]
            ds = a * ds  # [N_PAD, S_PAD, BT]
            # Coefficient of v_i in dv_i: -(sum_q ds_qi s_qi) r_i^2 / d.
            v_coef = -tl.sum(ds * s, 1) * r * r / D  # [N_PAD, BT]

            # Sweep 2: source grads, and this block's share of the query grads.
            for d0 in range(0, D, BLOCK_D):
                col = d0 + tl.arange(0, BLOCK_D)
                col_ok = col < D
                w_mask = q_ok[:, None] & col_ok[None, :]
                w = tl.load(w_ptr + q[:, None] * D + col[None, :], mask=w_mask, other=0.0).to(tl.float32)
                g = scale * tl.load(g_ptr + g_rows[:, :, None] * D + col[None, None, :],
                                    mask=q_tok_ok[:, :, None] & col_ok[None, None, :],
                                    other=0.0).to(tl.float32)  # [S_PAD, BT, BD]
                dw = tl.zeros([S_PAD, BLOCK_D], tl.float32)
                for i in tl.static_range(N):
                    v = load_tile(pick_source(i, v0, v1, v2, v3, v4, v5, v6, v7, v8, v9, v10, v11,
                                              v12, v13, v14, v15), tok, col, tok_ok, col_ok, D)
                    is_i = n == i
                    a_i = tl.sum(tl.where(is_i[:, None, None], a, 0.0), 0)  # [S_PAD, BT]
                    ds_i = tl.sum(tl.where(is_i[:, None, None], ds, 0.0), 0)  # [S_PAD, BT]
                    r_i = tl.sum(tl.where(is_i[:, None], r, 0.0), 0)  # [BT]
                    coef_i = tl.sum(tl.where(is_i[:, None], v_coef, 0.0), 0)  # [BT]
                    dv = (tl.sum(a_i[:, :, None] * g, 0)
                          + r_i[:, None] * tl.sum(ds_i[:, :, None] * w[:, None, :], 0)
                          + coef_i[:, None] * v)  # [BT, BD]
                    dv_ptr = pick_source(i, dv0, dv1, dv2, dv3, dv4, dv5, dv6, dv7, dv8, dv9, dv10,
                                         dv11, dv12, dv13, dv14, dv15)
                    tl.store(dv_ptr + tok[:, None] * D + col[None, :], dv.to(dv_ptr.dtype.element_ty),
                             mask=tok_ok[:, None] & col_ok[None, :])
                    dw += tl.sum(ds_i[:, :, None] * (r_i[:, None] * v)[None, :, :], 1)  # [S_PAD, BD]
                # This program's own slot: no other program writes it, no atomics.
                dw_offsets = (pid * S + q[:, None]).to(tl.int64) * D + col[None, :]
                tl.store(dw_ptr + dw_offsets, tl.load(dw_ptr + dw_offsets, mask=w_mask, other=0.0) + dw,
                         mask=w_mask)


# --------------------------------------------------------------------------
# Launch choices
# --------------------------------------------------------------------------


ROW_KERNEL_MAX_ELEMENTS = 16384
"""The forward holds whole rows (one sweep, each source read once) while its
accumulator ``S_PAD * BLOCK_T * pow2(d)`` fits this many fp32 elements (64 per
thread at 8 warps) with ``BLOCK_T >= 2 * S_PAD`` tokens per program; other
reads (the S = 6 block at d = 2048, say) take the two-sweep tiled kernel."""


def _row_tiles(d: int, s_pad: int) -> Optional[tuple[int, int, int]]:
    """``(BLOCK_T, D_PAD, num_warps)`` of the one-sweep forward, or None where rows do not fit.

    The row kernel re-reads the queries ``[S_PAD, d]`` (fp32) for every source; with at
    least ``2 * S_PAD`` tokens per program those cached reads are no more bytes than
    the source rows themselves.
    """
    d_pad = pow2(d)
    block_t = min(8, ROW_KERNEL_MAX_ELEMENTS // (s_pad * d_pad))
    if block_t < 2 * s_pad:
        return None
    elements = s_pad * block_t * d_pad
    return block_t, d_pad, min(16, max(4, elements // 1024))


TILE_ELEMENTS = 4096
"""fp32 elements of the largest ``[S_PAD, BLOCK_T, BLOCK_D]`` tile of the tiled kernels
(~32 registers per thread at 4 warps for each such tile)."""


def _tiles(d: int, s_pad: int, backward: bool) -> tuple[int, int, int]:
    """``(BLOCK_T, BLOCK_D, num_warps)`` of the tiled kernels: starting points, not tuned on a GPU.

    Two tokens per program: a program's two sweeps touch ``(N [+ S]) * 2 * d``
    elements, which the second sweep should still find in L2 (``2 * SMs`` programs
    in flight: ~20-30 MB at d = 2048, N = 9, S = 6), while the fp32 query tile of
    sweep 1 is read once per two tokens.
    """
    block_t = 2
    block_d = min(pow2(d), max(16, TILE_ELEMENTS // (s_pad * block_t)))
    return block_t, block_d, 8 if backward else 4


def _flat_tokens(sources: Sequence[Tensor]) -> tuple[object, int]:
    """``(T, d)`` of sources ``[..., d]``: T = prod(...) (a SymInt under dynamic shapes)."""
    return math.prod(sources[0].shape[:-1]), int(sources[0].shape[-1])


def _contiguous(tensors: Sequence[Tensor]) -> list[Tensor]:
    """The kernels index rows as ``t * d + c``; a contiguous tensor is returned as is (no copy)."""
    return [t.contiguous() for t in tensors]


# --------------------------------------------------------------------------
# Forward launcher
# --------------------------------------------------------------------------


def _forward_launch(
    sources: Sequence[Tensor],  # N <= MAX_SOURCES tensors [..., d]
    queries: Tensor,            # [S, d], S <= MAX_QUERIES
    eps: float,
    scale: float,
    prev: Optional[tuple[Tensor, Tensor]],  # (o [S, ..., d] fp32 unscaled, lse [S, ...] fp32)
    out_dtype: torch.dtype,
) -> tuple[Tensor, Tensor]:
    tokens, d = _flat_tokens(sources)
    num_queries = int(queries.shape[0])
    lead = sources[0].shape[:-1]
    o = torch.empty((num_queries, *lead, d), dtype=out_dtype, device=queries.device)
    lse = torch.empty((num_queries, *lead), dtype=torch.float32, device=queries.device)
    s_pad = pow2(num_queries)
    # Without HAS_PREV the prev pointers are never read: the queries stand in.
    prev_o, prev_lse = prev if prev is not None else (queries, queries)
    args = (*padded_sources(sources), queries, prev_o, prev_lse, o, lse, tokens, d, eps, scale)
    meta = dict(N=len(sources), S=num_queries, S_PAD=s_pad, HAS_PREV=prev is not None)
    rows = _row_tiles(d, s_pad)
    if rows is not None:
        block_t, d_pad, num_warps = rows
        wrap_triton(_block_read_fwd_rows_kernel)[(triton.cdiv(tokens, block_t),)](
            *args, **meta, BLOCK_T=block_t, D_PAD=d_pad, num_warps=num_warps,
        )
    else:
        block_t, block_d, num_warps = _tiles(d, s_pad, backward=False)
        wrap_triton(_block_read_fwd_kernel)[(persistent_programs(queries.device),)](
            *args, **meta, N_PAD=pow2(len(sources)), BLOCK_T=block_t, BLOCK_D=block_d,
            num_warps=num_warps,
        )
    return o, lse


def _forward_queries(
    sources: Sequence[Tensor], queries: Tensor, eps: float, scale: float
) -> tuple[Tensor, Tensor]:
    """One query chunk: all sources, chunked by MAX_SOURCES with an fp32 running (o, lse)."""
    chunks = source_chunks(len(sources))
    prev = None
    for k, (start, stop) in enumerate(chunks):
        last = k == len(chunks) - 1
        prev = _forward_launch(
            sources[start:stop], queries, eps,
            scale if last else 1.0,
            prev,
            sources[0].dtype if last else torch.float32,
        )
    return prev


def block_read_forward(
    sources: Sequence[Tensor], queries: Tensor, eps: float, scale: float = 1.0
) -> tuple[Tensor, Tensor]:
    """Phase 1 forward in Triton; same contract as :func:`reference.block_read_forward`.

    Parameters
    ----------
    sources : sequence of N Tensors [..., d], one shape, one dtype (fp32/bf16/fp16)
    queries : Tensor [S, d]
    eps : float
    scale : float
        Multiplies ``o`` (1 for phase 1; the plain read passes its ``c_l``).

    Returns
    -------
    o : Tensor [S, ..., d], dtype of the sources
    lse : Tensor [S, ...], fp32
    """
    sources = _contiguous(sources)
    queries = queries.contiguous()
    num_queries = int(queries.shape[0])
    if num_queries <= MAX_QUERIES:
        return _forward_queries(sources, queries, eps, scale)
    parts = [
        _forward_queries(sources, queries[q0 : q0 + MAX_QUERIES].contiguous(), eps, scale)
        for q0 in range(0, num_queries, MAX_QUERIES)
    ]
    return torch.cat([o for o, _ in parts]), torch.cat([lse for _, lse in parts])


# --------------------------------------------------------------------------
# Backward launcher
# --------------------------------------------------------------------------


def _backward_launch(
    sources: Sequence[Tensor],   # N <= MAX_SOURCES tensors [..., d]
    queries: Tensor,             # [S, d]
    grad_o: Tensor,              # [S, ..., d]
    grad_lse: Optional[Tensor],  # [S, ...]
    eps: float,
    scale: float,
    stats: int,
    lse: Optional[Tensor] = None,      # [S, ...] fp32, for STATS_GIVEN
    g_dot_o: Optional[Tensor] = None,  # [S, ...] fp32, for STATS_GIVEN
) -> tuple[list[Tensor], Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """One launch; returns ``(grad_sources, grad_queries [S, d] fp32, lse, g_dot_o)``.

    With ``stats=STATS_STORE_ONLY`` only ``lse`` and ``g_dot_o`` of these sources are
    written (no grads: ``[]`` and None); with ``STATS_COMPUTE`` the stats come back None.
    """
    tokens, d = _flat_tokens(sources)
    num_queries = int(queries.shape[0])
    s_pad = pow2(num_queries)
    block_t, block_d, num_warps = _tiles(d, s_pad, backward=True)
    num_programs = persistent_programs(queries.device)
    store_only = stats == STATS_STORE_ONLY
    grad_sources = [] if store_only else [torch.empty_like(v) for v in sources]
    stat_shape, device = grad_o.shape[:-1], grad_o.device
    if store_only:
        lse = torch.empty(stat_shape, dtype=torch.float32, device=device)
        g_dot_o = torch.empty(stat_shape, dtype=torch.float32, device=device)
    # Pointers a specialization never touches get a stand-in (the queries, the sources):
    # no grads of sources or queries in the store-only launch, no stats with STATS_COMPUTE.
    dw_partial = None if store_only else torch.zeros(
        (num_programs, num_queries, d), dtype=torch.float32, device=device
    )
    wrap_triton(_block_read_bwd_kernel)[(num_programs,)](
        *padded_sources(sources), *padded_sources(grad_sources or list(sources)),
        queries, grad_o,
        grad_lse if grad_lse is not None else queries,
        lse if lse is not None else queries,
        g_dot_o if g_dot_o is not None else queries,
        queries if store_only else dw_partial,
        tokens, d, eps, scale,
        N=len(sources), S=num_queries, N_PAD=pow2(len(sources)), S_PAD=s_pad,
        BLOCK_T=block_t, BLOCK_D=block_d, HAS_GLSE=grad_lse is not None, STATS=stats,
        num_warps=num_warps,
    )
    return grad_sources, None if store_only else dw_partial.sum(0), lse, g_dot_o


def _combine_stats(parts: Sequence[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """Per-chunk ``(lse_c, g_dot_o_c)`` [S, ...] -> the values over all sources (fp32)."""
    lse_c = torch.stack([lse for lse, _ in parts])  # [chunks, S, ...]
    lse = torch.logsumexp(lse_c, 0)
    g_dot_o = (torch.exp(lse_c - lse) * torch.stack([g for _, g in parts])).sum(0)
    return lse, g_dot_o


def _backward_queries(
    grad_o: Tensor, grad_lse: Optional[Tensor], sources: Sequence[Tensor], queries: Tensor,
    eps: float, scale: float,
) -> tuple[list[Tensor], Tensor]:
    """One query chunk; grads of the sources and fp32 grads of the queries [S, d]."""
    chunks = source_chunks(len(sources))
    if len(chunks) == 1:
        grads, dw, _, _ = _backward_launch(sources, queries, grad_o, grad_lse, eps, scale, STATS_COMPUTE)
        return grads, dw
    stats = [
        _backward_launch(sources[a:b], queries, grad_o, None, eps, scale, STATS_STORE_ONLY)[2:]
        for a, b in chunks
    ]
    lse, g_dot_o = _combine_stats(stats)
    grad_sources, dw = [], None
    for a, b in chunks:
        grads, dw_c, _, _ = _backward_launch(
            sources[a:b], queries, grad_o, grad_lse, eps, scale, STATS_GIVEN, lse, g_dot_o
        )
        grad_sources += grads
        dw = dw_c if dw is None else dw + dw_c
    return grad_sources, dw


def block_read_backward(
    grad_o: Tensor,
    grad_lse: Optional[Tensor],
    sources: Sequence[Tensor],
    queries: Tensor,
    eps: float,
    scale: float = 1.0,
) -> tuple[list[Tensor], Tensor]:
    """Phase 1 backward in Triton; same contract as :func:`reference.block_read_backward`.

    Parameters
    ----------
    grad_o : Tensor [S, ..., d]
        Grad of ``o`` (of the scaled output when ``scale != 1``).
    grad_lse : Tensor [S, ...] or None
        None: ``lse`` is unused (the plain read).
    sources : sequence of N Tensors [..., d]
    queries : Tensor [S, d]
    eps, scale : float

    Returns
    -------
    grad_sources : list of N Tensors [..., d], dtype of the sources
    grad_queries : Tensor [S, d], dtype of the queries
    """
    sources = _contiguous(sources)
    queries = queries.contiguous()
    grad_o = grad_o.contiguous()
    grad_lse = grad_lse.contiguous() if grad_lse is not None else None
    num_queries = int(queries.shape[0])
    if num_queries <= MAX_QUERIES:
        grad_sources, dw = _backward_queries(grad_o, grad_lse, sources, queries, eps, scale)
        return grad_sources, dw.to(queries.dtype)
    grad_sources, dws = None, []
    for q0 in range(0, num_queries, MAX_QUERIES):
        rows = slice(q0, q0 + MAX_QUERIES)
        grads, dw = _backward_queries(
            grad_o[rows].contiguous(),
            grad_lse[rows].contiguous() if grad_lse is not None else None,
            sources, queries[rows].contiguous(), eps, scale,
        )
        # Each query chunk contributes to every source's grad: accumulate in fp32.
        grads = [g.float() for g in grads]
        grad_sources = grads if grad_sources is None else [x + y for x, y in zip(grad_sources, grads)]
        dws.append(dw)
    return [g.to(v.dtype) for g, v in zip(grad_sources, sources)], torch.cat(dws).to(queries.dtype)
