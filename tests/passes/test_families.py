"""Detector rules that the architecture families of the model zoo rest on (design §4).

Small hand-written stand-ins for what real model code puts in the graph; the
real models themselves are checked in ``tests/test_zoo.py``. Graphs are captured
with a do-nothing Dynamo backend and, for the identity checks, rewritten with
zero queries and run eagerly (no Inductor), so each test takes a second or two.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from attnres_compile.core import zero_queries_in_graph
from attnres_compile.passes.graph import parameter_nodes
from attnres_compile.config import AttnResConfig
from attnres_compile.passes.pipeline import apply_plan, plan_graph
from fx_models import D, RMSNorm, capture, x_input  # tests/support


def dynamo_plan(model, *args, **config):
    gm, example_inputs = capture(model, *args)
    return gm, plan_graph(gm.graph, parameter_nodes(gm, example_inputs), **AttnResConfig(**config).plan_options)


class GatedMlp(nn.Module):
    """Llama / OLMo2 MLP: ``down(silu(gate(h)) * up(h))``, not homogeneous in ``h``."""

    def __init__(self, d=D):
        super().__init__()
        self.gate, self.up, self.down = nn.Linear(d, 2 * d), nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, h):
        return self.down(F.silu(self.gate(h)) * self.up(h))


class HandLayerNorm(nn.Module):
    """LayerNorm written out: ``(h - mean) / sqrt(var + eps) * w + b``."""

    def __init__(self, d=D, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.weight, self.bias = nn.Parameter(torch.ones(d)), nn.Parameter(torch.zeros(d))

    def forward(self, h):
        centered = h - h.mean(-1, keepdim=True)
        variance = centered.pow(2).mean(-1, keepdim=True)
        return centered / torch.sqrt(variance + self.eps) * self.weight + self.bias


class FunctionalRMSNorm(nn.Module):
    def __init__(self, d=D):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, h):
        return F.rms_norm(h, (h.shape[-1],), self.weight, 1e-6)


NORMS = {"hand-written RMSNorm": RMSNorm, "hand-written LayerNorm": HandLayerNorm, "F.rms_norm": FunctionalRMSNorm}


class PostBranchNormStack(nn.Module):
    """OLMo2 layout: each branch reads the raw stream and ends in a norm, ``x + norm(f(x))``."""

    def __init__(self, n=2, norm=RMSNorm):
        super().__init__()
        self.mixers = nn.ModuleList(nn.Linear(D, D) for _ in range(n))
        self.mixer_norms = nn.ModuleList(norm() for _ in range(n))
        self.mlps = nn.ModuleList(GatedMlp() for _ in range(n))
        self.mlp_norms = nn.ModuleList(norm() for _ in range(n))
        self.final = norm()

    def forward(self, x):
        for mixer, mixer_norm, mlp, mlp_norm in zip(self.mixers, self.mixer_norms, self.mlps, self.mlp_norms):
            x = x + mixer_norm(torch.tanh(mixer(x)))
            x = x + mlp_norm(mlp(x))
        return self.final(x)


class PostNormStack(nn.Module):
    """The original Transformer: the norm comes after the add, so no stream flows un-normalized."""

    def __init__(self, n=2, norm=RMSNorm):
        super().__init__()
        self.mlps = nn.ModuleList(GatedMlp() for _ in range(n))
        self.norms = nn.ModuleList(norm() for _ in range(n))

    def forward(self, x):
        for mlp, norm in zip(self.mlps, self.norms):
            x = norm(x + mlp(x))
        return x


class UnmatchedScaleStack(nn.Module):
    """``x + W x / mean|silu(U x)|``: a degree-1 value over a degree-1 *different* value.

    Counted in one variable the two degrees would cancel to 0 and the branch
    would pass for a normalization; it is not one (it grows with neither).
    """

    def __init__(self, n=2):
        super().__init__()
        self.values = nn.ModuleList(nn.Linear(D, D) for _ in range(n))
        self.scales = nn.ModuleList(nn.Linear(D, D) for _ in range(n))

    def forward(self, x):
        for value, scale in zip(self.values, self.scales):
            x = x + value(x) / F.silu(scale(x)).abs().mean(-1, keepdim=True)
        return x


def rewritten_output(model, x, config):
    """The model's output with its graph rewritten (zero queries, ``count`` scale), run eagerly."""
    plans = []

    def backend(gm, graph_inputs):
        plan = plan_graph(gm.graph, parameter_nodes(gm, graph_inputs), **config.plan_options)
        plans.append(plan)
        apply_plan(gm, plan, zero_queries_in_graph(gm, plan), config.scale)
        return gm.forward

    with torch.no_grad():
        out = torch.compile(model, backend=backend, fullgraph=True)(x)
    return out, plans


