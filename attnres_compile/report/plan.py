"""The plan for people: box-drawn tables, and JSON with the blocks and descriptions spelled out."""

from __future__ import annotations

import json
from typing import Any, Sequence

from ..passes.plan import Plan, StreamPlan


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
