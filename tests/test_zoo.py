"""The model zoo: every architecture family of design §4, from a real model definition.

Each model (``zoo.FAMILIES``: tiny configs, random weights) is checked three ways:

* structure — ``inspect_model`` (a dry run, no Inductor) finds the streams and
  layers the family has: parallel pairs, one stream per stack, post-branch
  norms inside the branch, LayerScale and DropPath between branch and add;
* numerics — ``verify``: zero-init identity (compiled rewrite vs eager
  original, outputs and every parameter gradient, fp32 rel <= 1e-5 in
  ``count`` scale) and random queries (compiled vs eager rewritten reference);
* training — 5 AdamW steps through ``backend="attnres"``: the queries leave
  zero and the loss stays finite.

Partitions vary across the zoo (2 blocks, Full AttnRes, one block, a short last
block) so that every model also exercises a different layout.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._pytree import tree_flatten

import attnres_compile
from attnres_compile import AttnResBackend, AttnResConfig
from attnres_compile.dry_run import inspect_model
from attnres_compile.passes.classify import ATTENTION, MLP, branch_kind
from attnres_compile.passes.detect import region_between
from attnres_compile.passes.graph import topo_index
from attnres_compile.passes.reads import tag_of
from zoo import FAMILIES

N_LAYER = 2  # transformer blocks per stack in every zoo model

# name -> (config, residual steps per stream). Sequential stacks have an attention
# and an MLP step per block; parallel ones one step per block; T5's decoder has a
# cross-attention step per block as well.
CASES = {
    "tiny_gpt": (AttnResConfig(block_size=3), [4]),  # blocks of 3 and 1: a short last block
    "gpt2": (AttnResConfig(num_blocks=4), [4]),  # Full AttnRes: every layer its own block
    "llama": (AttnResConfig(num_blocks=1), [4]),  # one block: a single partial
    "mixtral": (AttnResConfig(num_blocks=2), [4]),
    "gpt_neox": (AttnResConfig(num_blocks=2), [2]),
    "gemma2": (AttnResConfig(num_blocks=2), [4]),
    "olmo2": (AttnResConfig(num_blocks=2), [4]),
    "t5": (AttnResConfig(num_blocks=2), [4, 6]),
    "vit": (AttnResConfig(num_blocks=2), [4]),
    "dinov2": (AttnResConfig(num_blocks=2), [4]),
    "timm_style_vit": (AttnResConfig(num_blocks=3), [4]),  # ceil(4 / 3) = 2 per block
}


def expected_blocks(num_layers: int, config: AttnResConfig) -> list[list[int]]:
    """Consecutive blocks of ``block_size`` (or ``ceil(L / num_blocks)``) layers, short block last."""
    size = config.block_size or math.ceil(num_layers / min(config.num_blocks, num_layers))
    return [list(range(i, min(i + size, num_layers))) for i in range(0, num_layers, size)]


def build(name):
    _, factory = FAMILIES[name]
    return factory()


def inspection(name):
    """The one graph of ``name``'s model as planned and rewritten (dry run)."""
    model, args, kwargs = build(name)
    (graph,) = inspect_model(model, args, CASES[name][0], example_kwargs=kwargs)
    assert graph.refused is None, f"{name}: not rewritten: {graph.refused}\n{graph.plan.summary()}"
    return graph


def test_every_family_model_has_a_case():
    assert sorted(CASES) == sorted(FAMILIES)


# ---------------------------------------------------------------- structure


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_streams_layers_and_blocks(name):
    config, layers = CASES[name]
    plan = inspection(name).plan
    assert [len(s.layers) for s in plan.streams] == layers, plan.summary()
    for stream in plan.streams:
        assert [list(b) for b in stream.blocks] == expected_blocks(len(stream.layers), config)
        assert stream.width == 32


def _nodes(graph_module):
    return {n.name: n for n in graph_module.graph.nodes}


def test_gpt_neox_layers_are_parallel_pairs_with_one_read():
    """``mlp + attn + x``: each layer's branch is the sum of an attention and an MLP that read the same value.

    The pair meets before it meets the stream, so the plan holds it as one step
    whose branch is the sum: one read feeds both branches, as the family needs.
    """
    graph = inspection("gpt_neox")
    nodes, order = _nodes(graph.before), topo_index(graph.before.graph)
    for layer in graph.plan.streams[0].layers:
        (branch,) = (nodes[b] for b in layer.branches)
        stream_in = nodes[layer.stream_in]
        assert len(branch.args) == 2 and all(isinstance(a, torch.fx.Node) for a in branch.args), branch.format_node()
        kinds = sorted(branch_kind(region_between(stream_in, [part], order)) for part in branch.args)
        assert kinds == sorted([ATTENTION, MLP]), kinds


def test_mixtral_steps_alternate_attention_and_moe():
    layers = inspection("mixtral").plan.streams[0].layers
    assert [layer.description for layer in layers] == ["attention", "moe"] * N_LAYER


@pytest.mark.parametrize("name, norms", [
    ("gemma2", ["post_attention_layernorm", "post_feedforward_layernorm"]),
    ("olmo2", ["post_attention_layernorm", "post_feedforward_layernorm"]),
])
def test_post_branch_norms_are_inside_the_branch(name, norms):
    """The value added to the stream is the post-branch norm's output: the norm belongs to the branch."""
    layers = inspection(name).plan.streams[0].layers
    ends = [layer.branch_modules[0].rpartition(".")[2] for layer in layers]
    assert ends == norms * N_LAYER, [layer.branch_modules for layer in layers]


