"""The graph diff of a rewrite, as data: what changed between the original graph and its Block AttnRes form.

    ep = torch.export.export(model, args, kwargs, strict=False)
    before, after = ep.module(), attnres_compile.rewrite(ep.module())   # rewrite works in place
    plan = after.meta["attnres_plan"]
    print(diff_text(before, after, plan))                    # attnres_compile.report renders it
    write_diff_html("diff.html", before, after, plan)

The diff is computed from node names (the rewrite keeps the names of the nodes
it leaves alone), the tag every node the rewrite creates carries
(``passes.reads.tag_of``: its place, its role, what a read weighs), and the plan, which
names the old residual adds and the block of each layer. Each node of either
graph gets one row:

* ``same``: in both graphs with the same arguments (context, collapsed in long runs),
* ``rewired``: in both graphs, but its arguments changed (a norm that read the
  stream now reads a merge),
* ``removed``: only in ``before`` (the residual adds, export-only no-op casts),
* ``added``: only in ``after`` (the reads, merges, partial sums, query slices).

Rows are grouped into sections, one per stream and block in execution order
(plus a prologue before the first read and the final read after the last
block), so the block structure is visible in both the text and the HTML form.
"""

from __future__ import annotations

import difflib
import html
import math
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Union

import torch
import torch.fx as fx

from .passes.cleanup import is_noop_cast
from .passes.ir import op_arguments
from .passes.plan import Plan, StreamPlan
from .passes.reads import tag_of

__all__ = [
    "Collapsed",
    "DiffLookup",
    "DiffRow",
    "DiffSection",
    "annotation",
    "collapse_unchanged",
    "diff_rows",
    "diff_sections",
    "format_node",
    "op_label",
    "summary_line",
]

SectionKey = Optional[tuple[int, int]]
"""``(stream, block)`` of a section; ``block == len(blocks)`` is the final read; None is the prologue."""

CONTEXT = 2
"""Unchanged rows kept on each side of a change before the rest of a run collapses."""


# --------------------------------------------------------------------------- rows


@dataclass(frozen=True)
class DiffRow:
    """One node of either graph: ``status`` is ``same``, ``rewired``, ``removed`` or ``added``."""

    status: str
    before: Optional[fx.Node]
    after: Optional[fx.Node]

    @property
    def name(self) -> str:
        node = self.after if self.after is not None else self.before
        return node.name

    @property
    def changed(self) -> bool:
        return self.status != "same"


@dataclass
class DiffSection:
    """Consecutive rows that belong to one block of one stream (or the prologue)."""

    key: SectionKey
    title: str
    rows: list[DiffRow] = field(default_factory=list)


def _new_in_after(node: fx.Node, before_names: set[str]) -> bool:
    """A node of ``after`` the rewrite created: tagged, or a name ``before`` lacks (the query ``get_attr``)."""
    return tag_of(node) is not None or node.name not in before_names


def _match_keys(before: fx.Graph, after: fx.Graph) -> tuple[list[str], list[tuple[str, str]]]:
    """Keys under which difflib pairs nodes: a kept node's name; a created node never matches."""
    before_names = {n.name for n in before.nodes}
    before_keys = [n.name for n in before.nodes]
    after_keys = [("new", n.name) if _new_in_after(n, before_names) else n.name for n in after.nodes]
    return before_keys, after_keys


def diff_rows(before: fx.GraphModule, after: fx.GraphModule) -> list[DiffRow]:
    """Every node of both graphs once, in the order of ``after`` with removed nodes where they stood."""
    before_nodes, after_nodes = list(before.graph.nodes), list(after.graph.nodes)
    before_keys, after_keys = _match_keys(before.graph, after.graph)
    matcher = difflib.SequenceMatcher(None, before_keys, after_keys, autojunk=False)
    rows: list[DiffRow] = []
    for op, b0, b1, a0, a1 in matcher.get_opcodes():
        if op == "equal":
            for old, new in zip(before_nodes[b0:b1], after_nodes[a0:a1]):
                status = "same" if format_node(old) == format_node(new) else "rewired"
                rows.append(DiffRow(status, old, new))
            continue
        # Deletions before insertions, as a unified diff shows a hunk.
        rows.extend(DiffRow("removed", old, None) for old in before_nodes[b0:b1])
        rows.extend(DiffRow("added", None, new) for new in after_nodes[a0:a1])
    return rows


# --------------------------------------------------------------------------- sections


def _add_owners(plan: Plan) -> dict[str, tuple[int, int, int]]:
    """Old residual add name → ``(stream, block, layer)``, from the plan."""
    owners = {}
    for stream in plan.streams:
        for block_index, block in enumerate(stream.blocks):
            for layer_index in block:
                for add in stream.layers[layer_index].adds:
                    owners[add] = (stream.index, block_index, layer_index)
    return owners


