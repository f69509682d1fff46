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
    return [note for plan in backend.plans for note in plan.notes if "activation-checkpointed" in note]


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
    backend = AttnResBackend()
    torch.compile(model, backend=backend)(*args).square().mean().backward()
    assert _opened_regions(backend) == ["opened 3 activation-checkpointed region(s): their nodes keep their recompute tags"]
    assert model.attnres.queries[0].grad.abs().sum() > 0


@pytest.mark.parametrize("reentrant", [False, pytest.param(True, marks=pytest.mark.slow)])
@torch._dynamo.config.patch(skip_fwd_side_effects_in_bwd_under_checkpoint=True)
def test_hugging_face_gradient_checkpointing_is_rewritten_exactly(reentrant):
    """``gradient_checkpointing_enable()`` checkpoints only in train mode: verify runs there (dropout is 0).

    transformers' checkpointed layers set a context variable, which Dynamo refuses to replay in the
    recompute and breaks the graph at (plain ``torch.compile`` alike) unless told to skip it.
    """
    model, args, kwargs = hf_llama(n_layer=3)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    attnres_compile.prepare(model, args, CONFIG, example_kwargs=kwargs)
    report = attnres_compile.verify(model, args, example_kwargs=kwargs, training=True)
    assert report.ok, report
    backend = AttnResBackend()
    model.train()
    torch.compile(model, backend=backend)(*args, **kwargs).logits.square().mean().backward()
    assert len(_opened_regions(backend)) == 1
    assert model.attnres.queries[0].grad.abs().sum() > 0


def test_a_selectively_checkpointed_stack_is_left_plain_with_the_reason(caplog):
    """SAC's policy picks among aten ops the pass never sees: the model stays plain, and the log says why."""
    model, args = _gpt_with_checkpointed_blocks("selective")
    with caplog.at_level(logging.WARNING, logger="attnres_compile"):
        prepared = attnres_compile.prepare(model, args, CONFIG)
    assert not hasattr(prepared, "attnres")
    assert "selectively checkpointed region" in caplog.text and "post-norm" not in caplog.text


@pytest.mark.slow  # four training compiles; benchmarks/bench_checkpoint.py measures the same at 6 x 256
def test_checkpointing_saves_as_much_for_the_rewrite_as_for_the_plain_model():
    """Saved-for-backward bytes with AC / without, attnres <= 1.25 x the plain model's + 0.05 (issue contract)."""
    base, _ = _gpt_with_checkpointed_blocks("checkpoint", d_model=64, seq=32)
    x = torch.randint(0, 64, (8, 32), generator=torch.Generator().manual_seed(1))

    def saved(model, backend, ac: bool) -> int:
        model = copy.deepcopy(model)
        if not ac:  # the same weights, without AC
            for i, block in enumerate(model.blocks):
                model.blocks[i] = block.block
        torch._dynamo.reset()
        compiled = torch.compile(model, backend=backend)
        compiled(x).float().square().mean().backward()
        return saved_for_backward_bytes(lambda: compiled(x))

    prepared = attnres_compile.prepare(copy.deepcopy(base), (x,), CONFIG)
    plain = saved(base, "inductor", True) / saved(base, "inductor", False)
    ours = saved(prepared, "attnres", True) / saved(prepared, "attnres", False)
    assert plain < 0.6  # AC works at all at this size
    assert ours <= 1.25 * plain + 0.05, (ours, plain)
