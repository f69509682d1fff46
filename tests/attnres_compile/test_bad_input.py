"""Bad input: each a logged refusal that names the node, with the model left untouched, or a clear error.

Covered elsewhere (not repeated here): post-norm BERT and a model with no
stream (``test_prepare.py::test_models_without_a_readable_stream_are_left_untouched``,
``test_backend.py::test_post_norm_model_compiles_untouched``), a stack split by
``torch._dynamo.graph_break()`` (``test_backend.py``), inconsistent configs
(``test_config.py``), queries of the wrong shape loaded with
``load_state_dict`` (``test_save_load.py::test_state_dict_of_another_depth_names_both_shapes``),
a branch reading another stream value (``tests/passes/test_detect.py``).
"""

import logging
import re

import pytest
import torch
from torch import nn

import attnres_compile
from attnres_compile import AttnResBackend
from zoo import tiny_gpt

D = 16


class Layer(nn.Module):
    def __init__(self, d=D, talk=False):
        super().__init__()
        self.norm, self.f, self.talk = nn.LayerNorm(d), nn.Linear(d, d), talk

    def forward(self, x):
        if self.talk:
            print("inside the stack")  # Dynamo cannot trace a print: a graph break
        return x + self.f(self.norm(x))


class PrintingStack(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(Layer(talk=i == 2) for i in range(4))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


class SideBranchStack(nn.Module):
    """A side branch reads the raw stream after layer 0 and feeds layer 3 directly."""

    def __init__(self, through_attribute=False):
        super().__init__()
        self.layers = nn.ModuleList(Layer() for _ in range(4))
        self.side = nn.Linear(D, D)
        self.through_attribute = through_attribute

    def forward(self, x):
        x = self.layers[0](x * 1.0)
        # x.mT.mT is x: a read through tensor attributes is still a read of the values
        side = self.side(x.mT.mT if self.through_attribute else x)
        x = self.layers[2](self.layers[1](x))
        x = x + self.layers[3].f(self.layers[3].norm(x) + side)
        return x


def assert_untouched(model, state_keys):
    assert not hasattr(model, "attnres")
    assert "forward" not in vars(model)
    assert model.state_dict().keys() == state_keys


def test_print_inside_the_stack_is_a_graph_break_refused_by_prepare_and_run_unchanged(caplog, capsys):
    torch.manual_seed(0)
    model, x = PrintingStack(), torch.randn(2, 3, D)
    keys = model.state_dict().keys()
    with caplog.at_level(logging.WARNING, logger="attnres_compile"):
        attnres_compile.prepare(model, (x,))
    assert_untouched(model, keys)
    assert "graph breaks split the layer stack of PrintingStack" in caplog.text
    # The backend sees each piece of the broken frame on its own; an unprepared
    # model runs with zero queries, so whatever it rewrites keeps the outputs.
    torch.testing.assert_close(torch.compile(model, backend=AttnResBackend(inductor=False))(x), model(x))
    assert "inside the stack" in capsys.readouterr().out


@pytest.mark.parametrize("through_attribute", [False, True])
def test_side_branch_reading_the_raw_stream_is_refused_naming_the_node(caplog, through_attribute):
    torch.manual_seed(0)
    model, x = SideBranchStack(through_attribute), torch.randn(2, 3, D)
    keys = model.state_dict().keys()
    with caplog.at_level(logging.WARNING, logger="attnres_compile"):
        attnres_compile.prepare(model, (x,))
    assert_untouched(model, keys)
    assert "left untouched" in caplog.text
    # the layer and the node it reads from outside itself
    assert "reads" in caplog.text and "outside this layer" in caplog.text


class HiddenStatesThenInPlaceAdd(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(Layer() for _ in range(3))

    def forward(self, x):
        x = x * 1.0
        hidden = []
        for layer in self.layers:
            hidden.append(x)
            x += layer.f(layer.norm(x))  # writes into the tensor just kept in `hidden`
        return (x, *hidden)


def test_in_place_add_into_a_kept_hidden_state_is_refused_naming_the_writer(caplog):
    torch.manual_seed(0)
    model, x = HiddenStatesThenInPlaceAdd(), torch.randn(2, 3, D)
    with caplog.at_level(logging.WARNING, logger="attnres_compile"):
        attnres_compile.prepare(model, (x,))
    assert_untouched(model, model.state_dict().keys())
    assert re.search(r"skipped (\w+): writes into the stream value (\w+) in place, and output reads \2 after it", caplog.text)


class ComplexStack(nn.Module):
    """A complex-valued stream: softmax weights over complex sources are not defined."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(Layer() for _ in range(2))

    def forward(self, x):
        z = torch.complex(x, x)
        for layer in self.layers:
            z = z + layer.f(layer.norm(z.real)).to(torch.complex64)
        return z.real


class IntegerStack(nn.Module):
    """An integer stream (token-count-like): no floating-point stream to read."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(Layer() for _ in range(2))

    def forward(self, x):
        n = (x * 100).long()
        for layer in self.layers:
            n = n + layer.f(layer.norm(n.float())).long()
        return n.float()


@pytest.mark.parametrize("model_class", [ComplexStack, IntegerStack])
def test_non_floating_streams_are_left_untouched(model_class, caplog):
    torch.manual_seed(0)
    model, x = model_class(), torch.randn(2, 3, D)
    keys = model.state_dict().keys()
    with caplog.at_level(logging.WARNING, logger="attnres_compile"):
        attnres_compile.prepare(model, (x,))
    assert_untouched(model, keys)
    assert "no residual stream" in caplog.text and "left untouched" in caplog.text
    dtype = {ComplexStack: "torch.complex64", IntegerStack: "torch.int64"}[model_class]
    assert f"a residual step on a {dtype} stream" in caplog.text


@pytest.mark.parametrize("dtype, rtol", [(torch.bfloat16, 2e-2), (torch.float16, 2e-3), (torch.float64, 1e-12)])
def test_half_and_double_models_rewrite_with_zero_init_identity(dtype, rtol):
    """bf16, fp16 and fp64 streams are supported: the queries stay fp32, the read casts back.

    Runs the eager rewritten reference (no Inductor); the tolerance is the
    dtype's rounding of the re-associated residual sums.
    """
    model, args, _ = tiny_gpt()
    model = model.to(dtype)
    attnres_compile.prepare(model, args)
    assert model.attnres.queries[0].dtype == torch.float32
    backend = AttnResBackend(inductor=False)
    with torch.no_grad():
        got = torch.compile(model, backend=backend)(*args)
        want = model(*args)
    assert len(backend.plans) == 1 and got.dtype == dtype
    error = float((got.double() - want.double()).abs().max() / want.double().abs().max())
    assert error <= rtol, f"{dtype}: relative error {error:.3g}"


def test_graph_breaks_at_every_block_after_prepare_rewrite_nothing_and_say_why(caplog):
    """A forward pre-hook that Dynamo may not trace (as FSDP2's per-module hooks) splits the stack.

    Each block is then compiled on its own, where the prepared model's queries
    cannot reach: no fragment may be rewritten with stand-in zero queries.
    """
    model, args, _ = tiny_gpt()
    attnres_compile.prepare(model, args)
    untraceable = torch._dynamo.disable(lambda module, inputs: None)
    for block in model.blocks:
        block.register_forward_pre_hook(untraceable)
    backend = AttnResBackend(inductor=False)
    with caplog.at_level(logging.ERROR, logger="attnres_compile"):
        with torch.no_grad():
            out = torch.compile(model, backend=backend)(*args)
    assert not backend.plans
    assert "holds part of the layer stack of TinyGPT, which was prepared" in caplog.text
    assert "shard only the root module" in caplog.text
    assert "traced to a graph without its residual stream" in caplog.text
    torch.testing.assert_close(out, type(model).forward(model, *args))  # zero queries: the plain model


def test_a_prepared_model_that_lost_its_stream_names_the_places_left_alone(caplog):
    """No graph break, yet no stream (its norms were swapped out after prepare): the log names each site and why."""
    model, args, _ = tiny_gpt()
    attnres_compile.prepare(model, args)
    for block in model.blocks:
        block.ln_1 = block.ln_2 = torch.nn.Identity()
    backend = AttnResBackend(inductor=False)
    with caplog.at_level(logging.ERROR, logger="attnres_compile"), torch.no_grad():
        torch.compile(model, backend=backend)(*args)
    assert not backend.plans
    assert "traced to a graph without its residual stream" in caplog.text
    assert "no graph break recorded" not in caplog.text
    assert "with no normalization on the way in" in caplog.text
