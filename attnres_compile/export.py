"""The export path: rewrite a ``torch.export`` program into Block AttnRes (design §5).

    ep = torch.export.export(model, args, kwargs, strict=False)
    gm = attnres_compile.export.rewrite(ep)            # zero-init queries: same outputs
    torch.export.export(gm, args, kwargs)              # runs, re-exports, saves as .pt2

:func:`rewrite` plans the graph with the same detector as the backend
(``plan_graph``) and rewrites it with the same pass (``apply_plan``). The
learned queries become ``nn.Parameter``s of the result, ``attnres_queries_<k>``
as :func:`attnres_compile.prepare` names them, read by ``get_attr`` nodes, so
they train, show in ``state_dict`` and are parameters of a re-exported program.
"""

from __future__ import annotations

import logging
from typing import Optional, Sequence, Union

import torch
import torch.fx as fx
from torch import Tensor, nn

import attnres_compile.kernels  # noqa: F401  (registers torch.ops.attnres.*)
from attnres_compile.passes import Plan, apply_plan, plan_graph
from attnres_compile.passes.ir import copy_graph, tensor_value

from .backend import parameter_nodes, source_device
from .config import AttnResConfig
from .queries import QUERY_PREFIX, read_query_marker, strip_query_marker

log = logging.getLogger("attnres_compile")

PLAN_KEY = "attnres_plan"
"""``gm.meta[PLAN_KEY]``: the :class:`~attnres_compile.passes.Plan` a rewrite applied."""

aten = torch.ops.aten

# ``x.to(dtype)`` overloads that return ``x`` itself when nothing changes.
_ALIASING_CASTS = {aten.to.dtype, aten.to.dtype_layout, aten.to.device, aten.to.other}


def _is_noop_cast(node: fx.Node) -> bool:
    """An ``aten.to`` that keeps dtype and device: an alias of its input.

    Non-strict export records such a cast and then, because eager ``x.to(x.dtype)``
    returns ``x`` itself, uses the cast for *every* later read of ``x``: in an
    fp32 Llama each residual add reads the fp32 copy its RMSNorm made, which cuts
    the stream at every layer. Dropping the cast restores the add-to-add chain.
    """
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
    return before.dtype == after.dtype and before.device == after.device  # shape: `to` never changes it


def drop_noop_casts(graph: fx.Graph) -> int:
    """Replace every no-op ``aten.to`` by its input; returns how many went."""
    casts = [n for n in graph.nodes if _is_noop_cast(n)]
    for node in casts:
        node.replace_all_uses_with(node.args[0])
        graph.erase_node(node)
    return len(casts)


def _cleaned_graph(gm: fx.GraphModule) -> fx.Graph:
    """A copy of ``gm``'s graph with the export-only clean-ups applied (``gm`` stays as it is)."""
    graph = copy_graph(gm.graph)
    dropped = drop_noop_casts(graph)
    if dropped:
        log.debug("attnres: dropped %d no-op cast(s) before planning", dropped)
    return graph


def _query_values(plan: Plan, queries: Optional[Sequence[Tensor]], device) -> list[Tensor]:
    shapes = list(plan.query_shapes)
    if queries is None:
        return [torch.zeros(shape, dtype=torch.float32, device=device) for shape in shapes]
    queries = list(queries)
    given = [tuple(q.shape) for q in queries]
    if given != shapes:
        raise ValueError(
            f"attnres rewrite: queries have shapes {given} but this program needs {shapes} "
            "(one [layers + 1, d] matrix per stream)"
        )
    return [q.detach().to(device=device, dtype=torch.float32).clone() for q in queries]


def _add_query_parameters(gm: fx.GraphModule, plan: Plan, values: list[Tensor]) -> list[fx.Node]:
    """Register ``attnres_queries_<k>`` on ``gm`` and read each with a ``get_attr`` near the top."""
    anchor = next(n for n in gm.graph.nodes if n.op != "placeholder")
    nodes = []
    for k, value in enumerate(values):
        name = f"{QUERY_PREFIX}{k}"
        if hasattr(gm, name):
            raise ValueError(f"attnres rewrite: the module already has an attribute {name!r}")
        gm.register_parameter(name, nn.Parameter(value))
        with gm.graph.inserting_before(anchor):
            node = gm.graph.get_attr(name)
        node.meta["val"] = value
        nodes.append(node)
    return nodes


