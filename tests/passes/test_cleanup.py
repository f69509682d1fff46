"""Clean-ups before planning: a no-op ``aten.to`` is an alias of its input and goes."""

import torch
import torch.fx as fx

from attnres_compile.passes.cleanup import drop_noop_casts, is_noop_cast
from attnres_compile.passes.pipeline import graph_to_plan

aten = torch.ops.aten


def _graph_with_casts():
    """x (fp32) -> to(fp32) [no-op], to(bf16) [a real cast], both read by an add."""
    graph = fx.Graph()
    x = graph.placeholder("x")
    x.meta["val"] = torch.zeros(2, 3)
    same = graph.call_function(aten.to.dtype, (x, torch.float32))
    same.meta["val"] = torch.zeros(2, 3)
    other = graph.call_function(aten.to.dtype, (x, torch.bfloat16))
    other.meta["val"] = torch.zeros(2, 3, dtype=torch.bfloat16)
    out = graph.call_function(aten.add.Tensor, (same, other))
    graph.output(out)
    return graph, x, same, other, out


def test_only_the_cast_that_changes_nothing_is_dropped():
    graph, x, same, other, out = _graph_with_casts()
    assert is_noop_cast(same) and not is_noop_cast(other)
    assert drop_noop_casts(graph) == 1
    assert out.args == (x, other) and same not in graph.nodes


def test_a_copying_cast_is_kept():
    graph, x, same, *_ = _graph_with_casts()
    same.kwargs = {"copy": True}
    assert not is_noop_cast(same) and drop_noop_casts(graph) == 0


def test_the_graph_to_plan_is_a_cleaned_copy_only_when_there_is_something_to_clean():
    graph, _, same, _, _ = _graph_with_casts()
    planned = graph_to_plan(graph)
    assert planned is not graph and same in graph.nodes  # the caller's graph stays as it is
    assert [n.name for n in planned.nodes] == [n.name for n in graph.nodes if n is not same]
    drop_noop_casts(graph)
    assert graph_to_plan(graph) is graph
