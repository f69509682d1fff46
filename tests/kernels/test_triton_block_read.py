"""Phase-1 Triton kernels (kernels/triton_block_read.py) against the PyTorch reference.

Runs on CUDA, or on CPU under the Triton interpreter; where and with which
tolerances: tests/support/triton_testing.py.
"""

from __future__ import annotations

import pytest
import torch

from attnres_compile.kernels import ops
from attnres_compile.kernels import reference as ref
from attnres_compile.kernels import triton_block_read as tbr
from triton_testing import DEVICE, EPS, TOL, needs_triton_device, rel_err

pytestmark = needs_triton_device


def _case(n, s, shape, dtype, seed=0):
    """N sources ``shape``, S queries with O(1) scores, grads of o [S, *shape] and lse [S, *lead]."""
    gen = torch.Generator().manual_seed(seed)
    d = shape[-1]
    sources = [torch.randn(shape, generator=gen).to(dtype).to(DEVICE) for _ in range(n)]
    queries = (torch.randn(s, d, generator=gen) * 2 / d**0.5).to(DEVICE)
    grad_o = torch.randn(s, *shape, generator=gen).to(dtype).to(DEVICE)
    grad_lse = torch.randn(s, *shape[:-1], generator=gen).to(DEVICE)
    return sources, queries, grad_o, grad_lse


# (N, S, source shape, dtype): T and d never multiples of the tiles, S = 1 and > 1,
# N = 1 .. 9, N = 18 > MAX_SOURCES (two source chunks).
CASES = [
    (1, 1, (3, 7), torch.float32),
    (4, 3, (2, 5, 33), torch.float32),
    (9, 6, (5, 20), torch.bfloat16),
    (2, 2, (3, 9), torch.float16),
    (18, 2, (3, 9), torch.float32),
]
_ID = lambda c: str(c).replace("torch.", "")  # noqa: E731


@pytest.mark.parametrize("n,s,shape,dtype", CASES, ids=_ID)
def test_block_read_forward_backward_match_reference(n, s, shape, dtype):
    """The launcher's choice: the one-sweep row forward for S <= 3 here, tiled for S = 6."""
    sources, queries, grad_o, grad_lse = _case(n, s, shape, dtype)
    f32 = [v.float() for v in sources]
    tol = TOL[dtype]

    o, lse = tbr.block_read_forward(sources, queries, EPS)
    want_o, want_lse = ref.block_read_forward(f32, queries, EPS)
    assert o.shape == (s, *shape) and o.dtype == dtype
    assert lse.shape == (s, *shape[:-1]) and lse.dtype == torch.float32
    assert rel_err(o, want_o) <= tol
    assert rel_err(lse, want_lse) <= 2e-5  # fp32 for every input dtype

    grads, grad_queries = tbr.block_read_backward(grad_o, grad_lse, sources, queries, EPS)
    want_grads, want_queries = ref.block_read_backward(grad_o.float(), grad_lse, f32, queries, EPS)
    assert len(grads) == n
    for got, want in zip(grads, want_grads, strict=True):
        assert got.dtype == dtype and got.shape == shape
        assert rel_err(got, want) <= tol
    assert grad_queries.dtype == torch.float32 and rel_err(grad_queries, want_queries) <= 2e-5


@pytest.mark.parametrize("n,s,shape,dtype", [CASES[1], CASES[4]], ids=_ID)
def test_tiled_forward_matches_reference(monkeypatch, n, s, shape, dtype):
    """The two-sweep forward on cases the row kernel would take (S = 6 already runs it)."""
    monkeypatch.setattr(tbr, "ROW_KERNEL_MAX_ELEMENTS", 0)
    sources, queries, _, _ = _case(n, s, shape, dtype)
    o, lse = tbr.block_read_forward(sources, queries, EPS)
    want_o, want_lse = ref.block_read_forward([v.float() for v in sources], queries, EPS)
    assert o.dtype == dtype and rel_err(o, want_o) <= TOL[dtype]
    assert rel_err(lse, want_lse) <= 2e-5


