"""Mixed precision: a prepared model under ``torch.autocast("cpu", ...)`` runs rewritten, its reads in fp32.

What autocast does to the rewrite (tiny GPT, CPU, bf16 or fp16 autocast):

* The stream stays fp32: the embedding is not autocast, and ``x + f`` of an
  fp32 stream and a bf16 branch output promotes to fp32. The rewrite casts each
  branch output to the stream's dtype before it joins a partial (as the add
  promoted it), so every source ``b_n`` and every partial is fp32; the queries
  are fp32 parameters.
* The reads are custom ops, which autocast passes through without casting: they
  get fp32 sources and queries and return fp32 ``o``, ``lse``, ``h`` -- the
  stream's dtype, which is what the layer's norm read before the rewrite.
* Their bodies still run inside the autocast region when they run eagerly
  (``AttnResBackend(inductor=False)``, the reference ``verify`` compares with,
  or a direct call), where the matrix products of the reference math (scores
  ``v @ w``, mix ``a @ v``, and the backward's) would run in bf16 and lose the
  fp32 accumulation; the reference therefore runs with autocast off
  (``kernels/reference.py``). Without that the eager reads differ from fp32 by
  5e-3 rel (bf16), and a compiled model from its eager rewritten reference by
  5.6e-3 (logits) and 9.5e-3 (gradients). A compiled graph's reads were fp32
  already: AOTAutograd runs a compiled graph with autocast off (it baked the
  casts into the traced ops) and traces the ops' bodies below the autocast
  key; the compiled cases of the op-level test keep it that way.

Tolerances, max |got - want| / max |want| per output and per gradient group:
bf16 2e-2, fp16 2.5e-3 (about 2.5 machine epsilons of each) for the compiled
model against the eager rewritten reference and for the zero-init identity;
the errors measured are 0 on the logits and fp32 roundoff (<= 2.2e-7) on the
gradients, since both sides round the same bf16 ops the same way here. The
reads themselves, under autocast against outside it: 1e-6 (measured: 0).
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import attnres_compile
from attnres_compile import AttnResBackend, AttnResConfig
from attnres_compile.kernels import ops
from tiny_gpt import loss_fn
from zoo import VOCAB, set_random_queries, tiny_gpt

CONFIG = AttnResConfig(num_blocks=2)  # 2 blocks of 2 residual steps: merges with and without a partial
TOLERANCE = {torch.bfloat16: 2e-2, torch.float16: 2.5e-3}
READS_TOLERANCE = 1e-6


def _cpu_autocast_supports(dtype: torch.dtype) -> bool:
    """Whether CPU autocast runs a matmul in ``dtype`` (it warns and stays off for a dtype it lacks)."""
    with contextlib.suppress(Exception), torch.autocast("cpu", dtype=dtype):
        return (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == dtype
    return False


FP16_ON_CPU = pytest.mark.skipif(
    not _cpu_autocast_supports(torch.float16), reason="this torch has no fp16 CPU autocast"
)
AUTOCAST_DTYPES = [pytest.param(torch.bfloat16, id="bf16"), pytest.param(torch.float16, id="fp16", marks=FP16_ON_CPU)]


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want.double()).abs().max() / want.double().abs().max().clamp_min(1e-30))


# --------------------------------------------------------------------------
# The reads themselves
# --------------------------------------------------------------------------


def _two_phase_block(sources, partial, queries):
    """One block as the rewrite runs it: phase 1, a merge without and one with a partial, the final read."""
    o, lse = ops.attnres_block_read(sources, queries[:2], 1e-6)
    first = ops.attnres_merge(o[0], lse[0], None, queries[0], 1e-6, float(len(sources)))
    second = ops.attnres_merge(o[1], lse[1], partial, queries[1], 1e-6, float(len(sources) + 1))
    final = ops.attnres_read([*sources, partial], queries[2], 1e-6, float(len(sources) + 1))
    return first, second, final


def _read_inputs():
    """fp32 sources, partial and queries, as the rewrite hands them to the reads inside an autocast region."""
    gen = torch.Generator().manual_seed(0)
    sources = [torch.randn(2, 5, 32, generator=gen).requires_grad_() for _ in range(3)]
    partial = torch.randn(2, 5, 32, generator=gen).requires_grad_()
    queries = (torch.randn(3, 32, generator=gen) / 32**0.5).requires_grad_()
    return sources, partial, queries


def _reads_and_grads(fn, sources, partial, queries, autocast_dtype=None):
    """Outputs of ``fn`` and the gradients of every input, ``fn`` run under autocast if a dtype is given."""
    region = torch.autocast("cpu", dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
    with region:
        outputs = fn(sources, partial, queries)
    gen = torch.Generator().manual_seed(1)
    loss = sum((out.float() * torch.randn(out.shape, generator=gen)).sum() for out in outputs)
    grads = torch.autograd.grad(loss, [*sources, partial, queries])
    return [out.detach() for out in outputs], list(grads)


@pytest.mark.parametrize("dtype", AUTOCAST_DTYPES)
@pytest.mark.parametrize("how", ["eager", "extern", "traced"])
def test_reads_under_autocast_accumulate_in_fp32(how, dtype):
    """Autocast passes the custom ops through uncast, so an eager call runs their bodies inside the region: the reads
    must keep their fp32 math there; compiled (the reference as extern calls or traced into the graph) as well."""
    sources, partial, queries = _read_inputs()
    want_out, want_grads = _reads_and_grads(_two_phase_block, sources, partial, queries)
    fn = _two_phase_block
    with ops.use_reference_reads("extern" if how == "eager" else how):
        if how != "eager":
            fn = torch.compile(_two_phase_block, backend="aot_eager", fullgraph=True)
        got_out, got_grads = _reads_and_grads(fn, sources, partial, queries, autocast_dtype=dtype)
    assert [o.dtype for o in got_out] == [torch.float32] * 3  # the sources' dtype, not autocast's
    for got, want in zip(got_out + got_grads, want_out + want_grads, strict=True):
        assert _rel(got, want) <= READS_TOLERANCE


# --------------------------------------------------------------------------
# A prepared model, compiled, under autocast
# --------------------------------------------------------------------------


def _prepared_gpt():
    model, (ids,), _ = tiny_gpt(n_layer=2, d_model=32, seq=9)
    attnres_compile.prepare(model, (ids,), CONFIG)
    targets = torch.randint(0, VOCAB, ids.shape, generator=torch.Generator().manual_seed(3))
    return model, ids, targets


def _training_step(model, forward, ids, targets, dtype):
    """Forward and loss under autocast, backward outside it (as AMP recipes do); logits and every gradient."""
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=dtype):
        logits = forward(ids)
        loss = loss_fn(logits, targets)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return logits.detach(), grads


def _assert_close(got, want, tolerance, names):
    (got_logits, got_grads), (want_logits, want_grads) = got, want
    assert got_logits.dtype == want_logits.dtype
    assert _rel(got_logits, want_logits) <= tolerance
    for name in names:
        assert _rel(got_grads[name], want_grads[name]) <= tolerance, name


def _original_parameters(model) -> list[str]:
    return [name for name, _ in model.named_parameters() if not name.startswith("attnres_")]


@pytest.mark.parametrize(
    "reads, dtype",
    [
        pytest.param("auto", torch.bfloat16, id="auto-bf16"),
        pytest.param("auto", torch.float16, id="auto-fp16", marks=[pytest.mark.slow, FP16_ON_CPU]),
        pytest.param("traced", torch.bfloat16, id="traced-bf16", marks=pytest.mark.slow),
    ],
)
def test_training_step_under_autocast_runs_rewritten_and_matches_the_references(monkeypatch, reads, dtype):
    """One compiled training graph (``auto`` gives a training graph extern reads): zero queries against the eager
    original under the same autocast, then random queries against the eager rewritten reference."""
    monkeypatch.setenv("ATTNRES_REFERENCE_READS", reads)
    model, ids, targets = _prepared_gpt()
    backend = AttnResBackend()
    compiled = torch.compile(model, backend=backend)

    identity = _training_step(model, compiled, ids, targets, dtype)
    assert [len(plan.streams[0].layers) for plan in backend.plans] == [4]
    eager_original = _training_step(model, model, ids, targets, dtype)
    _assert_close(identity, eager_original, TOLERANCE[dtype], _original_parameters(model))

    set_random_queries(model)
    got = _training_step(model, compiled, ids, targets, dtype)
    want = _training_step(model, torch.compile(model, backend=AttnResBackend(inductor=False)), ids, targets, dtype)
    _assert_close(got, want, TOLERANCE[dtype], list(want[1]))
    assert got[1]["attnres_queries_0"].abs().sum() > 0
    assert len(backend.plans) == 1  # the queries are graph inputs: new values, no recompile


@pytest.mark.slow
@pytest.mark.parametrize("reads", ["auto", "extern"])
def test_evaluation_under_autocast_matches_the_eager_reference(monkeypatch, reads):
    """An inference graph (``auto`` gives it traced reads, fused by Inductor) under bf16 autocast."""
    monkeypatch.setenv("ATTNRES_REFERENCE_READS", reads)
    model, ids, _ = _prepared_gpt()
    set_random_queries(model)
    backend = AttnResBackend()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        got = torch.compile(model, backend=backend)(ids)
        want = torch.compile(model, backend=AttnResBackend(inductor=False))(ids)
    assert [len(plan.streams[0].layers) for plan in backend.plans] == [4]
    assert got.dtype == want.dtype == torch.bfloat16
    assert _rel(got, want) <= TOLERANCE[torch.bfloat16]


class _ReadDtypes(TorchDispatchMode):
    """Records the dtypes each ``attnres::`` op gets and returns."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[str, set, set]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.namespace == "attnres":
            self.calls.append((func.__name__.split(".")[0], _dtypes(args), _dtypes(out)))
        return out


