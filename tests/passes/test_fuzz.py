"""Property-based tests: random pre-norm models, captured with Dynamo, rewritten with zero queries.

Each example is a random :class:`random_models.ModelSpec` (1 to 40 residual
steps, sequential and parallel, four norms, LayerScale, constants, dropout,
``x += f``, ``f + x``, raw hidden-state outputs). The detector must find
exactly the steps the spec built (and which are parallel pairs), and the
rewritten graph with zero queries in ``count`` scale must reproduce the
model's outputs (rel <= 1e-5). The rewritten graph runs eagerly (the ops'
PyTorch path, no Inductor) to keep each example cheap.

The default run draws ``ATTNRES_FUZZ_EXAMPLES`` examples (200); the long run,
``pytest -m slow tests/passes/test_fuzz.py``, draws ``ATTNRES_FUZZ_SLOW_EXAMPLES``
(1000) others. Examples are derandomized: a failure reproduces.
"""

import operator
import os

import pytest
import torch
from torch import nn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.utils._pytree import tree_flatten

from attnres_compile.core import zero_queries_in_graph
from attnres_compile.passes.graph import parameter_nodes
from attnres_compile.config import AttnResConfig
from attnres_compile.passes.pipeline import apply_plan, plan_graph
from fx_models import capture  # tests/support
from random_models import LayerSpec, ModelSpec, build_model, example_inputs, model_specs  # tests/support

EXAMPLES = int(os.environ.get("ATTNRES_FUZZ_EXAMPLES", "200"))
SLOW_EXAMPLES = int(os.environ.get("ATTNRES_FUZZ_SLOW_EXAMPLES", "1000"))

configs = st.one_of(
    st.builds(AttnResConfig, num_blocks=st.integers(1, 10)),
    st.builds(AttnResConfig, block_size=st.integers(1, 6)),
)


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    scale = want.abs().max()
    return float((got - want).abs().max() / scale) if scale > 0 else float((got - want).abs().max())


def rewriting_backend(config: AttnResConfig, plans: list):
    """A Dynamo backend that plans each graph, rewrites it with zero queries and runs it eagerly."""

    def backend(gm, graph_inputs):
        plan = plan_graph(gm.graph, parameter_nodes(gm, graph_inputs), **config.plan_options)
        plans.append(plan)
        if plan.streams:
            apply_plan(gm, plan, zero_queries_in_graph(gm, plan), config.scale)
        return gm.forward

    return backend


def check_rewrite_is_identity(spec: ModelSpec, config: AttnResConfig) -> None:
    """Compile ``spec``'s model through the rewrite, check the plan against the spec, compare outputs.

    Compiled rather than called as a bare graph so that Dynamo keeps the calling
    convention (an input returned as a hidden state never enters the graph).
    """
    torch._dynamo.reset()  # every example traces the same forward code: keep its cache empty
    model = build_model(spec)
    plans: list = []
    with torch.no_grad():
        got = torch.compile(model, backend=rewriting_backend(config, plans), fullgraph=True)(*example_inputs(spec))
        want = model(*example_inputs(spec))
    (plan,) = plans
    assert [len(s.layers) for s in plan.streams] == [spec.num_layers], f"{spec}\n{plan.summary()}"
    stream = plan.streams[0]
    assert [layer.is_parallel for layer in stream.layers] == spec.parallel_layers, plan.summary()
    assert [i for block in stream.blocks for i in block] == list(range(spec.num_layers))
    got, want = tree_flatten(got)[0], tree_flatten(want)[0]
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        error = relative_error(g, w)
        assert error <= 1e-5, f"output {i}: relative error {error:.3g}\n{spec}\n{plan.summary()}"


def fuzz_settings(examples: int):
    return settings(
        max_examples=examples,
        deadline=None,
        derandomize=True,  # the same examples every run: a failure reproduces
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


@fuzz_settings(EXAMPLES)
@given(spec=model_specs(max_layers=40), config=configs)
def test_random_pre_norm_model_is_found_exactly_and_rewrites_to_itself(spec, config):
    check_rewrite_is_identity(spec, config)


@pytest.mark.slow
@fuzz_settings(SLOW_EXAMPLES)
@given(spec=model_specs(max_layers=40), config=configs)
def test_long_run_of_random_pre_norm_models(spec, config):
    """The same property on other examples (another derandomized seed): ``pytest -m slow``."""
    check_rewrite_is_identity(spec, config)


# ---------------------------------------------------------------- what the fuzzing found


class HiddenStatesThenInPlaceAdd(nn.Module):
    """``hidden.append(x); x += f``: each kept hidden state is written over by the next step."""

    def __init__(self, n=3, d=8):
        super().__init__()
        self.norms = nn.ModuleList(nn.LayerNorm(d) for _ in range(n))
        self.fs = nn.ModuleList(nn.Linear(d, d) for _ in range(n))

    def forward(self, x):
        x = x * 2.0
        hidden = []
        for norm, f in zip(self.norms, self.fs):
            hidden.append(x)
            x += f(norm(x))
        return (x, *hidden)


def test_in_place_add_into_a_kept_hidden_state_is_refused_and_named():
    torch.manual_seed(0)
    model, x = HiddenStatesThenInPlaceAdd(), torch.randn(2, 5, 8)
    gm, graph_inputs = capture(model, x)
    plan = plan_graph(gm.graph, parameter_nodes(gm, graph_inputs), **AttnResConfig().plan_options)
    assert plan.streams == ()
    (site,) = [s for s in plan.skipped if "in place" in s.reason]
    writer = next(n for n in gm.graph.nodes if n.name == site.node)
    assert writer.target is operator.iadd
    assert "reads" in site.reason and "after it" in site.reason


def test_in_place_add_with_no_later_reader_is_still_a_step():
    spec = ModelSpec(d=8, layers=(LayerSpec("x + f"), LayerSpec("x += f"), LayerSpec("x += f")), embed="tokens", hidden="last")
    check_rewrite_is_identity(spec, AttnResConfig(num_blocks=2))