def _source_indices(after: fx.GraphModule) -> dict[str, int]:
    """Node name → ``j`` for each source ``b_j`` the reads take (from the final read's source list)."""
    indices: dict[str, int] = {}
    for node in after.graph.nodes:
        if tag_of(node) is not None and node.op == "call_function" and op_label(node).startswith("attnres.read"):
            indices.update({source.name: j for j, source in enumerate(node.args[0])})
    return indices


@dataclass(frozen=True)
class DiffLookup:
    """What the renderers ask about rows: the plan, the owner of each old add, the sources."""

    plan: Plan
    owners: dict[str, tuple[int, int, int]]
    sources: dict[str, int]

    @classmethod
    def build(cls, after: fx.GraphModule, plan: Plan) -> "DiffLookup":
        return cls(plan, _add_owners(plan), _source_indices(after))

    def is_residual_add(self, row: DiffRow) -> bool:
        return row.status == "removed" and row.name in self.owners


def _row_key(row: DiffRow) -> Optional[SectionKey]:
    """The section a row opens, or None when it just continues the current one.

    Created nodes carry their block, and a rewired node belongs to the block of
    the read it now consumes. Other nodes (a layer's branch, its old residual
    add) sit after their block's read in execution order and stay with it.
    """
    tag = tag_of(row.after)
    if tag is not None:
        return (tag["stream"], tag["block"])
    if row.status == "rewired":
        for arg in row.after.all_input_nodes:
            arg_tag = tag_of(arg)
            if arg_tag is not None:
                return (arg_tag["stream"], arg_tag["block"])
    return None


def layer_span(stream: StreamPlan, block: int) -> str:
    layers = stream.blocks[block]
    return f"layer {layers[0]}" if len(layers) == 1 else f"layers {layers[0]}–{layers[-1]}"


def sources_span(count: int) -> str:
    """``b_0`` … ``b_{count-1}``, written short."""
    return "b_0" if count == 1 else f"b_0–b_{count - 1}"


def section_title(plan: Plan, key: SectionKey) -> str:
    """The heading of a section, e.g. ``stream 0 · block 1 (layers 2–3) · reads b_0–b_1 + partial``."""
    if key is None:
        return "prologue: inputs, parameters and the graph before the first read"
    stream = plan.streams[key[0]]
    block = key[1]
    if block >= len(stream.blocks):
        return f"stream {stream.index} · final read over {sources_span(len(stream.blocks) + 1)}"
    return (
        f"stream {stream.index} · block {block} ({layer_span(stream, block)}) · "
        f"reads {sources_span(block + 1)} + partial"
    )


def diff_sections(before: fx.GraphModule, after: fx.GraphModule, plan: Plan) -> list[DiffSection]:
    """The rows of :func:`diff_rows`, cut into sections wherever the stream or block changes."""
    sections = [DiffSection(None, section_title(plan, None))]
    for row in diff_rows(before, after):
        key = _row_key(row)
        if key is not None and key != sections[-1].key:
            sections.append(DiffSection(key, section_title(plan, key)))
        sections[-1].rows.append(row)
    return [s for s in sections if s.rows]


@dataclass(frozen=True)
class Collapsed:
    """A run of unchanged rows shown folded."""

    rows: tuple[DiffRow, ...]


def collapse_unchanged(rows: list[DiffRow], context: int = CONTEXT) -> list[Union[DiffRow, Collapsed]]:
    """Keep ``context`` unchanged rows beside each change; fold longer unchanged runs.

    A run is folded only when that hides at least two rows (hiding one row
    behind a line that says so saves nothing).
    """
    items: list[Union[DiffRow, Collapsed]] = []
    i = 0
    while i < len(rows):
        if rows[i].changed:
            items.append(rows[i])
            i += 1
            continue
        end = i
        while end < len(rows) and not rows[end].changed:
            end += 1
        keep_head = context if i > 0 else 0  # context after a change
        keep_tail = context if end < len(rows) else 0  # context before a change
        run = rows[i:end]
        if len(run) - keep_head - keep_tail >= 2:
            items.extend(run[:keep_head])
            items.append(Collapsed(tuple(run[keep_head:len(run) - keep_tail])))
            items.extend(run[len(run) - keep_tail:])
        else:
            items.extend(run)
        i = end
    return items


# --------------------------------------------------------------------------- node lines


