"""Open activation-checkpointed regions, so that the stream inside them can be found.

Under Dynamo, ``torch.utils.checkpoint.checkpoint(fn, ..., use_reentrant=False)``
(also what ``checkpoint_wrapper`` and Hugging Face's non-reentrant
``gradient_checkpointing_enable`` call) is one node of the higher-order op
``tag_activation_checkpoint``; its first argument names a submodule, the
*body*, which holds the layer and its residual adds. The detector, which reads
one flat graph, would see a block as an opaque call.

:func:`open_checkpointed_regions` inlines each body into the graph and tags
every node it copies as AOTAutograd tags it when it traces the op itself
(``torch._higher_order_ops.wrap.tag_activation_checkpoint_impl``):
``node.meta["recompute"] = PREFER_RECOMPUTE`` and one ``ac_graph_id`` per
region. AOTAutograd copies both fields onto the aten nodes it traces from a
node (``torch.fx.proxy._COPY_META_FIELDS``) and its partitioner recomputes
tagged nodes in the backward, so what AC recomputed is still recomputed. The
nodes the rewrite adds later (the reads, the partial sums) carry no tag: the
partitioner keeps what their backward needs, like the inputs of a checkpointed
region (see README, "Training recipes").

A region with a selective policy (``context_fn``, stored by Dynamo in the
body's ``meta["_checkpoint_context_fn"]``; e.g.
``create_selective_checkpoint_contexts(policy)``) cannot be tagged here: its
policy chooses op by op among the aten ops AOTAutograd has yet to trace. Its
nodes are inlined with the region's id in ``meta["attnres_selective_region"]``
instead, so the detector sees its residual adds, and
:func:`close_selective_regions` closes them again after the rewrite: the
region's nodes that remain (the layers' branches; the rewrite replaced its
residual adds) become new ``tag_activation_checkpoint`` calls whose bodies
carry the same ``context_fn``, one per convex piece (a read between two
branches of a block is outside both, so one block gives one region per
branch). AOTAutograd then applies the policy to every aten op of those
bodies, exactly as it would have in the original region.
"""

from __future__ import annotations

import operator
from typing import Any, Optional

import torch
import torch.fx as fx

from .graph import topo_index

CHECKPOINT_OP = torch.ops.higher_order.tag_activation_checkpoint
_POLICY_KEY = "_checkpoint_context_fn"
SELECTIVE_KEY = "attnres_selective_region"
"""Node meta: the id of the selectively checkpointed region the node was inlined from."""
_SELECTIVE_REGIONS_KEY = "attnres_selective_regions"
"""GraphModule meta: ``{region id: (context_fn, the region call's kwargs)}``."""
_BODY_PREFIX = "attnres_selective_body_"


