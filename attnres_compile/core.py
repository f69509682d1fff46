"""The pipeline core: the one function every way in calls.

    model ──Dynamo / torch.export──▶ graph ──run_pipeline──▶ rewritten graph ──▶ Inductor / a GraphModule

:func:`run_pipeline` owns the order, so no caller repeats a step of it:

1. read and strip the query marker a prepared model leaves in its graph;
2. plan the graph as the clean-ups leave it (``passes.pipeline.plan_graph``);
3. refuse, with the reason, what must not be rewritten: no stream, a stack cut
   by a graph break, a fragment of a prepared model's stack, a graph that is
   not the one ``prepare`` traced (its layout is checked and the difference named);
4. bind the queries: the marker's (placeholders under Dynamo, parameters of an
   exported program), new ``attnres_queries_<k>`` parameters (export of a
   model that was not prepared), or zeros made in the graph (an unprepared
   model under the backend), with their shapes checked;
5. apply the plan (``passes.pipeline.apply_plan``) and record it in ``gm.meta[PLAN_KEY]``.

Its callers: the backend (``backend.compile_graph``), the export path
(``export.rewrite``), ``prepare`` (plan only), the dry runs (``dry_run``) and
``depth_weights``.
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass, replace
from typing import Optional, Sequence

import torch
import torch.fx as fx
from torch import Tensor, nn

from .config import AttnResConfig
from .passes.checkpoint import (
    close_selective_regions,
    closed_checkpointed_regions,
    open_checkpointed_regions,
    selective_regions_opened,
)
from .passes.graph import copy_graph, parameter_nodes, tensor_value, value_device
from .passes.pipeline import apply_plan, clean_graph, graph_to_plan, plan_graph
from .passes.plan import Plan, SkippedSite, layout_difference
from .queries import QUERY_PREFIX, QueryBinding, enclosing_prepared_model, query_shape_error, read_query_marker, strip_query_marker
from .tracing import graph_break_reason

log = logging.getLogger("attnres_compile")

PLAN_KEY = "attnres_plan"
"""``gm.meta[PLAN_KEY]``: the :class:`~attnres_compile.passes.plan.Plan` the pipeline applied to ``gm``."""

NO_STREAM = "no residual stream"


class UnpreparedQueries(enum.Enum):
    """Where the queries come from when a graph carries no marker (its model was not prepared)."""

    ZEROS_IN_GRAPH = "zeros made in the graph (not trainable)"
    NEW_PARAMETERS = "new attnres_queries_<k> parameters of the GraphModule"


class QueryMismatch(ValueError):
    """A graph's queries (or the layout ``prepare`` traced) do not fit the plan of the graph.

    ``binding`` is the marker the graph carried, if any (it is already stripped from the graph).
    """

    def __init__(self, message: str, binding: Optional[QueryBinding] = None):
        super().__init__(message)
        self.binding = binding


@dataclass
class PipelineResult:
    """What :func:`run_pipeline` did to one graph.

    ``refused`` says why the graph was left as traced (None: it was rewritten,
    or planned only when ``apply=False``); ``graph_break`` is the graph-break
    reason Dynamo recorded, if any; ``before`` is the graph as traced (marker
    removed), kept on request.
    """

    plan: Plan
    config: AttnResConfig
    binding: Optional[QueryBinding]
    refused: Optional[str] = None
    graph_break: Optional[str] = None
    before: Optional[fx.GraphModule] = None

    @property
    def rewritten(self) -> bool:
        return self.refused is None


def run_pipeline(
    gm: fx.GraphModule,
    graph_inputs: Sequence = (),
    config: Optional[AttnResConfig] = None,
    *,
    unprepared: UnpreparedQueries = UnpreparedQueries.ZEROS_IN_GRAPH,
    initial_queries: Optional[Sequence[Tensor]] = None,
    apply: bool = True,
    keep_before: bool = False,
    where: str = "this graph",
) -> PipelineResult:
    """Plan ``gm`` and, when it holds a whole residual stream, rewrite it in place.

    Parameters
    ----------
    gm:
        A Dynamo graph (parameters are placeholders) or an export module
        (parameters are ``get_attr`` nodes).
    graph_inputs:
        The values of ``gm``'s placeholders (Dynamo's example inputs); ``()``
        for an export module.
    config:
        For a graph without a marker; a prepared model's graph carries its own.
    unprepared:
        Where the queries of a graph without a marker come from.
    initial_queries:
        Values for the queries, one ``[L_k + 1, d_k]`` tensor per stream: new
        parameters start from them, a prepared program's parameters are set to
        them (default: zeros, or the prepared values).
    apply:
        False plans only (``prepare``): the graph is not changed beyond the
        marker's removal.
    keep_before:
        Keep the graph as traced in ``result.before``.
    where:
        How messages name the graph (``"this graph"``, ``"this program"``).

    Raises
    ------
    QueryMismatch
        If the queries or the traced layout do not fit the graph's plan (the
        backend catches it and runs the graph unchanged).
    """
    binding = read_query_marker(gm)
    strip_query_marker(gm)
    config = binding.config if binding is not None else (config or AttnResConfig())
    # Always: an opened graph recomputes what the regions did. Selective regions are closed again
    # below, whatever happens, since only a region call carries their policy to AOTAutograd.
    opened = open_checkpointed_regions(gm)
    try:
        graph = graph_to_plan(gm.graph)
        plan = plan_graph(graph, parameter_nodes(gm, graph_inputs, graph), **config.plan_options)
        plan = _with_checkpoint_notes(plan, gm, opened)
        result = PipelineResult(plan, config, binding, graph_break=graph_break_reason(gm))
        if keep_before:
            result.before = fx.GraphModule(gm, copy_graph(gm.graph))
        result.refused = _refusal(result, say=apply)
        if result.refused is not None or not apply:
            return result
        _check_queries(gm, plan, binding, initial_queries, where)
        clean_graph(gm.graph)  # as the planned graph was
        queries = _bind_queries(gm, plan, binding, unprepared, initial_queries)
        apply_plan(gm, plan, queries, config.scale)
        gm.meta[PLAN_KEY] = plan
        return result
    finally:
        close_selective_regions(gm)


def _with_checkpoint_notes(plan: Plan, gm: fx.GraphModule, opened: int) -> Plan:
    """``plan`` with the activation-checkpointed regions said: how many were opened, which stay closed and why."""
    closed = tuple(SkippedSite(name, reason) for name, reason in closed_checkpointed_regions(gm))
    selective = selective_regions_opened(gm)
    notes = ()
    if opened > selective:
        notes += (f"opened {opened - selective} activation-checkpointed region(s): their nodes keep their recompute tags",)
    if selective:
        notes += (
            f"opened {selective} selectively checkpointed region(s): what remains of them after the rewrite "
            "runs in checkpointed regions again, with their policy (context_fn)",
        )
    return replace(plan, skipped=plan.skipped + closed, notes=plan.notes + notes)


def _refusal(result: PipelineResult, say: bool) -> Optional[str]:
    """Why a planned graph must run as traced, or None; logged when ``say`` (not for a plan-only trace)."""
    plan, binding = result.plan, result.binding
    if not plan.streams:
        if binding is not None and say:
            # prepare() found the stack in this forward's graph: now it is elsewhere.
            log.error(
                "attnres: the forward of a model prepared for Block AttnRes traced to a graph without its "
                "residual stream (%s); the layer stack must stay in one graph, as it was when prepare() traced "
                "it. It runs unchanged (plain residuals)",
                result.graph_break or _places_left_alone(plan),
            )
        return NO_STREAM
    if result.graph_break is not None:
        if say:
            log.warning(
                "attnres: %s; the layer stack is split across graphs, so this graph runs unchanged "
                "(eager) rather than rewrite half a stream", result.graph_break,
            )
        return result.graph_break
    if binding is None and (owner := enclosing_prepared_model()) is not None:
        reason = _fragment_of_prepared_model(owner)
        if say:
            log.error("attnres: %s", reason)
        return reason
    return None


def _places_left_alone(plan: Plan, most: int = 3) -> str:
    """The first places the detector looked at and left alone, with why: what a lost stream looks like."""
    if not plan.skipped:
        return "no graph break recorded, and no add x + f(x) in this graph"
    said = "; ".join(f"{site.node}: {site.reason}" for site in plan.skipped[:most])
    more = len(plan.skipped) - most
    return said + (f"; and {more} more (attnres_compile.inspect_model lists them)" if more > 0 else "")


def _fragment_of_prepared_model(owner: nn.Module) -> str:
    return (
        f"this graph holds part of the layer stack of {type(owner).__name__}, which was prepared for Block "
        "AttnRes, but not its forward: a graph break made the forward run eagerly and Dynamo compiled a "
        "submodule on its own, where the model's queries cannot reach. FSDP2 causes this when fully_shard "
        "wraps modules inside the stack (Dynamo does not trace FSDP2's hooks): shard only the root module with "
        "fully_shard, or shard every module with torchtitan's SimpleFSDP (data_parallel(model, mesh, "
        "mode='fully_shard')), whose all-gathers Dynamo traces into one graph. "
        "TORCH_LOGS=graph_breaks shows other breaks. The graph runs unchanged (plain residuals)"
    )


def _known_shape(node: fx.Node, gm: fx.GraphModule) -> Optional[tuple[int, ...]]:
    """The shape of a query node: from its meta, or from the parameter a ``get_attr`` reads."""
    if node.op == "get_attr":
        return tuple(gm.get_parameter(node.target).shape)
    value = tensor_value(node)
    return tuple(value.shape) if value is not None else None


def _check_queries(
    gm: fx.GraphModule,
    plan: Plan,
    binding: Optional[QueryBinding],
    initial_queries: Optional[Sequence[Tensor]],
    where: str,
) -> None:
    """The queries must fit the plan, and a prepared model's graph must be the stack ``prepare`` traced."""
    if initial_queries is not None:
        _require_fit([tuple(q.shape) for q in initial_queries], plan, binding, whose="queries", where=where)
    if binding is None:
        return
    difference = layout_difference(binding.layout, plan.layout)
    if difference is not None:
        raise QueryMismatch(
            f"{where} is not the layer stack prepare() traced ({difference}): the model's queries would be "
            "bound to other layers", binding,
        )
    shapes = [_known_shape(n, gm) for n in binding.nodes]
    _require_fit(shapes, plan, binding, whose="the model's queries", where=where)


