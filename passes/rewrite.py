"""Rewrite a planned residual stream into Block AttnRes (design §2–3).

For each stream, in execution order:

* the branch outputs of a block are summed into the intra-block partial ``p``
  instead of onto the stream; a finished block's partial is a new source;
* before each layer, ``h = merge(phase1[j], p)`` (two-phase read) replaces every
  use of the stream value the layer used to read, except its own add;
* after the last layer a final read over all sources replaces every use of the
  last stream value;
* the old adds, now unused, are erased.

The new nodes call the registered ops ``attnres::block_read``, ``attnres::merge``
and ``attnres::read`` and plain aten ops, so the result is valid torch IR and
aten IR alike.
"""

from __future__ import annotations

import operator
from typing import Any, Optional

import torch
import torch.fx as fx

from .ir import tensor_value
from .plan import StreamPlan

aten = torch.ops.aten

REWRITE_META = "attnres"
"""``node.meta[REWRITE_META]`` of every node the rewrite creates: ``{"stream": k,
"block": n, "layer": l}`` (``layer`` is the read's layer index, ``len(layers)`` for
the final read; ``block`` is ``len(blocks)`` for the final read)."""


class _Emitter:
    """Appends nodes one after another at a moving position in the graph."""

    def __init__(self, graph: fx.Graph, after: fx.Node, stream: int):
        self.graph = graph
        self.cursor = after
        self.created: set[fx.Node] = set()
        # Where each new node belongs, for the inspection tools (``node.meta[REWRITE_META]``).
        self.tag: dict[str, Any] = {"stream": stream}

    def move_after(self, node: fx.Node) -> None:
        self.cursor = node

    def call(self, target: Any, *args: Any, **kwargs: Any) -> fx.Node:
        with self.graph.inserting_after(self.cursor):
            node = self.graph.call_function(target, tuple(args), kwargs)
        node.meta[REWRITE_META] = dict(self.tag)
        self.cursor = node
        self.created.add(node)
        return node


def _scale(mode: str, num_sources: int) -> float:
    """``c_l``: the number of sources ("count", exact at zero queries) or 1 ("mean")."""
    return float(num_sources) if mode == "count" else 1.0


def _as_stream_dtype(emit: _Emitter, branch: fx.Node, stream_dtype: Optional[torch.dtype]) -> fx.Node:
    """Cast a branch output to the stream's dtype, as the original add promoted it."""
    value = tensor_value(branch)
    if stream_dtype is None or value is None or value.dtype == stream_dtype:
        return branch
    return emit.call(aten._to_copy.default, branch, dtype=stream_dtype)


def _fold_into_partial(emit, partial, branches, stream_dtype):
    for branch in branches:
        branch = _as_stream_dtype(emit, branch, stream_dtype)
        partial = branch if partial is None else emit.call(aten.add.Tensor, partial, branch)
    return partial


def rewrite_stream(graph: fx.Graph, stream: StreamPlan, queries: fx.Node, scale: str) -> None:
    """Rewrite one stream in place. ``queries`` is a ``[len(layers) + 1, d]`` node."""
    nodes = {n.name: n for n in graph.nodes}
    order = {n: i for i, n in enumerate(graph.nodes)}
    b0 = nodes[stream.source]
    # b_0 may be a graph input that precedes the queries (or other inputs):
    # the first reads go after all of them.
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    first_position = max([b0, queries, *placeholders[-1:]], key=order.__getitem__)
    stream_dtype = getattr(tensor_value(b0), "dtype", None)
    emit = _Emitter(graph, b0, stream.index)
    sources: list[fx.Node] = [b0]
    partial: Optional[fx.Node] = None
    old_adds: list[fx.Node] = []
    for block_index, block in enumerate(stream.blocks):
        phase1 = None
        for j, index in enumerate(block):
            layer = stream.layers[index]
            emit.tag.update(block=block_index, layer=index)
            stream_in = nodes[layer.stream_in]
            emit.move_after(first_position if index == 0 else stream_in)
            if index > 0:
                previous = stream.layers[index - 1]
                partial = _fold_into_partial(emit, partial, [nodes[b] for b in previous.branches], stream_dtype)
            if j == 0:
                if partial is not None:
                    sources.append(partial)
                    partial = None
                rows = emit.call(aten.slice.Tensor, queries, 0, block[0], block[-1] + 1)
                read = emit.call(torch.ops.attnres.block_read.default, list(sources), rows, stream.eps)
                phase1 = (emit.call(operator.getitem, read, 0), emit.call(operator.getitem, read, 1))
            o = emit.call(aten.select.int, phase1[0], 0, j)
            lse = emit.call(aten.select.int, phase1[1], 0, j)
            query = emit.call(aten.select.int, queries, 0, index)
            num_sources = len(sources) + (partial is not None)
            h = emit.call(
                torch.ops.attnres.merge.default, o, lse, partial, query, stream.eps,
                _scale(scale, num_sources),
            )
            own_add = nodes[layer.adds[0]]
            stream_in.replace_all_uses_with(h, delete_user_cb=lambda u: u is not own_add and u not in emit.created)
            old_adds.extend(nodes[a] for a in layer.adds)
    last = stream.layers[-1]
    stream_out = nodes[last.stream_out]
    emit.move_after(stream_out)
    emit.tag.update(block=len(stream.blocks), layer=len(stream.layers))
    partial = _fold_into_partial(emit, partial, [nodes[b] for b in last.branches], stream_dtype)
    sources.append(partial)
    final_query = emit.call(aten.select.int, queries, 0, len(stream.layers))
    final = emit.call(
        torch.ops.attnres.read.default, list(sources), final_query, stream.eps,
        _scale(scale, len(sources)),
    )
    stream_out.replace_all_uses_with(final, delete_user_cb=lambda u: u not in emit.created)
    for add in reversed(old_adds):
        if add.users:
            raise RuntimeError(f"attnres rewrite: old residual add {add.name} still has users {list(add.users)}")
        graph.erase_node(add)
