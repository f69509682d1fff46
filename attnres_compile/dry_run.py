"""Dry runs: what the pass finds in a model or an exported program, and what it would do.

    for graph in attnres_compile.inspect_model(model, (ids,)):
        print(format_plan(graph.plan))          # attnres_compile.report
        print(diff_text(graph.before, graph.after, graph.plan))

Nothing here changes the user's model: a model is traced with Dynamo and its
graph rewritten as Dynamo hands it over; a program is rewritten on a fresh
``program.module()``. Both go through the pipeline core, so the plan is the one
the backend and the export path build.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Union

import torch
import torch.fx as fx
from torch import nn

from .config import AttnResConfig
from .core import PipelineResult, UnpreparedQueries, run_pipeline
from .export import graph_module_of
from .passes.graph import copy_graph
from .passes.plan import Plan
from .tracing import trace_graphs


@dataclass
class Inspection:
    """One graph as traced, its plan, and the rewritten graph when the plan allows one.

    ``after`` is None when nothing was rewritten; ``refused`` then says why.
    ``origin`` says where the graph came from (``"torch.compile graph 1 of 1"``,
    ``"exported program"``).
    """

    plan: Plan
    before: fx.GraphModule
    after: Optional[fx.GraphModule]
    refused: Optional[str]
    origin: str

    @classmethod
    def of(cls, gm: fx.GraphModule, result: PipelineResult, origin: str) -> "Inspection":
        after = gm if result.rewritten else None
        return cls(plan=result.plan, before=result.before, after=after, refused=result.refused, origin=origin)


def inspect_model(
    model: nn.Module,
    example_inputs: tuple = (),
    config: Optional[AttnResConfig] = None,
    *,
    example_kwargs: Optional[dict[str, Any]] = None,
) -> list[Inspection]:
    """Trace ``model`` with Dynamo and plan (and rewrite, on the traced copy) each graph.

    One :class:`Inspection` per graph Dynamo produced, in compile order (more
    than one means graph breaks). A prepared model's config is used; otherwise
    ``config`` (default ``AttnResConfig()``). The model itself is not changed.
    """
    found: list[tuple[fx.GraphModule, PipelineResult]] = []

    def keep(gm: fx.GraphModule, graph_inputs):
        result = run_pipeline(gm, graph_inputs, config, keep_before=True)
        found.append((gm, result))
        return result.before.forward

    trace_graphs(model, example_inputs, example_kwargs or {}, keep)
    return [Inspection.of(gm, result, f"torch.compile graph {i + 1} of {len(found)}") for i, (gm, result) in enumerate(found)]


def inspect_program(
    program: Union[torch.export.ExportedProgram, fx.GraphModule], config: Optional[AttnResConfig] = None
) -> Inspection:
    """Plan and rewrite an exported program (or a GraphModule) without touching it."""
    gm = graph_module_of(program)
    work = gm if isinstance(program, torch.export.ExportedProgram) else fx.GraphModule(gm, copy_graph(gm.graph))
    result = run_pipeline(work, (), config, unprepared=UnpreparedQueries.NEW_PARAMETERS, keep_before=True, where="this program")
    return Inspection.of(work, result, "exported program")