def _stream_device(gm: fx.GraphModule, plan: Plan) -> Optional[torch.device]:
    device = source_device(gm.graph, plan)
    if device is not None:
        return device
    param = next(gm.parameters(), None)
    return param.device if param is not None else None


def _check_prepared_queries(
    gm: fx.GraphModule, plan: Plan, nodes: list[fx.Node], queries: Optional[Sequence[Tensor]]
) -> None:
    """A prepared model's queries must fit the plan; ``queries``, if given, overwrite them."""
    if not all(n.op == "get_attr" for n in nodes):
        raise ValueError("attnres rewrite: the prepared model's queries are not parameters of the program")
    params = [gm.get_parameter(n.target) for n in nodes]
    shapes = [tuple(p.shape) for p in params]
    if shapes != list(plan.query_shapes):
        raise ValueError(
            f"attnres rewrite: the prepared model's queries have shapes {shapes} but this program "
            f"needs {list(plan.query_shapes)}: the program differs from the one prepare() traced"
        )
    if queries is not None:
        with torch.no_grad():
            for param, value in zip(params, _query_values(plan, queries, params[0].device)):
                param.copy_(value)


def rewrite(
    program: Union[torch.export.ExportedProgram, fx.GraphModule],
    config: Optional[AttnResConfig] = None,
    *,
    queries: Optional[Sequence[Tensor]] = None,
) -> fx.GraphModule:
    """Rewrite the residual stream(s) of an exported program into Block AttnRes.

    Parameters
    ----------
    program:
        A ``torch.export.ExportedProgram`` (non-strict export recommended), or an
        ``fx.GraphModule`` whose parameters are ``get_attr`` nodes (such as
        ``program.module()``; it is rewritten in place).
    config:
        Partition, scale and eps. Default: the config of a model that
        :func:`attnres_compile.prepare` prepared before export, else ``AttnResConfig()``.
    queries:
        Initial query values, one ``[L_k + 1, d_k]`` tensor per stream (e.g.
        trained ones). Default: the prepared model's queries, else zeros, which
        reproduce the original model exactly under ``scale="count"``.

    Returns
    -------
    fx.GraphModule
        The rewritten module, with parameters ``attnres_queries_<k>`` (fp32) and
        the plan in ``gm.meta["attnres_plan"]``. With no residual stream found
        (post-norm models, no layers) the module comes back unchanged, with the
        reason logged and in the plan's skipped sites.
    """
    if isinstance(program, torch.export.ExportedProgram):
        gm = program.module()
    elif isinstance(program, fx.GraphModule):
        gm = program
    else:
        raise TypeError(
            f"attnres rewrite: expected a torch.export.ExportedProgram or an fx.GraphModule, "
            f"got {type(program).__name__}"
        )
    binding = read_query_marker(gm)  # a model prepared before export carries its queries
    if config is None:
        config = binding.config if binding is not None else AttnResConfig()
    if binding is not None:
        strip_query_marker(gm)
    graph = _cleaned_graph(gm)
    plan = plan_graph(graph, parameter_nodes(gm, (), graph), config)
    if not plan.streams:
        log.info("attnres: no residual stream in this program, returning it unchanged\n%s", plan.summary())
        gm.meta[PLAN_KEY] = plan  # what was looked at and why it was skipped
        return gm
    gm.graph = graph  # the plan names nodes of the cleaned copy
    if binding is not None:
        by_name = {n.name: n for n in graph.nodes}
        query_nodes = [by_name[n.name] for n in binding.nodes]  # the same nodes in the cleaned copy
        _check_prepared_queries(gm, plan, query_nodes, queries)
    else:
        query_nodes = _add_query_parameters(gm, plan, _query_values(plan, queries, _stream_device(gm, plan)))
    apply_plan(gm, plan, query_nodes, config.scale)
    gm.meta[PLAN_KEY] = plan
    log.info("attnres: rewrote exported program\n%s", plan.summary())
    return gm
