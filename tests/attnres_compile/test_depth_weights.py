"""Depth weights: the mean softmax weights of each read, and their heatmap."""

import math

import pytest
import torch

from attnres_compile import AttnResConfig, prepare, rewrite
from attnres_compile.depth_weights import depth_weights, depth_weights_of_graph
from attnres_compile.report import plot_depth_weights
from attnres_compile.export import PLAN_KEY
from attnres_compile.kernels.reference import rms_key
from zoo import tiny_gpt


def _random_queries(shapes, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen) / math.sqrt(shape[-1]) * 4 for shape in shapes]


def _prepared(num_blocks=2, seed=0):
    model, args, _ = tiny_gpt(n_layer=2)
    prepare(model, args, AttnResConfig(num_blocks=num_blocks))
    with torch.no_grad():
        for q, value in zip(model.attnres.queries, _random_queries([q.shape for q in model.attnres.queries], seed)):
            q.copy_(value)
    return model.eval(), args


def test_zero_queries_weigh_every_source_alike():
    model, args, _ = tiny_gpt(n_layer=2)
    (weights,) = depth_weights(model.eval(), args)  # unprepared: zero queries, num_blocks 8 -> Full AttnRes
    assert weights.columns == [f"b_{n}" for n in range(5)] and len(weights.rows) == 5
    for i, row in enumerate(weights.weights):
        present = row[~row.isnan()]
        assert len(present) == i + 1 and torch.allclose(present, torch.full_like(present, 1 / (i + 1)))


def test_rows_are_distributions_laid_out_by_block():
    model, args = _prepared(num_blocks=2)
    (weights,) = depth_weights(model, args)
    assert weights.rows == ["0: attention", "1: mlp", "2: attention", "3: mlp", "final"]
    present = ~weights.weights.isnan()
    # block 0 reads b_0 (+ its partial, column 1); block 1 reads b_0, b_1 (+ partial, column 2)
    assert present.sum(1).tolist() == [1, 2, 2, 3, 3]
    assert torch.allclose(weights.weights.nan_to_num().sum(1), torch.ones(5))
    assert not torch.allclose(weights.weights[1, :2], torch.tensor([0.5, 0.5]))  # the queries matter


def test_second_layer_weights_match_a_computation_from_the_plain_model():
    """Layer 1 reads [b_0, f_0]; with ``count`` scale layer 0's read is b_0 itself, so both
    come from hooks on the original model, independently of the rewrite."""
    model, args = _prepared(num_blocks=1)
    seen = {}
    hooks = [
        model.drop.register_forward_hook(lambda m, i, out: seen.setdefault("b0", out)),
        model.blocks[0].attn.register_forward_hook(lambda m, i, out: seen.setdefault("f0", out)),
    ]
    query = model.attnres.queries[0].detach()[1].clone()
    eps = model.attnres.plan.streams[0].eps
    with torch.no_grad():
        saved = [q.detach().clone() for q in model.attnres.queries]
        for q in model.attnres.queries:
            q.zero_()
        model(*args)  # the plain forward, to read b_0 and f_0
        for hook in hooks:
            hook.remove()
        for q, value in zip(model.attnres.queries, saved):
            q.copy_(value)
    scores = torch.stack([(rms_key(seen[k], eps) * query).sum(-1) for k in ("b0", "f0")], -1)
    expected = scores.softmax(-1).reshape(-1, 2).mean(0)
    (weights,) = depth_weights(model, args)
    torch.testing.assert_close(weights.weights[1, :2], expected, rtol=1e-5, atol=1e-6)


def test_export_path_gives_the_same_weights_as_the_model_path():
    model, args = _prepared(num_blocks=2, seed=3)
    (from_model,) = depth_weights(model, args)
    plain, _, _ = tiny_gpt(n_layer=2)
    program = torch.export.export(plain.eval(), args, strict=False)
    gm = rewrite(program, AttnResConfig(num_blocks=2), queries=[q.detach() for q in model.attnres.queries])
    (from_graph,) = depth_weights_of_graph(gm, args, plan=gm.meta[PLAN_KEY])
    assert from_graph.rows == from_model.rows
    torch.testing.assert_close(from_graph.weights, from_model.weights, equal_nan=True)


def test_a_graph_without_reads_is_refused():
    model, args, _ = tiny_gpt(n_layer=1)
    gm = torch.export.export(model, args, strict=False).module()
    with pytest.raises(ValueError, match="no Block AttnRes reads"):
        depth_weights_of_graph(gm, args)


def test_plot_writes_a_heatmap_png(tmp_path):
    pytest.importorskip("matplotlib")
    import matplotlib.image

    model, args = _prepared()
    path = tmp_path / "alpha.png"
    plot_depth_weights(depth_weights(model, args), str(path))
    image = matplotlib.image.imread(path)
    assert image.shape[0] > 200 and image.shape[1] > 200
    assert len(torch.from_numpy(image[..., :3]).reshape(-1, 3).unique(dim=0)) > 50  # a picture, not a blank


def test_a_saved_and_loaded_program_still_says_what_its_reads_weigh(tmp_path):
    """The reads' tags live in node.meta["custom"], which re-export, .pt2 save and load keep."""
    model, args = _prepared(num_blocks=2, seed=3)
    plain, _, _ = tiny_gpt(n_layer=2)
    program = torch.export.export(plain.eval(), args, strict=False)
    gm = rewrite(program, AttnResConfig(num_blocks=2), queries=[q.detach() for q in model.attnres.queries])
    (in_memory,) = depth_weights_of_graph(gm, args)
    torch.export.save(torch.export.export(gm, args, strict=False), tmp_path / "rewritten.pt2")
    loaded = torch.export.load(tmp_path / "rewritten.pt2").module()
    (from_file,) = depth_weights_of_graph(loaded, args)
    torch.testing.assert_close(from_file.weights, in_memory.weights, equal_nan=True)
    assert from_file.rows[-1] == "final" and len(from_file.rows) == len(in_memory.rows)
