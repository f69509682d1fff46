"""Clean-ups that run before planning, on every way in.

``drop_noop_casts``: non-strict ``torch.export`` records ``x.to(x.dtype)`` and
then, because the eager call returns ``x`` itself, uses the cast for *every*
later read of ``x``. In an fp32 Llama each residual add then reads the fp32
copy its RMSNorm made, which cuts the add-to-add chain at every layer. The
cast is an alias of its input, so replacing it by its input changes nothing
but restores the chain. Dynamo's torch IR has no such casts (``x.float()`` is
a ``call_method`` whose later readers keep reading ``x``), so there the pass
finds nothing to do.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from .graph import tensor_value

aten = torch.ops.aten

# ``x.to(dtype)`` overloads that return ``x`` itself when nothing changes.
_ALIASING_CASTS = {aten.to.dtype, aten.to.dtype_layout, aten.to.device, aten.to.other}


def is_noop_cast(node: fx.Node) -> bool:
    """An ``aten.to`` that keeps dtype and device (``to`` never changes the shape): an alias of its input."""
    if node.op != "call_function" or node.target not in _ALIASING_CASTS:
        return False
    if node.kwargs.get("copy", False) or node.kwargs.get("memory_format") not in (None, torch.preserve_format):
        return False
    source = node.args[0] if node.args else None
    if not isinstance(source, fx.Node):
        return False
    before, after = tensor_value(source), tensor_value(node)
    if before is None or after is None:
        return False
    return before.dtype == after.dtype and before.device == after.device


def drop_noop_casts(graph: fx.Graph) -> int:
    """Replace every no-op ``aten.to`` by its input; returns how many went."""
    casts = [n for n in graph.nodes if is_noop_cast(n)]
    for node in casts:
        node.replace_all_uses_with(node.args[0])
        graph.erase_node(node)
    return len(casts)
