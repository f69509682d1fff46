"""The graph diff as one self-contained HTML page: plan, stream diagrams, both graphs side by side."""

from __future__ import annotations

import functools
import html
import importlib.resources
import os
from collections import Counter
from typing import Any, Optional, Union

import torch.fx as fx

from ..diff import (
    CONTEXT,
    Collapsed,
    DiffLookup,
    DiffRow,
    DiffSection,
    SectionKey,
    added_ops,
    annotation,
    collapse_unchanged,
    diff_sections,
    format_node,
    layer_span,
    summary_line,
    tag_of,
    tally,
)
from ..passes.plan import Plan, StreamPlan
from .colours import BLOCK_COLOURS, FINAL_COLOUR, block_colour
from .stream_svg import section_id, svg_after, svg_before


@functools.cache
def _style_sheet() -> str:
    """``diff.css``, a data file of this package."""
    return importlib.resources.files(__package__).joinpath("diff.css").read_text(encoding="utf-8")


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _section_colour(plan: Plan, key: SectionKey) -> str:
    if key is None:
        return "#9aa3ad"
    return block_colour(key[1], len(plan.streams[key[0]].blocks))


def _row_block_class(row: DiffRow, look: DiffLookup) -> str:
    """``blk-N`` for the colour of a created node or removed add; ``blk-final`` for the final read."""
    tag = tag_of(row.after)
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


def _html_row(row: DiffRow, look: DiffLookup) -> str:
    lost, gained = _changed_refs(row)
    block = _row_block_class(row, look)
    note = annotation(row, look)
    left = _cell("before", row.before, row, lost, block if row.status == "removed" else "", note if row.before else "")
    right = _cell("after", row.after, row, gained, block if row.status == "added" else "", note if row.after else "")
    return f'<div class="row {row.status}">{left}{right}</div>'


def _html_section(section: DiffSection, look: DiffLookup, context: int) -> str:
    colour = _section_colour(look.plan, section.key)
    changed = sum(row.changed for row in section.rows)
    parts = [
        f'<section class="sect" id="{section_id(section.key)}" style="--c:{colour}">',
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
        f"{b}: {_e(layer_span(stream, b))}&nbsp;&nbsp;"
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
    counts = tally(rows, plan)
    cards = [
        ("", f"{len(before.graph.nodes)} → {len(after.graph.nodes)}", "nodes before → after"),
        ("removed", f"-{counts['removed']}", f"removed ({counts['residual_adds']} residual adds)"),
        ("added", f"+{counts['added']}", f"added ({added_ops(counts)})"),
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
    look = DiffLookup.build(after, plan)
    num_blocks = max((len(s.blocks) for s in plan.streams), default=0)
    figures = "".join(f'<div class="figs">{svg_before(s)}{svg_after(s)}</div>' for s in plan.streams)
    listing = "".join(_html_section(section, look, context) for section in sections)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{_e(title)}</title>
<style>{_style_sheet()}
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
