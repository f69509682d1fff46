"""Residual-stream detection (design §4) on small hand-written models.

Graphs are captured with a do-nothing Dynamo backend (torch IR) or exported
with ``torch.export`` (aten IR); the detector only reads them, so no Inductor
compile is needed. Each model is a few ``d = 16`` layers; the assertions name
the layer counts, ``b_0`` and eps the plan must carry.
"""

import math
import operator

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from attnres_compile.passes.graph import parameter_nodes
from attnres_compile.config import AttnResConfig
from attnres_compile.passes.pipeline import plan_graph
from attnres_compile.passes.detect import find_residual_streams
from fx_models import D, Mlp, ParallelStack, RMSNorm, capture, x_input  # tests/support


# ---------------------------------------------------------------- helpers


def dynamo_plan(model, *args, **config):
    gm, example_inputs = capture(model, *args)
    return gm, plan_graph(gm.graph, parameter_nodes(gm, example_inputs), **AttnResConfig(**config).plan_options)


def export_plan(model, *args, decompositions=None, **config):
    """Plan of an exported (aten IR) graph; ``decompositions=None`` keeps composite ops."""
    ep = torch.export.export(model, args)
    ep = ep.run_decompositions({} if decompositions is None else decompositions)
    names = set(ep.graph_signature.inputs_to_parameters)
    params = {n for n in ep.graph.nodes if n.op == "placeholder" and n.name in names}
    return ep, plan_graph(ep.graph, params, **AttnResConfig(**config).plan_options)


def layer_counts(plan):
    return [len(s.layers) for s in plan.streams]


class OnePlusRMSNorm(nn.Module):
    """Gemma-style ``(1 + w)`` gain around an fp32 RMSNorm."""

    def __init__(self, d=D, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(d))

    def forward(self, x):
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (h * (1.0 + self.weight.float())).type_as(x)


class WeightlessLayerNorm(nn.Module):
    def __init__(self, d=D):
        super().__init__()
        self.d = d

    def forward(self, x):
        return F.layer_norm(x, (self.d,), None, None, 1e-5)


class ShapeReadingRMSNorm(nn.Module):
    """Touches the stream a second time only for metadata (``x.size()``, ``zeros_like``)."""

    def __init__(self, d=D, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x):
        shape = x.size()
        h = x.reshape(-1, shape[-1]).float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight * h).reshape(shape) + torch.zeros_like(x)


class HandWrittenLayerNorm(nn.Module):
    """``x * x`` (one input read twice) and ``1 / sqrt(var + eps)`` (a scalar numerator)."""

    def forward(self, x):
        centered = x - x.mean(-1, keepdim=True)
        return centered * (1.0 / torch.sqrt((centered * centered).mean(-1, keepdim=True) + 1e-5))


NORMS = {
    "layernorm": lambda: nn.LayerNorm(D),
    "hand_written_layernorm": HandWrittenLayerNorm,
    "rmsnorm_fp32_type_as": RMSNorm,
    "one_plus_w": OnePlusRMSNorm,
    "F.layer_norm_no_weight": WeightlessLayerNorm,
    "metadata_reads": ShapeReadingRMSNorm,
}


# ---------------------------------------------------------------- models


class PreNormStack(nn.Module):
    """``n`` sequential pre-norm steps ``x = x + lin(norm(x))`` and a final norm."""

    def __init__(self, n=4, norm=lambda: nn.LayerNorm(D), add="x + f", final=True):
        super().__init__()
        self.norms = nn.ModuleList(norm() for _ in range(n))
        self.fs = nn.ModuleList(nn.Linear(D, D) for _ in range(n))
        self.final = norm() if final else None
        self.add = add

    def forward(self, x):
        for norm, f in zip(self.norms, self.fs):
            y = f(norm(x))
            if self.add == "x + f":
                x = x + y
            elif self.add == "f + x":
                x = y + x
            elif self.add == "x += f":
                x += y
            else:
                raise AssertionError(self.add)
        return self.final(x) if self.final is not None else x


class DropoutLayerScaleStack(nn.Module):
    """timm ViT-style: ``x = x + drop(gamma * mlp(norm(x)))`` and ``x + 0.5 * drop(f)``."""

    def __init__(self, n=4):
        super().__init__()
        self.norms = nn.ModuleList(nn.LayerNorm(D) for _ in range(n))
        self.fs = nn.ModuleList(Mlp() for _ in range(n))
        self.gammas = nn.ParameterList(nn.Parameter(torch.full((D,), 0.1)) for _ in range(n))
        self.drop = nn.Dropout(0.0)
        self.final = nn.LayerNorm(D)

    def forward(self, x):
        for i, (norm, f, gamma) in enumerate(zip(self.norms, self.fs, self.gammas)):
            if i % 2 == 0:
                x = x + self.drop(gamma * f(norm(x)))
            else:
                x = x + 0.5 * F.dropout(f(norm(x)), p=0.0, training=self.training)
        return self.final(x)


