"""The Block AttnRes rewrite (design §2–3) on captured Dynamo graphs, run eagerly.

The graph is captured with a do-nothing backend, planned, and rewritten with
``apply_plan``; the queries enter either as a new graph input (so a test can
feed zero or random queries) or as the backend's in-graph zeros. The rewritten
GraphModule then runs eagerly — the ``attnres::*`` ops' PyTorch path, no
Inductor — and is compared with the original module (zero queries, ``count``)
or with a hand-written Block AttnRes written from design §2 (random queries).
"""

import math
import operator

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import attnres_compile  # noqa: F401  (registers torch.ops.attnres.*)
from attnres_compile.core import zero_queries_in_graph
from attnres_compile.passes.graph import parameter_nodes
from attnres_compile.config import AttnResConfig
from attnres_compile.passes.pipeline import apply_plan, plan_graph
from attnres_compile.passes.reads import ROLES, tag_of
from fx_models import D, Mlp, ParallelStack, RMSNorm, capture, rewritten, x_input, zero_queries  # tests/support

OPS = torch.ops.attnres


# ---------------------------------------------------------------- models


class Sequential(nn.Module):
    """``n`` pre-norm steps ``x = x + mlp(norm(x))``; ``final=False`` returns the raw stream."""

    def __init__(self, n=5, norm=lambda: nn.LayerNorm(D), final=True):
        super().__init__()
        self.norms = nn.ModuleList(norm() for _ in range(n))
        self.fs = nn.ModuleList(Mlp() for _ in range(n))
        self.final = norm() if final else None

    def forward(self, x):
        for norm, f in zip(self.norms, self.fs):
            x = x + f(norm(x))
        return self.final(x) if self.final is not None else x

    def branches(self, i, h):
        """The branch of layer ``i`` applied to the value it reads (for the oracle)."""
        return self.fs[i](self.norms[i](h))


class EmbeddingLM(nn.Module):
    """``b_0 = emb * sqrt(d)`` (computed, not a graph input), RMSNorm, LayerScale, a hidden-state output."""

    def __init__(self, n=4, vocab=32):
        super().__init__()
        self.emb = nn.Embedding(vocab, D)
        self.norms = nn.ModuleList(RMSNorm() for _ in range(n))
        self.fs = nn.ModuleList(Mlp() for _ in range(n))
        self.gamma = nn.Parameter(torch.full((D,), 0.5))
        self.final = RMSNorm()
        self.head = nn.Linear(D, vocab, bias=False)

    def forward(self, idx):
        x = self.emb(idx) * math.sqrt(D)
        for norm, f in zip(self.norms, self.fs):
            x = x + self.gamma * f(norm(x))
        return self.head(self.final(x)), x  # logits and the last hidden state


# ---------------------------------------------------------------- helpers


def calls(gm, op):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is op]


def assert_rel_close(actual, expected, rel=1e-5):
    err = (actual - expected).abs().max() / expected.abs().max()
    assert err <= rel, f"relative error {err:.3g} > {rel}"


@pytest.mark.parametrize("num_blocks", [1, 2, 3, 5, 8])
def test_rewritten_graph_has_one_block_read_per_block_one_merge_per_layer_one_final_read(num_blocks):
    gm, _, plan, _ = rewritten(Sequential(5), x_input(), num_blocks=num_blocks)
    stream = plan.streams[0]
    gm.graph.lint()
    assert len(calls(gm, OPS.block_read.default)) == len(stream.blocks)
    assert len(calls(gm, OPS.merge.default)) == len(stream.layers) == 5
    assert len(calls(gm, OPS.read.default)) == 1
    names = {n.name for n in gm.graph.nodes}
    for layer in stream.layers:
        assert not set(layer.adds) & names, "old residual adds are erased"
    # phase 1 of block n reads b_0 and the n completed block sums
    reads = calls(gm, OPS.block_read.default)
    assert [len(r.args[0]) for r in reads] == list(range(1, len(stream.blocks) + 1))
    (final,) = calls(gm, OPS.read.default)
    assert len(final.args[0]) == len(stream.blocks) + 1
    # the final read feeds the final norm, the last stream value is gone
    assert [u.target for u in final.users] == [F.layer_norm]


