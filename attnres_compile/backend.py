"""The ``torch.compile`` backend: Dynamo graph → Block AttnRes rewrite → Inductor.

``torch.compile(model, backend="attnres")`` finds :func:`attnres_backend`
through the ``torch_dynamo_backends`` entry point; it keeps no state.
:class:`AttnResBackend` is the same backend with options (a config for
unprepared models, ``inductor=False`` for the eager rewritten reference) and a
record of the plans it applied, for its own lifetime.

``torch.compile`` hands a custom backend its ``mode`` and ``options`` as keyword
arguments (and nothing at all for the default mode); both backends take them and
pass them on to Inductor exactly as ``torch.compile`` would for
``backend="inductor"``, so ``mode="max-autotune-no-cudagraphs"`` or
``options={...}`` tune the rewritten graph instead of failing the compile.

With ``dynamic=True`` Dynamo also passes Python floats as graph inputs, a
norm's eps among them (``x * rsqrt(mean(x**2) + self.eps)``); the pass reads
the structure ``x + eps`` and a norm's eps only as constants, so such a graph
would lose its stream. The backend has Dynamo trace it again with those floats
as constants (guarded on their values), as Dynamo does itself for a float
Inductor cannot take as an input (:func:`_specialize_eps_inputs`).
"""

from __future__ import annotations

import functools
import logging
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.fx as fx

from .config import AttnResConfig
from .kernels import ops
from .core import NO_STREAM, PipelineResult, QueryMismatch, UnpreparedQueries, run_pipeline
from .passes.plan import Plan
from .passes.recompute import recompute_partials
from .queries import QueryBinding, guard_zero_queries

log = logging.getLogger("attnres_compile")


def _unrewritten(gm: fx.GraphModule, binding: Optional[QueryBinding]) -> Callable:
    """Run a graph as traced; with a prepared model's queries in it, only while they are zero."""
    if binding is not None:
        guard_zero_queries(gm, binding.nodes)
    return gm.forward


def compile_graph(
    gm: fx.GraphModule,
    example_inputs: list,
    config: Optional[AttnResConfig] = None,
    *,
    inductor: bool = True,
    on_rewrite: Optional[Callable[[Plan], None]] = None,
    mode: Optional[str] = None,
    options: Optional[dict[str, Any]] = None,
    recompute: bool = True,
) -> Callable:
    """The backend's work on one Dynamo graph: the pipeline, then Inductor (or eager).

    A graph the pipeline refuses runs as traced; if it carries a prepared
    model's queries, only while they are zero (never silently plain).
    ``mode`` and ``options`` are ``torch.compile``'s, for Inductor.
    ``on_rewrite`` gets the plan once the rewritten graph is compiled: a
    compile that Dynamo abandons and restarts (with ``dynamic=True`` it
    restarts once to specialize the model's Python floats) is not reported.
    ``recompute``: the backward recomputes the intra-block partials from the
    branches' last matrix products instead of keeping them (``passes.recompute``).
    """
    _specialize_eps_inputs(gm)
    try:
        result = run_pipeline(gm, example_inputs, config, unprepared=UnpreparedQueries.ZEROS_IN_GRAPH)
    except QueryMismatch as mismatch:
        log.error("attnres: %s; this graph runs unchanged (eager)", mismatch)
        return _unrewritten(gm, mismatch.binding)
    if not result.rewritten:
        _refuse_ddp_buckets(result)
        if result.refused == NO_STREAM and result.binding is None:
            log.info("attnres: no residual stream in this graph, running it unchanged (eager)\n%s", result.plan.summary())
        return _unrewritten(gm, result.binding)
    log.info("attnres: rewrote graph\n%s", result.plan.summary())
    if inductor:
        if recompute:
            _recompute_partials(gm)
        compiled = _inductor(gm, example_inputs, result.plan, inductor_config_patches(mode, options), recompute)
    else:
        if mode or options:
            log.info("attnres: mode=%r, options=%r are Inductor's; the eager reference ignores them", mode, options)
        compiled = gm.forward
    if on_rewrite is not None:
        on_rewrite(result.plan)
    return compiled


