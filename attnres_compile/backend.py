"""The ``torch.compile`` backend: Dynamo graph → Block AttnRes rewrite → Inductor.

``torch.compile(model, backend="attnres")`` finds :func:`attnres_backend`
through the ``torch_dynamo_backends`` entry point; it keeps no state.
:class:`AttnResBackend` is the same backend with options (a config for
unprepared models, ``inductor=False`` for the eager rewritten reference) and a
record of the plans it applied, for its own lifetime.
"""

from __future__ import annotations

import logging
import time
from typing import Callable, Optional

import torch
import torch.fx as fx

from .config import AttnResConfig
from .kernels import ops
from .core import NO_STREAM, QueryMismatch, UnpreparedQueries, run_pipeline
from .passes.plan import Plan
from .queries import QueryBinding, require_zero_queries

log = logging.getLogger("attnres_compile")


def _unrewritten(gm: fx.GraphModule, binding: Optional[QueryBinding]) -> Callable:
    """Run a graph as traced; with a prepared model's queries in it, only while they are zero."""
    if binding is None:
        return gm.forward
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    positions = [placeholders.index(q) for q in binding.nodes if q in placeholders]

    def run_plain(*args):
        require_zero_queries([args[i] for i in positions], where="without the rewrite")
        return gm.forward(*args)

    return run_plain


def compile_graph(
    gm: fx.GraphModule,
    example_inputs: list,
    config: Optional[AttnResConfig] = None,
    *,
    inductor: bool = True,
    on_rewrite: Optional[Callable[[Plan], None]] = None,
) -> Callable:
    """The backend's work on one Dynamo graph: the pipeline, then Inductor (or eager).

    A graph the pipeline refuses runs as traced; if it carries a prepared
    model's queries, only while they are zero (never silently plain).
    """
    try:
        result = run_pipeline(gm, example_inputs, config, unprepared=UnpreparedQueries.ZEROS_IN_GRAPH)
    except QueryMismatch as mismatch:
        log.error("attnres: %s; this graph runs unchanged (eager)", mismatch)
        return _unrewritten(gm, mismatch.binding)
    if not result.rewritten:
        if result.refused == NO_STREAM and result.binding is None:
            log.info("attnres: no residual stream in this graph, running it unchanged (eager)\n%s", result.plan.summary())
        return _unrewritten(gm, result.binding)
    log.info("attnres: rewrote graph\n%s", result.plan.summary())
    if on_rewrite is not None:
        on_rewrite(result.plan)
    if not inductor:
        return gm.forward
    return _inductor(gm, example_inputs, result.plan)


def _inductor(gm: fx.GraphModule, example_inputs: list, plan: Plan) -> Callable:
    """``compile_fx``, said in the log: what goes in, and how long the forward took (the backward compiles later)."""
    from torch._inductor.compile_fx import compile_fx

    reads = sum(s.num_queries for s in plan.streams)
    mode = _reference_reads_for(example_inputs)
    log.info(
        "attnres: compiling a graph of %d nodes with %d Block AttnRes reads (Inductor; reads without a Triton "
        "kernel: %s) ...", len(gm.graph.nodes), reads, mode,
    )
    start = time.perf_counter()
    with ops.use_reference_reads(mode), torch.compiler.config.patch(cache_key_tag=_cache_key_tag()):
        compiled = compile_fx(gm, example_inputs)
    log.info("attnres: compiled in %.1f s (a training graph's backward compiles at its first backward)", time.perf_counter() - start)
    return compiled


def _reference_reads_for(example_inputs: list) -> str:
    """``ops.reference_reads()``, with ``"auto"`` decided for this graph.

    A graph with a backward (grad enabled and an input that requires grad, the
    test AOTAutograd applies) takes the reads as extern calls: its compile,
    forward and backward, is the long one and would otherwise grow with depth.
    An inference graph (prefill, decode, eval) takes them traced: fused with
    their neighbours, for the latency of each step.
    """
    mode = ops.reference_reads()
    if mode != "auto":
        return mode
    needs_backward = torch.is_grad_enabled() and any(
        isinstance(t, torch.Tensor) and t.requires_grad for t in example_inputs
    )
    return "extern" if needs_backward else "traced"


def _cache_key_tag() -> str:
    """The user's cache-key tag plus what our ops' bodies trace to: a hash of their sources and the choices.

    The graph-level caches key on the graph, which names our ops but does not hold their bodies
    (``ops.implementation_fingerprint``), nor the settings that pick a body (``ops.choices_key``);
    with both in the key, artifacts compiled against other bodies are not served.
    """
    key = f"attnres-ops-{ops.implementation_fingerprint()}-{ops.choices_key()}"
    return f"{torch.compiler.config.cache_key_tag} {key}".strip()


def attnres_backend(gm: fx.GraphModule, example_inputs: list) -> Callable:
    """The registered ``"attnres"`` backend: :func:`compile_graph` with the defaults."""
    return compile_graph(gm, example_inputs)


class AttnResBackend:
    """A ``torch.compile`` backend that rewrites residual streams into Block AttnRes.

    Parameters
    ----------
    config:
        Used for models that were not prepared (a prepared model carries its own).
    inductor:
        Compile the rewritten graph with Inductor (default). ``False`` runs it
        eagerly: the readable reference that ``verify`` compares against.

    ``plans`` lists the plan of every graph this instance rewrote, in compile order.
    """

    def __init__(self, config: Optional[AttnResConfig] = None, *, inductor: bool = True):
        self.config = config
        self.inductor = inductor
        self.plans: list[Plan] = []

    def __call__(self, gm: fx.GraphModule, example_inputs: list) -> Callable:
        return compile_graph(gm, example_inputs, self.config, inductor=self.inductor, on_rewrite=self.plans.append)
