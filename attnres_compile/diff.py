"""The graph diff of a rewrite: what changed between the original graph and its Block AttnRes form.

    ep = torch.export.export(model, args, kwargs, strict=False)
    before, after = ep.module(), attnres_compile.rewrite(ep.module())   # rewrite works in place
    plan = after.meta["attnres_plan"]
    print(diff_text(before, after, plan))
    write_diff_html("diff.html", before, after, plan)

The diff is computed from node names (the rewrite keeps the names of the nodes
it leaves alone), the ``node.meta[REWRITE_META]`` tag of every node the rewrite
creates, and the plan, which names the old residual adds and the block of each
layer. Each node of either graph gets one row:

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
from typing import Any, Callable, Iterator, Optional, Union

import torch
import torch.fx as fx

from attnres_compile.passes.plan import Plan, StreamPlan
from attnres_compile.passes.rewrite import REWRITE_META

__all__ = ["DiffRow", "DiffSection", "diff_html", "diff_rows", "diff_sections", "diff_text", "write_diff_html"]

SectionKey = Optional[tuple[int, int]]
"""``(stream, block)`` of a section; ``block == len(blocks)`` is the final read; None is the prologue."""

CONTEXT = 2
"""Unchanged rows kept on each side of a change before the rest of a run collapses."""

# Colours of blocks 0, 1, 2, ... (cycled): distinct hues, none of them the red of removed rows.
BLOCK_COLOURS = ("#2f6fdb", "#e08a00", "#8e44ad", "#0f9b8e", "#c0399a", "#7a5c2e", "#1b9ac9", "#6b7a00")
FINAL_COLOUR = "#444b55"
SOURCE0_COLOUR = "#5b6470"


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


def _tag(node: Optional[fx.Node]) -> Optional[dict]:
    """The rewrite's ``{"stream", "block", "layer"}`` tag of a node it created, else None."""
    return None if node is None else node.meta.get(REWRITE_META)


def _new_in_after(node: fx.Node, before_names: set[str]) -> bool:
    """A node of ``after`` the rewrite created: tagged, or a name ``before`` lacks (the query ``get_attr``)."""
    return _tag(node) is not None or node.name not in before_names


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
        if _tag(node) is not None and node.op == "call_function" and op_label(node).startswith("attnres.read"):
            indices.update({source.name: j for j, source in enumerate(node.args[0])})
    return indices


@dataclass(frozen=True)
class _Lookup:
    """What the renderers ask about rows: the plan, the owner of each old add, the sources."""

    plan: Plan
    owners: dict[str, tuple[int, int, int]]
    sources: dict[str, int]

    @classmethod
    def build(cls, after: fx.GraphModule, plan: Plan) -> "_Lookup":
        return cls(plan, _add_owners(plan), _source_indices(after))

    def is_residual_add(self, row: DiffRow) -> bool:
        return row.status == "removed" and row.name in self.owners


def _row_key(row: DiffRow) -> Optional[SectionKey]:
    """The section a row opens, or None when it just continues the current one.

    Created nodes carry their block, and a rewired node belongs to the block of
    the read it now consumes. Other nodes (a layer's branch, its old residual
    add) sit after their block's read in execution order and stay with it.
    """
    tag = _tag(row.after)
    if tag is not None:
        return (tag["stream"], tag["block"])
    if row.status == "rewired":
        for arg in row.after.all_input_nodes:
            arg_tag = _tag(arg)
            if arg_tag is not None:
                return (arg_tag["stream"], arg_tag["block"])
    return None


def _layer_span(stream: StreamPlan, block: int) -> str:
    layers = stream.blocks[block]
    return f"layer {layers[0]}" if len(layers) == 1 else f"layers {layers[0]}–{layers[-1]}"


def _sources_span(count: int) -> str:
    """``b_0`` … ``b_{count-1}``, written short."""
    return "b_0" if count == 1 else f"b_0–b_{count - 1}"


