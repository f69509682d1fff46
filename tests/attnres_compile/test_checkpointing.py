"""Activation checkpointing: the rewrite sees into checkpointed blocks and keeps what AC recomputes."""

from __future__ import annotations

import copy
import functools
import logging

import pytest
import torch
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

import attnres_compile
from attnres_compile import AttnResBackend, AttnResConfig
from attnres_compile.memory import saved_for_backward_bytes
from zoo import hf_llama, tiny_gpt

CONFIG = AttnResConfig(num_blocks=3)  # 3 blocks of the 6 residual steps of a 3-layer model


class Checkpointed(torch.nn.Module):
    """``block`` run through ``torch.utils.checkpoint.checkpoint`` with ``kwargs``."""

    def __init__(self, block: torch.nn.Module, **kwargs):
        super().__init__()
        self.block, self.kwargs = block, kwargs

    def forward(self, x):
        return checkpoint(self.block, x, **self.kwargs)


def _save_matmuls(ctx, op, *args, **kwargs):
    return CheckpointPolicy.MUST_SAVE if op in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default) else CheckpointPolicy.PREFER_RECOMPUTE


WRAPPERS = {
    "checkpoint": lambda block: Checkpointed(block, use_reentrant=False),
    "checkpoint_reentrant": lambda block: Checkpointed(block, use_reentrant=True),
    "checkpoint_wrapper": checkpoint_wrapper,
    "selective": lambda block: Checkpointed(
        block, use_reentrant=False, context_fn=functools.partial(create_selective_checkpoint_contexts, _save_matmuls)
    ),
}


def _gpt_with_checkpointed_blocks(form: str, n_layer: int = 3, **kwargs):
    model, args, _ = tiny_gpt(n_layer=n_layer, **kwargs)
    for i, block in enumerate(model.blocks):
        model.blocks[i] = WRAPPERS[form](block)
    return model, args


def _opened_regions(backend: AttnResBackend) -> list[str]:
    return [note for plan in backend.plans for note in plan.notes if "checkpointed region" in note]


@pytest.mark.parametrize(
    "form",
    ["checkpoint", pytest.param("checkpoint_reentrant", marks=pytest.mark.slow), pytest.param("checkpoint_wrapper", marks=pytest.mark.slow)],
)
def test_checkpointed_blocks_are_rewritten_exactly(form):
    """Zero-init identity and random queries vs the eager rewritten reference, forward and backward (verify)."""
    model, args = _gpt_with_checkpointed_blocks(form)
    attnres_compile.prepare(model, args, CONFIG)
    report = attnres_compile.verify(model, args)
    assert report.ok, report
    backend = AttnResBackend(inductor=False)  # the plan's notes; the compiled run was verify's
    torch.compile(model, backend=backend)(*args).square().mean().backward()
    assert _opened_regions(backend) == ["opened 3 activation-checkpointed region(s): their nodes keep their recompute tags"]
    assert model.attnres.queries[0].grad.abs().sum() > 0


HF_FORMS = {
    "non-reentrant": {"use_reentrant": False},
    "reentrant": {"use_reentrant": True},
    "selective": {"use_reentrant": False, "context_fn": functools.partial(create_selective_checkpoint_contexts, _save_matmuls)},
}


@pytest.mark.parametrize("form", ["non-reentrant", pytest.param("reentrant", marks=pytest.mark.slow),
                                  pytest.param("selective", marks=pytest.mark.slow)])
@torch._dynamo.config.patch(skip_fwd_side_effects_in_bwd_under_checkpoint=True)
def test_hugging_face_gradient_checkpointing_is_rewritten_exactly(form):
    """``gradient_checkpointing_enable()`` checkpoints only in train mode: verify runs there (dropout is 0).

    transformers' checkpointed layers set a context variable, which Dynamo refuses to replay in the
    recompute and breaks the graph at (plain ``torch.compile`` alike) unless told to skip it.
    """
    model, args, kwargs = hf_llama(n_layer=3)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=HF_FORMS[form])
    attnres_compile.prepare(model, args, CONFIG, example_kwargs=kwargs)
    report = attnres_compile.verify(model, args, example_kwargs=kwargs, training=True)
    assert report.ok, report
    backend = AttnResBackend(inductor=False)  # the plan's notes; the compiled run was verify's
    model.train()
    torch.compile(model, backend=backend)(*args, **kwargs).logits.square().mean().backward()
    assert len(_opened_regions(backend)) == 1
    assert model.attnres.queries[0].grad.abs().sum() > 0


def _llama_with_wrapped_layers(form: str):
    """The tiny Llama with each decoder layer wrapped by ``checkpoint_wrapper`` (selective: with a policy)."""
    model, args, kwargs = hf_llama(n_layer=3)
    context = {"context_fn": functools.partial(create_selective_checkpoint_contexts, _save_matmuls)}
    for i, layer in enumerate(model.model.layers):
        model.model.layers[i] = checkpoint_wrapper(layer, **(context if form == "selective" else {}))
    return model, args, kwargs