class ScaledEmbeddingLM(nn.Module):
    """Gemma-style ``emb * sqrt(d)`` before the first layer: that product is ``b_0``."""

    def __init__(self, n=3, vocab=32):
        super().__init__()
        self.emb = nn.Embedding(vocab, D)
        self.stack = PreNormStack(n, RMSNorm)

    def forward(self, idx):
        return self.stack(self.emb(idx) * math.sqrt(D))


class MoE(nn.Module):
    """Two routed experts plus a sigmoid-gated shared expert: one branch, sums inside."""

    def __init__(self, d=D):
        super().__init__()
        self.router = nn.Linear(d, 2, bias=False)
        self.e0, self.e1, self.shared = nn.Linear(d, d), nn.Linear(d, d), Mlp(d)
        self.shared_gate = nn.Linear(d, 1, bias=False)

    def forward(self, h):
        w = torch.softmax(self.router(h), dim=-1)
        routed = w[..., 0:1] * self.e0(h) + w[..., 1:2] * self.e1(h)
        return routed + torch.sigmoid(self.shared_gate(h)) * self.shared(h)


class MoEStack(nn.Module):
    """Mixtral-style: attention then MoE, each its own step."""

    def __init__(self, n=2):
        super().__init__()
        self.n1 = nn.ModuleList(RMSNorm() for _ in range(n))
        self.attn = nn.ModuleList(nn.Linear(D, D) for _ in range(n))
        self.n2 = nn.ModuleList(RMSNorm() for _ in range(n))
        self.moe = nn.ModuleList(MoE() for _ in range(n))
        self.final = RMSNorm()

    def forward(self, x):
        for n1, attn, n2, moe in zip(self.n1, self.attn, self.n2, self.moe):
            x = x + attn(n1(x))
            x = x + moe(n2(x))
        return self.final(x)


# ---------------------------------------------------------------- detection


@pytest.mark.parametrize("norm", list(NORMS), ids=list(NORMS))
@pytest.mark.parametrize("add", ["x + f", "f + x", "x += f"])
def test_sequential_pre_norm_is_one_stream_of_every_layer(norm, add):
    x = x_input()
    gm, plan = dynamo_plan(PreNormStack(4, NORMS[norm], add), x)
    assert layer_counts(plan) == [4]
    stream = plan.streams[0]
    placeholder = next(n.name for n in gm.graph.nodes if n.op == "placeholder" and n.name.startswith("l_x"))
    assert stream.source == placeholder
    assert stream.width == D
    assert all(not layer.is_parallel for layer in stream.layers)
    # consecutive: each layer reads the previous layer's output
    for prev, layer in zip(stream.layers, stream.layers[1:]):
        assert layer.stream_in == prev.stream_out
    assert [layer.index for layer in stream.layers] == [0, 1, 2, 3]


def test_layer_plans_name_their_adds_and_branches():
    gm, plan = dynamo_plan(PreNormStack(2), x_input())
    nodes = {n.name: n for n in gm.graph.nodes}
    for layer in plan.streams[0].layers:
        (add,) = (nodes[a] for a in layer.adds)
        (branch,) = (nodes[b] for b in layer.branches)
        assert set(add.args) == {nodes[layer.stream_in], branch}


def test_dropout_p0_and_layerscale_between_branch_and_add_do_not_matter():
    model = DropoutLayerScaleStack(4)
    assert model.training  # dropout stays in the graph
    _, plan = dynamo_plan(model, x_input())
    assert layer_counts(plan) == [4]


class _ToLocal(nn.Module):
    """A parametrization whose forward is a method call, as SimpleFSDP's ``W.redistribute(...).to_local()``."""

    def forward(self, stored):
        return stored.contiguous()


def test_weights_reached_through_method_calls_are_weights():
    """Dynamo records a parametrized weight as a call_method on the parameter: the branch still has its matrix."""
    model = PreNormStack(3)
    for module in model.modules():
        if isinstance(module, nn.Linear):
            nn.utils.parametrize.register_parametrization(module, "weight", _ToLocal())
    gm, plan = dynamo_plan(model, x_input())
    assert any(n.op == "call_method" and n.target == "contiguous" for n in gm.graph.nodes)
    assert layer_counts(plan) == [3]