def section_title(plan: Plan, key: SectionKey) -> str:
    """The heading of a section, e.g. ``stream 0 · block 1 (layers 2–3) · reads b_0–b_1 + partial``."""
    if key is None:
        return "prologue: inputs, parameters and the graph before the first read"
    stream = plan.streams[key[0]]
    block = key[1]
    if block >= len(stream.blocks):
        return f"stream {stream.index} · final read over {_sources_span(len(stream.blocks) + 1)}"
    return (
        f"stream {stream.index} · block {block} ({_layer_span(stream, block)}) · "
        f"reads {_sources_span(block + 1)} + partial"
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


def _layer_name(stream: StreamPlan, index: int) -> str:
    """``L3 mlp (blocks.1)``: index, what the branch computes, and its module when known."""
    layer = stream.layers[index]
    return f"L{index} {layer.description}" + (f" ({layer.module_path})" if layer.module_path else "")


def _removed_note(row: DiffRow, look: _Lookup) -> str:
    if look.is_residual_add(row):
        stream, _, layer = look.owners[row.name]
        return f"residual add · {_layer_name(look.plan.streams[stream], layer)}"
    if op_label(row.before).startswith("aten.to."):
        return "no-op cast, dropped"
    return ""


def _added_note(node: fx.Node, tag: dict, look: _Lookup) -> str:
    stream = look.plan.streams[tag["stream"]]
    label = op_label(node)
    if look.sources.get(node.name, 0) > 0:
        j = look.sources[node.name]
        return f"b_{j} = Σ block {j - 1}"
    if label.startswith("attnres.block_read"):
        return f"phase 1 · block {tag['block']} over {_sources_span(tag['block'] + 1)}"
    if label.startswith("attnres.merge"):
        return f"phase 2 · read of {_layer_name(stream, tag['layer'])}"
    if label.startswith("attnres.read"):
        return f"final read over {_sources_span(len(stream.blocks) + 1)}"
    if label == "aten.add.Tensor":
        return "partial sum of branch outputs"
    return ""


def _annotation(row: DiffRow, look: _Lookup) -> str:
    """A short note on what a changed row is, e.g. ``phase 2 · read of L1 mlp (blocks.0)``."""
    if row.status == "removed":
        return _removed_note(row, look)
    tag = _tag(row.after)
    if tag is not None:
        return _added_note(row.after, tag, look)
    return "attnres queries" if row.status == "added" and row.after.op == "get_attr" else ""


# --------------------------------------------------------------------------- summary


def _tally(rows: list[DiffRow], plan: Plan) -> Counter:
    """Rows by status, the removed residual adds, and the attnres ops added by name."""
    owners = _add_owners(plan)
    counts: Counter = Counter(row.status for row in rows)
    counts["residual_adds"] = sum(row.status == "removed" and row.name in owners for row in rows)
    for row in rows:
        if row.status == "added" and row.after.op == "call_function":
            label = op_label(row.after)
            if label.startswith("attnres."):
                counts[label.split(".")[1]] += 1  # block_read, merge, read
    return counts


def _added_ops(counts: Counter) -> str:
    return f"{counts['block_read']} block_read, {counts['merge']} merge, {counts['read']} read"


def summary_line(before: fx.GraphModule, after: fx.GraphModule, plan: Plan, rows: list[DiffRow]) -> str:
    """Nodes before → after, what went and what came, and the plan's shape, in one line."""
    counts = _tally(rows, plan)
    layers = sum(len(s.layers) for s in plan.streams)
    blocks = sum(len(s.blocks) for s in plan.streams)
    return (
        f"{len(before.graph.nodes)} → {len(after.graph.nodes)} nodes: "
        f"-{counts['removed']} removed ({counts['residual_adds']} residual adds), "
        f"+{counts['added']} added ({_added_ops(counts)}), ~{counts['rewired']} rewired; "
        f"{len(plan.streams)} stream(s), {layers} layers, {blocks} blocks, {len(plan.skipped)} skipped site(s)"
    )


# --------------------------------------------------------------------------- text


_TEXT_PREFIX = {"same": " ", "removed": "-", "added": "+"}


def _text_row_lines(row: DiffRow, note: str) -> Iterator[str]:
    """A rewired node shows as ``-`` old and ``+`` new, the way a unified diff shows a changed line."""
    suffix = f"    # {note}" if note else ""
    if row.status == "rewired":
        yield f"- {format_node(row.before)}"
        yield f"+ {format_node(row.after)}    # rewired"
    else:
        node = row.after if row.after is not None else row.before
        yield f"{_TEXT_PREFIX[row.status]} {format_node(node)}{suffix}"


def diff_text(before: fx.GraphModule, after: fx.GraphModule, plan: Plan, *, context: int = CONTEXT) -> str:
    """A unified-diff-like listing of the two graphs, one section per stream and block.

    ``-`` lines are nodes only ``before`` has, ``+`` lines nodes only ``after``
    has (a rewired node shows as both), unchanged nodes are context; runs of
    unchanged nodes longer than ``2 * context`` collapse to ``… N unchanged nodes …``.
    """
    sections = diff_sections(before, after, plan)
    rows = [row for section in sections for row in section.rows]
    look = _Lookup.build(after, plan)
    lines = [f"# attnres rewrite: {summary_line(before, after, plan, rows)}"]
    lines += [f"# {line}" for line in plan.summary().splitlines()]
    for section in sections:
        lines.append("")
        lines.append(f"## {section.title}")
        for item in collapse_unchanged(section.rows, context):
            if isinstance(item, Collapsed):
                lines.append(f"  … {len(item.rows)} unchanged nodes …")
            else:
                lines.extend(_text_row_lines(item, _annotation(item, look)))
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- HTML: pieces


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def block_colour(block: int, num_blocks: int) -> str:
    """The colour of block ``block``; the final read (``block == num_blocks``) has its own."""
    return FINAL_COLOUR if block >= num_blocks else BLOCK_COLOURS[block % len(BLOCK_COLOURS)]


def _source_colour(source: int) -> str:
    """``b_0`` is the embedding; ``b_{n+1}`` is block n's sum and takes block n's colour."""
    return SOURCE0_COLOUR if source == 0 else BLOCK_COLOURS[(source - 1) % len(BLOCK_COLOURS)]


def _section_colour(plan: Plan, key: SectionKey) -> str:
    if key is None:
        return "#9aa3ad"
    return block_colour(key[1], len(plan.streams[key[0]].blocks))


def _row_block_class(row: DiffRow, look: _Lookup) -> str:
    """``blk-N`` for the colour of a created node or removed add; ``blk-final`` for the final read."""
    tag = _tag(row.after)
    if tag is not None:
        final = tag["block"] >= len(look.plan.streams[tag["stream"]].blocks)
        return "blk-final" if final else f"blk-{tag['block']}"
    if look.is_residual_add(row):
        return f"blk-{look.owners[row.name][1]}"
    return ""


def _html_node(node: fx.Node, highlight: set[str]) -> str:
    """A node line with its references as spans; references in ``highlight`` are marked."""

    def ref(name: str) -> str:
        cls = "ref changed" if name in highlight else "ref"
        return f'<span class="{cls}">{_e(name)}</span>'

    return format_node(node, ref=ref, lit=_e)


def _changed_refs(row: DiffRow) -> tuple[set[str], set[str]]:
    """Argument names a rewired node lost (before side) and gained (after side)."""
    if row.status != "rewired":
        return set(), set()
    old = {n.name for n in row.before.all_input_nodes}
    new = {n.name for n in row.after.all_input_nodes}
    return old - new, new - old


def _cell(side: str, node: Optional[fx.Node], row: DiffRow, highlight: set[str], extra: str, note: str) -> str:
    if node is None:
        return f'<div class="cell {side} empty"></div>'
    classes = f"cell {side} {row.status} {extra}".strip()
    title = _e(format_node(node) + (f"  — {note}" if note else ""))
    body = _html_node(node, highlight)
    note_html = f'<span class="note">{_e(note)}</span>' if note else ""
    return (
        f'<div class="{classes}" data-node="{_e(node.name)}" title="{title}">'
        f'<span class="code">{body}</span>{note_html}</div>'
    )


def _html_row(row: DiffRow, look: _Lookup) -> str:
    lost, gained = _changed_refs(row)
    block = _row_block_class(row, look)
    note = _annotation(row, look)
    left = _cell("before", row.before, row, lost, block if row.status == "removed" else "", note if row.before else "")
    right = _cell("after", row.after, row, gained, block if row.status == "added" else "", note if row.after else "")
    return f'<div class="row {row.status}">{left}{right}</div>'


def _section_id(key: SectionKey) -> str:
    """The anchor of a section, which the block bands of the stream diagram link to."""
    return "prologue" if key is None else f"stream{key[0]}-block{key[1]}"


def _html_section(section: DiffSection, look: _Lookup, context: int) -> str:
    colour = _section_colour(look.plan, section.key)
    changed = sum(row.changed for row in section.rows)
    parts = [
        f'<section class="sect" id="{_section_id(section.key)}" style="--c:{colour}">',
        f'<h3><span class="swatch"></span>{_e(section.title)}'
        f'<span class="count">{len(section.rows)} nodes, {changed} changed</span></h3>',
    ]
    for item in collapse_unchanged(section.rows, context):
        if isinstance(item, Collapsed):
            inner = "".join(_html_row(row, look) for row in item.rows)
            parts.append(
                f'<details class="run"><summary>… {len(item.rows)} unchanged nodes …</summary>{inner}</details>'
            )
        else:
            parts.append(_html_row(item, look))
    parts.append("</section>")
    return "".join(parts)


# --------------------------------------------------------------------------- HTML: stream diagrams

ROW_H = 24
HEAD_H = 34
LABEL_W = 330


def _svg_text(x: float, y: float, text: str, cls: str = "", anchor: str = "start") -> str:
    return f'<text x="{x:.1f}" y="{y:.1f}" class="{cls}" text-anchor="{anchor}">{_e(text)}</text>'


def _layer_label(stream: StreamPlan, index: int) -> tuple[str, str]:
    """``("L3 mlp", "blocks.1")``: the layer's index and kind, and its module."""
    layer = stream.layers[index]
    return f"L{index} {layer.description}", layer.module_path


def _svg_layer_box(x: float, y: float, stream: StreamPlan, index: int, colour: str) -> str:
    label, module = _layer_label(stream, index)
    return (
        f'<rect x="{x:.1f}" y="{y - 9:.1f}" width="{LABEL_W}" height="18" rx="4" class="layer" '
        f'style="stroke:{colour}"/>'
        + _svg_text(x + 8, y + 4, label, "lbl")
        + _svg_text(x + LABEL_W - 8, y + 4, module, "mod", "end")
    )


def _row_y(row: int) -> float:
    """The centre of diagram row ``row`` (0: ``b_0``; 1..L: the layers; L + 1: the output)."""
    return HEAD_H + row * ROW_H + ROW_H / 2


def svg_before(stream: StreamPlan) -> str:
    """The original stream: ``b_0`` then one ``⊕`` per layer on a single line, and the output."""
    n = len(stream.layers)
    line_x, box_x = 28, 60
    width = box_x + LABEL_W + 120
    height = HEAD_H + (n + 2) * ROW_H
    parts = [
        f'<svg class="diagram before" width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img">',
        _svg_text(8, 20, f"before: stream {stream.index}, one running sum", "title"),
        f'<line x1="{line_x}" y1="{_row_y(0)}" x2="{line_x}" y2="{_row_y(n + 1)}" class="stream"/>',
        f'<circle cx="{line_x}" cy="{_row_y(0)}" r="6" class="src" style="fill:{SOURCE0_COLOUR}"/>',
        _svg_text(box_x, _row_y(0) + 4, f"b_0 = {stream.source}", "lbl"),
    ]
    for i, layer in enumerate(stream.layers):
        cy = _row_y(i + 1)
        parts.append(f'<line x1="{line_x}" y1="{cy}" x2="{box_x}" y2="{cy}" class="edge"/>')
        parts.append(_svg_layer_box(box_x, cy, stream, i, "#9aa3ad"))
        parts.append(f'<circle cx="{line_x}" cy="{cy}" r="7" class="add"/>')
        parts.append(_svg_text(line_x, cy + 4, "+", "addsign", "middle"))
        parts.append(_svg_text(box_x + LABEL_W + 8, cy + 4, "⊕ " + ", ".join(layer.adds), "removed-add"))
    parts.append(_svg_text(box_x, _row_y(n + 1) + 4, f"output ← {stream.stream_out}", "lbl"))
    parts.append("</svg>")
    return "".join(parts)


@dataclass(frozen=True)
class _Lanes:
    """Where the source lanes of the after-diagram sit: ``xs[j]`` for ``b_j``, then ``p``, then the boxes.

    Lanes are 26 px apart, closer for many sources (Full AttnRes over a deep
    model), so the diagram stays beside the before-diagram on a wide screen.
    """

    xs: tuple[float, ...]
    spacing: float

    @classmethod
    def for_sources(cls, count: int) -> "_Lanes":
        spacing = max(7.0, min(26.0, 330.0 / (count + 1)))
        return cls(tuple(16 + j * spacing for j in range(count)), spacing)

    @property
    def partial_x(self) -> float:
        return self.xs[-1] + max(self.spacing, 14.0)

    @property
    def box_x(self) -> float:
        return self.partial_x + 18

    @property
    def dot_r(self) -> float:
        return min(4.5, 0.42 * self.spacing)

    def labelled(self, j: int) -> bool:
        """Whether lane j gets its ``b_j`` label: all of them when there is room, else every few."""
        return j % math.ceil(22 / self.spacing) == 0  # a label like "b12" is about 20 px wide


def _svg_block_band(stream: StreamPlan, block: int, top: float, width: float) -> str:
    colour = block_colour(block, len(stream.blocks))
    height = len(stream.blocks[block]) * ROW_H
    return (
        f'<a href="#{_section_id((stream.index, block))}">'
        f'<rect class="band" data-stream="{stream.index}" data-block="{block}" x="2" y="{top:.1f}" '
        f'width="{width - 4:.1f}" height="{height}" rx="6" style="fill:{colour};stroke:{colour}"/>'
        + _svg_text(width - 8, top + 13, f"block {block}", "bandlbl", "end")
        + "</a>"
    )


def _svg_reads(lanes: _Lanes, cy: float, count: int) -> str:
    """A read edge from the first ``count`` source lanes to the layer box, with a dot on each lane."""
    parts = [f'<line x1="{lanes.xs[0]}" y1="{cy}" x2="{lanes.box_x}" y2="{cy}" class="edge"/>']
    parts += [
        f'<circle cx="{lanes.xs[j]}" cy="{cy}" r="{lanes.dot_r:.1f}" class="dot" style="fill:{_source_colour(j)}"/>'
        for j in range(count)
    ]
    return "".join(parts)


def _svg_lanes(stream: StreamPlan, lanes: _Lanes) -> str:
    """One vertical lane per source; lane ``b_j`` (j > 0) starts where block j-1 ends, as its sum."""
    ends = [1 + sum(len(b) for b in stream.blocks[:n + 1]) for n in range(len(stream.blocks))]
    bottom = _row_y(len(stream.layers) + 1)
    parts = []
    for j, x in enumerate(lanes.xs):
        start = _row_y(0) if j == 0 else HEAD_H + ends[j - 1] * ROW_H
        colour = _source_colour(j)
        if j > 0:  # a faint guide from the lane's label down to where the source comes to be
            parts.append(f'<line x1="{x}" y1="{HEAD_H + 2}" x2="{x}" y2="{start}" class="guide"/>')
        parts.append(f'<line x1="{x}" y1="{start}" x2="{x}" y2="{bottom}" class="lane" '
                     f'style="stroke:{colour};stroke-width:{min(2.5, 0.3 * lanes.spacing):.1f}"/>')
        parts.append(f'<rect x="{x - 4}" y="{start - 3}" width="8" height="6" rx="2" style="fill:{colour}"/>')
        if lanes.labelled(j):
            parts.append(_svg_text(x, HEAD_H - 2, f"b{j}", "lanelbl", "middle"))
    parts.append(_svg_text(lanes.partial_x, HEAD_H - 2, "p", "lanelbl", "middle"))
    return "".join(parts)


def _svg_layer_rows(stream: StreamPlan, lanes: _Lanes) -> str:
    """Per layer: dots on the sources its block reads, a ring on ``p`` past the block's first layer, its box."""
    parts, row = [], 1
    for b, block in enumerate(stream.blocks):
        colour = block_colour(b, len(stream.blocks))
        for j, index in enumerate(block):
            cy = _row_y(row)
            parts.append(_svg_reads(lanes, cy, b + 1))
            if j > 0:
                parts.append(f'<circle cx="{lanes.partial_x}" cy="{cy}" r="4.5" class="partial" style="stroke:{colour}"/>')
            parts.append(_svg_layer_box(lanes.box_x, cy, stream, index, colour))
            row += 1
    return "".join(parts)


def svg_after(stream: StreamPlan) -> str:
    """Block AttnRes: source lanes ``b_0..b_N``, layers in block bands, dots on the sources each layer reads.

    Lane ``b_{n+1}`` starts where block n ends (it is that block's sum); every
    layer of block n reads ``b_0..b_n`` (one phase-1 read per block) and, past
    its first layer, the partial sum ``p`` of the block so far.
    """
    n_layers, n_blocks = len(stream.layers), len(stream.blocks)
    lanes = _Lanes.for_sources(n_blocks + 1)
    width = lanes.box_x + LABEL_W + 70
    height = HEAD_H + (n_layers + 2) * ROW_H
    parts = [
        f'<svg class="diagram after" width="{width:.0f}" height="{height}" viewBox="0 0 {width:.0f} {height}" role="img">',
        _svg_text(8, 20, f"after: stream {stream.index}, Block AttnRes over {n_blocks + 1} sources", "title"),
    ]
    top = HEAD_H + ROW_H
    for b, block in enumerate(stream.blocks):
        parts.append(_svg_block_band(stream, b, top, width))
        top += len(block) * ROW_H
    parts.append(_svg_lanes(stream, lanes))
    parts.append(_svg_text(lanes.box_x, _row_y(0) + 4, f"b_0 = {stream.source}", "lbl"))
    parts.append(_svg_layer_rows(stream, lanes))
    final_y = _row_y(n_layers + 1)
    parts.append(_svg_reads(lanes, final_y, n_blocks + 1))
    parts.append(
        f'<rect x="{lanes.box_x}" y="{final_y - 9}" width="{LABEL_W}" height="18" rx="4" class="layer final"/>'
        + _svg_text(lanes.box_x + 8, final_y + 4, f"final read over {_sources_span(n_blocks + 1)} → output", "lbl")
    )
    parts.append("</svg>")
    return "".join(parts)


# --------------------------------------------------------------------------- HTML: page

_CSS = """
:root { --red:#c62828; --red-bg:#fde8e8; --green:#1e7d32; --green-bg:#e3f4e5; --amber:#a86400; --amber-bg:#fff3dc; }
* { box-sizing: border-box; }
body { margin: 0; font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #1d232b; background: #f6f7f9; }
header { background: #1d232b; color: #f3f5f7; padding: 16px 24px 14px; }
header h1 { margin: 0 0 4px; font-size: 20px; font-weight: 600; }
header .summary { font-size: 13px; color: #c9d1d9; }
main { padding: 14px 24px 40px; }
h2 { font-size: 16px; margin: 22px 0 8px; }
.cards { display: flex; flex-wrap: wrap; gap: 10px; margin: 6px 0 4px; }
.card { background: #fff; border: 1px solid #dde1e6; border-radius: 8px; padding: 8px 12px; min-width: 120px; }
.card b { display: block; font-size: 20px; }
.card span { font-size: 12px; color: #5b6470; white-space: nowrap; }
.card.removed b { color: var(--red); } .card.added b { color: var(--green); } .card.rewired b { color: var(--amber); }
table.plan { border-collapse: collapse; background: #fff; font-size: 13px; margin: 6px 0; }
table.plan td, table.plan th { border: 1px solid #dde1e6; padding: 3px 8px; text-align: left; vertical-align: top; }
table.plan th { background: #eef0f3; font-weight: 600; }
.chip { display: inline-block; width: 12px; height: 12px; border-radius: 3px; vertical-align: -1px; margin-right: 4px; }
.legend { font-size: 13px; margin: 4px 0 8px; display: flex; flex-wrap: wrap; gap: 14px; }
.figs { display: flex; flex-wrap: wrap; gap: 16px; align-items: flex-start; }
.diagram { background: #fff; border: 1px solid #dde1e6; border-radius: 8px; }
.diagram .title { font-weight: 600; font-size: 13px; fill: #1d232b; }
.diagram .lbl { font-size: 12px; fill: #1d232b; }
.diagram .mod { font-size: 11px; fill: #6b7480; font-family: ui-monospace, Menlo, Consolas, monospace; }
.diagram .removed-add { font-size: 11px; fill: var(--red); font-family: ui-monospace, Menlo, Consolas, monospace; }
.diagram .lanelbl { font-size: 11px; fill: #3b434d; font-weight: 600; }
.diagram .bandlbl { font-size: 11px; fill: #1d232b; font-weight: 600; }
.diagram .stream { stroke: #5b6470; stroke-width: 3; }
.diagram .guide { stroke: #c5ccd4; stroke-width: 1; stroke-dasharray: 2 3; }
.diagram .edge { stroke: #b8bfc8; stroke-width: 1; }
.diagram .layer { fill: #fff; stroke-width: 1.6; }
.diagram .layer.final { stroke: #444b55; fill: #eef0f3; }
.diagram .add { fill: #fff; stroke: var(--red); stroke-width: 1.6; }
.diagram .addsign { font-size: 13px; font-weight: 700; fill: var(--red); }
.diagram .band { fill-opacity: .13; stroke-opacity: .7; stroke-width: 1; }
.diagram .partial { fill: #fff; stroke-width: 2; }
.toolbar { margin: 6px 0 10px; display: flex; gap: 8px; align-items: center; font-size: 13px; }
.toolbar button { font: inherit; padding: 3px 10px; border: 1px solid #c5ccd4; background: #fff; border-radius: 5px; cursor: pointer; }
.cols { display: grid; grid-template-columns: 1fr 1fr; gap: 0 12px; font-weight: 600; font-size: 13px; padding: 0 4px 4px 10px; }
.sect { background: #fff; border: 1px solid #dde1e6; border-left: 6px solid var(--c); border-radius: 6px; margin: 0 0 10px; overflow: hidden; }
.sect h3 { margin: 0; padding: 6px 10px; font-size: 13px; font-weight: 600; background: color-mix(in srgb, var(--c) 14%, #fff); }
.sect h3 .swatch { display: inline-block; width: 10px; height: 10px; border-radius: 2px; background: var(--c); margin-right: 8px; }
.sect h3 .count { float: right; font-weight: 400; color: #5b6470; }
.row { display: grid; grid-template-columns: 1fr 1fr; gap: 0 12px; padding: 0 4px; }
.cell { font: 12px/1.55 ui-monospace, Menlo, Consolas, "DejaVu Sans Mono", monospace; white-space: pre;
        display: flex; padding: 0 6px 0 20px; position: relative; min-height: 18px; color: #3b434d; min-width: 0; }
.cell .code { flex: 1 1 auto; min-width: 0; overflow: hidden; text-overflow: ellipsis; }
.cell::before { position: absolute; left: 6px; font-weight: 700; }
.cell.removed { background: var(--red-bg); color: var(--red); }
.cell.removed .code { text-decoration: line-through; text-decoration-color: #e9a3a3; }
.cell.removed::before { content: "-"; }
.cell.added { background: var(--green-bg); color: #103d18; box-shadow: inset 4px 0 0 var(--green); }
.cell.added::before { content: "+"; color: var(--green); }
.cell.rewired { background: var(--amber-bg); color: #4d3100; }
.cell.rewired::before { content: "~"; color: var(--amber); }
.cell.empty { background: repeating-linear-gradient(135deg, #fafbfc 0 6px, #f1f3f5 6px 12px); }
.cell .ref { color: #1f4f99; }
.cell .ref.changed { background: #ffd89a; border-radius: 3px; padding: 0 2px; font-weight: 600; }
/* the note stays visible: the code gives way first */
.cell .note { flex: 0 0 auto; max-width: 55%; overflow: hidden; text-overflow: ellipsis; margin-left: 10px;
              font: italic 11.5px/1.65 system-ui, sans-serif; color: #4b5561; }
details.run > summary { cursor: pointer; color: #6b7480; font-size: 12px; padding: 1px 10px; list-style: none; background: #f3f4f6; }
details.run > summary::-webkit-details-marker { display: none; }
details.run[open] > summary { color: #3b434d; }
"""

_JS = """
function setRuns(open) { document.querySelectorAll('details.run').forEach(function (d) { d.open = open; }); }
"""


def _block_css(num_blocks: int) -> str:
    """The added/removed cell colours of each block: a stripe and a tint in the block's colour."""
    rules = []
    for b in range(min(num_blocks, len(BLOCK_COLOURS))):
        colour = BLOCK_COLOURS[b]
        rules.append(
            f".cell.added.blk-{b} {{ box-shadow: inset 4px 0 0 {colour}; "
            f"background: color-mix(in srgb, {colour} 12%, #e3f4e5); }}"
        )
    for b in range(len(BLOCK_COLOURS), num_blocks):  # the palette cycles
        rules.append(f".cell.added.blk-{b} {{ box-shadow: inset 4px 0 0 {BLOCK_COLOURS[b % len(BLOCK_COLOURS)]}; }}")
    rules.append(
        f".cell.added.blk-final {{ box-shadow: inset 4px 0 0 {FINAL_COLOUR}; "
        f"background: color-mix(in srgb, {FINAL_COLOUR} 10%, #e3f4e5); }}"
    )
    return "\n".join(rules)


MAX_BLOCK_CHIPS = 12
"""Past this many blocks the plan table gives block sizes instead of one chip per block."""


def _blocks_cell(stream: StreamPlan) -> str:
    """One colour chip and layer span per block; just the sizes when there are many (Full AttnRes)."""
    if len(stream.blocks) > MAX_BLOCK_CHIPS:
        sizes = Counter(len(block) for block in stream.blocks)
        return _e(f"{len(stream.blocks)} blocks: " + ", ".join(f"{n} of {size} layer(s)" for size, n in sizes.items()))
    return " ".join(
        f'<span class="chip" style="background:{block_colour(b, len(stream.blocks))}"></span>'
        f"{b}: {_e(_layer_span(stream, b))}&nbsp;&nbsp;"
        for b in range(len(stream.blocks))
    )


def _plan_table(plan: Plan) -> str:
    """Streams with their blocks, layers and eps; then skipped sites and notes."""
    parts = ['<table class="plan"><tr><th>stream</th><th>b_0</th><th>d</th><th>eps</th>'
             "<th>layers</th><th>blocks (layers)</th></tr>"]
    for s in plan.streams:
        blocks = _blocks_cell(s)
        parts.append(
            f"<tr><td>{s.index}</td><td><code>{_e(s.source)}</code></td><td>{s.width}</td><td>{s.eps:g}</td>"
            f"<td>{len(s.layers)}</td><td>{blocks}</td></tr>"
        )
    parts.append("</table>")
    if plan.skipped:
        parts.append('<table class="plan"><tr><th>skipped site</th><th>reason</th></tr>')
        parts += [f"<tr><td><code>{_e(s.node)}</code></td><td>{_e(s.reason)}</td></tr>" for s in plan.skipped]
        parts.append("</table>")
    else:
        parts.append("<p>No skipped sites.</p>")
    parts += [f"<p>{_e(note)}</p>" for note in plan.notes]
    return "".join(parts)


def _cards(before: fx.GraphModule, after: fx.GraphModule, plan: Plan, rows: list[DiffRow]) -> str:
    """The headline numbers as cards: nodes, removed, added, rewired, layers, blocks."""
    counts = _tally(rows, plan)
    cards = [
        ("", f"{len(before.graph.nodes)} → {len(after.graph.nodes)}", "nodes before → after"),
        ("removed", f"-{counts['removed']}", f"removed ({counts['residual_adds']} residual adds)"),
        ("added", f"+{counts['added']}", f"added ({_added_ops(counts)})"),
        ("rewired", f"~{counts['rewired']}", "rewired (arguments changed)"),
        ("", str(sum(len(s.layers) for s in plan.streams)), f"layers in {len(plan.streams)} stream(s)"),
        ("", str(sum(len(s.blocks) for s in plan.streams)), "blocks"),
    ]
    return '<div class="cards">' + "".join(
        f'<div class="card {cls}"><b>{_e(value)}</b><span>{_e(label)}</span></div>' for cls, value, label in cards
    ) + "</div>"


def _legend(plan: Plan) -> str:
    num_blocks = max((len(s.blocks) for s in plan.streams), default=0)
    items = [
        '<span><span class="chip" style="background:var(--red)"></span>removed (before only)</span>',
        '<span><span class="chip" style="background:var(--green)"></span>added (after only), striped in its block\'s colour</span>',
        '<span><span class="chip" style="background:#ffd89a"></span>rewired: the argument that changed</span>',
    ]
    items += [
        f'<span><span class="chip" style="background:{block_colour(b, num_blocks)}"></span>block {b}</span>'
        for b in range(min(num_blocks, len(BLOCK_COLOURS)))
    ]
    items.append(f'<span><span class="chip" style="background:{FINAL_COLOUR}"></span>final read</span>')
    return '<div class="legend">' + "".join(items) + "</div>"


def diff_html(before: fx.GraphModule, after: fx.GraphModule, plan: Plan, *, title: str = "attnres rewrite",
              context: int = CONTEXT) -> str:
    """One self-contained HTML page (inline CSS, JS and SVG; nothing fetched) of the rewrite.

    A header with the plan (streams, blocks, skipped sites), a stream diagram
    per stream (before: one running sum; after: the sources, the layers in
    coloured block bands and the sources each layer reads), then both graphs
    side by side: removed nodes red, added nodes green with their block's
    colour, rewired nodes amber, long unchanged runs folded in ``<details>``.
    """
    sections = diff_sections(before, after, plan)
    rows = [row for section in sections for row in section.rows]
    look = _Lookup.build(after, plan)
    num_blocks = max((len(s.blocks) for s in plan.streams), default=0)
    figures = "".join(f'<div class="figs">{svg_before(s)}{svg_after(s)}</div>' for s in plan.streams)
    listing = "".join(_html_section(section, look, context) for section in sections)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{_e(title)}</title>
<style>{_CSS}
{_block_css(num_blocks)}</style>
<script>{_JS}</script>
</head><body>
<header><h1>{_e(title)}</h1><div class="summary">{_e(summary_line(before, after, plan, rows))}</div></header>
<main>
{_cards(before, after, plan, rows)}
<h2>Plan</h2>
{_plan_table(plan)}
<h2>Residual stream, before and after</h2>
{figures or "<p>No residual stream was rewritten.</p>"}
<h2>Graphs, before | after</h2>
{_legend(plan)}
<div class="toolbar"><button type="button" onclick="setRuns(true)">expand unchanged</button>
<button type="button" onclick="setRuns(false)">collapse unchanged</button></div>
<div class="cols"><div>before ({len(before.graph.nodes)} nodes)</div><div>after ({len(after.graph.nodes)} nodes)</div></div>
{listing}
</main></body></html>
"""


def write_diff_html(path: Union[str, os.PathLike], before: fx.GraphModule, after: fx.GraphModule, plan: Plan,
                    *, title: str = "attnres rewrite") -> str:
    """Write :func:`diff_html` to ``path`` (UTF-8) and return the path as a string."""
    with open(path, "w", encoding="utf-8") as f:
        f.write(diff_html(before, after, plan, title=title))
    return os.fspath(path)
