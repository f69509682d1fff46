"""``torch.compile`` options and training-loop patterns that must not switch the rewrite off.

Each test runs the hand-written GPT (2 layers = 4 residual steps, d 32, two
blocks; a tiny Llama where a norm's eps is the point), prepared with random
queries, asserts that the backend rewrote the graph it was given (its plan
lists the 4 steps) and compares with the eager rewritten reference
(``AttnResBackend(inductor=False)``) at fp32 rel <= 1e-5: outputs, and
gradients of every parameter, queries included.

Graphs each option compiles (the contract the tests assert):

* default, ``fullgraph=True``, ``model.compile(...)`` in place, gradient
  accumulation over micro-batches of one shape: one graph;
* ``dynamic=True``: one graph for every batch size and sequence length other
  than 1 (Dynamo specializes a size of 1). ``dynamic=True`` also turns the
  model's Python floats into graph inputs, a norm's eps among them, which the
  pass reads only as a constant: the backend has Dynamo trace the first compile
  again with those floats constant (the abandoned call is not in ``.plans``);
* ``mode="max-autotune-no-cudagraphs"`` / ``options={...}``: one graph, with
  the settings Inductor gets for ``backend="inductor"``;
* ``torch.no_grad()`` evaluation between training steps: two graphs, one
  training graph and one inference graph, whatever the number of steps.
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

import attnres_compile
from attnres_compile import AttnResBackend, AttnResConfig
from tiny_gpt import loss_fn
from zoo import VOCAB, hf_llama, set_random_queries, tiny_gpt

CONFIG = AttnResConfig(num_blocks=2)  # 2 blocks of 2 residual steps: merges with and without a partial
RTOL = 1e-5
STEPS = 4


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want.double()).abs().max() / want.double().abs().max().clamp_min(1e-30))


def _prepared_gpt(seed: int = 0):
    """The tiny GPT, prepared, with random (non-zero) queries, and one batch of ids [2, 9] and targets."""
    model, (ids,), _ = tiny_gpt(n_layer=2, d_model=32, seq=9)
    attnres_compile.prepare(model, (ids,), CONFIG)
    set_random_queries(model, seed)
    return model, ids, _targets_like(ids)


def _targets_like(ids: torch.Tensor, seed: int = 3) -> torch.Tensor:
    return torch.randint(0, VOCAB, ids.shape, generator=torch.Generator().manual_seed(seed))


def _batch(batch: int, seq: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))
    return ids, _targets_like(ids, seed + 1)


def _gradients(model) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def _training_step(model, forward, ids, targets):
    """Logits and every parameter's gradient of one loss, from zeroed gradients."""
    model.zero_grad(set_to_none=True)
    logits = forward(ids)
    loss_fn(logits, targets).backward()
    return logits.detach(), _gradients(model)


def _reference_step(model, ids, targets):
    """The same step through the eager rewritten reference."""
    return _training_step(model, torch.compile(model, backend=AttnResBackend(inductor=False)), ids, targets)


def _assert_matches(got, want):
    (got_logits, got_grads), (want_logits, want_grads) = got, want
    assert _rel(got_logits, want_logits) <= RTOL
    assert set(got_grads) == set(want_grads)
    for name in want_grads:
        assert _rel(got_grads[name], want_grads[name]) <= RTOL, name


def _assert_rewritten(backend: AttnResBackend, graphs: int = 1) -> None:
    """The backend rewrote ``graphs`` graphs, each with the model's 4 residual steps in 2 blocks."""
    assert [len(plan.streams[0].layers) for plan in backend.plans] == [4] * graphs
    assert all(len(plan.streams[0].blocks) == 2 for plan in backend.plans)


def _queries_have_gradients(grads: dict[str, torch.Tensor]) -> bool:
    return grads["attnres_queries_0"].abs().sum() > 0


# --------------------------------------------------------------------------
# Options of torch.compile
# --------------------------------------------------------------------------


def test_fullgraph_runs_rewritten_and_matches_the_reference():
    model, ids, targets = _prepared_gpt()
    backend = AttnResBackend()
    got = _training_step(model, torch.compile(model, backend=backend, fullgraph=True), ids, targets)
    _assert_rewritten(backend)
    _assert_matches(got, _reference_step(model, ids, targets))


def test_model_compile_in_place_runs_rewritten_and_matches_the_reference():
    model, ids, targets = _prepared_gpt()
    want = _reference_step(model, ids, targets)
    backend = AttnResBackend()
    model.compile(backend=backend)
    got = _training_step(model, model, ids, targets)
    _assert_rewritten(backend)
    assert _queries_have_gradients(got[1])
    _assert_matches(got, want)