def _recompute_partials(gm: fx.GraphModule) -> None:
    """Tag the partials for recomputation in the backward, and say which stay kept and why."""
    report = recompute_partials(gm.graph)
    if report.kept:
        log.info(
            "attnres: %d intra-block partial(s) recomputed in the backward, %d kept for it: %s",
            len(report.recomputed), len(report.kept), "; ".join(f"{name}: {why}" for name, why in report.kept),
        )
    elif report.recomputed:
        log.debug("attnres: %d intra-block partial(s) recomputed in the backward", len(report.recomputed))


def _refuse_ddp_buckets(result: PipelineResult) -> None:
    """A prepared model's stack cut by DistributedDataParallel's buckets: raise, naming the setting that keeps it whole.

    Under DDP, Dynamo's DDPOptimizer splits the graph at every gradient bucket
    (25 MB by default, the first 1 MB) so that each bucket's all-reduce can start
    during the backward. Run plain, the model would leave its queries unused,
    which DDP reports as an error about unused parameters that names neither.
    """
    if result.binding is None or not result.graph_break or "DDPOptimizer" not in result.graph_break:
        return
    raise RuntimeError(
        "attnres: DistributedDataParallel's gradient buckets (Dynamo's DDPOptimizer) split the layer stack of "
        "a model prepared for Block AttnRes into one graph per bucket, so it cannot be rewritten. Set "
        "torch._dynamo.config.optimize_ddp = False before compiling: the stack then stays in one graph, and "
        "DDP all-reduces the gradients after the backward instead of overlapping buckets with it"
    )


def _float_inputs_read_as_eps(gm: fx.GraphModule) -> list[str]:
    """The symbols of the Python floats Dynamo made graph inputs that the graph adds to a value or hands a norm.

    Dynamo passes such a float (only under ``dynamic=True``, or once the float
    changed between calls) as a 0-d tensor placeholder whose ``.item()`` the
    graph uses; its example value remembers the symbol.
    """
    from .passes.ir import canonical_op

    symbols = []
    for node in gm.graph.nodes:
        if node.op != "placeholder":
            continue
        grapharg, value = node.meta.get("grapharg"), node.meta.get("example_value")
        memo = getattr(value, "item_memo", None)
        if grapharg is None or not getattr(grapharg, "pass_arg_as_tensor", False) or memo is None:
            continue
        expr = getattr(getattr(memo, "node", None), "_expr", None)  # the symbol itself, not what replaced it
        symbol = getattr(expr, "name", None)
        items = [user for user in node.users if user.op == "call_method" and user.target == "item"]
        if symbol and any(canonical_op(use) in ("add", "norm") for item in items for use in item.users):
            symbols.append(symbol)
    return symbols


def _specialize_eps_inputs(gm: fx.GraphModule) -> None:
    """Have Dynamo trace ``gm``'s frame again with its eps-like float inputs as constants (see the module docstring).

    Raises Dynamo's own restart, the one it raises when Inductor cannot take a
    float input, after naming the floats to specialize; each is specialized
    once, so the second trace goes through.
    """
    try:
        from torch._dynamo.exc import TensorifyScalarRestartAnalysis
        from torch._dynamo.symbolic_convert import TensorifyState
    except ImportError:  # a torch without float inputs has nothing to specialize
        return
    symbols = [s for s in _float_inputs_read_as_eps(gm) if not TensorifyState.should_specialize(s)]
    if not symbols:
        return
    log.info("attnres: %d float input(s) of this graph read as a norm's eps (dynamic=True); "
             "tracing it again with them as constants", len(symbols))
    for symbol in symbols:
        TensorifyState.specialize(symbol)
    raise TensorifyScalarRestartAnalysis


def inductor_config_patches(mode: Optional[str], options: Optional[dict[str, Any]]) -> dict[str, Any]:
    """Inductor's settings for ``torch.compile``'s ``mode`` and ``options``.

    Translated by the same code that translates them for ``backend="inductor"``
    (``list_mode_options`` for the mode, the option names and types checked
    against Inductor's config), so that each means here what it means there.
    """
    if not mode and not options:
        return {}
    return dict(torch._TorchCompileInductorWrapper(mode, options, dynamic=None).config)


