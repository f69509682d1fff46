"""One vocabulary for the two graph dialects the passes read.

Dynamo hands a backend *torch IR* (``operator.add``, ``torch.rsqrt``,
``call_method 'pow'``, ``F.layer_norm`` ...); ``torch.export`` produces *aten IR*
(``aten.add.Tensor``, ``aten.rsqrt.default`` ...). The detector never looks at a
target directly: it asks :func:`canonical_op` for a canonical name, so one matcher
serves both dialects.
"""

from __future__ import annotations

import operator
from typing import Any, Optional

import torch
import torch.fx as fx
import torch.nn.functional as F

from .graph import tensor_value

aten = torch.ops.aten

# call_method names and plain callables, by canonical op.
_METHOD_OPS: dict[str, str] = {
    "add": "add", "add_": "add", "__add__": "add", "__iadd__": "add", "__radd__": "add",
    "sub": "sub", "sub_": "sub", "__sub__": "sub",
    "mul": "mul", "mul_": "mul", "__mul__": "mul", "__rmul__": "mul",
    "div": "div", "div_": "div", "__truediv__": "div",
    "pow": "pow", "pow_": "pow", "__pow__": "pow",
    "rsqrt": "rsqrt", "rsqrt_": "rsqrt", "sqrt": "sqrt", "reciprocal": "reciprocal",
    "neg": "neg", "__neg__": "neg",
    "mean": "reduce", "sum": "reduce", "amax": "reduce", "norm": "reduce",
    "var": "var", "std": "std",
    "to": "cast", "float": "cast", "half": "cast", "bfloat16": "cast", "double": "cast",
    "type": "cast", "type_as": "cast", "contiguous": "cast", "clone": "cast",
    "view": "cast", "reshape": "cast",
    "size": "meta", "dim": "meta", "numel": "meta", "stride": "meta",
    "new_zeros": "meta", "new_ones": "meta", "new_empty": "meta", "new_full": "meta",
    "new_tensor": "meta",
}

_FUNCTION_OPS: dict[Any, str] = {
    operator.add: "add", operator.iadd: "add", torch.add: "add",
    operator.sub: "sub", operator.isub: "sub", torch.sub: "sub",
    operator.mul: "mul", operator.imul: "mul", torch.mul: "mul",
    operator.truediv: "div", operator.itruediv: "div", torch.div: "div",
    operator.pow: "pow", torch.pow: "pow",
    operator.neg: "neg", torch.neg: "neg",
    torch.rsqrt: "rsqrt", torch.sqrt: "sqrt", torch.reciprocal: "reciprocal",
    torch.mean: "reduce", torch.sum: "reduce", torch.amax: "reduce", torch.norm: "reduce",
    torch.linalg.vector_norm: "reduce",
    torch.var: "var", torch.std: "std", torch.var_mean: "var_mean",
    F.layer_norm: "norm", F.rms_norm: "norm", F.group_norm: "norm", F.normalize: "norm",
    torch.layer_norm: "norm", torch.rms_norm: "norm",
    F.dropout: "cast", torch.dropout: "cast", torch.clone: "cast",
    torch.reshape: "cast",
    torch.zeros_like: "meta", torch.ones_like: "meta", torch.empty_like: "meta",
    torch.full_like: "meta", torch.randn_like: "meta", torch.rand_like: "meta",
    torch.numel: "meta",
    operator.getitem: "getitem",
}


def _aten_ops() -> dict[Any, str]:
    table = {
        "add": ["add.Tensor", "add_.Tensor"],
        "sub": ["sub.Tensor"],
        "mul": ["mul.Tensor", "mul.Scalar", "mul_.Tensor"],
        "div": ["div.Tensor", "div.Scalar"],
        "pow": ["pow.Tensor_Scalar"],
        "neg": ["neg.default"],
        "rsqrt": ["rsqrt.default"],
        "sqrt": ["sqrt.default"],
        "reciprocal": ["reciprocal.default"],
        "reduce": ["mean.dim", "mean.default", "sum.dim_IntList", "amax.default",
                   "linalg_vector_norm.default"],
        "var": ["var.correction", "var.dim"],
        "std": ["std.correction"],
        "var_mean": ["var_mean.correction"],
        "norm": ["layer_norm.default", "rms_norm.default", "group_norm.default"],
        "native_norm": ["native_layer_norm.default"],
        "cast": ["_to_copy.default", "to.dtype", "to.dtype_layout", "to.other", "type_as.default",
                 "clone.default", "view.default", "reshape.default", "_unsafe_view.default",
                 "dropout.default", "alias.default", "contiguous.default", "detach.default",
                 "_assert_tensor_metadata.default", "t.default", "permute.default",
                 "transpose.int", "expand.default", "unsqueeze.default", "squeeze.dim"],
        "native_dropout": ["native_dropout.default"],
        "meta": ["sym_size.int", "sym_numel.default", "sym_stride.int", "zeros_like.default",
                 "ones_like.default", "empty_like.default", "full_like.default",
                 "new_zeros.default", "new_ones.default", "new_empty.default"],
    }
    ops: dict[Any, str] = {}
    for canonical, names in table.items():
        for name in names:
            packet, _, overload = name.partition(".")
            op = getattr(aten, packet, None)
            if op is not None and hasattr(op, overload):
                ops[getattr(op, overload)] = canonical
    ops[torch.ops.prims.convert_element_type.default] = "cast"
    return ops


