"""The graph diff as text: a unified-diff-like listing, one section per stream and block."""

from __future__ import annotations

from typing import Iterator

import torch.fx as fx

from ..diff import CONTEXT, Collapsed, DiffLookup, DiffRow, annotation, collapse_unchanged, diff_sections, format_node, summary_line
from ..passes.plan import Plan

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
    look = DiffLookup.build(after, plan)
    lines = [f"# attnres rewrite: {summary_line(before, after, plan, rows)}"]
    lines += [f"# {line}" for line in plan.summary().splitlines()]
    for section in sections:
        lines.append("")
        lines.append(f"## {section.title}")
        for item in collapse_unchanged(section.rows, context):
            if isinstance(item, Collapsed):
                lines.append(f"  … {len(item.rows)} unchanged nodes …")
            else:
                lines.extend(_text_row_lines(item, annotation(item, look)))
    return "\n".join(lines) + "\n"


