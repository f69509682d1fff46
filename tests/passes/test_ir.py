"""The IR vocabulary: one canonical op for torch IR (Dynamo) and aten IR (export)."""

import operator

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

import attnres_compile  # noqa: F401  (registers torch.ops.attnres.*)
from attnres_compile.passes.graph import tensor_value, topo_index
from attnres_compile.passes.ir import (
    canonical_op,
    data_inputs,
    is_plain_add,
    mutated_operand,
    norm_eps,
    op_arguments,
    scalar_args,
)

aten = torch.ops.aten


def _graph_with(op, target, *args, **kwargs):
    """A graph ``x, y -> target(*args)`` where "x"/"y" in args stand for the two inputs."""
    graph = fx.Graph()
    x, y = graph.placeholder("x"), graph.placeholder("y")
    env = {"x": x, "y": y}
    args = tuple(env.get(a, a) if isinstance(a, str) else a for a in args)
    node = graph.create_node(op, target, args, kwargs)
    graph.output(node)
    return node, x, y


# ---------------------------------------------------------------- canonical_op


@pytest.mark.parametrize(
    "op, target, args, kind",
    [
        # torch IR: operators, torch functions, tensor methods
        ("call_function", operator.add, ("x", "y"), "add"),
        ("call_function", operator.iadd, ("x", "y"), "add"),
        ("call_function", torch.add, ("x", "y"), "add"),
        ("call_method", "add", ("x", "y"), "add"),
        ("call_method", "add_", ("x", "y"), "add"),
        ("call_function", operator.mul, ("x", "y"), "mul"),
        ("call_function", operator.imul, ("x", 2.0), "mul"),
        ("call_function", torch.mul, ("x", "y"), "mul"),
        ("call_method", "mul", ("x", "y"), "mul"),
        ("call_function", F.layer_norm, ("x", (16,), None, None, 1e-5), "norm"),
        ("call_function", torch.layer_norm, ("x", (16,)), "norm"),
        ("call_function", F.rms_norm, ("x", (16,)), "norm"),
        ("call_function", torch.rsqrt, ("x",), "rsqrt"),
        ("call_method", "pow", ("x", 2), "pow"),
        ("call_method", "mean", ("x", -1), "reduce"),
        ("call_method", "float", ("x",), "cast"),
        ("call_method", "type_as", ("x", "y"), "cast"),
        ("call_method", "to", ("x", torch.float32), "cast"),
        ("call_function", F.dropout, ("x",), "cast"),
        ("call_method", "size", ("x",), "meta"),
        ("call_method", "dim", ("x",), "meta"),
        ("call_method", "new_zeros", ("x", (2,)), "meta"),
        ("call_function", torch.zeros_like, ("x",), "meta"),
        ("call_function", getattr, ("x", "shape"), "meta"),
        ("call_function", getattr, ("x", "dtype"), "meta"),
        ("call_function", getattr, ("x", "real"), None),  # attributes that read values are no metadata
        ("call_function", getattr, ("x", "mT"), None),
        ("call_function", operator.getitem, ("x", 0), "getitem"),
        # aten IR
        ("call_function", aten.add.Tensor, ("x", "y"), "add"),
        ("call_function", aten.add_.Tensor, ("x", "y"), "add"),
        ("call_function", aten.mul.Tensor, ("x", "y"), "mul"),
        ("call_function", aten.mul.Scalar, ("x", 2.0), "mul"),
        ("call_function", aten.layer_norm.default, ("x", [16]), "norm"),
        ("call_function", aten.native_layer_norm.default, ("x", [16], None, None, 1e-5), "native_norm"),
        ("call_function", aten.rsqrt.default, ("x",), "rsqrt"),
        ("call_function", aten.mean.dim, ("x", [-1], True), "reduce"),
        ("call_function", aten._to_copy.default, ("x",), "cast"),
        ("call_function", torch.ops.prims.convert_element_type.default, ("x", torch.float32), "cast"),
        ("call_function", aten.sym_size.int, ("x", 0), "meta"),
        ("call_function", aten.zeros_like.default, ("x",), "meta"),
        # unknown ops have no kind
        ("call_function", torch.relu, ("x",), None),
        ("call_function", aten.mm.default, ("x", "y"), None),
        ("call_module", "lin", ("x",), None),
    ],
)
def test_canonical_op(op, target, args, kind):
    node, _, _ = _graph_with(op, target, *args)
    assert canonical_op(node) == kind


