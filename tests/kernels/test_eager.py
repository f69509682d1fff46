"""kernels/eager.py (the extern ops' ATen body) against the reference it rearranges."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attnres_compile.kernels import eager, reference as ref
from read_cases import assert_reads_close, read_case

EPS = 1e-6
F64 = torch.float64
layouts = st.sampled_from([(7,), (5, 7), (2, 3, 33)])  # [d] alone, [T, d], [B, T, d]


@settings(max_examples=40, deadline=None)
@given(shape=layouts, n=st.integers(1, 9), s=st.integers(1, 4), seed=st.integers(0, 2**16),
       with_grad_o=st.booleans(), with_grad_lse=st.booleans())
def test_block_read_matches_reference(shape, n, s, seed, with_grad_o, with_grad_lse):
    sources, queries, grad_o, grad_lse = read_case(shape, n, s, seed, dtype=F64)
    assert_reads_close(eager.block_read_forward(sources, queries, EPS), ref.block_read_forward(sources, queries, EPS), 1e-12)
    args = (grad_o if with_grad_o else None, grad_lse if with_grad_lse else None, sources, queries, EPS)
    assert_reads_close(eager.block_read_backward(*args), ref.block_read_backward(*args), 1e-12)


@settings(max_examples=30, deadline=None)
@given(shape=layouts, n=st.integers(1, 9), seed=st.integers(0, 2**16), scale=st.sampled_from([1.0, 3.0]))
def test_read_matches_reference(shape, n, seed, scale):
    sources, queries, grad_o, _ = read_case(shape, n, 1, seed, dtype=F64)
    query, grad = queries[0], grad_o[0]
    assert_reads_close(eager.read_forward(sources, query, EPS, scale), ref.read_forward(sources, query, EPS, scale), 1e-12)
    assert_reads_close(eager.read_backward(grad, sources, query, EPS, scale), ref.read_backward(grad, sources, query, EPS, scale), 1e-12)


@settings(max_examples=30, deadline=None)
@given(shape=layouts, seed=st.integers(0, 2**16), with_partial=st.booleans(), scale=st.sampled_from([1.0, 2.0]))
def test_merge_matches_reference(shape, seed, with_partial, scale):
    (o, partial), queries, grad_o, grad_lse = read_case(shape, 2, 1, seed, dtype=F64)
    lse, query = grad_lse[0], queries[0]
    p = partial if with_partial else None
    h = ref.merge_forward(o, lse, p, query, EPS, scale)
    assert_reads_close(eager.merge_forward(o, lse, p, query, EPS, scale), h, 1e-12)
    assert_reads_close(eager.merge_backward(grad_o[0], h, lse, p, query, EPS, scale),
           ref.merge_backward(grad_o[0], h, lse, p, query, EPS, scale), 1e-12)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.bfloat16, 1e-2)])
def test_low_precision_dtypes_follow_the_reference_policy(dtype, tol):
    """Outputs in their inputs' dtypes, lse in fp32, the math in fp32: as the reference."""
    sources, queries, grad_o, grad_lse = read_case((4, 16), 3, 2, seed=0, dtype=dtype)
    queries = queries.float()
    assert_reads_close(eager.block_read_forward(sources, queries, EPS), ref.block_read_forward(sources, queries, EPS), tol)
    args = (grad_o, grad_lse.float(), sources, queries, EPS)
    assert_reads_close(eager.block_read_backward(*args), ref.block_read_backward(*args), tol)


def test_outputs_are_new_tensors():
    """Custom ops may not return an input or two views of one buffer: every gradient is its own tensor."""
    sources, queries, grad_o, grad_lse = read_case((4, 8), 3, 2, seed=1)
    grads, _ = eager.block_read_backward(grad_o, grad_lse, sources, queries.float(), EPS)
    storages = {g.untyped_storage().data_ptr() for g in grads}
    assert len(storages) == len(grads)
    assert not storages & {v.untyped_storage().data_ptr() for v in [*sources, grad_o]}
