"""Branch kinds in the plan: attention, MLP, MoE, parallel pairs — read off the ops."""

import torch
import torch.nn.functional as F
from torch import nn

from attnres_compile.passes.graph import parameter_nodes
from attnres_compile.config import AttnResConfig
from attnres_compile.passes.pipeline import plan_graph
from fx_models import D, Mlp, ParallelStack, capture, x_input  # tests/support


class SelfAttention(nn.Module):
    """Single-head attention written out (softmax, no fused kernel)."""

    def __init__(self, fused=False):
        super().__init__()
        self.qkv = nn.Linear(D, 3 * D)
        self.proj = nn.Linear(D, D)
        self.fused = fused

    def forward(self, h):
        q, k, v = self.qkv(h).chunk(3, dim=-1)
        if self.fused:
            return self.proj(F.scaled_dot_product_attention(q, k, v, is_causal=True))
        return self.proj(torch.softmax(q @ k.transpose(-1, -2), dim=-1) @ v)


class TopkMoE(nn.Module):
    """Top-1 routing over two experts, dense for simplicity."""

    def __init__(self):
        super().__init__()
        self.router = nn.Linear(D, 2)
        self.experts = nn.ModuleList(Mlp() for _ in range(2))

    def forward(self, h):
        weight, choice = self.router(h).topk(1, dim=-1)
        out = torch.stack([e(h) for e in self.experts], dim=-1)
        return (out.gather(-1, choice.unsqueeze(-2).expand(*h.shape, 1)).squeeze(-1)) * weight


class Mixed(nn.Module):
    def __init__(self, fused=False):
        super().__init__()
        self.norms = nn.ModuleList(nn.LayerNorm(D) for _ in range(3))
        self.branches = nn.ModuleList([SelfAttention(fused), Mlp(), TopkMoE()])

    def forward(self, x):
        for norm, branch in zip(self.norms, self.branches):
            x = x + branch(norm(x))
        return x


def plan_of(model):
    gm, inputs = capture(model, x_input())
    plan = plan_graph(gm.graph, parameter_nodes(gm, inputs), **AttnResConfig().plan_options)
    assert len(plan.streams) == 1, plan.summary()
    return plan.streams[0]


def test_attention_mlp_and_moe_branches_are_told_apart():
    for fused in (False, True):
        stream = plan_of(Mixed(fused))
        assert [layer.description for layer in stream.layers] == ["attention", "mlp", "moe"]


def test_module_paths_name_the_layer_and_each_branch_output():
    stream = plan_of(Mixed())
    assert [layer.module_path for layer in stream.layers] == ["", "", ""]  # adds live in the top module
    assert stream.layers[0].branch_modules == ("branches.0.proj",)
    assert stream.layers[1].branch_modules[0].startswith("branches.1")


def test_parallel_pair_lists_both_branch_kinds():
    stream = plan_of(ParallelStack(n=2))
    assert all(layer.is_parallel for layer in stream.layers)
    assert all(layer.description == "parallel (mlp + mlp)" for layer in stream.layers)
