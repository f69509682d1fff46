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
body's ``meta["_checkpoint_context_fn"]``) stays closed: its policy chooses op
by op among the aten ops AOTAutograd has yet to trace, which this graph does
not hold, so inlining it would silently turn it into full recompute.
:func:`closed_checkpointed_regions` names such regions, for the plan.
"""

from __future__ import annotations

import operator
from typing import Any, Optional

import torch
import torch.fx as fx

CHECKPOINT_OP = torch.ops.higher_order.tag_activation_checkpoint
_POLICY_KEY = "_checkpoint_context_fn"


def _is_region(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target is CHECKPOINT_OP


def _body(gm: fx.GraphModule, region: fx.Node) -> fx.GraphModule:
    attr = region.args[0]
    if not isinstance(attr, fx.Node) or attr.op != "get_attr":
        raise ValueError(f"{region.name}: the body of a tag_activation_checkpoint is not a get_attr")
    return getattr(gm, attr.target)


def why_closed(gm: fx.GraphModule, region: fx.Node) -> Optional[str]:
    """Why ``region`` cannot be inlined, or None if it can."""
    body = _body(gm, region)
    if _POLICY_KEY in body.meta:
        return (
            "a selectively checkpointed region (checkpoint with context_fn): its policy picks op by op "
            "among aten ops that this graph does not hold yet, so the pass cannot open it without turning it "
            "into full recompute. Checkpoint without context_fn (full AC), or leave the blocks unwrapped"
        )
    return None


def closed_checkpointed_regions(gm: fx.GraphModule) -> list[tuple[str, str]]:
    """``(node name, reason)`` of every checkpointed region left in ``gm``."""
    return [(n.name, why_closed(gm, n) or "not opened") for n in gm.graph.nodes if _is_region(n)]


def _new_region_id() -> int:
    """An ``ac_graph_id`` from the counter AOTAutograd draws its own from, so ids never collide."""
    from torch._higher_order_ops import wrap

    return next(wrap.uid)


def _inline(gm: fx.GraphModule, region: fx.Node) -> None:
    """Replace ``region`` by its body's nodes, each tagged for recompute; its ``getitem``s by the outputs."""
    from torch.utils.checkpoint import CheckpointPolicy

    graph, body = gm.graph, _body(gm, region)
    region_id = _new_region_id()
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
                copy.meta["recompute"] = CheckpointPolicy.PREFER_RECOMPUTE
                copy.meta["ac_graph_id"] = region_id
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
    """Inline every checkpointed region of ``gm`` that can be opened (nested ones too); returns how many."""
    opened = 0
    while regions := [n for n in gm.graph.nodes if _is_region(n) and why_closed(gm, n) is None]:
        for region in regions:
            _inline(gm, region)
            opened += 1
    if opened:
        gm.recompile()
    return opened
