"""Dynamo traces that are not compiles: one throwaway run of a model, and what a graph says of breaks."""

from __future__ import annotations

import types
from typing import Any, Callable, Optional

import torch
import torch.fx as fx
from torch import nn


def with_own_dynamo_cache(fn: Callable, name: str) -> Callable:
    """A copy of ``fn`` with a code object of its own.

    Dynamo keeps compiled code, and its limit of 8 recompiles, per code object:
    a frame compiled through the copy neither uses nor fills ``fn``'s cache.
    """
    return types.FunctionType(fn.__code__.replace(), fn.__globals__, name)


def _call_model(model: nn.Module, args: tuple, kwargs: dict) -> Any:
    return model(*args, **kwargs)


def trace_graphs(model: nn.Module, example_inputs: tuple, example_kwargs: dict, on_graph: Callable) -> None:
    """Run the model once under Dynamo and hand every graph to ``on_graph(gm, graph_inputs)``.

    Runs without grad, through a throwaway frame (so this one-off trace stays out
    of the Dynamo cache of the model's own forward, which every instance of its
    class shares), with the random-number state restored afterwards so that
    tracing does not shift a training run. ``on_graph`` returns what runs the graph.
    """
    frame = with_own_dynamo_cache(_call_model, "attnres_trace")
    devices = [d for d in {p.device for p in model.parameters()} if d.type == "cuda"]
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        torch.compile(frame, backend=on_graph)(model, example_inputs, example_kwargs)


def graph_break_reason(gm: fx.GraphModule) -> Optional[str]:
    """Why this graph is only part of a frame (a graph break), or None if it is whole."""
    reason = getattr(gm, "compile_subgraph_reason", None)
    if reason is not None and getattr(reason, "graph_break", False):
        return f"graph ends at a graph break: {reason.reason}"
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator

        code_name = InstructionTranslator.current_tx().f_code.co_name
    except Exception:  # not under Dynamo (a hand-made graph) or an internal API moved
        return None
    if code_name.startswith("torch_dynamo_resume_in"):
        return f"graph resumes after a graph break ({code_name})"
    return None
