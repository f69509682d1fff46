"""Phase-2 Triton kernels (kernels/triton_merge.py) against the PyTorch reference.

Runs on CUDA, or on CPU under the Triton interpreter (test_triton_interpreter.py
starts this file with TRITON_INTERPRET=1). Tolerances (tests/support/triton_testing.py):
fp32 2e-5, bf16/fp16 1e-2 relative to the largest reference value.
"""

from __future__ import annotations

import pytest
import torch

import attnres_compile  # noqa: F401  (mounts attnres_compile.kernels, registers the ops)
from attnres_compile.kernels import ops
from attnres_compile.kernels import reference as ref
from attnres_compile.kernels import triton_merge as tm
from triton_testing import DEVICE, EPS, TOL, needs_triton_device, rel_err

pytestmark = needs_triton_device


def _case(shape, dtype, seed=0):
    """o, partial, grad [*shape], lse [*lead] (fp32, around the partial's score), query [d]."""
    gen = torch.Generator().manual_seed(seed)
    d = shape[-1]

    def rand(*size, dt=dtype, scale=1.0):
        return (torch.randn(size, generator=gen) * scale).to(dt).to(DEVICE)

    return rand(*shape), rand(*shape[:-1], dt=torch.float32), rand(*shape), rand(d, dt=torch.float32, scale=2 / d**0.5), rand(*shape)


@pytest.mark.parametrize(
    "shape,dtype,scale",
    [
        ((5, 33), torch.float32, 3.0),
        ((2, 3, 20), torch.bfloat16, 1.0),
        ((1, 7), torch.float16, 2.0),
    ],
    ids=["fp32-T5-d33", "bf16-2x3-d20", "fp16-T1-d7"],
)
def test_merge_forward_backward_match_reference(shape, dtype, scale):
    o, lse, partial, query, grad = _case(shape, dtype)
    tol = TOL[dtype]

    h = tm.merge_forward(o, lse, partial, query, EPS, scale)
    want_h = ref.merge_forward(o.float(), lse, partial.float(), query, EPS, scale)
    assert h.dtype == dtype and h.shape == shape
    assert rel_err(h, want_h) <= tol

    got = tm.merge_backward(grad, h, lse, partial, query, EPS, scale)
    want = ref.merge_backward(grad.float(), want_h, lse, partial.float(), query, EPS, scale)
    names = ("grad_o", "grad_lse", "grad_partial", "grad_query")
    for name, g, w, dt in zip(names, got, want, (dtype, torch.float32, dtype, torch.float32), strict=True):
        assert g.dtype == dt and g.shape == w.shape, name
        # grad_lse and grad_query are reductions over d / tokens computed in fp32.
        assert rel_err(g, w) <= (tol if dt == dtype else max(tol, 2e-5)), name


def test_several_column_blocks_and_token_blocks_per_program(monkeypatch):
    """Small tiles: d = 130 takes 3 column blocks per sweep and the 3 persistent backward
    programs of the interpreter (2 * SMs on CUDA) each stride over several token blocks."""
    monkeypatch.setattr(tm, "TILE_ELEMENTS", 64)
    o, lse, partial, query, grad = _case((5, 130), torch.float32, seed=3)
    h = tm.merge_forward(o, lse, partial, query, EPS, 2.0)
    assert rel_err(h, ref.merge_forward(o, lse, partial, query, EPS, 2.0)) <= 2e-5
    got = tm.merge_backward(grad, h, lse, partial, query, EPS, 2.0)
    want = ref.merge_backward(grad, h, lse, partial, query, EPS, 2.0)
    for g, w in zip(got, want, strict=True):
        assert rel_err(g, w) <= 2e-5


def test_merge_backward_matches_autograd_of_the_forward():
    o, lse, partial, query, grad = _case((4, 13), torch.float32, seed=1)
    inputs = [t.double().requires_grad_() for t in (o, lse, partial, query)]
    h = ref.merge_forward(*inputs, EPS, 2.0)
    want = torch.autograd.grad(h, inputs, grad.double())
    got = tm.merge_backward(grad, h.detach().float(), lse, partial, query, EPS, 2.0)
    for g, w in zip(got, want, strict=True):
        assert rel_err(g, w) <= 2e-5


@pytest.mark.parametrize("impl", ["triton", "aten"])
def test_merge_impl_selects_the_path(monkeypatch, impl):
    """ops.use_merge_impl: "triton" runs the kernels fwd and bwd, "aten" the reference; same values."""
    calls = []
    for name in ("merge_forward", "merge_backward"):
        kernel = getattr(tm, name)
        monkeypatch.setattr(tm, name, lambda *a, _k=kernel, _n=name, **kw: calls.append(_n) or _k(*a, **kw))
    o, lse, partial, query, grad = _case((3, 10), torch.float32, seed=2)
    inputs = [t.requires_grad_() for t in (o, lse, partial, query)]
    with ops.use_merge_impl(impl):
        h = ops.attnres_merge(*inputs, EPS, 3.0)
        grads = torch.autograd.grad(h, inputs, grad)
    assert calls == (["merge_forward", "merge_backward"] if impl == "triton" else [])
    want_h = ref.merge_forward(*[t.detach() for t in inputs], EPS, 3.0)
    o_, lse_, partial_, query_ = (t.detach() for t in inputs)
    want = ref.merge_backward(grad, want_h, lse_, partial_, query_, EPS, 3.0)
    assert rel_err(h, want_h) <= 2e-5
    for g, w in zip(grads, want, strict=True):
        assert rel_err(g, w) <= 2e-5


def test_merge_without_partial_needs_no_kernel(monkeypatch):
    monkeypatch.setattr(tm, "merge_forward", lambda *a, **k: pytest.fail("no kernel for h = scale * o"))
    o, lse, _, query, _ = _case((2, 5), torch.float32)
    torch.testing.assert_close(ops.attnres_merge(o, lse, None, query, EPS, 2.0), 2 * o)


def test_bad_merge_impl_is_refused(monkeypatch):
    monkeypatch.setenv("ATTNRES_MERGE_IMPL", "cuda")
    o, lse, partial, query, _ = _case((2, 5), torch.float32)
    with pytest.raises(ValueError, match="MERGE_IMPL must be 'triton' or 'aten'"):
        ops.attnres_merge(o, lse, partial, query)
    with pytest.raises(ValueError, match="must be 'triton' or 'aten'"):
        ops.use_merge_impl("cuda").__enter__()


def test_merge_impl_is_read_at_dispatch(monkeypatch):
    monkeypatch.setenv("ATTNRES_MERGE_IMPL", "aten")
    assert ops.merge_impl() == "aten"
    with ops.use_merge_impl("triton"):
        assert ops.merge_impl() == "triton"
    monkeypatch.delenv("ATTNRES_MERGE_IMPL")
    assert ops.merge_impl() == "triton"
