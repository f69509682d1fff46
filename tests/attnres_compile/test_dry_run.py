"""Dry runs: inspect_model / inspect_program plan and rewrite a copy and leave the model alone."""

import torch

from attnres_compile import AttnResConfig
from attnres_compile.dry_run import inspect_model, inspect_program
from attnres_compile.passes.ir import is_attnres_op
from attnres_compile.report import format_plan
from zoo import hf_bert, plain_mlp, tiny_gpt


def _attnres_nodes(gm):
    return [n for n in gm.graph.nodes if is_attnres_op(n)]


def test_inspect_model_plans_and_rewrites_a_copy_and_leaves_the_model_alone():
    model, args, _ = tiny_gpt(n_layer=3)
    forward, params = model.forward, [n for n, _ in model.named_parameters()]
    (graph,) = inspect_model(model, args, AttnResConfig(num_blocks=2))
    assert graph.refused is None and graph.origin == "torch.compile graph 1 of 1"
    stream = graph.plan.streams[0]
    assert [layer.description for layer in stream.layers] == ["attention", "mlp"] * 3
    assert stream.blocks == ((0, 1, 2), (3, 4, 5))
    before_names = {n.name for n in graph.before.graph.nodes}
    assert all(add in before_names for layer in stream.layers for add in layer.adds)
    assert not _attnres_nodes(graph.before)
    assert len(_attnres_nodes(graph.after)) == 2 + 6 + 1  # block reads, merges, final read
    assert model.forward == forward and [n for n, _ in model.named_parameters()] == params


def test_inspect_program_leaves_the_program_alone():
    model, args, _ = tiny_gpt()
    program = torch.export.export(model, args, strict=False)
    graph = inspect_program(program, AttnResConfig(num_blocks=2))
    assert graph.after is not None and _attnres_nodes(graph.after)
    assert not any(is_attnres_op(n) for n in program.graph.nodes)
    assert not _attnres_nodes(inspect_program(program).before)


def test_post_norm_program_reports_each_skipped_add_with_its_reason():
    model, args, kwargs = hf_bert()
    graph = inspect_program(torch.export.export(model, args, kwargs, strict=False))
    assert graph.after is None and graph.refused == "no residual stream"
    text = format_plan(graph.plan)
    assert "no residual stream found" in text
    for site in graph.plan.skipped:
        assert site.node in text
    assert "with no normalization" in text


def test_model_with_no_stream_is_refused_with_its_reason():
    model, args, _ = plain_mlp()
    (graph,) = inspect_model(model, args)
    assert graph.after is None and graph.refused == "no residual stream"