def _is_region(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target is CHECKPOINT_OP


def _body(gm: fx.GraphModule, region: fx.Node) -> fx.GraphModule:
    return getattr(gm, region.args[0].target)


def why_closed(gm: fx.GraphModule, region: fx.Node) -> Optional[str]:
    """Why ``region`` cannot be inlined, or None if it can."""
    attr = region.args[0]
    if not isinstance(attr, fx.Node) or attr.op != "get_attr":
        return "a checkpointed region whose body is not a submodule of the graph"
    return None


def closed_checkpointed_regions(gm: fx.GraphModule) -> list[tuple[str, str]]:
    """``(node name, reason)`` of every checkpointed region left in ``gm``."""
    return [(n.name, why_closed(gm, n) or "not opened") for n in gm.graph.nodes if _is_region(n)]


def new_region_id() -> int:
    """An ``ac_graph_id`` from the counter AOTAutograd draws its own from, so ids never collide."""
    from torch._higher_order_ops import wrap

    return next(wrap.uid)


def _region_tags(gm: fx.GraphModule, region: fx.Node) -> dict[str, Any]:
    """The meta every node inlined from ``region`` gets: a recompute tag, or for a selective region its id."""
    from torch.utils.checkpoint import CheckpointPolicy

    region_id = new_region_id()
    context_fn = _body(gm, region).meta.get(_POLICY_KEY)
    if context_fn is None:
        return {"recompute": CheckpointPolicy.PREFER_RECOMPUTE, "ac_graph_id": region_id}
    gm.meta.setdefault(_SELECTIVE_REGIONS_KEY, {})[region_id] = (context_fn, dict(region.kwargs))
    return {SELECTIVE_KEY: region_id}


def _inline(gm: fx.GraphModule, region: fx.Node) -> None:
    """Replace ``region`` by its body's nodes, each tagged (:func:`_region_tags`); its ``getitem``s by the outputs."""
    graph, body = gm.graph, _body(gm, region)
    tags = _region_tags(gm, region)
    operands = list(region.args[1:])
    env: dict[fx.Node, Any] = {}
    outputs: Any = None
    with graph.inserting_before(region):
        for node in body.graph.nodes:
            if node.op == "placeholder":
                env[node] = operands.pop(0)
            elif node.op == "output":
                outputs = fx.node.map_arg(node.args[0], env.__getitem__)
            elif node.op == "get_attr":
                # A constant or a nested body: move it onto the outer module under a fresh name.
                name = f"{region.name}_{node.target.replace('.', '_')}"
                setattr(gm, name, getattr(body, node.target))
                env[node] = graph.get_attr(name)
                env[node].meta = dict(node.meta)
            else:
                copy = graph.node_copy(node, env.__getitem__)
                copy.meta.update(tags)
                env[node] = copy
    for user in list(region.users):
        if user.op == "call_function" and user.target is operator.getitem:
            user.replace_all_uses_with(outputs[user.args[1]])
            graph.erase_node(user)
    if region.users:
        raise RuntimeError(f"{region.name}: a checkpointed region's output is used other than by indexing")
    attr = region.args[0]
    graph.erase_node(region)
    if not attr.users:
        graph.erase_node(attr)
        if not any(n.op == "get_attr" and n.target == attr.target for n in graph.nodes):
            delattr(gm, attr.target)


def open_checkpointed_regions(gm: fx.GraphModule) -> int:
    """Inline every checkpointed region of ``gm`` that can be opened (nested ones too); returns how many.

    Selective regions among them must be closed again (:func:`close_selective_regions`) before the
    graph runs.
    """
    opened = 0
    while regions := [n for n in gm.graph.nodes if _is_region(n) and why_closed(gm, n) is None]:
        for region in regions:
            _inline(gm, region)
            opened += 1
    if opened:
        gm.recompile()
    return opened


def selective_regions_opened(gm: fx.GraphModule) -> int:
    """How many selectively checkpointed regions :func:`open_checkpointed_regions` opened in ``gm``."""
    return len(gm.meta.get(_SELECTIVE_REGIONS_KEY, {}))


def _convex_pieces(gm: fx.GraphModule, region_id: int) -> list[list[fx.Node]]:
    """The live nodes inlined from one selective region, cut into convex pieces (topological order each).

    A piece is convex when no path leaves it and comes back: the rewrite's reads sit between a
    block's branches, so the branches of one region become separate pieces.
    """
    from torch.fx.passes.infra.partitioner import CapabilityBasedPartitioner
    from torch.fx.passes.operator_support import create_op_support
    from torch.fx.passes.utils.fuser_utils import topo_sort

    support = create_op_support(lambda _modules, node: node.meta.get(SELECTIVE_KEY) == region_id)
    partitioner = CapabilityBasedPartitioner(gm, support, allows_single_node_partition=True)
    return [topo_sort(list(p.nodes)) for p in partitioner.propose_partitions()]


def _as_region_call(gm: fx.GraphModule, call: fx.Node, context_fn: Any, kwargs: dict) -> None:
    """Turn ``call`` (``call_module`` of a fused body) into ``tag_activation_checkpoint(body, *args)``."""
    body = gm.get_submodule(call.target)
    body.meta[_POLICY_KEY] = context_fn
    with gm.graph.inserting_before(call):
        region = gm.graph.call_function(CHECKPOINT_OP, (gm.graph.get_attr(call.target), *call.args), dict(kwargs))
    region.meta = dict(call.meta)
    call.replace_all_uses_with(region)
    gm.graph.erase_node(call)


def _sort_in_place(graph: fx.Graph) -> None:
    """Order ``graph`` topologically, keeping the present order where data allows, moving nodes in place.

    (``torch.fx.passes.tools_common.stable_topological_sort`` builds new nodes, which loses the
    attributes Dynamo sets on placeholders.)
    """
    import heapq

    position = topo_index(graph)
    waiting = {node: len(node.all_input_nodes) for node in graph.nodes}
    ready = [(position[n], n.name, n) for n, count in waiting.items() if count == 0]
    heapq.heapify(ready)
    previous = None
    while ready:
        _, _, node = heapq.heappop(ready)
        if previous is not None:
            previous.append(node)
        previous = node
        for user in node.users:
            waiting[user] -= 1
            if waiting[user] == 0:
                heapq.heappush(ready, (position[user], user.name, user))


def _fuse(gm: fx.GraphModule, piece: list[fx.Node], name: str) -> fx.Node:
    """Move ``piece`` (convex, topological) into a submodule ``name``; returns its ``call_module``."""
    from torch.fx.passes.utils.fuser_utils import erase_nodes, fuse_as_graphmodule, insert_subgm

    body, inputs, outputs = fuse_as_graphmodule(gm, piece, name, dict.fromkeys(piece), always_return_tuple=True)
    insert_subgm(gm, body, inputs, outputs, piece[-1])
    call = piece[-1].next
    erase_nodes(gm, piece)
    return call


def close_selective_regions(gm: fx.GraphModule) -> int:
    """Wrap what remains of each opened selective region back into checkpoint calls with its policy.

    Returns the number of regions formed. Nodes of a region that nothing uses any more (the
    residual adds the rewrite replaced) are dropped first.
    """
    regions = gm.meta.pop(_SELECTIVE_REGIONS_KEY, {})
    if not regions:
        return 0
    gm.graph.eliminate_dead_code()
    formed = 0
    for region_id, (context_fn, kwargs) in regions.items():
        for piece in _convex_pieces(gm, region_id):
            call = _fuse(gm, piece, f"{_BODY_PREFIX}{formed}")
            _as_region_call(gm, call, context_fn, kwargs)
            formed += 1
    _sort_in_place(gm.graph)  # a piece's call sits after its last node: users in between move down
    for node in gm.graph.nodes:
        node.meta.pop(SELECTIVE_KEY, None)
    gm.graph.lint()
    gm.recompile()
    return formed