def test_canonical_op_of_placeholders_and_outputs_is_none():
    node, x, _ = _graph_with("call_function", operator.add, "x", "y")
    assert canonical_op(x) is None
    assert canonical_op(next(iter(node.users))) is None  # the output node


def test_aten_type_as_is_a_cast_that_reads_only_its_first_argument():
    node, x, y = _graph_with("call_function", aten.type_as.default, "x", "y")
    assert canonical_op(node) == "cast"
    assert data_inputs(node) == [x]


# ---------------------------------------------------------------- canonical_op on real graphs


class _Block(nn.Module):
    def __init__(self, d=16):
        super().__init__()
        self.norm, self.lin = nn.LayerNorm(d), nn.Linear(d, d)

    def forward(self, x):
        return x + 0.5 * self.lin(self.norm(x))


def test_canonical_op_on_a_dynamo_graph():
    graphs = []
    torch.compile(_Block(), backend=lambda gm, ex: (graphs.append(gm), gm.forward)[1])(torch.randn(2, 3, 16))
    kinds = [canonical_op(n) for n in graphs[0].graph.nodes if n.op == "call_function"]
    assert kinds == ["norm", None, "mul", "add"]  # layer_norm, linear, 0.5 *, x +


def test_canonical_op_on_an_export_graph():
    ep = torch.export.export(_Block(), (torch.randn(2, 3, 16),)).run_decompositions({})
    kinds = {n.target: canonical_op(n) for n in ep.graph.nodes if n.op == "call_function"}
    assert kinds[aten.add.Tensor] == "add"
    assert kinds[aten.mul.Tensor] == "mul"
    assert kinds[aten.layer_norm.default] == "norm"


# ---------------------------------------------------------------- data_inputs


def test_data_inputs_ignores_metadata_reads():
    graph = fx.Graph()
    x, y = graph.placeholder("x"), graph.placeholder("y")
    size = graph.call_method("size", (x,))
    zeros = graph.call_function(torch.zeros_like, (x,))
    new = graph.call_method("new_zeros", (x, (2,)))
    shape = graph.call_function(getattr, (x, "shape"))
    sym = graph.call_function(aten.sym_size.int, (x, 0))
    type_as = graph.call_method("type_as", (y, x))
    to_other = graph.call_method("to", (y, x))
    to_dtype = graph.call_method("to", (y, torch.float16))
    view = graph.call_method("view", (y, size))
    add = graph.call_function(operator.add, (x, y))
    graph.output((size, zeros, new, shape, sym, type_as, to_other, to_dtype, view, add))
    for meta in (size, zeros, new, shape, sym):
        assert data_inputs(meta) == []
    assert data_inputs(type_as) == [y]  # reads x's dtype only
    assert data_inputs(to_other) == [y]
    assert data_inputs(to_dtype) == [y]
    assert set(data_inputs(view)) == {y, size}  # the size node is itself value-free
    assert data_inputs(add) == [x, y]


def test_data_inputs_of_a_dynamo_rmsnorm_excludes_the_type_as_dtype_read():
    def rms(x, w):
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
        return w * h.type_as(x)

    graphs = []
    torch.compile(rms, backend=lambda gm, ex: (graphs.append(gm), gm.forward)[1])(torch.randn(2, 16), torch.ones(16))
    graph = graphs[0].graph
    x = next(n for n in graph.nodes if n.op == "placeholder" and "x" in n.name)
    type_as = next(n for n in graph.nodes if n.target == "type_as")
    assert x in type_as.all_input_nodes and x not in data_inputs(type_as)
    readers = [n for n in x.users if x in data_inputs(n)]
    assert [n.target for n in readers] == ["float"]  # the one value read of x


# ---------------------------------------------------------------- small helpers


