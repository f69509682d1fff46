"""The learned queries on the user's model, and how they reach the compiled graph.

``prepare`` registers the queries as parameters of the model, records them in
an :class:`AttnResQueries` (``model.attnres``) and installs an
:class:`AttnResForward` that passes the model's first tensor input through
``attnres::bind_queries(x, queries, spec)``. Dynamo traces that call, so the
query parameters arrive at the backend as graph inputs; the pipeline reads the
queries, the config and the layout ``prepare`` traced off the node
(:func:`read_query_marker`) and removes it (:func:`strip_query_marker`).
"""

from __future__ import annotations

import contextlib
import contextvars
import inspect
import json
import logging
import sys
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.fx as fx
from torch import Tensor, nn
from torch._subclasses.fake_tensor import FakeTensor

from .config import AttnResConfig
from .passes.graph import topo_index
from .passes.plan import Plan, StreamLayout
from .tracing import with_own_dynamo_cache

log = logging.getLogger("attnres_compile")


@torch.library.custom_op("attnres::bind_queries", mutates_args=())
def bind_queries(x: Tensor, queries: list[Tensor], spec: str) -> Tensor:
    """Identity on ``x`` that makes ``queries`` visible to Dynamo.

    Run eagerly (outside ``torch.compile(..., backend="attnres")``) the model is
    the plain one; that is only right while the queries are zero, so trained
    queries make an eager call fail instead of silently ignoring them.
    """
    require_zero_queries(queries)
    return x.clone()


def require_zero_queries(queries: list[Tensor], where: str = "eagerly") -> None:
    """Refuse to run a plain (not rewritten) model whose trained queries would be ignored."""
    if any(bool(q.count_nonzero()) for q in queries):
        raise RuntimeError(
            "this model was prepared for Block AttnRes and its attnres queries are non-zero: "
            "it only computes Block AttnRes when compiled, e.g. torch.compile(model, backend='attnres'), or "
            "model.compile(backend='attnres') for methods that call the model itself such as generate(); "
            f"running it {where} would silently drop the queries"
        )


def _refuse_non_zero_queries(*queries: Tensor) -> None:
    require_zero_queries(list(queries), where="without the rewrite")


def guard_zero_queries(gm: fx.GraphModule, nodes: list[fx.Node]) -> None:
    """Make ``gm`` (run eagerly, unrewritten) fail while the queries ``nodes`` stand for are non-zero.

    The check is a node of the graph, after the last of ``nodes``, so it sees the
    queries as the forward computes them: a placeholder's value, or what a
    sharded parameter's parametrization made of it (SimpleFSDP all-gathers the
    shards, ``redistribute(...).to_local()``), which no graph input holds.
    """
    order = topo_index(gm.graph)
    with gm.graph.inserting_after(max(nodes, key=order.__getitem__)):
        gm.graph.call_function(_refuse_non_zero_queries, tuple(nodes))
    gm.recompile()


@bind_queries.register_fake
def _bind_queries_fake(x: Tensor, queries: list[Tensor], spec: str) -> Tensor:
    return torch.empty_like(x)


_PLAIN_RUN_EXPECTED = contextvars.ContextVar("attnres_plain_run_expected", default=False)
_said_queries_get_no_gradient = False


@contextlib.contextmanager
def plain_run_expected():
    """Within: a prepared model trained as the plain model is intended (``verify``'s eager original)."""
    token = _PLAIN_RUN_EXPECTED.set(True)
    try:
        yield
    finally:
        _PLAIN_RUN_EXPECTED.reset(token)


def _say_queries_get_no_gradient() -> None:
    """Once per process: a prepared model records a backward without the rewrite, so its queries cannot train."""
    global _said_queries_get_no_gradient
    if _said_queries_get_no_gradient:
        return
    _said_queries_get_no_gradient = True
    log.warning(
        "attnres: a model prepared for Block AttnRes is training as the plain model (run eagerly, or compiled by "
        "another backend, e.g. Trainer's torch_compile=True or a plain torch.compile): its attnres queries get no "
        "gradient and stay zero. Compile it with torch.compile(model, backend='attnres') or "
        "model.compile(backend='attnres') (attnres_compile.hf.compile_for_trainer for a Hugging Face Trainer)"
    )


