"""The pipeline core: every way in plans through it, and they all get the same plan."""

import ast
import copy
import logging
import pathlib

import pytest
import torch
from torch import nn

import attnres_compile
import attnres_compile.core as core
from attnres_compile import AttnResBackend, AttnResConfig
from attnres_compile.depth_weights import depth_weights
from attnres_compile.dry_run import inspect_model, inspect_program
from zoo import set_random_queries, tiny_gpt

ROOT = pathlib.Path(__file__).resolve().parents[2]
CONFIG = AttnResConfig(num_blocks=2)


def _calls(path: pathlib.Path, names: set[str]) -> set[str]:
    """Names from ``names`` that ``path`` calls (``f(...)`` or ``module.f(...)``)."""
    called = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Call):
            func = node.func
            name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else None
            if name in names:
                called.add(name)
    return called


def test_only_the_core_runs_the_passes():
    """Outside tests, ``plan_graph`` and ``apply_plan`` are called from one place: ``core.run_pipeline``."""
    callers = {}
    for folder in ("attnres_compile", "passes", "kernels", "examples", "benchmarks", "scripts"):
        for path in (ROOT / folder).rglob("*.py"):
            found = _calls(path, {"plan_graph", "apply_plan"})
            if found:
                callers[str(path.relative_to(ROOT))] = found
    assert callers == {"attnres_compile/core.py": {"plan_graph", "apply_plan"}}


def _shape(plan):
    """A plan without its node names (two traces of one model name their nodes differently)."""
    return plan.layout, [(s.blocks, s.eps) for s in plan.streams]


def test_every_way_in_gives_the_same_plan(monkeypatch):
    seen: list = []
    plan_graph = core.plan_graph

    def recording_plan_graph(*args, **kwargs):
        seen.append(plan_graph(*args, **kwargs))
        return seen[-1]

    monkeypatch.setattr(core, "plan_graph", recording_plan_graph)
    model, args, _ = tiny_gpt(n_layer=2)
    plans = {}

    inspect_model(model, args, CONFIG)
    plans["inspect_model"] = seen[-1]
    inspect_program(torch.export.export(model, args, strict=False), CONFIG)
    plans["inspect_program"] = seen[-1]
    attnres_compile.rewrite(torch.export.export(copy.deepcopy(model), args, strict=False), CONFIG)
    plans["export rewrite"] = seen[-1]
    prepared = attnres_compile.prepare(copy.deepcopy(model), args, CONFIG)
    plans["prepare"] = seen[-1]
    backend = AttnResBackend()
    torch.compile(prepared, backend=backend)(*args)
    plans["backend"] = seen[-1]
    depth_weights(prepared, args)
    plans["depth_weights"] = seen[-1]

    assert backend.plans == [plans["backend"]] and prepared.attnres.plan == plans["prepare"]
    want = _shape(plans["prepare"])
    assert want[0][0].layers == ("attention", "mlp") * 2 and want[1][0][0] == ((0, 1), (2, 3))
    for way, plan in plans.items():
        assert _shape(plan) == want, way


class _SkippableStack(nn.Module):
    """A pre-norm stack whose forward can leave out its last layer: two traces, two stacks."""

    def __init__(self, d: int = 16, depth: int = 4):
        super().__init__()
        self.norms = nn.ModuleList(nn.LayerNorm(d) for _ in range(depth))
        self.mlps = nn.ModuleList(nn.Linear(d, d) for _ in range(depth))

    def forward(self, x, skip_last: bool = False):
        layers = list(zip(self.norms, self.mlps))
        for norm, mlp in layers[:-1] if skip_last else layers:
            x = x + mlp(norm(x))
        return x


def test_a_graph_that_is_not_the_stack_prepare_traced_is_named_and_never_runs_plain(caplog):
    torch.manual_seed(0)
    model, x = _SkippableStack(), torch.randn(2, 3, 16)
    attnres_compile.prepare(model, (x,))
    compiled = torch.compile(model, backend=AttnResBackend())
    with caplog.at_level(logging.ERROR, logger="attnres_compile"):
        torch.testing.assert_close(compiled(x, skip_last=True), model(x, skip_last=True))  # zero queries: plain is right
    assert "is not the layer stack prepare() traced" in caplog.text
    assert "expected 4 layers of width 16 (mlp, mlp, mlp, mlp), found 3 layers" in caplog.text
    set_random_queries(model)
    torch._dynamo.reset()
    with pytest.raises(Exception, match="non-zero"):
        torch.compile(model, backend=AttnResBackend())(x, skip_last=True)


class _Gathered(nn.Module):
    """A parametrization that computes the parameter the forward sees, as SimpleFSDP's all-gather does."""

    def forward(self, stored):
        return stored * 1.0


def test_queries_computed_in_the_graph_still_never_run_plain():
    """Queries that reach the graph through a parametrization are no graph input; they are checked all the same."""
    torch.manual_seed(0)
    model, x = _SkippableStack(), torch.randn(2, 3, 16)
    attnres_compile.prepare(model, (x,))
    set_random_queries(model)
    nn.utils.parametrize.register_parametrization(model, "attnres_queries_0", _Gathered())
    with pytest.raises(Exception, match="non-zero"):
        torch.compile(model, backend=AttnResBackend())(x, skip_last=True)


def _container_sizes(*modules) -> dict[str, int]:
    return {
        f"{m.__name__}.{name}": len(value)
        for m in modules
        for name, value in vars(m).items()
        if isinstance(value, (list, dict, set)) and not name.startswith("__")
    }


def test_the_registered_backend_keeps_no_state():
    """Compiling more models with backend="attnres" grows nothing in the process (AttnResBackend instances keep plans)."""
    import attnres_compile.backend as backend

    def compile_one(n_layer):
        model, args, _ = tiny_gpt(n_layer=n_layer)
        torch.compile(model, backend="attnres")(*args)

    compile_one(1)
    before = _container_sizes(backend, core)
    for n_layer in (2, 3):
        compile_one(n_layer)
    assert _container_sizes(backend, core) == before
    assert not hasattr(attnres_compile.attnres_backend, "plans")
