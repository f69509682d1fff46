"""The reference math of kernels/reference.py against autograd and the design's identities."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attnres_compile.kernels import reference as ref

F64 = torch.float64
EPS = 1e-6

# Odd sizes on purpose: d = 1 and 33 catch broadcasting and "d is a power of two" slips.
dims = st.sampled_from([1, 7, 33])
num_tokens = st.integers(1, 13)
num_sources = st.integers(1, 9)
num_queries = st.integers(1, 4)
# [d] alone, [T, d] or [2, T, d]: the leading dims are arbitrary.
layouts = st.sampled_from(["bare", "flat", "batched"])
seeds = st.integers(0, 2**16)


def _shape(layout: str, tokens: int, d: int) -> tuple[int, ...]:
    return {"bare": (d,), "flat": (tokens, d), "batched": (2, tokens, d)}[layout]


def _sources(n: int, shape: tuple[int, ...], gen: torch.Generator, dtype=F64) -> list[torch.Tensor]:
    return [torch.randn(shape, generator=gen, dtype=dtype).requires_grad_() for _ in range(n)]


def _grads(out: torch.Tensor, inputs: list[torch.Tensor], grad_out: torch.Tensor) -> tuple:
    return torch.autograd.grad(out, inputs, grad_out, allow_unused=True)


# --------------------------------------------------------------------------
# Explicit backward formulas vs torch.autograd of the forward reference (fp64)
# --------------------------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(d=dims, tokens=num_tokens, n=num_sources, layout=layouts, seed=seeds, count_scale=st.booleans())
def test_read_backward_matches_autograd(d, tokens, n, layout, seed, count_scale):
    gen = torch.Generator().manual_seed(seed)
    sources = _sources(n, _shape(layout, tokens, d), gen)
    query = torch.randn(d, generator=gen, dtype=F64).requires_grad_()
    scale = float(n) if count_scale else 1.0
    grad_h = torch.randn(_shape(layout, tokens, d), generator=gen, dtype=F64)

    h = ref.read_forward(sources, query, EPS, scale)
    *want_sources, want_query = _grads(h, [*sources, query], grad_h)
    got_sources, got_query = ref.read_backward(grad_h, sources, query, EPS, scale)

    for got, want in zip(got_sources, want_sources, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(got_query, want_query, rtol=1e-10, atol=1e-10)


@settings(max_examples=30, deadline=None)
@given(
    d=dims,
    tokens=num_tokens,
    n=num_sources,
    s=num_queries,
    layout=layouts,
    seed=seeds,
    which=st.sampled_from(["both", "o_only", "lse_only"]),
)
def test_block_read_backward_matches_autograd(d, tokens, n, s, layout, seed, which):
    gen = torch.Generator().manual_seed(seed)
    shape = _shape(layout, tokens, d)
    sources = _sources(n, shape, gen)
    queries = torch.randn(s, d, generator=gen, dtype=F64).requires_grad_()
    grad_o = torch.randn((s, *shape), generator=gen, dtype=F64)
    grad_lse = torch.randn((s, *shape[:-1]), generator=gen, dtype=F64)
    if which == "o_only":
        grad_lse = None
    if which == "lse_only":
        grad_o = None

    o, lse = ref.block_read_forward(sources, queries, EPS)
    assert o.shape == (s, *shape) and lse.shape == (s, *shape[:-1])
    loss = sum(
        (out * g).sum() for out, g in ((o, grad_o), (lse, grad_lse)) if g is not None
    )
    *want_sources, want_queries = torch.autograd.grad(loss, [*sources, queries])
    got_sources, got_queries = ref.block_read_backward(grad_o, grad_lse, sources, queries, EPS)

    for got, want in zip(got_sources, want_sources, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(got_queries, want_queries, rtol=1e-10, atol=1e-10)


@settings(max_examples=30, deadline=None)
@given(
    d=dims,
    tokens=num_tokens,
    layout=layouts,
    seed=seeds,
    with_partial=st.booleans(),
    scale=st.sampled_from([1.0, 3.0]),
)
def test_merge_backward_matches_autograd(d, tokens, layout, seed, with_partial, scale):
    gen = torch.Generator().manual_seed(seed)
    shape = _shape(layout, tokens, d)
    o = torch.randn(shape, generator=gen, dtype=F64).requires_grad_()
    lse = torch.randn(shape[:-1], generator=gen, dtype=F64).requires_grad_()
    partial = torch.randn(shape, generator=gen, dtype=F64).requires_grad_() if with_partial else None
    query = torch.randn(d, generator=gen, dtype=F64).requires_grad_()
    grad_h = torch.randn(shape, generator=gen, dtype=F64)

    h = ref.merge_forward(o, lse, partial, query, EPS, scale)
    inputs = [o, lse, query] + ([partial] if with_partial else [])
    want = _grads(h, inputs, grad_h)
    grad_o, grad_lse, grad_partial, grad_query = ref.merge_backward(
        grad_h, h.detach(), lse, partial, query, EPS, scale
    )

    torch.testing.assert_close(grad_o, want[0], rtol=1e-10, atol=1e-10)
    # Without a partial, lse and query do not reach h: autograd says None, we say zeros.
    for got, w in ((grad_lse, want[1]), (grad_query, want[2])):
        torch.testing.assert_close(got, torch.zeros_like(got) if w is None else w, rtol=1e-10, atol=1e-10)
    if with_partial:
        torch.testing.assert_close(grad_partial, want[3], rtol=1e-10, atol=1e-10)
    else:
        assert grad_partial is None


# --------------------------------------------------------------------------
# Identities
# --------------------------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(d=dims, tokens=num_tokens, n=num_sources, s=num_queries, layout=layouts, seed=seeds)
def test_merge_of_phase1_equals_plain_read(d, tokens, n, s, layout, seed):
    """Phase 1 over N sources, merged with the partial, is the read over N + 1 sources."""
    gen = torch.Generator().manual_seed(seed)
    shape = _shape(layout, tokens, d)
    sources = [torch.randn(shape, generator=gen, dtype=F64) for _ in range(n)]
    partial = torch.randn(shape, generator=gen, dtype=F64)
    queries = torch.randn(s, d, generator=gen, dtype=F64)

    o, lse = ref.block_read_forward(sources, queries, EPS)
    for q in range(s):
        for scale in (1.0, float(n + 1)):
            merged = ref.merge_forward(o[q], lse[q], partial, queries[q], EPS, scale)
            plain = ref.read_forward([*sources, partial], queries[q], EPS, scale)
            torch.testing.assert_close(merged, plain, rtol=1e-12, atol=1e-12)
        # No partial (a block's first layer): the merge only scales phase 1's read.
        first = ref.merge_forward(o[q], lse[q], None, queries[q], EPS, float(n))
        torch.testing.assert_close(
            first, ref.read_forward(sources, queries[q], EPS, float(n)), rtol=1e-12, atol=1e-12
        )


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_zero_query_reads_scaled_mean(dtype):
    """Zero query: h = scale * mean(sources); with scale = N it is the plain residual sum."""
    gen = torch.Generator().manual_seed(0)
    n, shape = 5, (2, 3, 7)
    sources = [torch.randn(shape, generator=gen, dtype=dtype) for _ in range(n)]
    partial = torch.randn(shape, generator=gen, dtype=dtype)
    zero = torch.zeros(7, dtype=torch.float32)
    tol = {"rtol": 1e-12, "atol": 1e-12} if dtype == F64 else {"rtol": 1e-6, "atol": 1e-6}

    total = torch.stack(sources).sum(0)
    torch.testing.assert_close(ref.read_forward(sources, zero, EPS, 1.0), total / n, **tol)
    torch.testing.assert_close(ref.read_forward(sources, zero, EPS, float(n)), total, **tol)

    # The two-phase path gives the same sum, partial included (scale = N + 1 sources).
    o, lse = ref.block_read_forward(sources, zero.expand(2, 7), EPS)
    h = ref.merge_forward(o[1], lse[1], partial, zero, EPS, float(n + 1))
    torch.testing.assert_close(h, total + partial, **tol)


def test_bf16_inputs_use_fp32_softmax():
    """bf16 sources: the math runs in fp32, only the output is rounded to bf16."""
    gen = torch.Generator().manual_seed(0)
    n, shape, d = 4, (3, 16), 16
    # A shared component plus small differences, and a query along it: scores near
    # 300 that differ by units -- bf16 (8 mantissa bits) cannot hold those differences.
    common = torch.ones(shape)
    sources = [(common + 0.2 * torch.randn(shape, generator=gen)).bfloat16() for _ in range(n)]
    query = torch.full((d,), 20.0)
    queries = torch.stack([query, -query])
    upcast = [v.float() for v in sources]

    h = ref.read_forward(sources, query, EPS, 1.0)
    assert h.dtype == torch.bfloat16
    torch.testing.assert_close(h, ref.read_forward(upcast, query, EPS, 1.0).bfloat16(), rtol=0, atol=0)

    o, lse = ref.block_read_forward(sources, queries, EPS)
    assert o.dtype == torch.bfloat16 and lse.dtype == torch.float32
    o32, lse32 = ref.block_read_forward(upcast, queries, EPS)
    torch.testing.assert_close(o, o32.bfloat16(), rtol=0, atol=0)
    torch.testing.assert_close(lse, lse32, rtol=0, atol=0)

    grad_h = torch.randn(shape, generator=gen).bfloat16()
    grads, grad_query = ref.read_backward(grad_h, sources, query, EPS, 1.0)
    grads32, grad_query32 = ref.read_backward(grad_h.float(), upcast, query, EPS, 1.0)
    assert grad_query.dtype == torch.float32
    torch.testing.assert_close(grad_query, grad_query32, rtol=0, atol=0)
    for got, want in zip(grads, grads32, strict=True):
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got, want.bfloat16(), rtol=0, atol=0)

    # The test can tell: a softmax over bf16 scores moves the result by far more.
    bf_query = query.bfloat16()
    keys = torch.stack(sources) * torch.rsqrt(torch.stack(sources).pow(2).mean(-1, keepdim=True) + EPS)
    naive = (torch.softmax((keys * bf_query).sum(-1), 0).unsqueeze(-1) * torch.stack(sources)).sum(0)
    assert (naive.float() - h.float()).abs().max() > 0.05  # 0.078 for this seed


def test_rms_key_is_fp32_and_unit_rms():
    v = torch.randn(4, 9, dtype=torch.float16)
    k = ref.rms_key(v, EPS)
    assert k.dtype == torch.float32
    torch.testing.assert_close(k.pow(2).mean(-1), torch.ones(4), rtol=1e-4, atol=1e-4)
    assert ref.rms_key(v.double(), EPS).dtype == torch.float64
