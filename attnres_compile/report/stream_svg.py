"""The stream diagrams of the HTML diff (inline SVG): the residual stream before, Block AttnRes after."""

from __future__ import annotations

import html
import math
from dataclasses import dataclass

from ..diff import sources_span
from ..passes.plan import StreamPlan
from .colours import SOURCE0_COLOUR, block_colour, source_colour


def section_id(key) -> str:
    """The anchor of a diff section, which the block bands of the diagram link to."""
    return "prologue" if key is None else f"stream{key[0]}-block{key[1]}"


ROW_H = 24
HEAD_H = 34
LABEL_W = 330


def _svg_text(x: float, y: float, text: str, cls: str = "", anchor: str = "start") -> str:
    return f'<text x="{x:.1f}" y="{y:.1f}" class="{cls}" text-anchor="{anchor}">{html.escape(str(text))}</text>'


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
        f'<a href="#{section_id((stream.index, block))}">'
        f'<rect class="band" data-stream="{stream.index}" data-block="{block}" x="2" y="{top:.1f}" '
        f'width="{width - 4:.1f}" height="{height}" rx="6" style="fill:{colour};stroke:{colour}"/>'
        + _svg_text(width - 8, top + 13, f"block {block}", "bandlbl", "end")
        + "</a>"
    )


def _svg_reads(lanes: _Lanes, cy: float, count: int) -> str:
    """A read edge from the first ``count`` source lanes to the layer box, with a dot on each lane."""
    parts = [f'<line x1="{lanes.xs[0]}" y1="{cy}" x2="{lanes.box_x}" y2="{cy}" class="edge"/>']
    parts += [
        f'<circle cx="{lanes.xs[j]}" cy="{cy}" r="{lanes.dot_r:.1f}" class="dot" style="fill:{source_colour(j)}"/>'
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
        colour = source_colour(j)
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
        + _svg_text(lanes.box_x + 8, final_y + 4, f"final read over {sources_span(n_blocks + 1)} → output", "lbl")
    )
    parts.append("</svg>")
    return "".join(parts)