def test_merge_scale_is_the_number_of_sources_in_count_mode_and_one_in_mean_mode():
    # blocks of [2, 2, 1]: layer j of block n reads n + 1 completed sources, plus p when j > 0
    for scale, expected in (("count", [1.0, 2.0, 2.0, 3.0, 3.0]), ("mean", [1.0] * 5)):
        torch._dynamo.reset()
        gm, _, plan, _ = rewritten(Sequential(5), x_input(), scale=scale, num_blocks=3)
        assert plan.streams[0].blocks == ((0, 1), (2, 3), (4,))
        assert [m.args[5] for m in calls(gm, OPS.merge.default)] == expected
        (final,) = calls(gm, OPS.read.default)
        assert final.args[3] == (4.0 if scale == "count" else 1.0)
        # the first layer of a block has no partial: absent, not zero
        assert [m.args[2] is None for m in calls(gm, OPS.merge.default)] == [True, False, True, False, True]


def test_parallel_layer_gets_one_read_for_both_branches():
    gm, _, plan, _ = rewritten(ParallelStack(3), x_input(), num_blocks=3)
    assert [layer.is_parallel for layer in plan.streams[0].layers] == [True] * 3
    merges = calls(gm, OPS.merge.default)
    assert len(merges) == 3
    for merge in merges:
        (norm,) = merge.users  # the shared pre-norm, read once for attention and MLP
        assert norm.target is F.layer_norm
        assert len(norm.users) == 2


def test_stream_dtype_and_shape_of_new_nodes():
    gm, example_inputs, plan, _ = rewritten(Sequential(3), x_input(), num_blocks=2)
    out = gm(zero_queries(plan), *example_inputs)[0]
    assert out.shape == (2, 5, D) and out.dtype == torch.float32


# ---------------------------------------------------------------- zero-query identity (count)


MODELS = {
    "sequential": lambda: Sequential(5),
    "sequential_rmsnorm_raw_output": lambda: Sequential(4, RMSNorm, final=False),
    "parallel": lambda: ParallelStack(3),
    "parallel_summed_first": lambda: ParallelStack(3, "(a + m) + x"),
}


@pytest.mark.parametrize("num_blocks", [1, 2, 8])
@pytest.mark.parametrize("name", list(MODELS))
def test_zero_queries_count_reproduce_the_original_model(name, num_blocks):
    torch.manual_seed(0)
    model = MODELS[name]()
    x = x_input(1)
    gm, example_inputs, plan, _ = rewritten(model, x, num_blocks=num_blocks)
    (out,) = gm(zero_queries(plan), *example_inputs)
    with torch.no_grad():
        expected = model(x)
    assert_rel_close(out.detach(), expected)


def test_zero_queries_count_reproduce_gradients():
    # fp64: in fp32 the inner layers' gradients of this loss are ~1e-6 of the final
    # norm's and differ by ~1% between any two summation orders (the hand-written
    # Block AttnRes below differs from the original model just as much).
    torch.manual_seed(0)
    model = Sequential(4).double()
    x = x_input(2).double().requires_grad_(True)
    probe = torch.randn(2, 5, D, dtype=torch.float64)
    (model(x) * probe).sum().backward()
    want = {k: p.grad.clone() for k, p in model.named_parameters()}
    want_x = x.grad.clone()
    model.zero_grad()
    x.grad = None
    gm, example_inputs, plan, _ = rewritten(model, x, num_blocks=2)
    queries = zero_queries(plan).double().requires_grad_(True)
    (out,) = gm(queries, *example_inputs)
    (out * probe).sum().backward()
    for k, p in model.named_parameters():
        assert_rel_close(p.grad, want[k], rel=1e-9)
    assert_rel_close(x.grad, want_x, rel=1e-9)
    assert queries.grad is not None and queries.grad.abs().max() > 0  # the queries learn