@pytest.mark.parametrize("inductor", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["eager", "inductor"])
def test_dynamic_true_compiles_one_rewritten_graph_for_every_shape(inductor):
    """``dynamic=True``: symbolic batch and sequence from the first compile; three shapes, one rewritten graph,
    each shape equal to the static eager reference. The pass on symbolic shapes runs in both forms; Inductor adds
    the symbolic codegen (and Dynamo's restart of the first trace) at ~20 s of a cold compile, so under ``slow``."""
    model, _, _ = _prepared_gpt()
    backend = AttnResBackend(inductor=inductor)
    compiled = torch.compile(model, backend=backend, dynamic=True)
    for batch, seq, seed in ((2, 9, 0), (3, 7, 1), (4, 12, 2)):  # no size 1: Dynamo specializes it
        ids, targets = _batch(batch, seq, seed)
        got = _training_step(model, compiled, ids, targets)
        assert got[0].shape == (batch, seq, VOCAB)
        _assert_matches(got, _reference_step(model, ids, targets))
    _assert_rewritten(backend, graphs=1)
    assert backend.plans[0].streams[0].eps == 1e-5  # nn.LayerNorm's, which dynamic=True made a graph input


@pytest.mark.slow  # ~12 s on a warm cache (Llama traced three times); the GPT above is the quick check
@pytest.mark.parametrize("inductor", [False, True], ids=["eager", "inductor"])
def test_dynamic_true_keeps_the_rewrite_of_a_norm_whose_eps_is_a_float_attribute(inductor):
    """Llama's RMSNorm adds ``self.variance_epsilon`` to the mean square; under ``dynamic=True`` Dynamo passes that
    float as a graph input, which hid the norm (and with it the whole stream) from the pass. The backend has it
    traced again as a constant: rewritten, with the model's eps, equal to the static eager reference."""
    model, (ids,), kwargs = hf_llama()
    for module in model.modules():
        if hasattr(module, "variance_epsilon"):
            module.variance_epsilon = 1e-5  # not the pass's 1e-6 fallback: a plan that missed it would show
    attnres_compile.prepare(model, (ids,), CONFIG, example_kwargs=kwargs)
    set_random_queries(model)
    backend = AttnResBackend(inductor=inductor)
    with torch.no_grad():
        got = torch.compile(model, backend=backend, dynamic=True)(ids, **kwargs).logits
        want = torch.compile(model, backend=AttnResBackend(inductor=False))(ids, **kwargs).logits
    assert _rel(got, want) <= RTOL
    _assert_rewritten(backend, graphs=1)
    assert backend.plans[0].streams[0].eps == 1e-5


MAX_AUTOTUNE = {"max_autotune": True, "coordinate_descent_tuning": True}
"""What ``mode="max-autotune-no-cudagraphs"`` sets for ``backend="inductor"`` (``list_mode_options``)."""


@pytest.fixture
def inductor_settings(monkeypatch) -> list:
    """The ``config_patches`` of each ``compile_fx`` call the backend makes (not of the call that ``compile_fx``
    makes of itself once it has applied them)."""
    import torch._inductor.compile_fx as inductor

    settings = []
    compile_fx = inductor.compile_fx
    depth = [0]

    def recording(gm, example_inputs, *args, config_patches=None, **kwargs):
        if depth[0] == 0:
            settings.append(dict(config_patches or {}))
        depth[0] += 1
        try:
            return compile_fx(gm, example_inputs, *args, config_patches=config_patches, **kwargs)
        finally:
            depth[0] -= 1

    monkeypatch.setattr(inductor, "compile_fx", recording)
    return settings


@pytest.fixture
def inductor_skipped(monkeypatch) -> list:
    """Records what the backend hands ``compile_fx`` and runs the rewritten graph eagerly instead of compiling it:
    the whole way from ``torch.compile``'s arguments to Inductor's door, without Inductor's codegen."""
    import torch._inductor.compile_fx as inductor

    settings = []

    def recording(gm, example_inputs, *args, config_patches=None, **kwargs):
        settings.append(dict(config_patches or {}))
        return gm.forward

    monkeypatch.setattr(inductor, "compile_fx", recording)
    return settings