def _inductor(
    gm: fx.GraphModule, example_inputs: list, plan: Plan, config_patches: dict[str, Any], recompute: bool
) -> Callable:
    """``compile_fx``, said in the log: what goes in, and how long the forward took (the backward compiles later)."""
    from torch._inductor.compile_fx import compile_fx

    reads = sum(s.num_queries for s in plan.streams)
    mode = _reference_reads_for(example_inputs)
    log.info(
        "attnres: compiling a graph of %d nodes with %d Block AttnRes reads (Inductor; reads without a Triton "
        "kernel: %s%s) ...", len(gm.graph.nodes), reads, mode,
        f"; settings {config_patches}" if config_patches else "",
    )
    start = time.perf_counter()
    with ops.use_reference_reads(mode), torch.compiler.config.patch(cache_key_tag=_cache_key_tag(example_inputs, recompute)):
        compiled = compile_fx(gm, example_inputs, config_patches=config_patches or None)
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


def _cache_key_tag(example_inputs: list, recompute: bool) -> str:
    """The user's cache-key tag plus what the caches' own keys miss: our ops' bodies, recompute tags, local shapes.

    The graph-level caches key on the graph, which names our ops but does not hold their bodies
    (``ops.implementation_fingerprint``), nor the settings that pick a body (``ops.choices_key``);
    with both in the key, artifacts compiled against other bodies are not served. Nor do they
    key on the recompute tags of ``passes.recompute``, which change what the partitioner keeps.
    A DTensor input is keyed by its global shape and placements, but the compiled code
    asserts the local shard's shape, which differs between ranks when a dimension does
    not split evenly (a query matrix of L + 1 rows over two ranks): ranks sharing a
    cache directory would load each other's code (``_local_shapes_key``).
    """
    recomputed = f"-recompute-{_recompute_fingerprint()}" if recompute else ""
    key = f"attnres-ops-{ops.implementation_fingerprint()}{recomputed}-{ops.choices_key()}{_local_shapes_key(example_inputs)}"
    return f"{torch.compiler.config.cache_key_tag} {key}".strip()


@functools.cache
def _recompute_fingerprint() -> str:
    """A hash of ``passes/recompute.py``, which decides the recompute tags."""
    import hashlib
    from .passes import recompute

    return hashlib.sha256(Path(recompute.__file__).read_bytes()).hexdigest()[:16]


def _local_shapes_key(example_inputs: list) -> str:
    """``-local-<hash>`` of the local shapes of the DTensor inputs, or ``""`` when there are none."""
    import hashlib

    if not torch.distributed.is_available():
        return ""
    from torch.distributed.tensor import DTensor

    shapes = [tuple(t._local_tensor.shape) for t in example_inputs if isinstance(t, DTensor)]
    if not shapes:
        return ""
    return "-local-" + hashlib.sha256(repr(shapes).encode()).hexdigest()[:16]


def attnres_backend(
    gm: fx.GraphModule, example_inputs: list, *, mode: Optional[str] = None, options: Optional[dict[str, Any]] = None
) -> Callable:
    """The registered ``"attnres"`` backend: :func:`compile_graph` with the defaults."""
    return compile_graph(gm, example_inputs, mode=mode, options=options)


class AttnResBackend:
    """A ``torch.compile`` backend that rewrites residual streams into Block AttnRes.

    Parameters
    ----------
    config:
        Used for models that were not prepared (a prepared model carries its own).
    inductor:
        Compile the rewritten graph with Inductor (default). ``False`` runs it
        eagerly: the readable reference that ``verify`` compares against.
    recompute:
        Recompute the intra-block partials in the backward (one matrix product
        of a branch each) instead of keeping them (default; ``passes.recompute``).

    ``plans`` lists the plan of every graph this instance rewrote, in compile order.
    """

    def __init__(self, config: Optional[AttnResConfig] = None, *, inductor: bool = True, recompute: bool = True):
        self.config = config
        self.inductor = inductor
        self.recompute = recompute
        self.plans: list[Plan] = []

    def __call__(
        self,
        gm: fx.GraphModule,
        example_inputs: list,
        *,
        mode: Optional[str] = None,
        options: Optional[dict[str, Any]] = None,
    ) -> Callable:
        return compile_graph(
            gm, example_inputs, self.config, inductor=self.inductor, on_rewrite=self.plans.append,
            mode=mode, options=options, recompute=self.recompute,
        )
