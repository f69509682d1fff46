"""The graph diff of a rewrite: text and HTML forms on exported models."""

import dataclasses
import re
from html.parser import HTMLParser

import pytest
import torch

import attnres_compile
from attnres_compile import AttnResConfig
from attnres_compile.diff import diff_rows, diff_sections, op_label
from attnres_compile.passes.graph import copy_graph
from attnres_compile.passes.plan import Plan, SkippedSite
from attnres_compile.passes.reads import tag_of
from attnres_compile.report import diff_html, diff_text, write_diff_html
from zoo import hf_llama, tiny_gpt

MODELS = {"tiny_gpt": tiny_gpt, "llama": hf_llama}
CONFIG = AttnResConfig(num_blocks=2)  # 2 transformer blocks = 4 layers -> 2 blocks of 2


@pytest.fixture(scope="module")
def rewritten():
    """name → (before, after, plan); ``rewrite`` works in place, so each side has its own module."""
    out = {}
    for name, factory in MODELS.items():
        model, args, kwargs = factory(n_layer=2)
        ep = torch.export.export(model, args, kwargs, strict=False)
        after = attnres_compile.rewrite(ep.module(), CONFIG)
        out[name] = (ep.module(), after, after.meta["attnres_plan"])
    return out


@pytest.fixture(params=sorted(MODELS))
def case(request, rewritten):
    return rewritten[request.param]


def _tagged(after):
    return [n for n in after.graph.nodes if tag_of(n) is not None]


def _attnres_ops(after):
    return [n for n in _tagged(after) if op_label(n).startswith("attnres.")]


def _residual_adds(plan):
    return [add for stream in plan.streams for layer in stream.layers for add in layer.adds]


# --------------------------------------------------------------------------- rows


def test_rows_account_for_every_node_of_both_graphs(case):
    before, after, _ = case
    rows = diff_rows(before, after)
    before_names = {n.name for n in before.graph.nodes}
    after_names = {n.name for n in after.graph.nodes}
    assert [r.after.name for r in rows if r.after is not None] == [n.name for n in after.graph.nodes]
    assert [r.before.name for r in rows if r.before is not None] == [n.name for n in before.graph.nodes]
    assert {r.name for r in rows if r.status == "removed"} == before_names - after_names
    assert {r.name for r in rows if r.status == "added"} == {n.name for n in _tagged(after)} | (after_names - before_names)


def test_rows_mark_the_consumers_of_each_merge_as_rewired(case):
    before, after, _ = case
    rewired = {r.name for r in diff_rows(before, after) if r.status == "rewired"}
    merges = [n for n in _tagged(after) if op_label(n).startswith("attnres.merge")]
    readers = {user.name for merge in merges for user in merge.users if tag_of(user) is None}
    assert len(merges) == 4 and readers  # a merge feeds the layer's norm, which read the stream before
    assert readers <= rewired


# --------------------------------------------------------------------------- text


def test_text_names_every_removed_add_and_every_new_read(case):
    before, after, plan = case
    lines = diff_text(before, after, plan).splitlines()
    for add in _residual_adds(plan):
        assert any(line.startswith(f"- {add} = aten.add.Tensor(") and "# residual add · L" in line for line in lines), add
    ops = _attnres_ops(after)
    assert sorted(op_label(n).split(".")[1] for n in ops) == ["block_read"] * 2 + ["merge"] * 4 + ["read"]
    for node in ops:
        assert any(line.startswith(f"+ {node.name} = {op_label(node)}(") for line in lines), node.name


def test_text_has_a_header_per_block_and_each_add_under_its_block(case):
    before, after, plan = case
    lines = diff_text(before, after, plan).splitlines()
    headers = [i for i, line in enumerate(lines) if line.startswith("## stream 0 · ")]
    assert [lines[i] for i in headers] == [
        "## stream 0 · block 0 (layers 0–1) · reads b_0 + partial",
        "## stream 0 · block 1 (layers 2–3) · reads b_0–b_1 + partial",
        "## stream 0 · final read over b_0–b_2",
    ]
    stream = plan.streams[0]
    for block, layers in enumerate(stream.blocks):
        section = lines[headers[block]:headers[block + 1]]
        for index in layers:
            add = stream.layers[index].adds[0]
            assert any(line.startswith(f"- {add} = ") for line in section), (block, add)
    final = lines[headers[-1]:]
    read = next(n for n in _attnres_ops(after) if op_label(n).startswith("attnres.read"))
    assert any(line.startswith(f"+ {read.name} = ") for line in final)


def test_text_summary_counts_the_change(case):
    before, after, plan = case
    first = diff_text(before, after, plan).splitlines()[0]
    assert f"{len(before.graph.nodes)} → {len(after.graph.nodes)} nodes" in first
    assert "(4 residual adds)" in first and "(2 block_read, 4 merge, 1 read)" in first


def _collapsed_counts(text):
    return [int(m) for m in re.findall(r"^  … (\d+) unchanged nodes …$", text, flags=re.M)]


def test_text_collapses_long_unchanged_runs_and_loses_no_node(case):
    before, after, plan = case
    same = sum(r.status == "same" for r in diff_rows(before, after))
    text = diff_text(before, after, plan)
    folded = _collapsed_counts(text)
    context_lines = [line for line in text.splitlines() if line.startswith("  ") and not line.startswith("  … ")]
    assert folded and max(folded) >= 10
    assert sum(folded) + len(context_lines) == same
    assert len(text.splitlines()) < len(after.graph.nodes)