def test_backend_zero_queries_on_embedding_model_with_hidden_state_output():
    # b_0 is computed (emb * sqrt(d)), so the backend's in-graph zero queries work.
    torch.manual_seed(0)
    model = EmbeddingLM(4)
    idx = torch.randint(0, 32, (2, 5))
    gm, example_inputs = capture(model, idx)
    plan = plan_graph(gm.graph, parameter_nodes(gm, example_inputs), **AttnResConfig(num_blocks=2).plan_options)
    assert plan.streams[0].blocks == ((0, 1), (2, 3))
    apply_plan(gm, plan, zero_queries_in_graph(gm, plan), "count")
    (final,) = calls(gm, OPS.read.default)
    # the final norm (read twice: .float() and .type_as) and the returned hidden state
    assert any(u.op == "output" for u in final.users)
    assert not [n for n in gm.graph.nodes if n.name == plan.streams[0].stream_out]
    logits, hidden = gm(*example_inputs)
    with torch.no_grad():
        want_logits, want_hidden = model(idx)
    assert_rel_close(logits, want_logits)
    assert_rel_close(hidden, want_hidden)


def test_backend_zero_queries_when_b0_is_a_graph_input():
    """b_0 is the model's input: the first reads must follow the in-graph zero queries."""
    model, x = Sequential(3), x_input()
    gm, example_inputs = capture(model, x)
    plan = plan_graph(gm.graph, parameter_nodes(gm, example_inputs), **AttnResConfig().plan_options)
    apply_plan(gm, plan, zero_queries_in_graph(gm, plan), "count")
    with torch.no_grad():
        (out,) = gm(*example_inputs)  # a Dynamo graph returns a tuple
        assert_rel_close(out, model(x))


# ---------------------------------------------------------------- mean scale


def test_mean_scale_with_raw_output_is_the_stream_divided_by_the_source_count():
    # "mean" reads h = sum(alpha_i v_i) = x_l / n_l at zero queries (design §2). Every
    # pre-norm inside is scale-invariant (up to eps), but the model returns the
    # stream raw (no final norm): the output is the original one divided by the
    # final read's source count, not the original. Only "count" is exact here.
    torch.manual_seed(0)
    model = Sequential(4, RMSNorm, final=False)
    x = x_input(3)
    gm, example_inputs, plan, _ = rewritten(model, x, scale="mean", num_blocks=2)
    (out,) = gm(zero_queries(plan), *example_inputs)
    with torch.no_grad():
        expected = model(x)
    num_sources = len(plan.streams[0].blocks) + 1  # b_0 and the 2 block sums
    assert (out - expected).abs().max() > 0.1 * expected.abs().max()
    assert_rel_close(out.detach() * num_sources, expected, rel=1e-3)  # eps of the inner norms


def test_mean_scale_behind_a_final_norm_matches_up_to_eps():
    torch.manual_seed(0)
    model = Sequential(4, RMSNorm, final=True)
    x = x_input(4)
    gm, example_inputs, plan, _ = rewritten(model, x, scale="mean", num_blocks=2)
    (out,) = gm(zero_queries(plan), *example_inputs)
    with torch.no_grad():
        expected = model(x)
    assert_rel_close(out.detach(), expected, rel=1e-3)


# ---------------------------------------------------------------- random queries vs. design §2


def _rms_key(v, eps):
    return v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + eps)


def _read(sources, w, eps, scale):
    v = torch.stack(sources)  # [S, B, T, d]
    alpha = torch.softmax((_rms_key(v, eps) * w).sum(-1), dim=0)  # [S, B, T]
    c = len(sources) if scale == "count" else 1.0
    return c * (alpha.unsqueeze(-1) * v).sum(0)


def block_attnres(model, x, queries, blocks, eps, scale):
    """Design §2 literally: sources b_0..b_{n-1} plus the partial p, one read per layer."""
    sources, partial = [x], None
    for block in blocks:
        for j, layer in enumerate(block):
            h = _read(sources + ([partial] if j > 0 else []), queries[layer], eps, scale)
            f = model.branches(layer, h)
            partial = f if j == 0 else partial + f
        sources.append(partial)
    h = _read(sources, queries[-1], eps, scale)
    return model.final(h) if model.final is not None else h


