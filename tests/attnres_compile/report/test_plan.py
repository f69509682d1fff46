"""The plan for people: the box-drawn plan table and the plan JSON."""

import json

from attnres_compile import AttnResConfig
from attnres_compile.dry_run import inspect_model
from attnres_compile.report import format_plan, plan_json, render_table
from zoo import tiny_gpt


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