def _bind_queries_setup_context(ctx: Any, inputs: tuple, output: Tensor) -> None:
    ctx.num_queries = len(inputs[1])
    # Autograd records the marker where the rewrite did not run (the attnres backend strips it from
    # its graph): an eager forward, or another backend's AOTAutograd trace (functional tensors).
    # Dynamo's own probe of the op, with fake tensors, happens for every backend: not that.
    if any(q.requires_grad for q in inputs[1]) and not isinstance(output, FakeTensor) and not _PLAIN_RUN_EXPECTED.get():
        _say_queries_get_no_gradient()


def _bind_queries_backward(ctx: Any, grad: Tensor):
    # The structure must mirror the inputs (x, list of queries, spec): one None per query.
    return grad, [None] * ctx.num_queries, None


bind_queries.register_autograd(_bind_queries_backward, setup_context=_bind_queries_setup_context)


QUERY_PREFIX = "attnres_queries_"


class AttnResQueries:
    """What ``prepare`` attaches to a model as ``model.attnres``.

    The queries themselves are parameters of the model, ``attnres_queries_<k>``:
    stream k's ``[L_k + 1, d_k]`` matrix, one row per layer in execution order,
    the final read's row last, fp32 whatever the model dtype (they are tiny and
    the read's softmax runs in fp32). They hang off the model directly rather
    than off a submodule because containers such as ``nn.Sequential`` run every
    submodule they hold. This object keeps the config and the plan ``prepare``
    traced; the marker carries both into every compiled graph, where the
    pipeline checks the graph against that plan's layout.
    """

    def __init__(self, model: nn.Module, config: AttnResConfig, plan: Plan):
        self.model = model
        self.num_streams = len(plan.streams)
        self.config = config
        self.plan = plan
        # Serialized once here: the marker call that carries it is traced by Dynamo.
        self.marker_spec = marker_spec(config, plan)

    @staticmethod
    def add_to(model: nn.Module, config: AttnResConfig, plan: Plan, device=None) -> "AttnResQueries":
        for k, (rows, width) in enumerate(plan.query_shapes):
            zeros = torch.zeros(rows, width, device=device, dtype=torch.float32)
            model.register_parameter(f"{QUERY_PREFIX}{k}", nn.Parameter(zeros))
        model.attnres = AttnResQueries(model, config, plan)
        return model.attnres

    @property
    def queries(self) -> list[nn.Parameter]:
        """Stream k's ``[L_k + 1, d_k]`` query matrix at position k."""
        return [getattr(self.model, f"{QUERY_PREFIX}{k}") for k in range(self.num_streams)]

    def __repr__(self) -> str:
        shapes = [tuple(q.shape) for q in self.queries]
        return f"AttnResQueries(queries={shapes}, config={self.config})"


def is_query_parameter(name: str) -> bool:
    """Is ``name`` (from ``named_parameters``) one of the queries ``prepare`` added?"""
    return name.rpartition(".")[2].startswith(QUERY_PREFIX)



def _forward_with_queries(self: "AttnResForward", *args: Any, **kwargs: Any) -> Any:
    """Body of every :class:`AttnResForward`'s ``__call__`` (copied per instance, see there)."""
    args, kwargs = _bind_first_tensor(self.module, args, kwargs)
    return type(self.module).forward(self.module, *args, **kwargs)