@pytest.mark.parametrize(
    "target, args, kwargs, plain",
    [
        (operator.add, ("x", "y"), {}, True),
        (operator.iadd, ("x", "y"), {}, True),
        (aten.add.Tensor, ("x", "y"), {}, True),
        (torch.add, ("x", "y"), {"alpha": 2}, False),
        (aten.add.Tensor, ("x", "y"), {"alpha": 2}, False),
        (torch.add, ("x", "y", 2), {}, False),  # positional alpha  (hypothetical call form)
        (operator.add, ("x", 1e-6), {}, False),  # + eps is not a two-tensor add
        (operator.mul, ("x", "y"), {}, False),
    ],
)
def test_is_plain_add(target, args, kwargs, plain):
    node, _, _ = _graph_with("call_function", target, *args, **kwargs)
    assert is_plain_add(node) is plain


@pytest.mark.parametrize(
    "target, args, kwargs, eps",
    [
        (F.layer_norm, ("x", (16,), None, None, 1e-5), {}, 1e-5),
        (F.layer_norm, ("x", (16,)), {"eps": 3e-4}, 3e-4),
        (F.layer_norm, ("x", (16,)), {}, None),  # default eps not spelled out in the call
        (F.rms_norm, ("x", (16,), None, 1e-6), {}, 1e-6),
        (aten.native_layer_norm.default, ("x", [16], None, None, 2e-5), {}, 2e-5),
        (aten.layer_norm.default, ("x", [16], None, None, 1e-5), {}, 1e-5),
        (operator.add, ("x", 1e-6), {}, None),  # an eps add is not a norm call
    ],
)
def test_norm_eps(target, args, kwargs, eps):
    node, _, _ = _graph_with("call_function", target, *args, **kwargs)
    assert norm_eps(node) == (pytest.approx(eps) if eps is not None else None)


def test_scalar_args():
    node, x, y = _graph_with("call_function", operator.add, "x", 1e-6)
    assert scalar_args(node) == [1e-6]
    graph = fx.Graph()
    a, b = graph.placeholder("a"), graph.placeholder("b")
    cat = graph.call_function(torch.cat, ([a, b], 0))
    assert scalar_args(cat) == [0]
    assert scalar_args(graph.call_function(operator.mul, (a, True))) == []  # bools are flags


def test_tensor_value_reads_dynamo_and_export_meta():
    graph = fx.Graph()
    a, b, c = graph.placeholder("a"), graph.placeholder("b"), graph.placeholder("c")
    a.meta["example_value"] = torch.zeros(2)
    b.meta["val"] = torch.ones(3)
    c.meta["val"] = 5  # a SymInt-like, not a tensor
    assert tensor_value(a).shape == (2,) and tensor_value(b).shape == (3,)
    assert tensor_value(c) is None


def test_topo_index_follows_the_graph_order():
    graph = fx.Graph()
    x = graph.placeholder("x")
    late = graph.call_function(torch.relu, (x,))
    with graph.inserting_before(late):
        early = graph.call_function(torch.neg, (x,))
    graph.output((late, early))
    order = topo_index(graph)
    assert order[x] < order[early] < order[late]


def test_op_arguments_names_the_arguments_by_the_schema():
    graph = fx.Graph()
    o, lse, query = graph.placeholder("o"), graph.placeholder("lse"), graph.placeholder("query")
    merge = graph.call_function(torch.ops.attnres.merge.default, (o, lse, None, query), {"eps": 1e-6, "scale": 2.0})
    assert op_arguments(merge) == {"o": o, "lse": lse, "partial": None, "query": query, "eps": 1e-6, "scale": 2.0}


# ---------------------------------------------------------------- mutated_operand


@pytest.mark.parametrize(
    "op, target, args, writes",
    [
        ("call_method", "add_", ("x", "y"), True),
        ("call_function", operator.iadd, ("x", "y"), True),
        ("call_function", aten.mul_.Tensor, ("x", "y"), True),
        ("call_method", "add", ("x", "y"), False),
        # autograd flags, not values: Hugging Face's inputs_embeds.requires_grad_() under gradient checkpointing
        ("call_method", "requires_grad_", ("x",), False),
    ],
)
def test_mutated_operand_is_a_write_to_values_only(op, target, args, writes):
    node, x, _ = _graph_with(op, target, *args)
    x.meta["val"] = torch.zeros(2)
    assert mutated_operand(node) is (x if writes else None)