def op_label(node: fx.Node) -> str:
    """What a node computes, short: ``aten.add.Tensor``, ``attnres.merge.default``, ``getitem``."""
    if node.op == "call_function":
        target = node.target
        if isinstance(target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
            return str(target)  # namespace.op.overload
        return getattr(target, "__name__", str(target))
    if node.op == "call_method":
        return f".{node.target}"
    if node.op == "call_module":
        return f"module {node.target}"
    if node.op == "get_attr":
        return f"get_attr {node.target}"
    return node.op  # placeholder, output


def _format_arg(arg: Any, ref: Callable[[str], str], lit: Callable[[str], str]) -> str:
    if isinstance(arg, fx.Node):
        return ref(arg.name)
    if isinstance(arg, (list, tuple)):
        inner = ", ".join(_format_arg(a, ref, lit) for a in arg)
        if isinstance(arg, tuple):
            return lit("(") + inner + lit(",)" if len(arg) == 1 else ")")
        return lit("[") + inner + lit("]")
    if isinstance(arg, dict):
        return lit("{") + ", ".join(lit(f"{k!r}: ") + _format_arg(v, ref, lit) for k, v in arg.items()) + lit("}")
    return lit(repr(arg) if isinstance(arg, str) else str(arg))


def format_node(node: fx.Node, ref: Callable[[str], str] = str, lit: Callable[[str], str] = str) -> str:
    """``name = op(args, key=value)``; ``ref`` renders node references, ``lit`` everything else."""
    head = lit(f"{node.name} = {op_label(node)}")
    if node.op in ("placeholder", "get_attr"):
        return head
    parts = [_format_arg(a, ref, lit) for a in node.args]
    parts += [lit(f"{k}=") + _format_arg(v, ref, lit) for k, v in node.kwargs.items()]
    return head + lit("(") + lit(", ").join(parts) + lit(")")


def layer_name(stream: StreamPlan, index: int) -> str:
    """``L3 mlp (blocks.1)``: index, what the branch computes, and its module when known."""
    layer = stream.layers[index]
    return f"L{index} {layer.description}" + (f" ({layer.module_path})" if layer.module_path else "")


def _removed_note(row: DiffRow, look: DiffLookup) -> str:
    if look.is_residual_add(row):
        stream, _, layer = look.owners[row.name]
        return f"residual add · {layer_name(look.plan.streams[stream], layer)}"
    if is_noop_cast(row.before):
        return "no-op cast, dropped"
    return ""


def _added_note(node: fx.Node, tag: dict, look: DiffLookup) -> str:
    stream = look.plan.streams[tag["stream"]]
    role = tag["role"]
    if look.sources.get(node.name, 0) > 0:
        j = look.sources[node.name]
        return f"b_{j} = Σ block {j - 1}"
    if role == "block_read":
        return f"phase 1 · block {tag['block']} over {sources_span(len(tag['sources']))}"
    if role == "merge":
        return f"phase 2 · read of {layer_name(stream, tag['layer'])}"
    if role == "read":
        return f"final read over {sources_span(len(tag['sources']))}"
    if role == "partial":
        return "partial sum of branch outputs"
    return ""


def annotation(row: DiffRow, look: DiffLookup) -> str:
    """A short note on what a changed row is, e.g. ``phase 2 · read of L1 mlp (blocks.0)``."""
    if row.status == "removed":
        return _removed_note(row, look)
    tag = tag_of(row.after)
    if tag is not None:
        return _added_note(row.after, tag, look)
    return "attnres queries" if row.status == "added" and row.after.op == "get_attr" else ""


# --------------------------------------------------------------------------- summary


def tally(rows: list[DiffRow], plan: Plan) -> Counter:
    """Rows by status, the removed residual adds, and the reads added by role (block_read, merge, read)."""
    owners = _add_owners(plan)
    counts: Counter = Counter(row.status for row in rows)
    counts["residual_adds"] = sum(row.status == "removed" and row.name in owners for row in rows)
    for row in rows:
        tag = tag_of(row.after) if row.status == "added" else None
        if tag is not None and tag["role"] in ("block_read", "merge", "read"):
            counts[tag["role"]] += 1
    return counts


def added_ops(counts: Counter) -> str:
    return f"{counts['block_read']} block_read, {counts['merge']} merge, {counts['read']} read"


def summary_line(before: fx.GraphModule, after: fx.GraphModule, plan: Plan, rows: list[DiffRow]) -> str:
    """Nodes before → after, what went and what came, and the plan's shape, in one line."""
    counts = tally(rows, plan)
    layers = sum(len(s.layers) for s in plan.streams)
    blocks = sum(len(s.blocks) for s in plan.streams)
    return (
        f"{len(before.graph.nodes)} → {len(after.graph.nodes)} nodes: "
        f"-{counts['removed']} removed ({counts['residual_adds']} residual adds), "
        f"+{counts['added']} added ({added_ops(counts)}), ~{counts['rewired']} rewired; "
        f"{len(plan.streams)} stream(s), {layers} layers, {blocks} blocks, {len(plan.skipped)} skipped site(s)"
    )