def test_a_stack_broken_at_every_checkpointed_layer_is_left_plain_naming_the_graph_breaks(caplog):
    """Hugging Face layers inside checkpoint_wrapper break the graph (a side effect): said, not "post-norm"."""
    model, args, kwargs = _llama_with_wrapped_layers("checkpoint_wrapper")
    with caplog.at_level(logging.WARNING, logger="attnres_compile"):
        attnres_compile.prepare(model, args, CONFIG, example_kwargs=kwargs)
    assert not hasattr(model, "attnres")
    assert "graph breaks cut its forward" in caplog.text and "skip_fwd_side_effects_in_bwd_under_checkpoint" in caplog.text
    assert "post-norm" not in caplog.text


@pytest.mark.parametrize("form", ["checkpoint_wrapper", "selective"])
@torch._dynamo.config.patch(skip_fwd_side_effects_in_bwd_under_checkpoint=True)
def test_llama_decoder_layers_wrapped_by_hand_are_rewritten_exactly(form):
    """torchtitan's way on a Hugging Face model: each decoder layer wrapped by checkpoint_wrapper (or SAC)."""
    model, args, kwargs = _llama_with_wrapped_layers(form)
    attnres_compile.prepare(model, args, CONFIG, example_kwargs=kwargs)
    report = attnres_compile.verify(model, args, example_kwargs=kwargs)
    assert report.ok, report
    backend = AttnResBackend(inductor=False)  # the plan's notes; the compiled run was verify's
    torch.compile(model, backend=backend)(*args, **kwargs).logits.square().mean().backward()
    assert len(_opened_regions(backend)) == 1
    assert model.attnres.queries[0].grad.abs().sum() > 0


def _recording(policy, seen: list):
    """``policy``, recording the aten op of every call (SAC calls it for each op of a region)."""

    def record(ctx, op, *args, **kwargs):
        seen.append(op)
        return policy(ctx, op, *args, **kwargs)

    return record


def test_selectively_checkpointed_blocks_are_rewritten_and_keep_their_policy():
    """SAC: the blocks are opened for the rewrite, then their branches run in regions with the same policy."""
    seen = []
    context_fn = functools.partial(create_selective_checkpoint_contexts, _recording(_save_matmuls, seen))
    model, args = _gpt_with_checkpointed_blocks("checkpoint")
    for wrapped in model.blocks:
        wrapped.kwargs["context_fn"] = context_fn
    attnres_compile.prepare(model, args, CONFIG)
    report = attnres_compile.verify(model, args)
    assert report.ok, report
    assert torch.ops.aten.mm.default in seen or torch.ops.aten.addmm.default in seen  # the policy was asked about the branches' ops
    backend = AttnResBackend(inductor=False)  # the plan's notes; the compiled run was verify's
    torch.compile(model, backend=backend)(*args).square().mean().backward()
    notes = [note for plan in backend.plans for note in plan.notes if "checkpointed" in note]
    assert notes == [
        "opened 3 selectively checkpointed region(s): what remains of them after the rewrite runs in "
        "checkpointed regions again, with their policy (context_fn)"
    ]
    assert model.attnres.queries[0].grad.abs().sum() > 0


@pytest.mark.slow  # six training compiles; benchmarks/bench_checkpoint.py measures the same at 6 x 256
def test_checkpointing_saves_as_much_for_the_rewrite_as_for_the_plain_model():
    """Saved-for-backward bytes with AC / without, attnres <= 1.25 x the plain model's + 0.05 (issue contract).

    Full AC and selective AC (save matmuls): the selective policy must save more than full AC and
    less than no AC, in the compiled rewrite as in the plain model.
    """
    base, _ = _gpt_with_checkpointed_blocks("checkpoint", d_model=64, seq=32)
    x = torch.randint(0, 64, (8, 32), generator=torch.Generator().manual_seed(1))

    def saved(model, backend, form) -> int:
        model = copy.deepcopy(model)
        for i, wrapped in enumerate(model.blocks):  # the same weights, wrapped as asked
            model.blocks[i] = WRAPPERS[form](wrapped.block) if form else wrapped.block
        torch._dynamo.reset()
        compiled = torch.compile(model, backend=backend)
        compiled(x).float().square().mean().backward()
        return saved_for_backward_bytes(lambda: compiled(x))

    prepared = attnres_compile.prepare(copy.deepcopy(base), (x,), CONFIG)
    ratios = {}
    for arm, model, backend in (("plain", base, "inductor"), ("attnres", prepared, "attnres")):
        none = saved(model, backend, None)
        ratios[arm] = {form: saved(model, backend, form) / none for form in ("checkpoint", "selective")}
    assert ratios["plain"]["checkpoint"] < 0.6  # AC works at all at this size
    for form in ("checkpoint", "selective"):
        assert ratios["attnres"][form] <= 1.25 * ratios["plain"][form] + 0.05, ratios
    for arm in ratios:
        assert ratios[arm]["checkpoint"] < ratios[arm]["selective"] < 1.0, ratios
