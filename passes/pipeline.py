"""The passes in order, top to bottom: clean up → detect → partition → plan, then insert the reads.

``clean_graph`` and ``apply_plan`` change a graph; ``graph_to_plan`` and ``plan_graph`` only read it.
The passes take plain data (ints, floats, strings, nodes) and return a
:class:`~attnres_compile.passes.plan.Plan`; which graph they run on and where
its queries come from is the caller's business (``attnres_compile.core``).
"""

from __future__ import annotations

import logging
from typing import Optional

import torch.fx as fx

from attnres_compile.kernels.reference import DEFAULT_EPS

from .classify import branch_kind
from .cleanup import drop_noop_casts, is_noop_cast
from .detect import Step, find_residual_streams, region_between
from .graph import copy_graph, module_path, static_int, tensor_value, topo_index
from .partition import partition_blocks
from .plan import LayerPlan, Plan, SkippedSite, StreamPlan
from .reads import insert_reads

log = logging.getLogger("attnres_compile")


def clean_graph(graph: fx.Graph) -> None:
    """The clean-ups every graph gets before it is planned and rewritten (they change no node's name)."""
    dropped = drop_noop_casts(graph)
    if dropped:
        log.debug("attnres: dropped %d no-op cast(s) before planning", dropped)


def graph_to_plan(graph: fx.Graph) -> fx.Graph:
    """``graph`` when the clean-ups would not change it, else a cleaned copy (``graph`` stays as it is).

    A plan names nodes, and the clean-ups rename none, so a plan of the copy
    applies to ``graph`` once :func:`clean_graph` has run on it too.
    """
    if not any(is_noop_cast(n) for n in graph.nodes):
        return graph
    copy = copy_graph(graph)
    clean_graph(copy)
    return copy


def _layer_plan(index: int, step: Step, order: dict[fx.Node, int]) -> LayerPlan:
    return LayerPlan(
        index=index,
        stream_in=step.stream_in.name,
        adds=tuple(a.name for a in step.adds),
        branches=tuple(b.name for b in step.branches),
        module_path=module_path(step.adds[0]),
        branch_modules=tuple(module_path(b) for b in step.branches),
        branch_kinds=tuple(branch_kind(region_between(step.stream_in, [b], order)) for b in step.branches),
    )


def _stream_plan(
    index: int, steps: list[Step], order: dict[fx.Node, int], partition: dict, eps: Optional[float]
) -> tuple[Optional[StreamPlan], Optional[SkippedSite]]:
    b0 = steps[0].stream_in
    value = tensor_value(b0)
    width = static_int(value.shape[-1]) if value is not None else None
    if width is None:
        return None, SkippedSite(b0.name, "hidden size of the stream is not a static int")
    if eps is None:  # the model's own norm eps, as its pre-norms use it
        eps = next((s.eps for s in steps if s.eps is not None), DEFAULT_EPS)
    plan = StreamPlan(
        index=index,
        source=b0.name,
        width=width,
        eps=float(eps),
        layers=tuple(_layer_plan(i, s, order) for i, s in enumerate(steps)),
        blocks=partition_blocks(len(steps), **partition),
    )
    return plan, None


def plan_graph(
    graph: fx.Graph,
    parameters: set[fx.Node],
    *,
    num_blocks: Optional[int] = None,
    block_size: Optional[int] = None,
    eps: Optional[float] = None,
) -> Plan:
    """Find every residual stream of ``graph`` and lay out its blocks (no change to the graph).

    Parameters
    ----------
    graph:
        A Dynamo (torch IR) or export (aten IR) graph, cleaned by :func:`clean_graph`.
    parameters:
        The nodes that stand for model parameters (see ``graph.parameter_nodes``).
    num_blocks, block_size:
        The partition (one of them; see ``partition.partition_blocks``).
    eps:
        The key-norm eps; None takes the eps of the model's own norms
        (``DEFAULT_EPS`` where the graph shows none).
    """
    chains, skipped = find_residual_streams(graph, parameters)
    order = topo_index(graph)
    partition = {"num_blocks": num_blocks, "block_size": block_size}
    streams: list[StreamPlan] = []
    for steps in chains:
        stream, problem = _stream_plan(len(streams), steps, order, partition, eps)
        if problem is not None:
            skipped.append(problem)
        else:
            streams.append(stream)
    return Plan(streams=tuple(streams), skipped=tuple(skipped))


def apply_plan(gm: fx.GraphModule, plan: Plan, queries: list[fx.Node], scale: str) -> None:
    """Insert the reads of every planned stream; ``queries[k]`` is stream k's ``[L_k + 1, d]`` node."""
    if len(queries) != len(plan.streams):
        raise ValueError(f"apply_plan: {len(plan.streams)} streams but {len(queries)} query matrices")
    for stream, query in zip(plan.streams, queries):
        insert_reads(gm.graph, stream, query, scale)
    gm.graph.lint()
    gm.recompile()
