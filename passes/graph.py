"""Graph utilities the passes and their callers share: values, order, copies, parameters, modules."""

from __future__ import annotations

import copy
import re
from typing import Optional, Sequence

import torch
import torch.fx as fx
from torch import nn


def tensor_value(node: fx.Node) -> Optional[torch.Tensor]:
    """The (fake) tensor a node stands for, from Dynamo's or export's meta."""
    value = node.meta.get("val", node.meta.get("example_value"))
    return value if isinstance(value, torch.Tensor) else None


def value_device(node: Optional[fx.Node]) -> Optional[torch.device]:
    """The device of the tensor ``node`` stands for, from its meta (None if unknown or ``meta``)."""
    value = tensor_value(node) if node is not None else None
    return value.device if value is not None and value.device.type != "meta" else None


def static_int(size) -> Optional[int]:
    """``size`` as an int when it is one, or a SymInt that Dynamo specialized to one."""
    if isinstance(size, int):
        return size
    node = getattr(size, "node", None)
    return node.maybe_as_int() if node is not None and hasattr(node, "maybe_as_int") else None


def topo_index(graph: fx.Graph) -> dict[fx.Node, int]:
    """Position of every node in ``graph`` (the graph's order is a topological order)."""
    return {n: i for i, n in enumerate(graph.nodes)}


def copy_graph(graph: fx.Graph) -> fx.Graph:
    """A copy of ``graph`` with the same node names and (shallow-copied) meta.

    The calling convention (pytree specs of inputs and outputs) is shared, not
    copied, so a ``GraphModule`` built on the copy is called like the original.
    """
    new = fx.Graph(tracer_cls=graph._tracer_cls)
    new._codegen = graph._codegen
    copied = new.graph_copy(graph, {}, return_output_node=True)
    if copied is not None:
        value, old_output = copied
        output = new.output(value, type_expr=getattr(old_output, "type", None))
        output.meta = copy.copy(old_output.meta)
    return new


def parameter_nodes(gm: fx.GraphModule, example_inputs: Sequence, graph: Optional[fx.Graph] = None) -> set[fx.Node]:
    """Nodes of ``graph`` (default ``gm.graph``) that stand for ``nn.Parameter``s.

    Dynamo lifts parameters to placeholders (their example inputs are
    Parameters); an unlifted export module reads them with ``get_attr``.
    """
    graph = gm.graph if graph is None else graph
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    params = {n for n, value in zip(placeholders, example_inputs) if isinstance(value, nn.Parameter)}
    named = dict(gm.named_parameters())
    params |= {n for n in graph.nodes if n.op == "get_attr" and n.target in named}
    return params


# Dynamo names a module by the frame local it was reached from: L['self'], L['model'] ...
_FRAME_LOCAL = re.compile(r"^L\['[^']*'\]\.?")


def module_path(node: fx.Node) -> str:
    """Dotted path of the innermost module a node was traced in, if recorded (``"h.0.attn"``)."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    return _FRAME_LOCAL.sub("", str(path))  # "L['self'].h.0.attn" -> "h.0.attn"
