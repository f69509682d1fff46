"""The ``torch.compile`` backend: Dynamo graph → Block AttnRes rewrite → Inductor.

``torch.compile(model, backend="attnres")`` finds :data:`attnres_backend` through
the ``torch_dynamo_backends`` entry point. :class:`AttnResBackend` with options
(a config for unprepared models, ``inductor=False`` for the eager rewritten
reference) is the same thing, configurable.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
import torch.fx as fx
from torch import nn

import attnres_compile.kernels  # noqa: F401  (registers torch.ops.attnres.*)
from attnres_compile.passes import Plan, apply_plan, plan_graph
from attnres_compile.passes.ir import copy_graph, tensor_value

from .config import AttnResConfig
from .queries import (
    QueryBinding,
    enclosing_prepared_model,
    read_query_marker,
    require_zero_queries,
    strip_query_marker,
)

log = logging.getLogger("attnres_compile")
_logged_once: set[str] = set()


def _log_once(level: int, message: str, *args) -> None:
    key = message % args
    if key not in _logged_once:
        _logged_once.add(key)
        log.log(level, message, *args)


def parameter_nodes(gm: fx.GraphModule, example_inputs: Sequence, graph: Optional[fx.Graph] = None) -> set[fx.Node]:
    """Nodes of ``graph`` (default ``gm.graph``) that stand for ``nn.Parameter``s.

    Dynamo lifts parameters to placeholders (their example inputs are
    Parameters); an unlifted export module reads them with ``get_attr``.
    """
    graph = gm.graph if graph is None else graph
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    params = {n for n, value in zip(placeholders, example_inputs) if isinstance(value, nn.Parameter)}
    named = dict(gm.named_parameters())
    params |= {n for n in graph.nodes if n.op == "get_attr" and n.target in named}
    return params


def graph_break_reason(gm: fx.GraphModule) -> Optional[str]:
    """Why this graph is only part of a frame (a graph break), or None if it is whole."""
    reason = getattr(gm, "compile_subgraph_reason", None)
    if reason is not None and getattr(reason, "graph_break", False):
        return f"graph ends at a graph break: {reason.reason}"
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator

        code_name = InstructionTranslator.current_tx().f_code.co_name
    except Exception:  # not under Dynamo (a hand-made graph) or an internal API moved
        return None
    if code_name.startswith("torch_dynamo_resume_in"):
        return f"graph resumes after a graph break ({code_name})"
    return None


def source_device(graph: fx.Graph, plan: Plan) -> Optional[torch.device]:
    """The device of the first stream's ``b_0``, from the graph's meta (None if unknown)."""
    source = next((n for n in graph.nodes if n.name == plan.streams[0].source), None)
    value = tensor_value(source) if source is not None else None
    return value.device if value is not None and value.device.type != "meta" else None


def _zero_queries(gm: fx.GraphModule, plan: Plan) -> list[fx.Node]:
    """Zero queries made inside the graph, for an unprepared model (not trainable).

    Built by an op rather than held as a buffer: Dynamo's graph may only take
    tensors that it lifted itself from the user's module.
    """
    first = next(n for n in gm.graph.nodes if n.op != "placeholder")
    device = source_device(gm.graph, plan)
    nodes = []
    for stream in plan.streams:
        with gm.graph.inserting_before(first):
            nodes.append(
                gm.graph.call_function(
                    torch.ops.aten.zeros.default, ([stream.num_queries, stream.width],),
                    {"dtype": torch.float32, "device": device},
                )
            )
    return nodes


def _query_mismatch(binding: QueryBinding, plan: Plan) -> Optional[str]:
    shapes = [tuple(n.meta["example_value"].shape) if "example_value" in n.meta else None for n in binding.nodes]
    expected = list(plan.query_shapes)
    if len(shapes) != len(expected) or any(s is not None and s != e for s, e in zip(shapes, expected)):
        return (
            f"the model's queries have shapes {shapes} but this graph needs {expected} "
            "(one [layers + 1, d] matrix per stream): the graph differs from the one prepare() traced"
        )
    return None


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


def _fragment_of_prepared_model(owner: nn.Module) -> str:
    return (
        f"this graph holds part of the layer stack of {type(owner).__name__}, which was prepared for Block "
        "AttnRes, but not its forward: a graph break made the forward run eagerly and Dynamo compiled a "
        "submodule on its own, where the model's queries cannot reach. FSDP2 causes this when fully_shard "
        "wraps modules inside the stack (Dynamo does not trace FSDP2's hooks): shard only the root module. "
        "TORCH_LOGS=graph_breaks shows other breaks. The graph runs unchanged (plain residuals)"
    )


@dataclass
class GraphRewrite:
    """What :func:`rewrite_graph` did to one graph.

    ``refused`` says why the graph was left as traced (None: it was rewritten);
    ``before`` is a copy of the graph as traced (marker removed), kept on request.
    """

    plan: Plan
    binding: Optional[QueryBinding]
    refused: Optional[str] = None
    before: Optional[fx.GraphModule] = None


def rewrite_graph(
    gm: fx.GraphModule, example_inputs: Sequence, config: Optional[AttnResConfig] = None, *, keep_before: bool = False
) -> GraphRewrite:
    """Plan a Dynamo graph and, when it holds a whole residual stream, rewrite it in place.

    A prepared model's graph carries its queries and config (the marker is
    removed here); an unprepared one gets zero, in-graph queries and ``config``.
    Every refusal is logged with its reason and leaves the graph as traced.
    """
    binding = read_query_marker(gm)
    strip_query_marker(gm)
    before = fx.GraphModule(gm, copy_graph(gm.graph)) if keep_before else None
    config = binding.config if binding is not None else (config or AttnResConfig())
    plan = plan_graph(gm.graph, parameter_nodes(gm, example_inputs), config)
    result = GraphRewrite(plan, binding, before=before)
    if not plan.streams:
        result.refused = "no residual stream"
        if binding is not None:
            # prepare() found the stack in this forward's graph: now it is elsewhere.
            log.error(
                "attnres: the forward of a model prepared for Block AttnRes traced to a graph without its "
                "residual stream (%s); the layer stack must stay in one graph. It runs unchanged (plain residuals)",
                graph_break_reason(gm) or "no graph break recorded",
            )
            return result
        _log_once(logging.INFO, "attnres: no residual stream in this graph, running it unchanged (eager)\n%s", plan.summary())
        return result
    broken = graph_break_reason(gm)
    if broken is not None:
        log.warning(
            "attnres: %s; the layer stack is split across graphs, so this graph runs unchanged "
            "(eager) rather than rewrite half a stream", broken,
        )
        result.refused = broken
        return result
    if binding is None and (owner := enclosing_prepared_model()) is not None:
        result.refused = _fragment_of_prepared_model(owner)
        log.error("attnres: %s", result.refused)
        return result
    if binding is None:
        _log_once(logging.INFO, "attnres: model was not prepared: using zero, non-trainable queries (call attnres_compile.prepare to train them)")
        queries = _zero_queries(gm, plan)
    else:
        mismatch = _query_mismatch(binding, plan)
        if mismatch is not None:
            log.error("attnres: %s; this graph runs unchanged (eager)", mismatch)
            result.refused = mismatch
            return result
        queries = binding.nodes
    apply_plan(gm, plan, queries, config.scale)
    log.info("attnres: rewrote graph\n%s", plan.summary())
    return result


class AttnResBackend:
    """A ``torch.compile`` backend that rewrites residual streams into Block AttnRes.

    Parameters
    ----------
    config:
        Used for models that were not prepared (a prepared model carries its own).
    inductor:
        Compile the rewritten graph with Inductor (default). ``False`` runs it
        eagerly: the readable reference that ``verify`` compares against.
    """

    def __init__(self, config: Optional[AttnResConfig] = None, *, inductor: bool = True):
        self.config = config
        self.inductor = inductor
        self.plans: list[Plan] = []  # one per rewritten graph, in compile order

    def __call__(self, gm: fx.GraphModule, example_inputs: list) -> Callable:
        result = rewrite_graph(gm, example_inputs, self.config)
        if result.refused is not None:
            return _unrewritten(gm, result.binding)
        self.plans.append(result.plan)
        if not self.inductor:
            return gm.forward
        from torch._inductor.compile_fx import compile_fx

        return compile_fx(gm, example_inputs)


attnres_backend = AttnResBackend()
