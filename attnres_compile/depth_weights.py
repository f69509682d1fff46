"""Depth weights: how much each read draws from each source, as the paper plots them.

For every read of a rewritten graph (one per layer, then the final read) the
softmax weights ``alpha_i = softmax_i(w . rmsnorm(v_i))`` over its sources,
averaged over tokens: a ``[reads, sources]`` matrix per stream. Column ``n`` is
block summary ``b_n`` (``b_0`` the embedding); a layer inside block ``n``
reads its block's partial sum, which becomes ``b_{n+1}``, so the partial sits
in column ``n + 1``.

    weights = depth_weights(model, (ids,))         # a prepared (trained) model, one batch
    plot_depth_weights(weights, "alpha.png")       # attnres_compile.report

The reads say what they are (``passes.reads.tag_of``): a final read weighs its
``sources``, a merge its block's ``block_read`` sources and its ``partial``,
each with its ``query``; the weights come from the reference math
(``kernels.reference.read_weights``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.fx as fx
import torch.fx._pytree as fx_pytree
from torch import Tensor, nn

from .config import AttnResConfig
from .core import PLAN_KEY, run_pipeline
from .kernels.reference import read_weights
from .passes.ir import op_arguments
from .passes.plan import Plan, StreamPlan
from .passes.reads import tag_of
from .tracing import trace_graphs

log = logging.getLogger("attnres_compile")

_WEIGHED_ROLES = ("merge", "read")  # one per layer, then the final read


@dataclass
class DepthWeights:
    """Mean read weights of one stream.

    ``weights [reads, sources]``: row ``l`` is layer ``l``'s read (the last row
    the final read), NaN where a read has no such source (later blocks).
    """

    stream: int
    weights: Tensor
    rows: list[str]
    columns: list[str]


class _WeightRecorder(fx.Interpreter):
    """Runs a rewritten graph and records, per read, the mean weight of each source."""

    def __init__(self, gm: fx.GraphModule, plan: Optional[Plan]):
        super().__init__(gm, garbage_collect_values=False)  # the sources must outlive their last use
        self.plan = plan
        self.block_reads = {
            (tag["stream"], tag["block"]): node
            for node in gm.graph.nodes
            if (tag := tag_of(node)) is not None and tag["role"] == "block_read"
        }
        self.records: dict[int, dict[int, Tensor]] = {}  # stream -> read (layer index) -> [sources]

    def run_node(self, node: fx.Node) -> Any:
        result = super().run_node(node)
        tag = tag_of(node)
        if tag is not None and tag["role"] in _WEIGHED_ROLES:
            self._record(node, tag)
        return result

    def _weighed(self, node: fx.Node, tag: dict) -> list[fx.Node]:
        """The source nodes a read weighs, in source order."""
        args = op_arguments(node)
        if tag["role"] == "read":
            return list(args["sources"])
        phase1 = op_arguments(self.block_reads[tag["stream"], tag["block"]])["sources"]
        return list(phase1) + ([args["partial"]] if args["partial"] is not None else [])

    def _record(self, node: fx.Node, tag: dict) -> None:
        args = op_arguments(node)
        sources = [self.env[s] for s in self._weighed(node, tag)]
        with torch.no_grad():
            alpha = read_weights(sources, self.env[args["query"]], args["eps"])  # [..., N]
            self.records.setdefault(tag["stream"], {})[tag["layer"]] = alpha.reshape(-1, len(sources)).mean(0)

    def weights(self) -> list[DepthWeights]:
        streams = self.plan.streams if self.plan is not None else ()
        return [
            _as_matrix(k, rows, streams[k] if k < len(streams) else None) for k, rows in sorted(self.records.items())
        ]


def _as_matrix(stream: int, rows: dict[int, Tensor], plan_stream: Optional[StreamPlan]) -> DepthWeights:
    width = max(len(w) for w in rows.values())
    matrix = torch.full((len(rows), width), float("nan"))
    for i, row in enumerate(sorted(rows)):
        matrix[i, : len(rows[row])] = rows[row].cpu()
    names = [f"read {row}" for row in sorted(rows)]
    if plan_stream is not None and len(rows) == plan_stream.num_queries:
        names = [f"{layer.index}: {layer.description}" for layer in plan_stream.layers] + ["final"]
    else:
        names[-1] = "final"
    return DepthWeights(stream, matrix, names, [f"b_{n}" for n in range(width)])


def _graph_inputs(gm: fx.GraphModule, args: tuple, kwargs: dict) -> list:
    """The placeholders' values for a call ``gm(*args, **kwargs)`` (export modules take a pytree)."""
    in_spec = getattr(gm, "_in_spec", None)
    if in_spec is None:
        if kwargs:
            raise TypeError("depth_weights: this graph takes positional inputs only")
        return list(args)
    return fx_pytree.tree_flatten_spec((tuple(args), dict(kwargs)), in_spec)


def depth_weights_of_graph(
    gm: fx.GraphModule, args: tuple, kwargs: Optional[dict[str, Any]] = None, *, plan: Optional[Plan] = None
) -> list[DepthWeights]:
    """Run a rewritten GraphModule (e.g. from :func:`attnres_compile.rewrite`) once; one entry per stream.

    ``plan`` (default: the one the rewrite recorded in ``gm.meta``, if any) names the rows.
    """
    plan = plan if plan is not None else gm.meta.get(PLAN_KEY)
    if not any(tag_of(n) is not None for n in gm.graph.nodes):
        raise ValueError("depth_weights: the graph holds no Block AttnRes reads (was it rewritten?)")
    recorder = _WeightRecorder(gm, plan)
    with torch.no_grad():
        recorder.run(*_graph_inputs(gm, args, kwargs or {}))
    return recorder.weights()


def depth_weights(
    model: nn.Module, example_inputs: tuple, *, example_kwargs: Optional[dict[str, Any]] = None
) -> list[DepthWeights]:
    """Mean read weights of a model on one batch, one entry per stream.

    A prepared model uses its own (trained) queries; an unprepared one is
    read with zero queries, which weigh every source alike. The model is not changed.
    """
    found: list[list[DepthWeights]] = []

    def record(gm: fx.GraphModule, graph_inputs):
        result = run_pipeline(gm, graph_inputs)
        if not result.rewritten:
            return gm.forward

        def run(*args):
            recorder = _WeightRecorder(gm, result.plan)
            out = recorder.run(*args)
            found.append(recorder.weights())
            return out

        return run

    trace_graphs(model, example_inputs, example_kwargs or {}, record)
    if not found:
        raise ValueError(f"depth_weights: no residual stream of {type(model).__name__} was rewritten (see the log)")
    return [w for graph in found for w in graph]


def depth_weights_of_program(
    program: torch.export.ExportedProgram, config: Optional[AttnResConfig] = None
) -> list[DepthWeights]:
    """Mean read weights of an exported program on its own example inputs.

    A program that is not rewritten yet is rewritten first (with ``config``, zero
    queries: uniform weights), and said so in the log.
    """
    from .export import rewrite

    args, kwargs = program.example_inputs or ((), {})
    module = program.module()
    if not any(tag_of(n) is not None for n in module.graph.nodes):
        log.warning("attnres: the program is not rewritten; plotting its rewrite with zero queries (uniform weights)")
        module = rewrite(module, config)
    return depth_weights_of_graph(module, tuple(args), dict(kwargs))
