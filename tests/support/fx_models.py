"""Small pre-norm modules and a Dynamo graph capture, shared by the pass tests."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from attnres_compile.config import AttnResConfig
from attnres_compile.passes.graph import parameter_nodes
from attnres_compile.passes.pipeline import apply_plan, plan_graph

D = 16


def x_input(seed: int = 0) -> torch.Tensor:
    """A ``[2, 5, D]`` stream input, the same for a given seed."""
    return torch.randn(2, 5, D, generator=torch.Generator().manual_seed(seed))


def capture(model, *args):
    """The one Dynamo graph of ``model(*args)`` and its example inputs."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append((gm, example_inputs))
        return gm.forward

    torch.compile(model, backend=backend, fullgraph=True)(*args)
    assert len(graphs) == 1
    return graphs[0]


class Mlp(nn.Module):
    def __init__(self, d=D):
        super().__init__()
        self.up, self.down = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, h):
        return self.down(F.gelu(self.up(h)))


class RMSNorm(nn.Module):
    """Llama-style: computed in fp32, cast back with ``.type_as(x)``."""

    def __init__(self, d=D, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x):
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.type_as(x)


class ParallelStack(nn.Module):
    """GPT-NeoX / GPT-J style: one norm feeds attention and MLP, both added at once."""

    def __init__(self, n=2, assoc="x + a + m"):
        super().__init__()
        self.norms = nn.ModuleList(nn.LayerNorm(D) for _ in range(n))
        self.attn = nn.ModuleList(nn.Linear(D, D) for _ in range(n))
        self.mlp = nn.ModuleList(Mlp() for _ in range(n))
        self.final = nn.LayerNorm(D)
        self.assoc = assoc

    def forward(self, x):
        for norm, attn, mlp in zip(self.norms, self.attn, self.mlp):
            h = norm(x)
            if self.assoc == "x + a + m":
                x = x + attn(h) + mlp(h)
            elif self.assoc == "(x + a) + m":
                t = x + attn(h)
                x = t + mlp(h)
            elif self.assoc == "m + (x + a)":
                a = attn(h)
                x = mlp(h) + (x + a)
            elif self.assoc == "(a + m) + x":
                x = (attn(h) + mlp(h)) + x
            elif self.assoc == "m = a; m += mlp; x + m":
                m = attn(h)
                m += mlp(h)
                x = x + m
            else:
                raise AssertionError(self.assoc)
        return self.final(x)

    def branches(self, i, h):
        """The summed branch of layer ``i`` applied to the value it reads (for oracles)."""
        h = self.norms[i](h)
        return self.attn[i](h) + self.mlp[i](h)


def rewritten(model, *args, scale="count", **config):
    """Capture, plan and rewrite ``model``; the queries become the graph's *first* input.

    Returns ``(gm, example_inputs, plan, original_graph_code)``; call ``gm(queries, *example_inputs)``.
    The queries placeholder goes first because the rewrite emits a stream's
    first read right after ``b_0``: when ``b_0`` is itself a graph input, a
    query node defined later would be used before it is defined.
    """
    gm, example_inputs = capture(model, *args)
    plan = plan_graph(gm.graph, parameter_nodes(gm, example_inputs), **AttnResConfig(scale=scale, **config).plan_options)
    assert len(plan.streams) == 1, plan.summary()
    first = next(iter(gm.graph.nodes))
    with gm.graph.inserting_before(first):
        queries = gm.graph.placeholder("attnres_queries")
    stream = plan.streams[0]
    queries.meta["example_value"] = torch.zeros(stream.num_queries, stream.width)
    original = gm.code
    apply_plan(gm, plan, [queries], scale)
    return gm, example_inputs, plan, original


def zero_queries(plan):
    return torch.zeros(plan.streams[0].num_queries, plan.streams[0].width)