def _bind_queries(
    gm: fx.GraphModule,
    plan: Plan,
    binding: Optional[QueryBinding],
    unprepared: UnpreparedQueries,
    initial_queries: Optional[Sequence[Tensor]],
) -> list[fx.Node]:
    """One ``[L_k + 1, d_k]`` query node per stream of ``plan``, in ``gm``'s (cleaned) graph."""
    if binding is not None:
        if initial_queries is not None:
            _overwrite_parameters(gm, binding.nodes, initial_queries)
        return binding.nodes
    if unprepared is UnpreparedQueries.NEW_PARAMETERS:
        return _add_query_parameters(gm, plan, initial_queries)
    log.info(
        "attnres: model was not prepared: using zero, non-trainable queries (call attnres_compile.prepare to train them)"
    )
    return zero_queries_in_graph(gm, plan)


def _require_fit(shapes: list, plan: Plan, binding: Optional[QueryBinding], *, whose: str, where: str) -> None:
    problem = query_shape_error(shapes, list(plan.query_shapes), whose=whose, where=where)
    if problem is not None:
        raise QueryMismatch(problem, binding)


def _overwrite_parameters(gm: fx.GraphModule, nodes: list[fx.Node], values: Sequence[Tensor]) -> None:
    if not all(n.op == "get_attr" for n in nodes):
        raise QueryMismatch("initial queries can only be set on queries that are parameters of the program")
    with torch.no_grad():
        for node, value in zip(nodes, values):
            parameter = gm.get_parameter(node.target)
            parameter.copy_(value.detach().to(device=parameter.device, dtype=parameter.dtype))