def test_scaled_embedding_is_b0():
    idx = torch.randint(0, 32, (2, 5))
    gm, plan = dynamo_plan(ScaledEmbeddingLM(3), idx)
    assert layer_counts(plan) == [3]
    b0 = next(n for n in gm.graph.nodes if n.name == plan.streams[0].source)
    assert b0.op == "call_function" and b0.target in (torch.mul, operator.mul)
    assert math.sqrt(D) in b0.args
    assert plan.streams[0].eps == pytest.approx(1e-6)


@pytest.mark.parametrize("assoc", ["x + a + m", "(x + a) + m", "m + (x + a)"])
def test_parallel_pair_of_two_adds_is_one_parallel_layer(assoc):
    gm, plan = dynamo_plan(ParallelStack(3, assoc), x_input())
    assert layer_counts(plan) == [3]  # one layer per attention + MLP pair
    nodes = {n.name: n for n in gm.graph.nodes}
    for layer in plan.streams[0].layers:
        assert layer.is_parallel
        assert len(layer.adds) == len(layer.branches) == 2
        # both branches read the same stream value, through the same norm
        assert all(nodes[layer.stream_in] in _ancestors(nodes[b]) for b in layer.branches)


@pytest.mark.parametrize("assoc", ["(a + m) + x", "m = a; m += mlp; x + m"])
def test_parallel_pair_summed_first_is_one_sequential_layer(assoc):
    # The branches meet before they meet the stream: one add touches the stream,
    # so the step is a plain one whose branch is the sum (a MoE-like branch).
    _, plan = dynamo_plan(ParallelStack(3, assoc), x_input())
    assert layer_counts(plan) == [3]
    assert [layer.is_parallel for layer in plan.streams[0].layers] == [False] * 3
    assert all(len(layer.adds) == 1 for layer in plan.streams[0].layers)


def test_moe_branch_with_sums_inside_is_one_step():
    _, plan = dynamo_plan(MoEStack(2), x_input())
    assert layer_counts(plan) == [4]  # attn, moe, attn, moe
    assert all(not layer.is_parallel for layer in plan.streams[0].layers)


@pytest.mark.parametrize(
    "norm, eps",
    [(lambda: nn.LayerNorm(D, eps=1e-5), 1e-5), (lambda: RMSNorm(D, eps=1e-6), 1e-6),
     (lambda: nn.LayerNorm(D, eps=3e-4), 3e-4), (lambda: RMSNorm(D, eps=2e-5), 2e-5)],
    ids=["layernorm-1e-5", "rmsnorm-1e-6", "layernorm-3e-4", "rmsnorm-2e-5"],
)
def test_eps_is_read_off_the_models_norm_and_config_overrides_it(norm, eps):
    model = PreNormStack(2, norm)
    _, plan = dynamo_plan(model, x_input())
    assert plan.streams[0].eps == pytest.approx(eps, rel=1e-12)
    torch._dynamo.reset()
    _, plan = dynamo_plan(model, x_input(), eps=1e-3)
    assert plan.streams[0].eps == pytest.approx(1e-3)


def test_plan_to_dict_and_summary_are_plain_data():
    _, plan = dynamo_plan(ParallelStack(2), x_input())
    data = plan.to_dict()
    assert data["streams"][0]["width"] == D and len(data["streams"][0]["layers"]) == 2
    assert "2 layers (2 parallel)" in plan.summary()
    assert plan.query_shapes == ((3, D),)


def _ancestors(node):
    seen, stack = set(), [node]
    while stack:
        n = stack.pop()
        for u in n.all_input_nodes:
            if u not in seen:
                seen.add(u)
                stack.append(u)
    return seen


# ---------------------------------------------------------------- non-detection


class SkipMlp(nn.Module):
    """``x + relu(lin(x))``: a skip with no norm anywhere, not a residual stream."""

    def __init__(self, n=3):
        super().__init__()
        self.fs = nn.ModuleList(nn.Linear(D, D) for _ in range(n))

    def forward(self, x):
        for f in self.fs:
            x = x + torch.relu(f(x))
        return x


class PostNorm(nn.Module):
    """BERT / original Transformer: ``x = ln(x + f(x))``, normalized after the add."""

    def __init__(self, n=3):
        super().__init__()
        self.fs = nn.ModuleList(Mlp() for _ in range(n))
        self.lns = nn.ModuleList(nn.LayerNorm(D) for _ in range(n))

    def forward(self, x):
        for f, ln in zip(self.fs, self.lns):
            x = ln(x + f(x))
        return x


def gelu_tanh_poly(h):
    return 0.5 * h * (1.0 + torch.tanh(0.7978845608 * (h + 0.044715 * h * h * h)))


