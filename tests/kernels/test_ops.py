"""The attnres::* custom ops: autograd, opcheck, reference agreement, torch.compile, bad inputs.

Inductor compiles are the slow part on a CPU runner, so only two functions are
compiled here, on tiny shapes.
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

from attnres_compile.kernels import ops
from attnres_compile.kernels import reference as ref
from attnres_compile.kernels.ops import attnres_block_read, attnres_merge, attnres_read

EPS = 1e-6
N, SHAPE, D, S = 3, (2, 3, 5), 5, 2


def _inputs(dtype=torch.float64, seed=0, shape=SHAPE, requires_grad=True):
    """N sources [2, 3, 5], a partial, a query [5] and block queries [2, 5]."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*size, dt=dtype):
        return torch.randn(size, generator=gen).to(dt).requires_grad_(requires_grad)

    sources = [rand(*shape) for _ in range(N)]
    partial = rand(*shape)
    query = rand(shape[-1], dt=torch.float64 if dtype == torch.float64 else torch.float32)
    queries = rand(S, shape[-1], dt=query.dtype)
    return sources, partial, query, queries


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want.double()).abs().max() / want.double().abs().max().clamp_min(1e-30)).item()


# --------------------------------------------------------------------------
# Autograd through the registered backward ops (fp64 gradcheck)
# --------------------------------------------------------------------------


@pytest.mark.parametrize("scale", [1.0, float(N)])
def test_read_gradcheck(scale):
    sources, _, query, _ = _inputs()
    fn = lambda *xs: attnres_read(list(xs[:-1]), xs[-1], EPS, scale)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (*sources, query))


def test_block_read_gradcheck():
    sources, _, _, queries = _inputs()
    fn = lambda *xs: attnres_block_read(list(xs[:-1]), xs[-1], EPS)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (*sources, queries))
    # Only one of the two outputs used: the other grad arrives as None / zeros.
    only_o = lambda *xs: attnres_block_read(list(xs[:-1]), xs[-1], EPS)[0]  # noqa: E731
    only_lse = lambda *xs: attnres_block_read(list(xs[:-1]), xs[-1], EPS)[1]  # noqa: E731
    assert torch.autograd.gradcheck(only_o, (*sources, queries))
    assert torch.autograd.gradcheck(only_lse, (*sources, queries))


@pytest.mark.parametrize("with_partial", [True, False])
def test_merge_gradcheck(with_partial):
    sources, partial, query, _ = _inputs()
    o = sources[0]
    lse = torch.randn(SHAPE[:-1], dtype=torch.float64, requires_grad=True)
    if with_partial:
        fn = lambda o, lse, p, w: attnres_merge(o, lse, p, w, EPS, 2.0)  # noqa: E731
        assert torch.autograd.gradcheck(fn, (o, lse, partial, query))
    else:
        fn = lambda o, lse, w: attnres_merge(o, lse, None, w, EPS, 2.0)  # noqa: E731
        assert torch.autograd.gradcheck(fn, (o, lse, query))


def test_two_phase_gradcheck():
    """Phase 1 then phase 2, as a rewritten block runs them: grads flow through lse."""
    sources, partial, _, queries = _inputs()

    def fn(*xs):
        *srcs, p, w = xs
        o, lse = attnres_block_read(srcs, w, EPS)
        return attnres_merge(o[0], lse[0], None, w[0], EPS, 3.0) + attnres_merge(
            o[1], lse[1], p, w[1], EPS, 4.0
        )

    assert torch.autograd.gradcheck(fn, (*sources, partial, queries))


# --------------------------------------------------------------------------
# opcheck: schema, autograd registration, fake tensors, AOT dispatch
# --------------------------------------------------------------------------


def _op_cases():
    sources, partial, query, queries = _inputs(torch.float32)
    lse = torch.randn(SHAPE[:-1], requires_grad=True)
    grad = torch.randn(SHAPE)
    plain = [s.detach() for s in sources]
    return [
        ("read", (sources, query, EPS, 2.0)),
        ("block_read", (sources, queries, EPS)),
        ("merge", (sources[0], lse, partial, query, EPS, 2.0)),
        ("merge_no_partial", (sources[0], lse, None, query, EPS, 2.0)),
        ("read_backward", (grad, plain, query.detach(), EPS, 2.0)),
        (
            "block_read_backward",
            (torch.randn(S, *SHAPE), torch.randn(S, *SHAPE[:-1]), plain, queries.detach(), EPS),
        ),
        ("merge_backward", (grad, plain[0], lse.detach(), partial.detach(), query.detach(), EPS, 2.0)),
    ]


@pytest.mark.parametrize("name,args", _op_cases(), ids=[c[0] for c in _op_cases()])
def test_opcheck(name, args):
    op = getattr(torch.ops.attnres, name.removesuffix("_no_partial")).default
    torch.library.opcheck(op, args)