def test_max_autotune_mode_reaches_inductors_door_with_the_rewrite(inductor_skipped):
    """``mode="max-autotune-no-cudagraphs"``: torch.compile hands a custom backend the mode; ours gives Inductor the
    settings ``backend="inductor"`` gets, for the rewritten graph (the real compile is the ``slow`` test below)."""
    model, ids, targets = _prepared_gpt()
    backend = AttnResBackend()
    got = _training_step(model, torch.compile(model, backend=backend, mode="max-autotune-no-cudagraphs"), ids, targets)
    assert inductor_skipped == [MAX_AUTOTUNE] == [torch._inductor.list_mode_options("max-autotune-no-cudagraphs")]
    _assert_rewritten(backend)
    _assert_matches(got, _reference_step(model, ids, targets))


def test_an_unknown_inductor_option_is_refused_as_inductor_refuses_it():
    model, ids, _ = _prepared_gpt()
    with pytest.raises(Exception, match="Unexpected optimization option no_such_option"):
        torch.compile(model, backend="attnres", options={"no_such_option": True})(ids)


@pytest.mark.slow
@pytest.mark.parametrize(
    "compile_kwargs, settings",
    [
        ({"mode": "max-autotune-no-cudagraphs"}, MAX_AUTOTUNE),
        ({"options": {"max_autotune": True}}, {"max_autotune": True}),
    ],
    ids=["mode", "options"],
)
def test_max_autotune_compiles_the_rewrite_with_inductor(inductor_settings, compile_kwargs, settings):
    """The real compile: ~12 s more than a default one on a cold cache on 2 cores (the GEMMs are autotuned)."""
    model, ids, targets = _prepared_gpt()
    backend = AttnResBackend()
    got = _training_step(model, torch.compile(model, backend=backend, **compile_kwargs), ids, targets)
    assert inductor_settings == [settings]
    _assert_rewritten(backend)
    _assert_matches(got, _reference_step(model, ids, targets))


# --------------------------------------------------------------------------
# Training-loop patterns
# --------------------------------------------------------------------------


def test_gradient_accumulation_over_micro_batches_equals_one_big_batch():
    """4 micro-batches of 2 through the compiled model, each loss / 4, accumulate into the gradient of the one
    batch of 8 (eager rewritten reference), queries included; the micro-batches reuse one graph."""
    model, _, _ = _prepared_gpt()
    ids, targets = _batch(2 * STEPS, 9, seed=5)
    backend = AttnResBackend()
    compiled = torch.compile(model, backend=backend)
    model.zero_grad(set_to_none=True)
    logits = []
    for micro_ids, micro_targets in zip(ids.chunk(STEPS), targets.chunk(STEPS), strict=True):
        micro_logits = compiled(micro_ids)
        (loss_fn(micro_logits, micro_targets) / STEPS).backward()  # the mean over the big batch, in parts
        logits.append(micro_logits.detach())
    got = (torch.cat(logits), _gradients(model))
    _assert_rewritten(backend, graphs=1)
    assert _queries_have_gradients(got[1])
    # The big batch after the micro-batches: a new batch size makes Dynamo compile the code again with a dynamic
    # batch (for the cheap eager reference here; the other way round it would be our expensive compile).
    _assert_matches(got, _reference_step(model, ids, targets))


class _CountingBackend(AttnResBackend):
    """An ``AttnResBackend`` that counts the graphs Dynamo hands it."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def __call__(self, gm, example_inputs, **kwargs):
        self.calls += 1
        return super().__call__(gm, example_inputs, **kwargs)


def test_no_grad_evaluation_between_training_steps_compiles_two_graphs_once():
    """3 optimizer steps with an eval (``model.eval()`` + ``torch.no_grad()``) after each: one training graph and
    one inference graph, compiled once each, both rewritten; the eval matches the eager reference."""
    model, ids, targets = _prepared_gpt()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    backend = _CountingBackend()
    compiled = torch.compile(model, backend=backend)
    counters.clear()
    for _ in range(3):
        model.train()
        optimizer.zero_grad(set_to_none=True)
        loss_fn(compiled(ids), targets).backward()
        assert _queries_have_gradients(_gradients(model))
        optimizer.step()
        model.eval()
        with torch.no_grad():
            evaluation = compiled(ids)
    assert backend.calls == 2 and counters["stats"]["unique_graphs"] == 2
    _assert_rewritten(backend, graphs=2)
    with torch.no_grad():
        want = torch.compile(model, backend=AttnResBackend(inductor=False))(ids)
    assert _rel(evaluation, want) <= RTOL
