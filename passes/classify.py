"""What a residual branch computes, for the plan report: attention, MLP or MoE.

Read off the ops inside the branch, never off module or model names: a branch
that holds a softmax or a fused attention kernel is attention; one that routes
tokens with ``topk`` is a mixture of experts; any other weighted branch is an MLP.
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.fx as fx

ATTENTION = "attention"
MLP = "mlp"
MOE = "moe"

# Substrings of op names (torch IR and aten IR alike).
_ATTENTION_OPS = ("softmax", "scaled_dot_product", "flash_attention", "efficient_attention", "flex_attention")
_ROUTING_OPS = ("topk",)


def op_name(node: fx.Node) -> str:
    """The bare name of the op a node calls (``"softmax"``, ``"_softmax"``, ``"topk"`` ...)."""
    if node.op == "call_method":
        return str(node.target)
    if node.op == "call_function":
        target = node.target
        if isinstance(target, torch._ops.OpOverload):
            return target._opname  # aten.topk.default -> topk
        return getattr(target, "__name__", None) or str(target)
    return ""


def branch_kind(region: Iterable[fx.Node]) -> str:
    """``"attention"``, ``"moe"`` or ``"mlp"`` for the nodes of one branch."""
    names = [op_name(node) for node in region]
    # Routing first: a MoE router normalizes its logits with a softmax too.
    if any(op in name for name in names for op in _ROUTING_OPS):
        return MOE
    if any(op in name for name in names for op in _ATTENTION_OPS):
        return ATTENTION
    return MLP
