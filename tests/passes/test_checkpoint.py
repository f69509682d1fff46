"""passes/checkpoint.py: activation-checkpointed regions opened with their recompute tags, or named."""

from __future__ import annotations

import copy
import functools

import torch
import torch.fx as fx
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from attnres_compile.passes.checkpoint import (
    _POLICY_KEY as POLICY_KEY,
    CHECKPOINT_OP,
    SELECTIVE_KEY,
    close_selective_regions,
    open_checkpointed_regions,
    selective_regions_opened,
)


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


def _dynamo_graph_and_inputs(model, x) -> tuple[fx.GraphModule, list]:
    graphs = []

    def capture(gm, example_inputs):
        graphs.append((gm, example_inputs))
        return gm.forward

    torch._dynamo.reset()
    torch.compile(model, backend=capture)(x)
    (found,) = graphs
    return found


def _dynamo_graph(model, x) -> fx.GraphModule:
    return _dynamo_graph_and_inputs(model, x)[0]


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


def _save_everything(ctx, op, *args, **kwargs):
    return CheckpointPolicy.MUST_SAVE


def test_a_selective_region_is_opened_untagged_and_closed_again_with_its_policy():
    context_fn = functools.partial(create_selective_checkpoint_contexts, _save_everything)
    model, x = TwoCheckpointedBlocks(context_fn=context_fn), torch.randn(2, 3, 8, requires_grad=True)
    gm, inputs = _dynamo_graph_and_inputs(model, x)
    want = gm(*inputs)
    policies = [getattr(gm, r.args[0].target).meta[POLICY_KEY] for r in _regions(gm)]  # as Dynamo kept them
    assert open_checkpointed_regions(gm) == 2 and not _regions(gm)
    assert selective_regions_opened(gm) == 2
    inlined = [n for n in gm.graph.nodes if SELECTIVE_KEY in n.meta]
    assert inlined and not any("recompute" in n.meta for n in gm.graph.nodes)  # the policy decides, later
    assert close_selective_regions(gm) == 2
    regions = _regions(gm)
    assert len(regions) == 2 and [getattr(gm, r.args[0].target).meta[POLICY_KEY] for r in regions] == policies
    assert all(r.kwargs == {"use_reentrant": False} for r in regions)
    assert not any(SELECTIVE_KEY in n.meta for n in gm.graph.nodes)
    torch.testing.assert_close(gm(*inputs), want, rtol=0, atol=0)


def test_what_remains_of_a_selective_region_is_closed_in_convex_pieces():
    """A node outside the region between its two halves (a read, in a rewrite) splits it in two regions."""
    context_fn = functools.partial(create_selective_checkpoint_contexts, _save_everything)
    model, x = TwoCheckpointedBlocks(context_fn=context_fn), torch.randn(2, 3, 8, requires_grad=True)
    model.kwargs["context_fn"] = context_fn

    def both_steps_in_one_region(x):
        return checkpoint(lambda x: model.step(1, model.step(0, x)), x, **model.kwargs)

    gm, inputs = _dynamo_graph_and_inputs(both_steps_in_one_region, x)
    want = gm(*inputs)
    assert open_checkpointed_regions(gm) == 1
    # Put an untagged op between the steps, as a read would sit: first add -> mul (outside) -> second step.
    first_add = next(n for n in gm.graph.nodes if n.op == "call_function" and "add" in n.name)
    with gm.graph.inserting_after(first_add):
        outside = gm.graph.call_function(torch.mul, (first_add, 1.0))
    first_add.replace_all_uses_with(outside, delete_user_cb=lambda user: user is not outside)
    assert close_selective_regions(gm) == 2
    first, second = _regions(gm)
    assert outside.graph is gm.graph  # left out of both bodies, and between them:
    assert outside.args[0].args[0] is first and second in outside.users
    got = gm(*inputs)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    grads = torch.autograd.grad(got[0].sum(), x)
    want_grads = torch.autograd.grad(want[0].sum(), x)
    torch.testing.assert_close(grads, want_grads, rtol=0, atol=0)
