"""Recompute the intra-block partials in the backward instead of keeping them.

A merge's backward reads its partial ``p`` (the sum of the block's earlier
branch outputs; see ``reference.merge_backward``), so a training step would
keep one stream-sized tensor per layer after a block's first: beyond the
N + 1 block summaries Block AttnRes keeps by design, about as many again
(6 of the 13 extra tensors of a 6 x 256 GPT in blocks of 2).

Each branch output is one matrix product away from a value the backward
keeps anyway: the input of the branch's last linear, which its weight
gradient needs. :func:`recompute_partials` tags the nodes from that product
to the partial with ``node.meta["recompute"] = MUST_RECOMPUTE`` and an
``ac_graph_id`` of their own, as activation checkpointing tags its regions;
AOTAutograd copies both onto the aten nodes it traces from a node, and its
partitioner recomputes tagged nodes in the backward rather than keep them.
The price is one matrix product per partial in the backward, taken only
where it is no larger than ``[T, d] x [d, d]`` (an attention output
projection; an MLP's down projection, ``[T, 4d] x [4d, d]``, is kept).

A partial is left kept (and counted) when its chain holds anything but a
matrix product, the views, casts, adds and multiplies of the partial sum and
dropouts that drop nothing (``ir.canonical_op`` names them in both IRs): a random op (a dropout that drops) would recompute a different
mask, a collective (a DTensor value, tensor parallelism) would communicate
again, and a branch that is a sum of products (experts) would cost more than
it saves.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Optional

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch.utils._python_dispatch import is_traceable_wrapper_subclass
from torch.utils.checkpoint import CheckpointPolicy

from .checkpoint import new_region_id
from .graph import tensor_value
from .ir import canonical_op, data_inputs, mutated_operand

aten = torch.ops.aten

_MATMULS = {
    torch._C._nn.linear, torch.matmul, operator.matmul, torch.mm, torch.addmm, torch.bmm, "matmul", "__matmul__",
    aten.linear.default, aten.mm.default, aten.addmm.default, aten.matmul.default, aten.bmm.default,
}
"""A branch's last matrix product (a function, or the name of a tensor method): where a recomputed chain starts."""

_PASS_THROUGH = ("add", "mul", "cast")
"""Canonical ops (``ir.canonical_op``) a chain may pass through from the products to the partial: the
partial sum and a bias (add), LayerScale or a residual multiplier (mul), casts, views and dropouts that
drop nothing (cast); cheap, and none of them collective."""

_DROPOUTS = (F.dropout, torch.dropout, aten.dropout.default)

_MERGE = torch.ops.attnres.merge.default


@dataclass(frozen=True)
class RecomputeReport:
    """What :func:`recompute_partials` did: partials recomputed, partials kept and why (``(node, reason)``)."""

    recomputed: tuple[str, ...]
    kept: tuple[tuple[str, str], ...]


def _drops(node: fx.Node) -> bool:
    """A dropout that may drop (``p > 0`` while training): recomputed, it would draw another mask."""
    if node.target not in _DROPOUTS:
        return False
    p = node.kwargs.get("p", node.args[1] if len(node.args) > 1 else 0.5)
    default_training = node.args[2] if len(node.args) > 2 else True
    training = node.kwargs.get("training", node.kwargs.get("train", default_training))
    return not (p == 0 or training is False)


def _is_product(node: fx.Node) -> bool:
    if node.op not in ("call_function", "call_method"):
        return False
    try:
        return node.target in _MATMULS
    except TypeError:  # an unhashable target
        return False


def _costlier_than_kept(product: fx.Node) -> Optional[str]:
    """Why recomputing ``product`` costs too much, or None.

    Recomputing ``[T, k] x [k, n]`` costs ``T k n`` multiply-adds to save ``T n``
    values; it is taken where ``k <= n`` (an attention output projection), not
    for an MLP's down projection (``k = 4 n``), whose product costs several
    times a layer's own norm and read.
    """
    lhs = product.args[1] if product.target in (torch.addmm, aten.addmm.default) else product.args[0]
    lhs_value, out_value = tensor_value(lhs) if isinstance(lhs, fx.Node) else None, tensor_value(product)
    if lhs_value is None or out_value is None:
        return f"{product.name}: the shapes of its product are unknown"
    inner, outer = lhs_value.shape[-1], out_value.shape[-1]
    if not (isinstance(inner, int) and isinstance(outer, int)) or inner > outer:
        return f"{product.name} contracts {inner} features into {outer}: recomputing it costs more than keeping its output"
    return None


def _chain_to_products(partial: fx.Node) -> tuple[Optional[list[fx.Node]], str]:
    """The nodes from the branches' last matrix products to ``partial``, or None and why not."""
    chain: list[fx.Node] = []
    pending, seen = [partial], set()
    while pending:
        node = pending.pop()
        if node in seen:
            continue
        seen.add(node)
        if node.op in ("placeholder", "get_attr"):
            continue  # a parameter or an input: there in the backward without being kept
        if is_traceable_wrapper_subclass(tensor_value(node)):
            return None, f"{node.name} is a tensor subclass (a DTensor): recomputing it could communicate again"
        chain.append(node)
        if _is_product(node):
            if (why := _costlier_than_kept(node)) is not None:
                return None, why
            continue  # its inputs are kept for the weight gradient anyway
        if canonical_op(node) in _PASS_THROUGH and not _drops(node) and mutated_operand(node) is None:
            pending.extend(u for u in data_inputs(node) if tensor_value(u) is not None)
            continue
        return None, f"{node.name} ({getattr(node.target, '__name__', node.target)}) is neither a matrix product nor a view, cast, add or multiply"
    return chain, ""


def recompute_partials(graph: fx.Graph) -> RecomputeReport:
    """Tag every merge's partial for recomputation where its chain allows (see the module docstring).

    A node that already carries a recompute tag (an opened checkpointed region)
    keeps it. Returns which partials were tagged and which are kept.
    """
    recomputed, kept = [], []
    for merge in graph.find_nodes(op="call_function", target=_MERGE):
        partial = merge.args[2]
        if partial is None:
            continue
        chain, why = _chain_to_products(partial)
        if chain is None:
            kept.append((partial.name, why))
            continue
        region = new_region_id()
        for node in chain:
            if "recompute" not in node.meta:
                node.meta["recompute"] = CheckpointPolicy.MUST_RECOMPUTE
                node.meta["ac_graph_id"] = region
        recomputed.append(partial.name)
    return RecomputeReport(tuple(recomputed), tuple(kept))
