"""passes/recompute.py: which partials the backward recomputes, and what that saves, with the same numbers."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy

import attnres_compile
from attnres_compile import memory
from attnres_compile.passes.recompute import recompute_partials
from fx_models import D, rewritten, zero_queries
from tiny_gpt import GPTConfig, TinyGPT


class Layers(nn.Module):
    """Pre-norm layers ``x = x + out(act(inp(norm(x))))`` with ``hidden`` features between the products."""

    def __init__(self, n=4, hidden=D, dropout=0.0):
        super().__init__()
        self.norms = nn.ModuleList(nn.LayerNorm(D) for _ in range(n))
        self.inp = nn.ModuleList(nn.Linear(D, hidden) for _ in range(n))
        self.out = nn.ModuleList(nn.Linear(hidden, D) for _ in range(n))
        self.dropout = dropout

    def forward(self, x):
        for norm, inp, out in zip(self.norms, self.inp, self.out):
            x = x + F.dropout(out(F.gelu(inp(norm(x)))), self.dropout, self.training)
        return x


def _tagged(gm):
    return {n.name for n in gm.graph.nodes if n.meta.get("recompute") == CheckpointPolicy.MUST_RECOMPUTE}


def test_partials_one_product_away_are_tagged_from_the_product_on():
    gm, *_ = rewritten(Layers(n=4), torch.randn(2, 5, D), block_size=2)
    report = recompute_partials(gm.graph)
    assert len(report.recomputed) == 2 and not report.kept  # one partial per block of two
    tagged = _tagged(gm)
    assert set(report.recomputed) <= tagged
    for node in gm.graph.nodes:
        if node.name in tagged:
            assert node.meta["ac_graph_id"] is not None
            assert "linear" in str(node.target) or node.target is F.dropout  # the product, then identities
    ids = {gm.graph.find_nodes(op="call_function", target=torch.ops.attnres.merge.default)[0].name}
    assert not ids & tagged  # the reads themselves are not recomputed


class CastLayers(Layers):
    """The branch output cast back to the stream's dtype by a tensor method (a ``call_method`` node)."""

    def forward(self, x):
        for norm, inp, out in zip(self.norms, self.inp, self.out):
            x = x + out(F.gelu(inp(norm(x)))).to(x.dtype)
        return x


def test_casts_in_either_form_are_passed_through():
    gm, *_ = rewritten(CastLayers(n=4), torch.randn(2, 5, D), block_size=2)
    assert any(n.op == "call_method" and n.target == "to" for n in gm.graph.nodes)
    report = recompute_partials(gm.graph)
    assert len(report.recomputed) == 2 and not report.kept


def test_a_wide_product_is_kept_and_says_why():
    gm, *_ = rewritten(Layers(n=4, hidden=4 * D), torch.randn(2, 5, D), block_size=2)
    report = recompute_partials(gm.graph)
    assert not report.recomputed and len(report.kept) == 2
    assert all(f"contracts {4 * D} features into {D}" in why for _, why in report.kept)
    assert not _tagged(gm)


def test_a_dropout_that_drops_is_kept():
    model = Layers(n=4, dropout=0.1).train()
    gm, *_ = rewritten(model, torch.randn(2, 5, D), block_size=2)
    report = recompute_partials(gm.graph)
    assert not report.recomputed and all("dropout" in why for _, why in report.kept)


def test_a_node_already_tagged_keeps_its_tag():
    gm, *_ = rewritten(Layers(n=4), torch.randn(2, 5, D), block_size=2)
    region = [n for n in gm.graph.nodes if "linear" in str(n.target)]
    for node in region:
        node.meta.update(recompute=CheckpointPolicy.PREFER_RECOMPUTE, ac_graph_id=-1)
    recompute_partials(gm.graph)
    assert all(n.meta["recompute"] == CheckpointPolicy.PREFER_RECOMPUTE and n.meta["ac_graph_id"] == -1 for n in region)


def test_the_rewritten_graph_runs_as_before():
    gm, example_inputs, plan, _ = rewritten(Layers(n=4), torch.randn(2, 5, D), block_size=2)
    before = gm(zero_queries(plan), *example_inputs)
    recompute_partials(gm.graph)
    torch.testing.assert_close(gm(zero_queries(plan), *example_inputs), before, rtol=0, atol=0)


# ---------------------------------------------------------------- end to end, through Inductor


def _gpt():
    torch.manual_seed(0)
    return TinyGPT(GPTConfig(vocab_size=64, n_layer=4, n_head=2, d_model=64, max_len=16))


def test_recomputing_partials_keeps_less_and_computes_the_same(fresh_dynamo):
    """Four layers in blocks of two: two partials, each a [B, T, d] tensor, no longer kept; same loss and grads."""
    x = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    model = attnres_compile.prepare(_gpt(), (x,), config=attnres_compile.AttnResConfig(block_size=2))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "attnres" in name:
                p.normal_(std=0.5)
    arms = {name: copy.deepcopy(model) for name in ("recompute", "keep")}
    results = {}
    for name, arm in arms.items():
        compiled = torch.compile(arm, backend=attnres_compile.AttnResBackend(recompute=name == "recompute"))
        saved = memory.saved_for_backward_bytes(lambda: compiled(x))
        arm.zero_grad()
        loss = compiled(x).float().square().mean()
        loss.backward()
        results[name] = (saved, loss.detach(), {n: p.grad for n, p in arm.named_parameters()})
    (saved_r, loss_r, grads_r), (saved_k, loss_k, grads_k) = results["recompute"], results["keep"]
    stream_bytes = 2 * 16 * 64 * 4
    assert saved_k - saved_r >= 2 * stream_bytes
    torch.testing.assert_close(loss_r, loss_k)
    for name in grads_k:
        torch.testing.assert_close(grads_r[name], grads_k[name], msg=name)
