"""Dry runs: what the pass finds in a model or an exported program, and what it would do.

    for graph in attnres_compile.inspect_model(model, (ids,)):
        print(format_plan(graph.plan))          # streams, layers, blocks, skipped sites
        print(diff_text(graph.before, graph.after, graph.plan))

Nothing here changes the user's model: a model is traced with Dynamo and its
graph rewritten as Dynamo hands it over; a program is rewritten on a fresh
``program.module()``. The plan is the same one the backend and the export path
build (one detector for all three ways in).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

import torch
import torch.fx as fx
from torch import nn

from attnres_compile.passes import Plan, StreamPlan

from .backend import rewrite_graph
from .config import AttnResConfig
from .export import PLAN_KEY, rewrite
from attnres_compile.passes.ir import copy_graph
from .prepare import trace_graphs


@dataclass
class Inspection:
    """One graph as traced, its plan, and the rewritten graph when the plan allows one.

    ``after`` is None when nothing was rewritten; ``refused`` then says why.
    ``origin`` says where the graph came from (``"torch.compile graph 1 of 1"``,
    ``"exported program"``).
    """

    plan: Plan
    before: fx.GraphModule
    after: Optional[fx.GraphModule]
    refused: Optional[str]
    origin: str


def inspect_model(
    model: nn.Module,
    example_inputs: tuple = (),
    config: Optional[AttnResConfig] = None,
    *,
    example_kwargs: Optional[dict[str, Any]] = None,
) -> list[Inspection]:
    """Trace ``model`` with Dynamo and plan (and rewrite, on the traced copy) each graph.

    One :class:`Inspection` per graph Dynamo produced, in compile order (more
    than one means graph breaks). A prepared model's config is used; otherwise
    ``config`` (default ``AttnResConfig()``). The model itself is not changed.
    """
    found: list[tuple[fx.GraphModule, Any]] = []

    def keep(gm: fx.GraphModule, graph_inputs):
        result = rewrite_graph(gm, graph_inputs, config, keep_before=True)
        found.append((gm, result))
        return result.before.forward

    trace_graphs(model, example_inputs, example_kwargs or {}, keep)
    return [
        Inspection(
            plan=result.plan,
            before=result.before,
            after=None if result.refused else gm,
            refused=result.refused,
            origin=f"torch.compile graph {i + 1} of {len(found)}",
        )
        for i, (gm, result) in enumerate(found)
    ]


def inspect_program(
    program: Union[torch.export.ExportedProgram, fx.GraphModule], config: Optional[AttnResConfig] = None
) -> Inspection:
    """Plan and rewrite an exported program (or a GraphModule) without touching it."""
    if isinstance(program, torch.export.ExportedProgram):
        before, work = program.module(), program.module()
    elif isinstance(program, fx.GraphModule):
        before = fx.GraphModule(program, copy_graph(program.graph))
        work = fx.GraphModule(program, copy_graph(program.graph))
    else:
        raise TypeError(f"inspect_program: expected an ExportedProgram or a GraphModule, got {type(program).__name__}")
    after = rewrite(work, config)
    plan: Plan = after.meta[PLAN_KEY]
    rewritten = bool(plan.streams)
    return Inspection(
        plan=plan,
        before=before,
        after=after if rewritten else None,
        refused=None if rewritten else "no residual stream",
        origin="exported program",
    )


# ---------------------------------------------------------------- the report


def _block_of(stream: StreamPlan) -> dict[int, int]:
    return {layer: n for n, block in enumerate(stream.blocks) for layer in block}


def _layer_range(block: Sequence[int]) -> str:
    return f"{block[0]}" if len(block) == 1 else f"{block[0]}-{block[-1]}"


def plan_report(plan: Plan) -> dict[str, Any]:
    """The plan as JSON-ready data, with what a reader wants spelled out.

    Adds to :meth:`Plan.to_dict` each layer's ``block`` and ``description``
    (``"attention"``, ``"mlp"``, ``"moe"``, ``"parallel (attention + mlp)"``).
    """
    report = plan.to_dict()
    for stream, data in zip(plan.streams, report["streams"]):
        block_of = _block_of(stream)
        data["num_queries"] = stream.num_queries
        for layer, layer_data in zip(stream.layers, data["layers"]):
            layer_data["block"] = block_of[layer.index]
            layer_data["description"] = layer.description
    return report


def plan_json(plan: Plan, indent: int = 2) -> str:
    return json.dumps(plan_report(plan), indent=indent)


def render_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], title: str = "") -> str:
    """A box-drawn text table (what ``rich`` would print, without the dependency)."""
    cells = [[str(c) for c in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]

    def line(left: str, mid: str, right: str) -> str:
        return left + mid.join("─" * (w + 2) for w in widths) + right

    def row(values: Sequence[str]) -> str:
        return "│" + "│".join(f" {v:<{w}} " for v, w in zip(values, widths)) + "│"

    lines = [title] if title else []
    lines += [line("┌", "┬", "┐"), row(headers), line("├", "┼", "┤")]
    lines += [row(r) for r in cells]
    lines.append(line("└", "┴", "┘"))
    return "\n".join(lines)


def _stream_table(stream: StreamPlan) -> str:
    block_of = _block_of(stream)
    rows = [
        (
            layer.index,
            block_of[layer.index],
            layer.description,
            ", ".join(m for m in layer.branch_modules if m) or layer.module_path or "-",
            layer.stream_in,
            ", ".join(layer.adds),
        )
        for layer in stream.layers
    ]
    blocks = "  ".join(f"block {n}: layers {_layer_range(b)}" for n, b in enumerate(stream.blocks))
    title = (
        f"stream {stream.index}: d={stream.width}, {len(stream.layers)} layers in {len(stream.blocks)} blocks, "
        f"b_0 = {stream.source}, key eps {stream.eps:g}, {stream.num_queries} queries"
    )
    table = render_table(("layer", "block", "kind", "module", "reads", "adds (removed)"), rows, title)
    return f"{table}\n{blocks}"


def format_plan(plan: Plan) -> str:
    """The plan as text tables: one per stream, then the skipped sites with reasons."""
    parts = [_stream_table(stream) for stream in plan.streams]
    if not plan.streams:
        parts.append("no residual stream found: nothing would be rewritten")
    if plan.skipped:
        parts.append(render_table(("node", "why it was skipped"), [(s.node, s.reason) for s in plan.skipped], "skipped sites"))
    parts.extend(plan.notes)
    return "\n\n".join(parts)
