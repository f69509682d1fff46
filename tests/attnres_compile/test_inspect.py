"""Dry runs: inspect_model / inspect_program, the plan table and the plan JSON."""

import json

import torch

import attnres_compile.kernels  # noqa: F401  (registers torch.ops.attnres.*)
from attnres_compile import AttnResConfig
from attnres_compile.inspect import format_plan, inspect_model, inspect_program, plan_json, render_table
from attnres_compile.passes.ir import is_attnres_op
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


def test_plan_table_lists_every_layer_with_block_kind_module_and_nodes():
    model, args, _ = tiny_gpt(n_layer=2)
    (graph,) = inspect_model(model, args, AttnResConfig(num_blocks=2))
    text = format_plan(graph.plan)
    stream = graph.plan.streams[0]
    assert "4 layers in 2 blocks" in text and "block 0: layers 0-1  block 1: layers 2-3" in text
    rows = [line for line in text.splitlines() if line.startswith("│ ") and "attention" in line or "mlp" in line]
    assert len(rows) == 4
    for layer, row in zip(stream.layers, rows):
        cells = [c.strip() for c in row.strip("│").split("│")]
        block = 0 if layer.index < 2 else 1
        assert cells[:3] == [str(layer.index), str(block), layer.description]
        assert cells[3] == layer.branch_modules[0] and cells[4] == layer.stream_in and cells[5] == layer.adds[0]


def test_plan_json_is_the_plan_with_blocks_and_descriptions():
    model, args, _ = tiny_gpt(n_layer=2)
    (graph,) = inspect_model(model, args, AttnResConfig(block_size=3))
    data = json.loads(plan_json(graph.plan))
    (stream,) = data["streams"]
    assert stream["blocks"] == [[0, 1, 2], [3]] and stream["num_queries"] == 5
    assert [layer["block"] for layer in stream["layers"]] == [0, 0, 0, 1]
    assert [layer["description"] for layer in stream["layers"]] == ["attention", "mlp"] * 2
    assert stream["width"] == 32 and data["skipped"] == []


def test_render_table_pads_every_column():
    text = render_table(("a", "long header"), [(1, "x"), ("wider cell", "y")], title="t")
    lines = text.splitlines()
    assert lines[0] == "t" and len({len(line) for line in lines[1:]}) == 1
