"""Insert the Block AttnRes reads of a planned residual stream (design §2–3).

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
aten IR alike. Every new node describes itself (:func:`tag_of`), so that the
diff and the depth weights read the rewrite off the graph instead of guessing
it from op names and argument positions. The tag lives in
``node.meta["custom"]``, the metadata ``torch.export`` keeps through
re-export, ``.pt2`` save and load.
"""

from __future__ import annotations

import operator
from typing import Any, Optional

import torch
import torch.fx as fx

from .graph import tensor_value
from .plan import StreamPlan

aten = torch.ops.aten

TAG = "attnres"
"""``node.meta["custom"][TAG]`` of every node the rewrite creates, a dict:

``stream``, ``block``, ``layer``
    where it belongs: ``layer`` is the index of the layer whose read it serves
    (``len(layers)`` for the final read), ``block`` that layer's block
    (``len(blocks)`` for the final read);
``role``
    what it is, one of :data:`ROLES`;
``target``
    the op it calls (``"attnres.merge.default"``), for :func:`tag_of`;
``sources``
    for the three reads: what the read weighs, in source order
    (``"b_0", "b_1", ...``, then ``"partial"`` for a merge that has one). The
    values themselves are the op's arguments: ``sources`` of a ``block_read``
    or ``read``; a merge weighs its block's ``block_read`` sources and its
    ``partial``.
"""

ROLES = {
    "query_rows": "the rows of a block's queries ([S, d]) for its phase-1 read",
    "block_read": "phase 1: a block's queries against its completed sources (o [S, ..., d], lse [S, ...])",
    "block_read_output": "o or lse of a phase-1 read, or one layer's row of it",
    "query": "one layer's query ([d])",
    "merge": "phase 2: a layer's read, phase 1's (o, lse) merged with the intra-block partial",
    "cast": "a branch output cast to the stream's dtype, as the original add promoted it",
    "partial": "the sum of a block's branch outputs so far (a source b_n once the block ends)",
    "read": "the final read over every source, which replaces the stream's last value",
}


def _target_name(target: Any) -> str:
    return str(target) if isinstance(target, torch._ops.OpOverload) else getattr(target, "__name__", str(target))


def tag_of(node: Optional[fx.Node]) -> Optional[dict]:
    """The tag the rewrite gave ``node`` (see :data:`TAG`), or None for a node it did not create.

    A re-export copies a node's ``custom`` meta onto the nodes it traces from
    it (the ``getitem``s of a two-output op): a tag counts only on a node that
    calls what the tagged node called.
    """
    tag = None if node is None else (node.meta.get("custom") or {}).get(TAG)
    if tag is None or tag.get("target") != _target_name(node.target):
        return None
    return tag


class _Emitter:
    """Appends tagged nodes one after another at a moving position in the graph."""

    def __init__(self, graph: fx.Graph, after: fx.Node, stream: int):
        self.graph = graph
        self.cursor = after
        self.created: set[fx.Node] = set()
        self.place: dict[str, int] = {"stream": stream}

    def move_after(self, node: fx.Node) -> None:
        self.cursor = node

    def call(self, role: str, target: Any, *args: Any, describe: Optional[dict] = None, **kwargs: Any) -> fx.Node:
        with self.graph.inserting_after(self.cursor):
            node = self.graph.call_function(target, tuple(args), kwargs)
        node.meta["custom"] = {TAG: {**self.place, "role": role, "target": _target_name(target), **(describe or {})}}
        self.cursor = node
        self.created.add(node)
        return node


def _scale(mode: str, num_sources: int) -> float:
    """``c_l``: the number of sources ("count", exact at zero queries) or 1 ("mean")."""
    return float(num_sources) if mode == "count" else 1.0


def _sources(completed: int, partial: bool = False) -> dict:
    """The ``sources`` of a read's tag: ``b_0 .. b_{completed - 1}``, then the partial."""
    return {"sources": [f"b_{j}" for j in range(completed)] + (["partial"] if partial else [])}


def _as_stream_dtype(emit: _Emitter, branch: fx.Node, stream_dtype: Optional[torch.dtype]) -> fx.Node:
    """Cast a branch output to the stream's dtype, as the original add promoted it."""
    value = tensor_value(branch)
    if stream_dtype is None or value is None or value.dtype == stream_dtype:
        return branch
    return emit.call("cast", aten._to_copy.default, branch, dtype=stream_dtype)


def _fold_into_partial(emit: _Emitter, partial, branches, stream_dtype):
    for branch in branches:
        branch = _as_stream_dtype(emit, branch, stream_dtype)
        partial = branch if partial is None else emit.call("partial", aten.add.Tensor, partial, branch)
    return partial


def insert_reads(graph: fx.Graph, stream: StreamPlan, queries: fx.Node, scale: str) -> None:
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
            emit.place.update(block=block_index, layer=index)
            stream_in = nodes[layer.stream_in]
            emit.move_after(first_position if index == 0 else stream_in)
            if index > 0:
                previous = stream.layers[index - 1]
                partial = _fold_into_partial(emit, partial, [nodes[b] for b in previous.branches], stream_dtype)
            if j == 0:
                if partial is not None:
                    sources.append(partial)
                    partial = None
                rows = emit.call("query_rows", aten.slice.Tensor, queries, 0, block[0], block[-1] + 1)
                read = emit.call(
                    "block_read", torch.ops.attnres.block_read.default, list(sources), rows, stream.eps,
                    describe=_sources(len(sources)),
                )
                phase1 = tuple(emit.call("block_read_output", operator.getitem, read, i) for i in (0, 1))
            o = emit.call("block_read_output", aten.select.int, phase1[0], 0, j)
            lse = emit.call("block_read_output", aten.select.int, phase1[1], 0, j)
            query = emit.call("query", aten.select.int, queries, 0, index)
            num_sources = len(sources) + (partial is not None)
            h = emit.call(
                "merge", torch.ops.attnres.merge.default, o, lse, partial, query, stream.eps,
                _scale(scale, num_sources), describe=_sources(len(sources), partial is not None),
            )
            own_add = nodes[layer.adds[0]]
            stream_in.replace_all_uses_with(h, delete_user_cb=lambda u: u is not own_add and u not in emit.created)
            old_adds.extend(nodes[a] for a in layer.adds)
    last = stream.layers[-1]
    stream_out = nodes[last.stream_out]
    emit.move_after(stream_out)
    emit.place.update(block=len(stream.blocks), layer=len(stream.layers))
    partial = _fold_into_partial(emit, partial, [nodes[b] for b in last.branches], stream_dtype)
    sources.append(partial)
    final_query = emit.call("query", aten.select.int, queries, 0, len(stream.layers))
    final = emit.call(
        "read", torch.ops.attnres.read.default, list(sources), final_query, stream.eps,
        _scale(scale, len(sources)), describe=_sources(len(sources)),
    )
    stream_out.replace_all_uses_with(final, delete_user_cb=lambda u: u not in emit.created)
    for add in reversed(old_adds):
        if add.users:
            raise RuntimeError(f"attnres rewrite: old residual add {add.name} still has users {list(add.users)}")
        graph.erase_node(add)