_FUNCTION_OPS.update(_aten_ops())


_METADATA_ATTRIBUTES = frozenset({
    "shape", "dtype", "device", "ndim", "layout", "is_cuda", "is_sparse", "is_quantized", "is_meta",
    "requires_grad", "names",
})


def canonical_op(node: fx.Node) -> Optional[str]:
    """The canonical op ``node`` computes (``"add"``, ``"mul"``, ``"norm"`` ...) or None.

    ``getattr(x, "shape")``-style calls and ``.size()`` are ``"meta"``: they read
    only a tensor's metadata, which the rewrite never changes.
    """
    if node.op == "call_method":
        return _METHOD_OPS.get(node.target)
    if node.op == "call_function":
        if node.target is getattr:
            # x.shape / x.dtype read metadata; x.real, x.T, x.mT ... read the values.
            return "meta" if node.args[1:2] and node.args[1] in _METADATA_ATTRIBUTES else None
        try:
            return _FUNCTION_OPS.get(node.target)
        except TypeError:  # unhashable target
            return None
    return None


# Casts whose later tensor arguments only lend their dtype: x.type_as(y), x.to(y).
_READS_FIRST_ARG_ONLY = {"type_as", "to", aten.type_as.default, aten.to.other}


def data_inputs(node: fx.Node) -> list[fx.Node]:
    """The nodes whose *values* ``node`` reads (metadata reads excluded).

    ``x.type_as(y)`` reads y's dtype only; ``x.to(y)`` likewise; ``torch.zeros_like``
    and ``.size()`` read no values at all.
    """
    op = canonical_op(node)
    if op == "meta":
        return []
    if op == "cast" and node.target in _READS_FIRST_ARG_ONLY:
        first = node.args[0] if node.args else None
        return [first] if isinstance(first, fx.Node) else []
    return list(node.all_input_nodes)


def scalar_args(node: fx.Node) -> list[float]:
    """Python numbers among ``node``'s positional arguments."""
    return [a for a in node.args if isinstance(a, (int, float)) and not isinstance(a, bool)]



def is_plain_add(node: fx.Node) -> bool:
    """A two-tensor add with unit ``alpha`` (``x + y``, ``x += y``, ``aten.add``)."""
    if canonical_op(node) != "add":
        return False
    if node.kwargs.get("alpha", 1) != 1 or len(node.args) < 2:
        return False
    if len(node.args) > 2 and node.op == "call_function" and node.target is torch.add:
        return False  # torch.add(x, y, alpha) positional
    a, b = node.args[0], node.args[1]
    return isinstance(a, fx.Node) and isinstance(b, fx.Node)


_INPLACE_FUNCTIONS = {operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ipow}
# Trailing-underscore methods that change a tensor's autograd flags, not its values (Hugging Face calls
# ``inputs_embeds.requires_grad_()`` under gradient checkpointing).
_FLAG_METHODS = {"requires_grad_"}


def mutated_operand(node: fx.Node) -> Optional[fx.Node]:
    """The tensor ``node`` writes into in place (``x += y``, ``x.mul_(2)``, ``aten.add_``), or None."""
    first = node.args[0] if node.args else None
    if not isinstance(first, fx.Node) or tensor_value(first) is None:
        return None  # a SymInt ``n += 1`` mutates nothing
    if node.op == "call_method":
        name = str(node.target)
        writes = name.endswith("_") and not name.startswith("_") and name not in _FLAG_METHODS
        return first if writes else None
    if node.op != "call_function":
        return None
    if node.target in _INPLACE_FUNCTIONS:
        return first
    schema = getattr(node.target, "_schema", None)
    if schema is not None and schema.arguments:
        alias = schema.arguments[0].alias_info
        return first if alias is not None and alias.is_write else None
    return None


_EPS_POSITION: dict[Any, int] = {
    F.layer_norm: 4, torch.layer_norm: 4, aten.layer_norm.default: 4,
    aten.native_layer_norm.default: 4, F.group_norm: 4,
    F.rms_norm: 3, torch.rms_norm: 3,
}
if hasattr(aten, "rms_norm"):
    _EPS_POSITION[aten.rms_norm.default] = 3


def norm_eps(node: fx.Node) -> Optional[float]:
    """The eps a norm node was called with, when the call names one."""
    if node.op != "call_function" or node.target not in _EPS_POSITION:
        return None
    position = _EPS_POSITION[node.target]
    eps = node.kwargs.get("eps", node.args[position] if len(node.args) > position else None)
    return float(eps) if isinstance(eps, (int, float)) and not isinstance(eps, bool) else None



def is_attnres_op(node: fx.Node) -> bool:
    """A call of one of this project's ops (``torch.ops.attnres.*``)."""
    return node.op == "call_function" and getattr(node.target, "namespace", None) == "attnres"



def op_arguments(node: fx.Node) -> dict[str, Any]:
    """The arguments of a call to an op overload, by the names its schema gives them.

    ``attnres::merge(o, lse, partial, query, eps, scale)`` called as ``merge(a, b, None, q, 1e-6, 2.0)``
    gives ``{"o": a, "lse": b, "partial": None, "query": q, "eps": 1e-6, "scale": 2.0}``.
    """
    schema = node.target._schema
    named = dict(zip((a.name for a in schema.arguments), node.args))
    named.update(node.kwargs)
    return named