def _dtypes(values) -> set:
    """The dtypes of the tensors in ``values`` (a tensor, or a nest of lists and tuples of them)."""
    if isinstance(values, torch.Tensor):
        return {values.dtype}
    if isinstance(values, (list, tuple)):
        return set().union(*(_dtypes(v) for v in values))
    return set()


def _recording(backend: AttnResBackend, recorder: TorchDispatchMode):
    """``backend``, whose compiled graphs run under ``recorder`` (Dynamo compiles nothing under a dispatch mode)."""

    def compile_graph(gm, example_inputs):
        run = backend(gm, example_inputs)

        def run_recorded(*args):
            with recorder:
                return run(*args)

        return run_recorded

    return compile_graph


def test_the_reads_see_and_return_the_streams_dtype_under_autocast():
    """Inside the autocast region the stream is fp32 (fp32 embedding + bf16 branch promotes): the reads get fp32
    sources and queries and give fp32 back, the dtype the layer norms read before the rewrite."""
    model, ids, _ = _prepared_gpt()
    set_random_queries(model)
    recorder = _ReadDtypes()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = torch.compile(model, backend=_recording(AttnResBackend(inductor=False), recorder))(ids)
    assert logits.dtype == torch.bfloat16  # the lm_head ran in bf16, as in the original model
    reads = [call for call in recorder.calls if not call[0].startswith("reference_")]
    assert [name for name, _, _ in reads] == ["block_read", "merge", "merge", "block_read", "merge", "merge", "read"], (
        recorder.calls
    )
    for name, inputs, outputs in reads:
        assert inputs == outputs == {torch.float32}, (name, inputs, outputs)
