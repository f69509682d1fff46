"""Plain-read Triton path (kernels/triton_read.py) against the PyTorch reference.

Runs on CUDA, or on CPU under the Triton interpreter (test_triton_interpreter.py
starts this file with TRITON_INTERPRET=1). Tolerances (tests/support/triton_testing.py):
fp32 2e-5, bf16 1e-2 relative to the largest reference value.
"""

from __future__ import annotations

import pytest
import torch

from attnres_compile.kernels.ops import attnres_block_read, attnres_merge, attnres_read
from attnres_compile.kernels import reference as ref
from attnres_compile.kernels import triton_read as tr
from triton_testing import DEVICE, EPS, TOL, needs_triton_device, rel_err

pytestmark = needs_triton_device


def _case(n, shape, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    d = shape[-1]
    sources = [torch.randn(shape, generator=gen).to(dtype).to(DEVICE) for _ in range(n)]
    query = (torch.randn(d, generator=gen) * 2 / d**0.5).to(DEVICE)
    grad = torch.randn(shape, generator=gen).to(dtype).to(DEVICE)
    return sources, query, grad


@pytest.mark.parametrize(
    "n,shape,dtype",
    # (More sources than one launch takes: test_triton_block_read.py, same launchers.)
    [(1, (3, 5), torch.float32), (5, (2, 3, 33), torch.bfloat16)],
    ids=["N1-fp32", "N5-bf16"],
)
def test_read_forward_backward_match_reference(n, shape, dtype):
    sources, query, grad = _case(n, shape, dtype)
    f32, scale, tol = [v.float() for v in sources], float(n), TOL[dtype]

    h = tr.read_forward(sources, query, EPS, scale)
    assert h.dtype == dtype and h.shape == shape
    assert rel_err(h, ref.read_forward(f32, query, EPS, scale)) <= tol

    grads, grad_query = tr.read_backward(grad, sources, query, EPS, scale)
    want_grads, want_query = ref.read_backward(grad.float(), f32, query, EPS, scale)
    for got, want in zip(grads, want_grads, strict=True):
        assert got.dtype == dtype and rel_err(got, want) <= tol
    assert grad_query.dtype == torch.float32 and rel_err(grad_query, want_query) <= 2e-5


def test_read_op_autograd_through_the_kernels():
    sources, query, grad = _case(4, (5, 9), torch.float32, seed=1)
    inputs = [t.requires_grad_() for t in (*sources, query)]
    h = attnres_read(inputs[:-1], inputs[-1], EPS, 4.0)
    got = torch.autograd.grad(h, inputs, grad)
    want_sources, want_query = ref.read_backward(grad, [v.detach() for v in sources], query.detach(), EPS, 4.0)
    assert rel_err(h, ref.read_forward(sources, query, EPS, 4.0)) <= 2e-5
    for g, w in zip(got, [*want_sources, want_query], strict=True):
        assert rel_err(g, w) <= 2e-5


def test_two_phase_equals_the_plain_read():
    """block_read over the completed sources, then merge with the partial = read over all of them."""
    sources, query, grad = _case(5, (4, 12), torch.float32, seed=2)
    *completed, partial = sources
    o, lse = attnres_block_read(completed, torch.stack([query, -query]), EPS)
    h = attnres_merge(o[0], lse[0], partial, query, EPS, 5.0)
    assert rel_err(h, attnres_read(sources, query, EPS, 5.0)) <= 2e-5