class WeightlessBranches(nn.Module):
    """Branches with a norm but no weight matrix: a GELU, a bias add, a 1-D gain."""

    def __init__(self):
        super().__init__()
        self.n0, self.n1, self.n2 = nn.LayerNorm(D), nn.LayerNorm(D), nn.LayerNorm(D)
        self.bias = nn.Parameter(torch.zeros(D))
        self.gain = nn.Parameter(torch.ones(D))

    def forward(self, x):
        x = x + gelu_tanh_poly(self.n0(x))
        x = x + (self.n1(x) + self.bias)
        x = x + self.gain * torch.tanh(self.n2(x))
        return x


def test_skip_without_norm_is_no_stream_and_the_skip_says_why():
    _, plan = dynamo_plan(SkipMlp(3), x_input())
    assert plan.streams == ()
    assert len(plan.skipped) == 3
    assert all("raw" in s.reason and "normalization" in s.reason for s in plan.skipped)
    assert "no residual stream rewritten" in plan.summary()


def test_post_norm_is_no_stream():
    _, plan = dynamo_plan(PostNorm(3), x_input())
    assert plan.streams == ()
    assert plan.skipped, "post-norm adds are reported, not silently dropped"
    assert all("raw" in s.reason for s in plan.skipped)


def test_branch_without_weight_matrix_is_no_step():
    _, plan = dynamo_plan(WeightlessBranches(), x_input())
    assert plan.streams == ()
    gm, example_inputs = capture(WeightlessBranches(), x_input())
    streams, _ = find_residual_streams(gm.graph, parameter_nodes(gm, example_inputs))
    assert streams == []


class WeightlessStepInTheMiddle(nn.Module):
    def __init__(self):
        super().__init__()
        self.stack_a = PreNormStack(2, final=False)
        self.norm = nn.LayerNorm(D)
        self.stack_b = PreNormStack(2)

    def forward(self, x):
        x = self.stack_a(x)
        x = x + gelu_tanh_poly(self.norm(x))
        return self.stack_b(x)


def test_weightless_step_between_layers_splits_the_stream():
    # What the code does: the weightless add is not a step, so the layers on
    # either side chain into two streams, each rewritten on its own.
    _, plan = dynamo_plan(WeightlessStepInTheMiddle(), x_input())
    assert layer_counts(plan) == [2, 2]


class ForeignRead(nn.Module):
    """Layer 3 also reads ``b_0`` (the embedding) inside its branch, as a gate."""

    def __init__(self, n=4):
        super().__init__()
        self.norms = nn.ModuleList(nn.LayerNorm(D) for _ in range(n))
        self.fs = nn.ModuleList(nn.Linear(D, D) for _ in range(n))

    def forward(self, x):
        emb = x
        for i, (norm, f) in enumerate(zip(self.norms, self.fs)):
            h = norm(x)
            if i == 3:
                h = h * torch.sigmoid(emb)
            x = x + f(h)
        return x


class ForeignReadByAdd(ForeignRead):
    """Layer 3 adds ``b_0`` raw to its normed input: ``f(norm(x) + emb)``."""

    def forward(self, x):
        emb = x
        for i, (norm, f) in enumerate(zip(self.norms, self.fs)):
            h = norm(x)
            if i == 3:
                h = h + emb
            x = x + f(h)
        return x


class ForeignReadOfEarlierLayer(ForeignRead):
    """Layer 3's branch reads layer 1's output, a stream value it does not own."""

    def forward(self, x):
        seen = []
        for i, (norm, f) in enumerate(zip(self.norms, self.fs)):
            h = norm(x)
            if i == 3:
                h = h * torch.sigmoid(seen[1].mean(-1, keepdim=True))
            x = x + f(h)
            seen.append(x)
        return x


@pytest.mark.parametrize("model", [ForeignRead, ForeignReadOfEarlierLayer])
def test_branch_reading_another_stream_value_skips_the_stream(model):
    gm, plan = dynamo_plan(model(4), x_input())
    assert plan.streams == ()
    names = {n.name for n in gm.graph.nodes}
    (site,) = [s for s in plan.skipped if "outside this layer" in s.reason]
    assert site.node in names
    assert "layer 3" in site.reason


class Fork(nn.Module):
    """One stream value feeds two separate residual adds (two heads on a trunk)."""

    def __init__(self):
        super().__init__()
        self.trunk = PreNormStack(2, final=False)
        self.na, self.nb = nn.LayerNorm(D), nn.LayerNorm(D)
        self.fa, self.fb = nn.Linear(D, D), nn.Linear(D, D)

    def forward(self, x):
        x = self.trunk(x)
        return x + self.fa(self.na(x)), x + self.fb(self.nb(x))


