"""Depth weights: how much each read draws from each source, as the paper plots them.

For every read of a rewritten graph (one per layer, then the final read) the
softmax weights ``alpha_i = softmax_i(w . rmsnorm(v_i))`` over its sources,
averaged over tokens: a ``[reads, sources]`` matrix per stream. Column ``n`` is
block summary ``b_n`` (``b_0`` the embedding); a layer inside block ``n``
reads its block's partial sum, which becomes ``b_{n+1}``, so the partial sits
in column ``n + 1``.

    weights = depth_weights(model, (ids,))         # a prepared (trained) model, one batch
    plot_depth_weights(weights, "alpha.png")
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
import torch.fx as fx
import torch.fx._pytree as fx_pytree
from torch import Tensor, nn

from attnres_compile.kernels.reference import rms_key
from attnres_compile.passes import Plan

from .backend import rewrite_graph
from .prepare import trace_graphs

log = logging.getLogger("attnres_compile")

_OPS = torch.ops.attnres


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


def _source_weights(sources: Sequence[Tensor], query: Tensor, eps: float) -> Tensor:
    """``[N]``: ``softmax_i(query . rms_key(v_i))`` averaged over tokens (the reference math)."""
    scores = torch.stack([(rms_key(v, eps).float() * query.float()).sum(-1) for v in sources], dim=-1)
    return scores.softmax(dim=-1).reshape(-1, len(sources)).mean(0)


def _query_row(node: fx.Node) -> tuple[fx.Node, int]:
    """``select(queries, 0, row)`` → ``(queries, row)``: which stream and which read."""
    queries, _, row = node.args[:3]
    return queries, int(row)


def _phase1_of(merge: fx.Node) -> fx.Node:
    """The ``block_read`` whose output a merge reads: ``merge(select(getitem(block_read, 0), 0, j), ...)``."""
    getitem = merge.args[0].args[0]
    return getitem.args[0]


class _WeightRecorder(fx.Interpreter):
    """Runs a rewritten graph and records, per read, the mean weight of each source."""

    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm, garbage_collect_values=False)  # the sources must outlive their last use
        self.records: dict[fx.Node, dict[int, Tensor]] = {}

    def run_node(self, node: fx.Node) -> Any:
        result = super().run_node(node)
        if node.op == "call_function" and node.target in (_OPS.merge.default, _OPS.read.default):
            self._record(node)
        return result

    def _record(self, node: fx.Node) -> None:
        value = self.env.__getitem__
        if node.target is _OPS.read.default:
            sources, query_node, eps = node.args[0], node.args[1], node.args[2]
            values = [value(s) for s in sources]
        else:
            _, _, partial, query_node, eps = node.args[:5]
            values = [value(s) for s in _phase1_of(node).args[0]]
            if partial is not None:
                values.append(value(partial))
        queries, row = _query_row(query_node)
        with torch.no_grad():
            self.records.setdefault(queries, {})[row] = _source_weights(values, value(query_node), float(eps))

    def weights(self, plan: Optional[Plan] = None) -> list[DepthWeights]:
        return [
            _as_matrix(k, rows, plan.streams[k] if plan is not None and k < len(plan.streams) else None)
            for k, rows in enumerate(self.records.values())
        ]


def _as_matrix(stream: int, rows: dict[int, Tensor], plan_stream) -> DepthWeights:
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
    """Run a rewritten GraphModule (e.g. from :func:`attnres_compile.rewrite`) once; one entry per stream."""
    recorder = _WeightRecorder(gm)
    with torch.no_grad():
        recorder.run(*_graph_inputs(gm, args, kwargs or {}))
    if not recorder.records:
        raise ValueError("depth_weights: the graph holds no Block AttnRes reads (was it rewritten?)")
    return recorder.weights(plan)


def depth_weights(
    model: nn.Module, example_inputs: tuple, *, example_kwargs: Optional[dict[str, Any]] = None
) -> list[DepthWeights]:
    """Mean read weights of a model on one batch, one entry per stream.

    A prepared model uses its own (trained) queries; an unprepared one is
    read with zero queries, which weigh every source alike. The model is not changed.
    """
    found: list[list[DepthWeights]] = []

    def record(gm: fx.GraphModule, graph_inputs):
        result = rewrite_graph(gm, graph_inputs)
        if result.refused is not None:
            return gm.forward

        def run(*args):
            recorder = _WeightRecorder(gm)
            out = recorder.run(*args)
            found.append(recorder.weights(result.plan))
            return out

        return run

    trace_graphs(model, example_inputs, example_kwargs or {}, record)
    if not found:
        raise ValueError(f"depth_weights: no residual stream of {type(model).__name__} was rewritten (see the log)")
    return [w for graph in found for w in graph]


def plot_depth_weights(weights: Sequence[DepthWeights], path: str, *, title: str = "Block AttnRes depth weights") -> None:
    """Write a heatmap per stream (rows: reads in order, columns: sources) to ``path`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(
        1, len(weights), squeeze=False,
        figsize=(2.2 + 0.9 * max(w.weights.shape[1] for w in weights) * len(weights), 1.4 + 0.32 * max(len(w.rows) for w in weights)),
    )
    for ax, stream in zip(axes[0], weights):
        image = ax.imshow(stream.weights.numpy(), cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
        ax.set_xticks(range(len(stream.columns)), stream.columns)
        ax.set_yticks(range(len(stream.rows)), stream.rows, fontsize=8)
        ax.set_xlabel("source (b_0: embedding; b_n: block n-1, its partial sum while it runs)", fontsize=8)
        ax.set_title(f"stream {stream.stream}", fontsize=10)
        for (i, j), value in _cells(stream.weights):
            ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7, color="white" if value < 0.6 else "black")
        fig.colorbar(image, ax=ax, label="mean alpha")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    log.info("attnres: wrote depth-weight plot %s", path)


def _cells(matrix: Tensor):
    for i in range(matrix.shape[0]):
        for j in range(matrix.shape[1]):
            value = float(matrix[i, j])
            if value == value:  # not NaN
                yield (i, j), value