@pytest.mark.parametrize("name, scale", [
    ("dinov2", ["drop_path", "drop_path"]),  # DropPath(LayerScale(branch)) + x
    ("timm_style_vit", ["drop_path1", "drop_path2"]),
])
def test_layer_scale_and_drop_path_sit_between_branch_and_add(name, scale):
    layers = inspection(name).plan.streams[0].layers
    ends = [layer.branch_modules[0].rpartition(".")[2] for layer in layers]
    assert ends == scale * N_LAYER, [layer.branch_modules for layer in layers]


def _ancestors(node):
    seen, stack = set(), [node]
    while stack:
        for u in stack.pop().all_input_nodes:
            if u not in seen:
                seen.add(u)
                stack.append(u)
    return seen


def test_t5_stacks_are_two_streams_and_the_encoder_output_is_no_decoder_source():
    """Encoder and decoder are rewritten on their own; cross-attention reads the encoder's final read."""
    graph = inspection("t5")
    after = graph.after
    reads = [n for n in after.graph.nodes if tag_of(n) is not None and n.op == "call_function"
             and getattr(n.target, "namespace", None) == "attnres" and n.target._opname in ("block_read", "read")]
    encoder_output = next(n for n in reads if tag_of(n)["stream"] == 0 and n.target._opname == "read")
    for read in reads:
        if tag_of(read)["stream"] != 1:
            continue
        for source in read.args[0]:
            tag = (tag_of(source) or {}).get("stream", 1)
            assert tag == 1, f"decoder read {read.name} takes {source.name} from stream {tag}"
            assert encoder_output not in _ancestors(source) or tag_of(source), source.name
    decoder_b0 = _nodes(after)[graph.plan.streams[1].source]
    assert encoder_output not in _ancestors(decoder_b0)
    # the decoder's cross-attention steps (layers 1, 4) read the encoder output
    nodes = _nodes(after)
    for index in (1, 4):
        branch = nodes[graph.plan.streams[1].layers[index].branches[0]]
        assert encoder_output in _ancestors(branch)


# ---------------------------------------------------------------- numerics


# HF ViT/Dinov2 give attention's key projection a bias, whose gradient is zero in exact
# arithmetic (softmax ignores a shift shared by all keys): verify measures such a group's
# float noise against the check's largest gradient (ZERO_GRADIENT_FLOOR in verify.py).
@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_verify_zero_init_identity_and_random_queries(name):
    model, args, kwargs = build(name)
    report = attnres_compile.verify(model, args, CASES[name][0], example_kwargs=kwargs, rtol=1e-5)
    print(f"{name}: {FAMILIES[name][0]}\n{report}")
    assert report.ok, str(report)
    checks = sorted({c.check for c in report.comparisons})
    assert len(checks) == 2, checks
    assert any(c.name.startswith("grad attnres") for c in report.comparisons)


def _eager_rewrite_output(model, args, kwargs, scale):
    """Outputs of the rewritten graph with zero queries in ``scale``, run eagerly (no Inductor)."""
    backend = AttnResBackend(AttnResConfig(num_blocks=2, scale=scale), inductor=False)
    with torch.no_grad():
        out = torch.compile(model, backend=backend)(*args, **kwargs)
    assert backend.plans, "nothing was rewritten"
    return out.logits


# Measured worst rel error of the logits at zero queries, `mean` scale vs the original:
# Gemma 2 reads the stream only through scale-free norms (pre-norms, final norm), so
# `mean` differs only by the norms' eps; OLMo2's branches read the raw stream, so
# `mean` feeds them x_l / n_l and the model changes.
MEAN_SCALE = {"gemma2": (0.0, 1e-4), "olmo2": (1e-2, math.inf)}


@pytest.mark.parametrize("name", sorted(MEAN_SCALE))
def test_mean_scale_at_zero_queries(name):
    model, args, kwargs = build(name)
    model.eval()
    with torch.no_grad():
        want = model(*args, **kwargs).logits
    got = {scale: _eager_rewrite_output(model, args, kwargs, scale) for scale in ("count", "mean")}
    rel = {scale: float((g - want).abs().max() / want.abs().max()) for scale, g in got.items()}
    print(f"{name}: zero-query logits rel error {rel}")
    low, high = MEAN_SCALE[name]
    assert rel["count"] <= 1e-5
    assert low <= rel["mean"] <= high, rel


# ---------------------------------------------------------------- training


def _training_loss(outputs, targets_seed: int = 0) -> torch.Tensor:
    """Cross-entropy of the first float output's last axis against fixed random targets.

    Logits, class scores and hidden states alike: the point is a loss whose
    gradient reaches every query, not a meaningful task.
    """
    leaves, _ = tree_flatten(outputs)
    out = next(t for t in leaves if isinstance(t, torch.Tensor) and t.is_floating_point())
    flat = out.float().reshape(-1, out.shape[-1])
    targets = torch.randint(0, flat.shape[-1], (flat.shape[0],), generator=torch.Generator().manual_seed(targets_seed))
    return F.cross_entropy(flat, targets)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_five_training_steps_move_the_queries(name):
    model, args, kwargs = build(name)
    model = attnres_compile.prepare(model, args, CASES[name][0], example_kwargs=kwargs)
    assert all(torch.all(q == 0) for q in model.attnres.queries)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    compiled = torch.compile(model, backend="attnres")
    model.train()
    losses = []
    for _ in range(5):
        optimizer.zero_grad(set_to_none=True)
        loss = _training_loss(compiled(*args, **kwargs))
        loss.backward()
        optimizer.step()
        losses.append(float(loss))
    assert all(math.isfinite(v) for v in losses), losses
    assert all(float(q.abs().max()) > 0 for q in model.attnres.queries), "a stream's queries stayed at zero"
