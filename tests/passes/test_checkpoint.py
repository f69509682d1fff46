"""passes/checkpoint.py: activation-checkpointed regions opened with their recompute tags, or named."""

from __future__ import annotations

import copy
import functools

import torch
import torch.fx as fx
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from attnres_compile.passes.checkpoint import CHECKPOINT_OP, closed_checkpointed_regions, open_checkpointed_regions


class TwoCheckpointedBlocks(torch.nn.Module):
    """Two pre-norm residual steps, each inside ``checkpoint``; ``context_fn`` makes them selective."""

    def __init__(self, context_fn=None):
        super().__init__()
        self.norms = torch.nn.ModuleList(torch.nn.LayerNorm(8) for _ in range(2))
        self.linears = torch.nn.ModuleList(torch.nn.Linear(8, 8) for _ in range(2))
        self.kwargs = {"use_reentrant": False} | ({"context_fn": context_fn} if context_fn else {})

    def step(self, i, x):
        return x + self.linears[i](self.norms[i](x))

    def forward(self, x):
        for i in range(2):
            x = checkpoint(functools.partial(self.step, i), x, **self.kwargs)
        return x


def _dynamo_graph(model, x) -> fx.GraphModule:
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    torch.compile(model, backend=capture)(x)
    (gm,) = graphs
    return gm


def _regions(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is CHECKPOINT_OP]


def test_opened_regions_become_nodes_tagged_for_recompute_one_id_per_region():
    model, x = TwoCheckpointedBlocks(), torch.randn(2, 3, 8, requires_grad=True)
    gm = _dynamo_graph(model, x)
    assert len(_regions(gm)) == 2
    assert open_checkpointed_regions(gm) == 2
    assert not _regions(gm) and not [name for name, _ in gm.named_children()]  # bodies gone with their calls
    tagged = [n for n in gm.graph.nodes if "recompute" in n.meta]
    assert tagged and all(n.meta["recompute"] == CheckpointPolicy.PREFER_RECOMPUTE for n in tagged)
    adds = [n for n in tagged if "add" in n.name]
    assert len({n.meta["ac_graph_id"] for n in adds}) == 2  # the two residual adds, one region each
    placeholders = [n for n in gm.graph.nodes if n.op in ("placeholder", "output")]
    assert not any("recompute" in n.meta for n in placeholders)


def test_an_opened_graph_computes_what_the_regions_did_forward_and_backward():
    model, x = TwoCheckpointedBlocks(), torch.randn(2, 3, 8, requires_grad=True)
    runs = []

    def backend(gm, example_inputs):
        opened = fx.GraphModule(gm, copy.deepcopy(gm.graph))
        assert open_checkpointed_regions(opened) == 2

        def run(*args):
            runs.append(opened(*args))
            return gm(*args)

        return run

    torch._dynamo.reset()
    want = torch.compile(model, backend=backend)(x)
    ((got,),) = runs  # the graph returns a 1-tuple
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    want_grads = torch.autograd.grad(want.sum(), [x, *model.parameters()])
    got_grads = torch.autograd.grad(got.sum(), [x, *model.parameters()])
    for g, w in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


def test_a_selective_region_stays_closed_and_says_why():
    policy = functools.partial(create_selective_checkpoint_contexts, lambda ctx, op, *a, **k: CheckpointPolicy.MUST_SAVE)
    gm = _dynamo_graph(TwoCheckpointedBlocks(context_fn=policy), torch.randn(2, 3, 8, requires_grad=True))
    assert open_checkpointed_regions(gm) == 0
    closed = closed_checkpointed_regions(gm)
    assert len(closed) == 2 and all("context_fn" in why and "full AC" in why for _, why in closed)