class AttnResForward:
    """Stands in for a prepared model's ``forward``: binds the queries, then runs the real one.

    An instance attribute rather than a forward pre-hook because ``torch.compile``
    runs a compiled module's hooks outside the traced frame, where the queries
    would never reach the graph. Picklable and deep-copyable with its model, and
    it reports the original signature (``transformers`` inspects it).

    Its ``__call__`` is the frame Dynamo compiles, and Dynamo keeps its cache
    (and its limit of 8 recompiles) per code object. One shared ``__call__``
    would make every prepared model in a process share that limit, so each
    instance gets a private class whose ``__call__`` is a fresh copy of
    :func:`_forward_with_queries`: a model's compiles count only against itself,
    as with a plain model's own ``forward``.
    """

    def __new__(cls, module: nn.Module) -> "AttnResForward":
        call = with_own_dynamo_cache(_forward_with_queries, "__call__")
        private = type(cls.__name__, (cls,), {"__call__": call, "__module__": cls.__module__})
        return object.__new__(private)

    def __init__(self, module: nn.Module):
        self.module = module

    def __reduce__(self):
        return AttnResForward, (self.module,)

    @property
    def __signature__(self) -> inspect.Signature:
        return inspect.signature(type(self.module).forward.__get__(self.module))

    __call__ = _forward_with_queries


def enclosing_prepared_model() -> Optional[nn.Module]:
    """The prepared model whose forward is running around the current compile, if any.

    Dynamo compiles a submodule's forward as a frame of its own when a graph
    break (e.g. FSDP2's per-module hooks, which Dynamo never traces) made the
    prepared forward fall back to eager: that forward's
    :class:`AttnResForward` frame is then still on the Python stack.
    """
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_filename == __file__:  # the wrapper's body is defined in this file
            wrapper = frame.f_locals.get("self")
            if isinstance(wrapper, AttnResForward):
                return wrapper.module
        frame = frame.f_back
    return None


def _bind_first_tensor(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    attnres: AttnResQueries = module.attnres
    bound = list(attnres.queries)
    for i, arg in enumerate(args):
        if isinstance(arg, Tensor):
            return args[:i] + (bind_queries(arg, bound, attnres.marker_spec),) + args[i + 1:], kwargs
    for key, value in kwargs.items():
        if isinstance(value, Tensor):
            return args, {**kwargs, key: bind_queries(value, bound, attnres.marker_spec)}
    raise TypeError(
        f"{type(module).__name__} was prepared for Block AttnRes, which needs a tensor argument "
        "to carry its queries into the graph; the call passed none"
    )


def marker_spec(config: AttnResConfig, plan: Plan) -> str:
    """What the marker carries besides the queries: the config and the layout ``prepare`` traced (JSON)."""
    layout = [{"width": s.width, "layers": list(s.layers)} for s in plan.layout]
    return json.dumps({"config": config.to_dict(), "layout": layout}, sort_keys=True)


@dataclass
class QueryBinding:
    """What a stripped marker told the pipeline: the query nodes, the config, the traced layout."""

    nodes: list[fx.Node]
    config: AttnResConfig
    layout: tuple[StreamLayout, ...]


def _is_marker(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in (
        torch.ops.attnres.bind_queries.default,
        torch.ops.attnres.bind_queries,
    )


def read_query_marker(gm: fx.GraphModule) -> Optional[QueryBinding]:
    """The queries, config and layout carried by the graph's first ``bind_queries`` node, if any."""
    for node in gm.graph.nodes:
        if _is_marker(node):
            _, queries, spec = node.args[:3]
            data = json.loads(spec)
            layout = tuple(StreamLayout(s["width"], tuple(s["layers"])) for s in data["layout"])
            return QueryBinding(list(queries), AttnResConfig.from_dict(data["config"]), layout)
    return None


def query_shape_error(given: list, needed: list, *, whose: str, where: str) -> Optional[str]:
    """Why query matrices of shapes ``given`` do not fit ``needed``, or None when they do.

    ``given`` may hold None for a shape that is not known (no meta): that one is not judged.
    """
    given = [tuple(s) if s is not None else None for s in given]
    needed = [tuple(s) for s in needed]
    if len(given) == len(needed) and all(g is None or g == n for g, n in zip(given, needed)):
        return None
    return f"{whose} have shapes {given} but {where} needs {needed} (one [layers + 1, d] matrix per stream)"


def strip_query_marker(gm: fx.GraphModule) -> None:
    """Remove every ``bind_queries`` node: the passes then see the model's own graph."""
    markers = [n for n in gm.graph.nodes if _is_marker(n)]
    for node in markers:
        node.replace_all_uses_with(node.args[0])
        gm.graph.erase_node(node)
    if markers:
        gm.recompile()
