"""kernels/cpu.py (the C++ read kernels for fp32 on CPU) against the reference."""

from __future__ import annotations

import logging

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attnres_compile.kernels import cpu, ops, reference as ref
from read_cases import assert_reads_close, read_case

EPS = 1e-6
TOL = 2e-5  # fp32 sums in another order than the reference's
layouts = st.sampled_from([(7,), (5, 7), (2, 3, 33), (3, 64)])  # [d] alone, [T, d], [B, T, d]; d = 64: full vectors

pytestmark = pytest.mark.skipif(cpu.library() is None, reason="no C++ compiler for the CPU read kernels")


def _close_fp32(got, want):
    assert_reads_close(got, want, TOL)


@settings(max_examples=40, deadline=None)
@given(shape=layouts, n=st.integers(1, 9), s=st.integers(1, 4), seed=st.integers(0, 2**16),
       with_grad_o=st.booleans(), with_grad_lse=st.booleans())
def test_block_read_matches_reference(shape, n, s, seed, with_grad_o, with_grad_lse):
    sources, queries, grad_o, grad_lse = read_case(shape, n, s, seed)
    _close_fp32(cpu.block_read_forward(sources, queries, EPS), ref.block_read_forward(sources, queries, EPS))
    args = (grad_o if with_grad_o else None, grad_lse if with_grad_lse else None, sources, queries, EPS)
    _close_fp32(cpu.block_read_backward(*args), ref.block_read_backward(*args))


@settings(max_examples=30, deadline=None)
@given(shape=layouts, n=st.integers(1, 9), seed=st.integers(0, 2**16), scale=st.sampled_from([1.0, 3.0]))
def test_read_matches_reference(shape, n, seed, scale):
    sources, queries, grad_o, _ = read_case(shape, n, 1, seed)
    query, grad = queries[0], grad_o[0]
    _close_fp32(cpu.read_forward(sources, query, EPS, scale), ref.read_forward(sources, query, EPS, scale))
    _close_fp32(cpu.read_backward(grad, sources, query, EPS, scale), ref.read_backward(grad, sources, query, EPS, scale))


@settings(max_examples=30, deadline=None)
@given(shape=layouts, seed=st.integers(0, 2**16), scale=st.sampled_from([1.0, 2.0]))
def test_merge_matches_reference(shape, seed, scale):
    (o, partial), queries, grad_o, grad_lse = read_case(shape, 2, 1, seed)
    lse, query = grad_lse[0], queries[0]
    h = ref.merge_forward(o, lse, partial, query, EPS, scale)
    _close_fp32(cpu.merge_forward(o, lse, partial, query, EPS, scale), h)
    _close_fp32(cpu.merge_backward(grad_o[0], h, lse, partial, query, EPS, scale),
           ref.merge_backward(grad_o[0], h, lse, partial, query, EPS, scale))


def test_strided_inputs():
    """Views that are not contiguous (a transposed source, an expanded gradient) read what they show."""
    sources, queries, grad_o, grad_lse = read_case((6, 16), 3, 2, seed=2)
    strided = [v.t().contiguous().t() for v in sources]
    expanded = torch.randn(16).expand(2, 6, 16)
    want = ref.block_read_backward(expanded, grad_lse, sources, queries, EPS)
    _close_fp32(cpu.block_read_backward(expanded, grad_lse, strided, queries.t().contiguous().t(), EPS), want)


def test_threads_split_tokens_and_sum_the_query_gradient():
    sources, queries, grad_o, grad_lse = read_case((2, 37, 16), 4, 3, seed=3)
    want = ref.block_read_backward(grad_o, grad_lse, sources, queries, EPS)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(3)
        got = cpu.block_read_backward(grad_o, grad_lse, sources, queries, EPS)
    finally:
        torch.set_num_threads(threads)
    _close_fp32(got, want)


def test_applies_to_fp32_cpu_tensors_only():
    x = torch.randn(4, 8)
    assert cpu.applies(x, None, x)
    assert not cpu.applies(x, x.double())
    assert not cpu.applies(x.bfloat16())
    assert not cpu.applies(torch.empty(0, 8))


def test_the_extern_ops_run_the_kernels_where_they_apply(monkeypatch):
    sources, queries, _, _ = read_case((4, 8), 2, 2, seed=4)
    calls = []
    real = cpu.block_read_forward
    monkeypatch.setattr(cpu, "block_read_forward", lambda *a: calls.append(a) or real(*a))
    torch.ops.attnres.reference_block_read(sources, queries, EPS)
    torch.ops.attnres.reference_block_read([v.double() for v in sources], queries.double(), EPS)
    assert len(calls) == 1  # fp32 took the kernels, fp64 the eager ATen calls


def test_a_missing_compiler_falls_back_to_eager_with_a_warning(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "cache"))
    cpu.library.cache_clear()
    try:
        with caplog.at_level(logging.WARNING):
            assert cpu.library() is None
            assert not cpu.applies(torch.randn(2, 4))
            sources, queries, _, _ = read_case((4, 8), 2, 2, seed=5)
            o, _ = torch.ops.attnres.reference_block_read(sources, queries, EPS)
        assert "could not be built" in caplog.text and "no-such-compiler" in caplog.text
        _close_fp32(o, ref.block_read_forward(sources, queries, EPS)[0])
    finally:
        cpu.library.cache_clear()
    assert ops.cpu is cpu