@pytest.mark.parametrize("name,args", _op_cases(), ids=[c[0] for c in _op_cases()])
def test_opcheck_of_the_reference_op(name, args):
    """The opaque op the CPU path runs: its schema and fake implementation agree with its kernel."""
    op = getattr(torch.ops.attnres, "reference_" + name.removesuffix("_no_partial")).default
    plain = [[a.detach() for a in arg] if isinstance(arg, list) else arg.detach() if isinstance(arg, torch.Tensor) else arg
             for arg in args]
    torch.library.opcheck(op, plain, test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))


# --------------------------------------------------------------------------
# Ops vs the reference
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "dtype,tol",
    # The ops run the reference in eager, so fp32 is tight; bf16 allows one bf16
    # rounding of the result (2^-8 relative) against the fp32 reference.
    [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)],
)
def test_ops_match_reference(dtype, tol):
    sources, partial, query, queries = _inputs(dtype)
    f32 = [v.detach().float() for v in sources]
    p32 = partial.detach().float()
    w, ws = query.detach(), queries.detach()

    h = attnres_read(sources, query, EPS, float(N))
    assert h.dtype == dtype and h.shape == SHAPE
    assert _rel_err(h, ref.read_forward(f32, w, EPS, float(N))) <= tol

    o, lse = attnres_block_read(sources, queries, EPS)
    assert o.dtype == dtype and lse.dtype == torch.float32
    o_ref, lse_ref = ref.block_read_forward(f32, ws, EPS)
    assert _rel_err(o, o_ref) <= tol and _rel_err(lse, lse_ref) <= tol

    m = attnres_merge(o[1], lse[1], partial, queries[1], EPS, float(N + 1))
    assert m.dtype == dtype
    assert _rel_err(m, ref.read_forward([*f32, p32], ws[1], EPS, float(N + 1))) <= tol

    # Grads through the registered autograd vs the reference backward.
    grad_h = torch.randn(SHAPE).to(dtype)
    grads = torch.autograd.grad(h, [*sources, query], grad_h)
    want_sources, want_query = ref.read_backward(grad_h.float(), f32, w, EPS, float(N))
    for got, want in zip(grads[:-1], want_sources, strict=True):
        assert got.dtype == dtype and _rel_err(got, want) <= tol
    assert grads[-1].dtype == torch.float32 and _rel_err(grads[-1], want_query) <= tol


def test_ops_accept_flat_tokens_and_fp16():
    """[T, d] sources (no batch dim) and fp16."""
    sources, partial, query, queries = _inputs(torch.float16, shape=(4, 5), requires_grad=False)
    h = attnres_read(sources, query)
    assert h.shape == (4, 5) and h.dtype == torch.float16
    o, lse = attnres_block_read(sources, queries)
    assert o.shape == (S, 4, 5) and lse.shape == (S, 4)
    assert attnres_merge(o[0], lse[0], partial, queries[0]).shape == (4, 5)


# --------------------------------------------------------------------------
# torch.compile
# --------------------------------------------------------------------------


def _block(sources, partial, query, queries):
    """A two-layer block and the next block's plain read: every op, fwd and bwd."""
    o, lse = attnres_block_read(sources, queries, EPS)
    h0 = attnres_merge(o[0], lse[0], None, queries[0], EPS, float(N))
    h1 = attnres_merge(o[1], lse[1], partial, queries[1], EPS, float(N + 1))
    return attnres_read([*sources, h0 * h1], query, EPS, float(N + 1))


def _fwd_bwd(fn, sources, partial, query, queries):
    out = fn(sources, partial, query, queries)
    inputs = [*sources, partial, query, queries]
    grads = torch.autograd.grad(out.square().sum(), inputs, allow_unused=True)
    return out, [g for g in grads if g is not None]


def test_compile_inductor_matches_eager():
    torch._dynamo.reset()
    args = _inputs(torch.float32)
    want_out, want_grads = _fwd_bwd(_block, *args)
    got_out, got_grads = _fwd_bwd(torch.compile(_block, backend="inductor", fullgraph=True), *args)
    assert _rel_err(got_out, want_out) <= 1e-5
    for got, want in zip(got_grads, want_grads, strict=True):
        assert _rel_err(got, want) <= 1e-5


def test_compile_dynamic_token_count():
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("inductor")

    def fn(sources, partial, query, queries):
        return attnres_read(sources, query, EPS, float(N))

    compiled = torch.compile(fn, backend=counter, dynamic=True, fullgraph=True)
    graphs_after_first = None
    for tokens in (3, 7):
        args = _inputs(torch.float32, seed=tokens, shape=(2, tokens, D))
        got_out, got_grads = _fwd_bwd(compiled, *args)
        want_out, want_grads = _fwd_bwd(fn, *args)
        assert got_out.shape == (2, tokens, D) and len(got_grads) == N + 1
        assert _rel_err(got_out, want_out) <= 1e-5
        for got, want in zip(got_grads, want_grads, strict=True):
            assert _rel_err(got, want) <= 1e-5
        # (The first compile may hand the backend an extra, empty graph when Dynamo
        # restarts its analysis to specialize a float; count only what comes later.)
        graphs_after_first = graphs_after_first or counter.frame_count
    assert counter.frame_count == graphs_after_first  # no recompile for the new token count


