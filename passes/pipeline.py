"""The pass pipeline, top to bottom: detect → partition → plan, then rewrite → clean up.

``plan_graph`` only reads the graph; ``apply_plan`` changes it. The backend,
the export rewrite and the inspection tool all call ``plan_graph``.
"""

from __future__ import annotations

import logging
import re
from typing import Optional

import torch.fx as fx

from attnres_compile.config import AttnResConfig

from .classify import branch_kind
from .detect import Step, find_residual_streams, region_between
from .ir import tensor_value, topo_index
from .partition import partition_blocks
from .plan import LayerPlan, Plan, SkippedSite, StreamPlan
from .rewrite import rewrite_stream

log = logging.getLogger("attnres_compile")

DEFAULT_EPS = 1e-6

# Dynamo names a module by the frame local it was reached from: L['self'], L['model'] ...
_FRAME_LOCAL = re.compile(r"^L\['[^']*'\]\.?")


def _module_path(node: fx.Node) -> str:
    """Dotted path of the innermost module a node was traced in, if recorded."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    return _FRAME_LOCAL.sub("", str(path))  # "L['self'].h.0.attn" -> "h.0.attn"


def _layer_plan(index: int, step: Step, order: dict[fx.Node, int]) -> LayerPlan:
    return LayerPlan(
        index=index,
        stream_in=step.stream_in.name,
        adds=tuple(a.name for a in step.adds),
        branches=tuple(b.name for b in step.branches),
        module_path=_module_path(step.adds[0]),
        branch_modules=tuple(_module_path(b) for b in step.branches),
        branch_kinds=tuple(branch_kind(region_between(step.stream_in, [b], order)) for b in step.branches),
    )


def _static_int(size) -> Optional[int]:
    """``size`` as an int when it is one, or a SymInt that Dynamo specialized to one."""
    if isinstance(size, int):
        return size
    node = getattr(size, "node", None)
    return node.maybe_as_int() if node is not None and hasattr(node, "maybe_as_int") else None


def _stream_plan(
    index: int, steps: list[Step], config: AttnResConfig, order: dict[fx.Node, int]
) -> tuple[Optional[StreamPlan], Optional[SkippedSite]]:
    b0 = steps[0].stream_in
    value = tensor_value(b0)
    width = _static_int(value.shape[-1]) if value is not None else None
    if width is None:
        return None, SkippedSite(b0.name, "hidden size of the stream is not a static int")
    found_eps = next((s.eps for s in steps if s.eps is not None), None)
    eps = config.eps if config.eps is not None else (found_eps if found_eps is not None else DEFAULT_EPS)
    plan = StreamPlan(
        index=index,
        source=b0.name,
        width=width,
        eps=float(eps),
        layers=tuple(_layer_plan(i, s, order) for i, s in enumerate(steps)),
        blocks=partition_blocks(len(steps), config),
    )
    return plan, None


def plan_graph(graph: fx.Graph, parameters: set[fx.Node], config: AttnResConfig) -> Plan:
    """Find every residual stream of ``graph`` and lay out its blocks (no change to the graph)."""
    chains, skipped = find_residual_streams(graph, parameters)
    order = topo_index(graph)
    streams: list[StreamPlan] = []
    for steps in chains:
        stream, problem = _stream_plan(len(streams), steps, config, order)
        if problem is not None:
            skipped.append(problem)
        else:
            streams.append(stream)
    return Plan(streams=tuple(streams), skipped=tuple(skipped))


def apply_plan(gm: fx.GraphModule, plan: Plan, queries: list[fx.Node], scale: str) -> None:
    """Rewrite every planned stream; ``queries[k]`` is stream k's ``[L_k + 1, d]`` node."""
    if len(queries) != len(plan.streams):
        raise ValueError(f"apply_plan: {len(plan.streams)} streams but {len(queries)} query matrices")
    for stream, query in zip(plan.streams, queries):
        rewrite_stream(gm.graph, stream, query, scale)
    gm.graph.lint()
    gm.recompile()