@pytest.mark.parametrize("norm", sorted(NORMS))
def test_post_branch_norm_after_a_non_homogeneous_branch_is_a_step(norm):
    # silu(gate(x)) * up(x) and tanh(W x) are not homogeneous in x; the norm at the
    # branch's end makes the branch scale-free in its own input, as F.rms_norm does.
    _, plan = dynamo_plan(PostBranchNormStack(3, NORMS[norm]), x_input())
    assert [len(s.layers) for s in plan.streams] == [6], plan.summary()
    assert not plan.skipped, plan.summary()


@pytest.mark.parametrize("norm", sorted(NORMS))
def test_post_branch_norm_rewrite_with_zero_queries_is_the_identity(norm):
    torch.manual_seed(0)
    model, x = PostBranchNormStack(3, NORMS[norm]), x_input()
    got, plans = rewritten_output(model, x, AttnResConfig(num_blocks=2))
    assert [len(s.layers) for s in plans[0].streams] == [6]
    want = model(x)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-6), float((got - want).abs().max())


@pytest.mark.parametrize("norm", sorted(NORMS))
def test_post_norm_after_a_non_homogeneous_branch_is_still_refused(norm):
    _, plan = dynamo_plan(PostNormStack(3, NORMS[norm]), x_input())
    assert plan.streams == ()
    assert any("raw" in site.reason for site in plan.skipped), plan.summary()


def test_degrees_in_two_different_variables_do_not_cancel():
    _, plan = dynamo_plan(UnmatchedScaleStack(3), x_input())
    assert plan.streams == (), plan.summary()
    assert any("raw" in site.reason for site in plan.skipped), plan.summary()


class SoftmaxRoutedMoE(nn.Module):
    """Mixtral routing: softmax over the router logits, then top-k, renormalized."""

    def __init__(self, d=D, experts=4):
        super().__init__()
        self.router = nn.Linear(d, experts, bias=False)
        self.experts = nn.ModuleList(GatedMlp(d) for _ in range(experts))

    def forward(self, h):
        weights = torch.softmax(self.router(h), dim=-1)
        weights, chosen = weights.topk(2, dim=-1)
        weights = weights / weights.sum(-1, keepdim=True)
        outputs = torch.stack([expert(h) for expert in self.experts], dim=-2)  # [..., E, d]
        picked = outputs.gather(-2, chosen.unsqueeze(-1).expand(*chosen.shape, h.shape[-1]))
        return (weights.unsqueeze(-1) * picked).sum(-2)


class SoftmaxAttention(nn.Module):
    def __init__(self, d=D):
        super().__init__()
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)

    def forward(self, h):
        q, k, v = self.qkv(h).chunk(3, dim=-1)
        return self.proj(torch.softmax(q @ k.transpose(-1, -2), dim=-1) @ v)


class MoEBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm1, self.attn, self.norm2, self.moe = RMSNorm(), SoftmaxAttention(), RMSNorm(), SoftmaxRoutedMoE()

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.moe(self.norm2(x))


def test_softmax_routed_moe_branch_is_moe_not_attention():
    _, plan = dynamo_plan(MoEBlock(), x_input())
    assert [layer.description for layer in plan.streams[0].layers] == ["attention", "moe"]