def test_compile_decomposes_the_ops():
    """triton_op: AOTAutograd traces into the bodies, fwd and bwd; on CPU a body is one opaque reference op."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return make_boxed_func(gm.forward)

    torch._dynamo.reset()
    compiled = torch.compile(_block, backend=aot_autograd(fw_compiler=capture, bw_compiler=capture))
    _fwd_bwd(compiled, *_inputs(torch.float32))
    assert len(graphs) == 2  # forward and backward
    forward, backward = ({str(n.target) for n in gm.graph.nodes if n.op == "call_function"} for gm in graphs)
    ours = {t for t in forward | backward if t.startswith("attnres.")}
    assert all(t.startswith("attnres.reference_") for t in ours), ours  # no read op left undecomposed
    assert {"attnres.reference_block_read.default", "attnres.reference_merge.default"} <= forward
    assert {"attnres.reference_block_read_backward.default", "attnres.reference_merge_backward.default"} <= backward


def test_traced_reference_reads_leave_no_op_of_ours_and_match_the_extern_ones():
    """use_reference_reads("traced"): the reference math itself goes to Inductor, fwd and bwd; same values."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return make_boxed_func(gm.forward)

    args = _inputs(torch.float32)
    want_out, want_grads = _fwd_bwd(_block, *args)
    torch._dynamo.reset()
    with ops.use_reference_reads("traced"):
        compiled = torch.compile(_block, backend=aot_autograd(fw_compiler=capture, bw_compiler=capture))
        got_out, got_grads = _fwd_bwd(compiled, *args)
    assert len(graphs) == 2
    for gm in graphs:
        targets = {str(n.target) for n in gm.graph.nodes if n.op == "call_function"}
        assert not any(t.startswith("attnres.") for t in targets), targets
    assert _rel_err(got_out, want_out) <= 1e-5
    for got, want in zip(got_grads, want_grads, strict=True):
        assert _rel_err(got, want) <= 1e-5


def test_export_keeps_one_node_per_op():
    class Read(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.query = torch.nn.Parameter(torch.zeros(D))

        def forward(self, a, b):
            return attnres_read([a, b], self.query, EPS, 2.0)

    x = torch.randn(SHAPE)
    ep = torch.export.export(Read(), (x, x + 1))
    targets = [n.target for n in ep.graph.nodes if n.op == "call_function"]
    assert targets == [torch.ops.attnres.read.default]
    # Zero query, scale 2 = the number of sources: the plain sum.
    torch.testing.assert_close(ep.module()(x, x + 1), 2 * x + 1)


# --------------------------------------------------------------------------
# Bad inputs
# --------------------------------------------------------------------------


def test_bad_inputs_raise_clear_errors():
    sources, partial, query, queries = _inputs(torch.float32, requires_grad=False)
    with pytest.raises(ValueError, match=r"attnres::read: sources must be a non-empty"):
        attnres_read([], query)
    with pytest.raises(ValueError, match=r"attnres::read: all sources must have one shape"):
        attnres_read([sources[0], sources[1][:1]], query)
    with pytest.raises(ValueError, match=r"attnres::read: all sources must have one dtype"):
        attnres_read([sources[0], sources[1].double()], query)
    with pytest.raises(ValueError, match=r"attnres::read: query must be \[d\] with d = 5"):
        attnres_read(sources, torch.zeros(4))
    with pytest.raises(ValueError, match=r"attnres::read: sources\[0\] must be a floating-point"):
        attnres_read([torch.ones(SHAPE, dtype=torch.int64)], query)
    with pytest.raises(ValueError, match=r"attnres::read: query must be a floating-point"):
        attnres_read(sources, torch.ones(D, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"attnres::block_read: queries must be \[S, d\]"):
        attnres_block_read(sources, query)
    with pytest.raises(ValueError, match=r"attnres::block_read: queries must be \[S, d\] with d = 5"):
        attnres_block_read(sources, torch.zeros(S, 4))
    o, lse = attnres_block_read(sources, queries)
    with pytest.raises(ValueError, match=r"attnres::merge: lse must have shape \(2, 3\)"):
        attnres_merge(o[0], lse, partial, queries[0])
    with pytest.raises(ValueError, match=r"attnres::merge: partial must have shape"):
        attnres_merge(o[0], lse[0], partial[0], queries[0])
    with pytest.raises(ValueError, match=r"attnres::merge: partial must have dtype torch.float32"):
        attnres_merge(o[0], lse[0], partial.double(), queries[0])
    with pytest.raises(ValueError, match=r"attnres::merge: query must be \[d\] with d = 5"):
        attnres_merge(o[0], lse[0], partial, torch.zeros(3))
