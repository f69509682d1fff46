"""``prepare``: trace a model once and give it trainable, zero-initialized queries."""

from __future__ import annotations

import logging
from typing import Any, Optional

import torch
from torch import nn

from .config import AttnResConfig
from .core import run_pipeline
from .passes.plan import Plan
from .queries import AttnResForward, AttnResQueries
from .tracing import trace_graphs

log = logging.getLogger("attnres_compile")


def _model_device(model: nn.Module) -> Optional[torch.device]:
    param = next(model.parameters(), None)
    return param.device if param is not None else None


def trace_plans(
    model: nn.Module, example_inputs: tuple, example_kwargs: dict, config: AttnResConfig
) -> list[tuple[Plan, Optional[str]]]:
    """Plan every graph of one traced run: one ``(plan, graph_break_reason)`` per graph, in compile order."""
    results: list[tuple[Plan, Optional[str]]] = []

    def plan(gm, graph_inputs):
        result = run_pipeline(gm, graph_inputs, config, apply=False)
        results.append((result.plan, result.graph_break))
        return gm.forward

    trace_graphs(model, example_inputs, example_kwargs, plan)
    return results


def _stack_plan(model: nn.Module, traced: list[tuple[Plan, Optional[str]]]) -> Optional[Plan]:
    """The one graph holding the whole layer stack, or None (with the reason logged)."""
    with_streams = [(plan, broken) for plan, broken in traced if plan.streams]
    name = type(model).__name__
    if not traced:
        log.warning(
            "attnres: Dynamo produced no graph for %s (it skipped the forward, e.g. after a graph break "
            "inside a loop; TORCH_LOGS=graph_breaks shows why). Model left untouched.", name,
        )
        return None
    if not with_streams:
        notes = "\n".join(plan.summary() for plan, _ in traced)
        breaks = [broken for _, broken in traced if broken]
        if breaks:
            why = (f"graph breaks cut its forward into {len(traced)} graphs and none holds the layer stack: "
                   f"{breaks[0]}. TORCH_LOGS=graph_breaks shows where; under activation checkpointing, a "
                   "side effect inside a checkpointed layer breaks the graph unless "
                   "torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint = True")
        elif any(plan.skipped for plan, _ in traced):
            why = "the places it left alone, and why"
        else:
            why = ("no add x + f(x) whose branch reads x through a norm and has a weight; post-norm models "
                   "such as BERT normalize after the add")
        log.warning(
            "attnres: %s has no residual stream a Block AttnRes rewrite can read (%s). Model left untouched.\n%s",
            name, why, notes,
        )
        return None
    breaks = [broken for _, broken in traced if broken]
    if len(with_streams) > 1 or any(broken for _, broken in with_streams):
        log.error(
            "attnres: graph breaks split the layer stack of %s across %d graphs (%s). Block AttnRes needs "
            "the stack in one graph; model left untouched.", name, len(traced), "; ".join(breaks) or "no reason recorded",
        )
        return None
    return with_streams[0][0]


def prepare(
    model: nn.Module,
    example_inputs: tuple = (),
    config: Optional[AttnResConfig] = None,
    *,
    example_kwargs: Optional[dict[str, Any]] = None,
) -> nn.Module:
    """Give ``model`` the zero-initialized queries of Block AttnRes, in place.

    Traces the model once on ``example_inputs`` to find its residual streams,
    then adds the parameters ``attnres_queries_<k>`` (one per residual stream),
    ``model.attnres`` (an :class:`AttnResQueries` with the config and the plan)
    and a ``forward`` wrapper that carries the queries into
    ``torch.compile(model, backend="attnres")``. Build the optimizer afterwards.
    A model with no readable stream is returned untouched, with a logged reason.

    Returns the same ``model`` object.
    """
    config = config or AttnResConfig()
    if not isinstance(example_inputs, tuple):
        raise TypeError(f"prepare: example_inputs must be a tuple of positional args, got {type(example_inputs).__name__}")
    existing = getattr(model, "attnres", None)
    if isinstance(existing, AttnResQueries):
        if existing.config != config:
            raise ValueError(f"prepare: model is already prepared with {existing.config}, not {config}")
        log.info("attnres: model already prepared; nothing to do")
        return model
    plan = _stack_plan(model, trace_plans(model, example_inputs, example_kwargs or {}, config))
    if plan is None:
        return model
    AttnResQueries.add_to(model, config, plan, device=_model_device(model))
    model.forward = AttnResForward(model)
    log.info("attnres: prepared %s\n%s", type(model).__name__, plan.summary())
    return model