@pytest.mark.parametrize("scale", ["count", "mean"])
@pytest.mark.parametrize(
    "name, num_blocks",
    [("sequential", 2), ("sequential", 1), ("sequential", 8), ("sequential_rmsnorm_raw_output", 3), ("parallel", 2)],
)
def test_random_queries_match_a_hand_written_block_attnres(name, num_blocks, scale):
    torch.manual_seed(0)
    model = MODELS[name]()
    x = x_input(5)
    gm, example_inputs, plan, _ = rewritten(model, x, scale=scale, num_blocks=num_blocks)
    stream = plan.streams[0]
    queries = torch.randn(stream.num_queries, D, generator=torch.Generator().manual_seed(7))
    (out,) = gm(queries, *example_inputs)
    with torch.no_grad():
        expected = block_attnres(model, x, queries, stream.blocks, stream.eps, scale)
    assert_rel_close(out.detach(), expected, rel=1e-5)
    assert (out - model(x)).abs().max() > 1e-3  # the queries do change the model


# ---------------------------------------------------------------- re-planning


def test_rewritten_graph_has_no_stream_left():
    gm, example_inputs, plan, _ = rewritten(Sequential(4), x_input(), num_blocks=2)
    params = parameter_nodes(gm, [None, *example_inputs])  # the queries input comes first
    again = plan_graph(gm.graph, params, **AttnResConfig().plan_options)
    assert again.streams == ()


def test_nodes_are_ordered_after_rewrite():
    gm, _, _, _ = rewritten(ParallelStack(2), x_input(), num_blocks=1)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    for node in gm.graph.nodes:
        for u in node.all_input_nodes:
            assert order[u] < order[node]
    getitems = [n for n in gm.graph.nodes if n.target is operator.getitem]
    assert all(g.args[0].target is OPS.block_read.default for g in getitems)


def _place(tag):
    return {key: tag[key] for key in ("stream", "block", "layer")}


def test_every_new_node_is_tagged_with_its_stream_block_and_layer():
    gm, _, plan, _ = rewritten(Sequential(5), x_input(), num_blocks=2)
    stream = plan.streams[0]
    tags = {n: tag_of(n) for n in gm.graph.nodes}
    for node in calls(gm, OPS.block_read.default):
        first_layer = stream.blocks[tags[node]["block"]][0]
        assert _place(tags[node]) == {"stream": 0, "block": tags[node]["block"], "layer": first_layer}
    merges = calls(gm, OPS.merge.default)
    assert [tags[n]["layer"] for n in merges] == list(range(len(stream.layers)))
    assert [tags[n]["block"] for n in merges] == [b for b, layers in enumerate(stream.blocks) for _ in layers]
    (final,) = calls(gm, OPS.read.default)
    assert _place(tags[final]) == {"stream": 0, "block": len(stream.blocks), "layer": len(stream.layers)}
    assert all(tags[n] is None for n in gm.graph.nodes if n.op == "placeholder")


def test_every_new_node_says_its_role_and_each_read_what_it_weighs():
    gm, _, plan, _ = rewritten(Sequential(5), x_input(), num_blocks=2)  # blocks of 3 and 2 layers
    tagged = [tag_of(n) for n in gm.graph.nodes if tag_of(n) is not None]
    assert tagged and all(tag["role"] in ROLES for tag in tagged)
    for node in calls(gm, OPS.block_read.default):
        block = tag_of(node)["block"]
        assert tag_of(node)["role"] == "block_read"
        assert tag_of(node)["sources"] == [f"b_{j}" for j in range(block + 1)]
        assert len(node.args[0]) == block + 1
    for node in calls(gm, OPS.merge.default):
        tag = tag_of(node)
        completed = [f"b_{j}" for j in range(tag["block"] + 1)]
        first_of_block = tag["layer"] == plan.streams[0].blocks[tag["block"]][0]
        assert tag["role"] == "merge"
        assert tag["sources"] == completed + ([] if first_of_block else ["partial"])
        assert (node.args[2] is None) == first_of_block
    (final,) = calls(gm, OPS.read.default)
    assert tag_of(final)["role"] == "read" and tag_of(final)["sources"] == ["b_0", "b_1", "b_2"]