def test_text_with_wide_context_folds_nothing(case):
    before, after, plan = case
    text = diff_text(before, after, plan, context=10_000)
    assert _collapsed_counts(text) == []
    for node in after.graph.nodes:
        assert re.search(rf"^[ +] {re.escape(node.name)} = ", text, flags=re.M), node.name


def test_text_of_an_unrewritten_graph_shows_no_change():
    model, args, kwargs = tiny_gpt(n_layer=1)
    ep = torch.export.export(model, args, kwargs, strict=False)
    text = diff_text(ep.module(), ep.module(), Plan(streams=()))
    assert "-0 removed (0 residual adds), +0 added" in text
    assert "no residual stream rewritten" in text
    assert not re.search(r"^[-+] ", text, flags=re.M)


# --------------------------------------------------------------------------- HTML


class _Page(HTMLParser):
    """Collects the elements of a page and checks that every non-void element is closed in order."""

    VOID = {"meta", "br", "hr", "img", "input", "link", "col", "area", "base", "wbr", "source", "track", "embed"}
    SVG_LEAVES = {"rect", "circle", "line", "path", "polyline", "polygon", "ellipse"}

    def __init__(self):
        super().__init__()
        self.stack, self.elements, self.errors = [], [], []

    def handle_starttag(self, tag, attrs):
        self.elements.append((tag, dict(attrs)))
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        self.elements.append((tag, dict(attrs)))  # `<rect .../>`: opened and closed at once

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1:] or 'nothing'}")
        else:
            self.stack.pop()

    def with_node(self, name):
        return [attrs for _, attrs in self.elements if attrs.get("data-node") == name]


def _parse(page):
    parser = _Page()
    parser.feed(page)
    parser.close()
    return parser


def test_html_is_well_formed(case):
    page = diff_html(*case)
    parser = _parse(page)
    assert parser.errors == [] and parser.stack == []
    assert page.startswith("<!DOCTYPE html>")
    assert [tag for tag, _ in parser.elements].count("svg") == 2  # before and after of the one stream


def test_html_is_self_contained(case):
    page = diff_html(*case).lower()
    for reference in ("http", "<link", "src=", "@import", "url(", "@font-face"):
        assert reference not in page, reference


def test_html_highlights_every_rewritten_node_with_its_block(case):
    before, after, plan = case
    parser = _parse(diff_html(before, after, plan))
    num_blocks = len(plan.streams[0].blocks)
    for node in _tagged(after):
        classes = [attrs["class"].split() for attrs in parser.with_node(node.name) if "after" in attrs["class"].split()]
        block = tag_of(node)["block"]
        expected = "blk-final" if block == num_blocks else f"blk-{block}"
        assert classes and "added" in classes[0] and expected in classes[0], (node.name, classes)
    for add in _residual_adds(plan):
        classes = [attrs["class"].split() for attrs in parser.with_node(add)]
        assert len(classes) == 1 and {"before", "removed"} <= set(classes[0]), (add, classes)


def test_html_draws_one_band_per_block(case):
    _, _, plan = case
    parser = _parse(diff_html(*case))
    bands = [attrs for tag, attrs in parser.elements if tag == "rect" and attrs.get("class") == "band"]
    assert [int(b["data-block"]) for b in bands] == list(range(len(plan.streams[0].blocks)))


def test_html_folds_long_unchanged_runs_in_details(case):
    page = diff_html(*case)
    folded = [int(n) for n in re.findall(r"<summary>… (\d+) unchanged nodes …</summary>", page)]
    assert folded and max(folded) >= 10
    assert page.count('<details class="run">') == len(folded)


def test_html_escapes_names_targets_reasons_and_title(rewritten):
    before, after, plan = rewritten["tiny_gpt"]
    after = torch.fx.GraphModule(after, copy_graph(after.graph))  # a copy: the fixture is shared
    anchor = next(n for n in after.graph.nodes if n.op == "call_function")
    with after.graph.inserting_after(anchor):
        after.graph.call_function(lambda x: x, (anchor,))  # its label is "<lambda>"
    plan = dataclasses.replace(plan, skipped=(SkippedSite("add_9", "reads <b>x</b> & more"),))
    page = diff_html(before, after, plan, title="diff <script>alert(1)</script>")
    assert "<lambda>" not in page and "&lt;lambda&gt;" in page
    assert "<b>x</b>" not in page and "reads &lt;b&gt;x&lt;/b&gt; &amp; more" in page
    assert "<script>alert" not in page and "diff &lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert _parse(page).errors == []


def test_write_diff_html_writes_the_page(case, tmp_path):
    path = write_diff_html(tmp_path / "diff.html", *case, title="tiny")
    assert path == str(tmp_path / "diff.html")
    assert (tmp_path / "diff.html").read_text(encoding="utf-8") == diff_html(*case, title="tiny")


def test_sections_follow_execution_order(case):
    before, after, plan = case
    keys = [section.key for section in diff_sections(before, after, plan)]
    assert keys == [None, (0, 0), (0, 1), (0, 2)]