def _stream_device(gm: fx.GraphModule, plan: Plan) -> Optional[torch.device]:
    """Where the queries go: the device of the first stream's ``b_0``, else of the first parameter."""
    source = next((n for n in gm.graph.nodes if n.name == plan.streams[0].source), None)
    device = value_device(source)
    if device is None:
        parameter = next(gm.parameters(), None)
        device = parameter.device if parameter is not None else None
    return device


def _add_query_parameters(gm: fx.GraphModule, plan: Plan, values: Optional[Sequence[Tensor]]) -> list[fx.Node]:
    """Register ``attnres_queries_<k>`` on ``gm`` and read each with a ``get_attr`` near the top."""
    device = _stream_device(gm, plan)
    if values is None:
        values = [torch.zeros(shape, dtype=torch.float32, device=device) for shape in plan.query_shapes]
    anchor = next(n for n in gm.graph.nodes if n.op != "placeholder")
    nodes = []
    for k, value in enumerate(values):
        name = f"{QUERY_PREFIX}{k}"
        if hasattr(gm, name):
            raise ValueError(f"attnres rewrite: the module already has an attribute {name!r}")
        gm.register_parameter(name, nn.Parameter(value.detach().to(device=device, dtype=torch.float32).clone()))
        with gm.graph.inserting_before(anchor):
            node = gm.graph.get_attr(name)
        node.meta["val"] = gm.get_parameter(name)
        nodes.append(node)
    return nodes


def zero_queries_in_graph(gm: fx.GraphModule, plan: Plan) -> list[fx.Node]:
    """Zero queries made inside the graph, for an unprepared model (not trainable).

    Built by an op rather than held as a buffer: Dynamo's graph may only take
    tensors that it lifted itself from the user's module.
    """
    first = next(n for n in gm.graph.nodes if n.op != "placeholder")
    device = _stream_device(gm, plan)
    nodes = []
    for rows, width in plan.query_shapes:
        with gm.graph.inserting_before(first):
            nodes.append(
                gm.graph.call_function(
                    torch.ops.aten.zeros.default, ([rows, width],), {"dtype": torch.float32, "device": device},
                )
            )
    return nodes