def test_several_column_blocks_and_token_blocks_per_program(monkeypatch):
    """Small tiles: d = 130 takes 3 column blocks per sweep and the 3 persistent backward
    programs of the interpreter (2 * SMs on CUDA) each stride over several token blocks."""
    monkeypatch.setattr(tbr, "TILE_ELEMENTS", 128)
    monkeypatch.setattr(tbr, "ROW_KERNEL_MAX_ELEMENTS", 0)
    sources, queries, grad_o, grad_lse = _case(2, 2, (7, 130), torch.float32, seed=4)
    o, lse = tbr.block_read_forward(sources, queries, EPS)
    want_o, want_lse = ref.block_read_forward(sources, queries, EPS)
    assert rel_err(o, want_o) <= 2e-5 and rel_err(lse, want_lse) <= 2e-5
    grads, grad_queries = tbr.block_read_backward(grad_o, grad_lse, sources, queries, EPS)
    want_grads, want_queries = ref.block_read_backward(grad_o, grad_lse, sources, queries, EPS)
    for got, want in zip([*grads, grad_queries], [*want_grads, want_queries], strict=True):
        assert rel_err(got, want) <= 2e-5


def test_block_read_backward_matches_autograd_of_the_forward():
    """An oracle independent of the reference's hand-written backward: fp64 autograd."""
    sources, queries, grad_o, grad_lse = _case(3, 2, (4, 11), torch.float32, seed=1)
    f64 = [v.double().requires_grad_() for v in sources]
    w64 = queries.double().requires_grad_()
    o, lse = ref.block_read_forward(f64, w64, EPS)
    want = torch.autograd.grad((o, lse), [*f64, w64], (grad_o.double(), grad_lse.double()))
    grads, grad_queries = tbr.block_read_backward(grad_o, grad_lse, sources, queries, EPS)
    for got, exp in zip([*grads, grad_queries], want, strict=True):
        assert rel_err(got, exp) <= 2e-5


def test_more_queries_than_one_launch_takes():
    s = tbr.MAX_QUERIES + 1
    sources, queries, grad_o, grad_lse = _case(2, s, (2, 5), torch.float32, seed=2)
    o, lse = tbr.block_read_forward(sources, queries, EPS)
    want_o, want_lse = ref.block_read_forward(sources, queries, EPS)
    assert rel_err(o, want_o) <= 2e-5 and rel_err(lse, want_lse) <= 2e-5
    grads, grad_queries = tbr.block_read_backward(grad_o, None, sources, queries, EPS)
    want_grads, want_queries = ref.block_read_backward(grad_o, None, sources, queries, EPS)
    for got, want in zip([*grads, grad_queries], [*want_grads, want_queries], strict=True):
        assert rel_err(got, want) <= 2e-5


def test_op_runs_the_kernels_fwd_and_bwd(monkeypatch):
    """attnres::block_read and its autograd take the Triton path, not the reference."""
    calls = []
    for name in ("block_read_forward", "block_read_backward"):
        kernel = getattr(tbr, name)
        monkeypatch.setattr(tbr, name, lambda *a, _k=kernel, _n=name, **kw: calls.append(_n) or _k(*a, **kw))
    sources, queries, grad_o, grad_lse = _case(3, 2, (5, 6), torch.float32, seed=3)
    sources = [v.requires_grad_() for v in sources]
    queries.requires_grad_()
    o, lse = ops.attnres_block_read(sources, queries, EPS)
    got = torch.autograd.grad((o, lse), [*sources, queries], (grad_o, grad_lse))
    assert calls == ["block_read_forward", "block_read_backward"]
    want = ref.block_read_backward(grad_o, grad_lse, [v.detach() for v in sources], queries.detach(), EPS)
    for g, w in zip(got, [*want[0], want[1]], strict=True):
        assert rel_err(g, w) <= 2e-5


def test_fp64_stays_on_the_reference(monkeypatch):
    monkeypatch.setattr(tbr, "block_read_forward", lambda *a, **k: pytest.fail("Triton path taken"))
    sources, queries, _, _ = _case(2, 1, (3, 4), torch.float64)
    o, _ = ops.attnres_block_read(sources, queries.double(), EPS)
    assert o.dtype == torch.float64