def test_branch_adding_b0_raw_skips_the_stream():
    # ``norm(x_3) + emb`` looks like a step of ``emb`` whose branch is layers 0-2;
    # it is dropped as a skip around a stack, and layer 3's raw read of emb then
    # refuses the whole stream, naming the node.
    _, plan = dynamo_plan(ForeignReadByAdd(4), x_input())
    assert plan.streams == ()
    assert any("a skip connection around a whole stack" in s.reason for s in plan.skipped)
    assert any("layer 3" in s.reason and "outside this layer" in s.reason for s in plan.skipped)


class LongSkip(nn.Module):
    """An embedding skip around the whole stack: ``emb + final(stack(emb * 4))``."""

    def __init__(self):
        super().__init__()
        self.stack = PreNormStack(3, final=False)
        self.final = nn.LayerNorm(D)

    def forward(self, emb):
        return emb + self.final(self.stack(emb * 4.0))


def test_skip_around_the_whole_stack_is_not_a_layer():
    _, plan = dynamo_plan(LongSkip(), x_input())
    assert layer_counts(plan) == [3]


def test_stream_that_forks_is_skipped():
    gm, plan = dynamo_plan(Fork(), x_input())
    assert plan.streams == ()
    (site,) = [s for s in plan.skipped if "forks" in s.reason]
    assert site.node in {n.name for n in gm.graph.nodes}
    assert "2 residual adds" in site.reason


# ---------------------------------------------------------------- aten IR (torch.export)


@pytest.mark.parametrize("add", ["x + f", "x += f"])
def test_export_layernorm_stack(add):
    ep, plan = export_plan(PreNormStack(3, add=add), x_input())
    assert layer_counts(plan) == [3]
    assert plan.streams[0].source == "x"
    assert plan.streams[0].eps == pytest.approx(1e-5)


def test_export_weightless_layer_norm():
    _, plan = export_plan(PreNormStack(3, WeightlessLayerNorm), x_input())
    assert layer_counts(plan) == [3]


@pytest.mark.parametrize("assoc", ["x + a + m", "(a + m) + x"])
def test_export_parallel(assoc):
    _, plan = export_plan(ParallelStack(2, assoc), x_input())
    assert layer_counts(plan) == [2]
    assert {layer.is_parallel for layer in plan.streams[0].layers} == {assoc == "x + a + m"}


def test_export_post_norm_is_no_stream():
    _, plan = export_plan(PostNorm(2), x_input())
    assert plan.streams == ()


@pytest.mark.parametrize("norm", [RMSNorm, OnePlusRMSNorm])
def test_export_rmsnorm_with_type_as(norm):
    _, plan = export_plan(PreNormStack(3, norm), x_input())
    assert layer_counts(plan) == [3]


@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm_fp32_type_as"])
def test_export_core_aten_linear(norm):
    _, plan = export_plan(PreNormStack(3, NORMS[norm]), x_input(), decompositions=_core_aten())
    assert layer_counts(plan) == [3]


def _core_aten():
    from torch.export import default_decompositions

    return default_decompositions()


def test_make_fx_graph():
    from torch.fx.experimental.proxy_tensor import make_fx

    model = PreNormStack(3)
    params = dict(model.named_parameters())
    gm = make_fx(lambda p, x: torch.func.functional_call(model, p, (x,)))(params, x_input())
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    plan = plan_graph(gm.graph, set(placeholders[: len(params)]), **AttnResConfig().plan_options)
    assert layer_counts(plan) == [3]


# ---------------------------------------------------------------- dynamic shapes


def _capture_dynamic(model, x, dynamic):
    graphs = []

    def backend(gm, example_inputs):
        graphs.append((gm, example_inputs))
        return gm.forward

    torch.compile(model, backend=backend, fullgraph=True, dynamic=dynamic)(x)
    gm, example_inputs = graphs[-1]
    return plan_graph(gm.graph, parameter_nodes(gm, example_inputs), **AttnResConfig().plan_options)


@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm_fp32_type_as", "metadata_reads"])
def test_dynamic_batch_and_sequence_keep_the_stream(norm):
    x = x_input()
    torch._dynamo.mark_dynamic(x, 0)
    torch._dynamo.mark_dynamic(x, 1)
    plan = _capture_dynamic(PreNormStack(3, NORMS[norm]), x, dynamic=None)
    assert layer_counts(plan) == [3]
    assert plan.streams[0].width == D


def test_dynamic_true_keeps_the_stream():
    plan = _capture_dynamic(PreNormStack(3), x_input(), dynamic=True)
    assert layer_counts(plan) == [3]
