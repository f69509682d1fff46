"""attnres_compile/pipelining.py in one process: where the cuts fall, what crosses them, and the gradients.

The two-process schedules (GPipe, 1F1B, interleaved with and without the cache)
run in tests/attnres_compile/test_distributed.py.
"""

import pytest
import torch

import attnres_compile
from attnres_compile.pipelining import StageCache, balanced_cuts, split_stages
from train_distributed import logits_of, next_token_loss
from zoo import VOCAB, tiny_gpt

MICRO_BATCHES = 4


@pytest.fixture(scope="module")
def program():
    """The tiny GPT (4 transformer blocks = 8 layers) rewritten into 4 AttnRes blocks, random queries."""
    model, _, _ = tiny_gpt(n_layer=4, d_model=16)
    example = torch.randint(0, VOCAB, (1, 9))
    gm = attnres_compile.rewrite(torch.export.export(model, (example,), strict=False),
                                 attnres_compile.AttnResConfig(num_blocks=4))
    with torch.no_grad():
        gm.attnres_queries_0.copy_(torch.randn(gm.attnres_queries_0.shape, generator=torch.Generator().manual_seed(0)))
    return gm


def test_balanced_cuts_spread_blocks_and_refuse_more_stages_than_blocks():
    assert balanced_cuts(4, 4) == [1, 2, 3]
    assert balanced_cuts(8, 2) == [4]
    assert balanced_cuts(6, 4) == [2, 3, 4]
    with pytest.raises(ValueError, match="5 stages need 1 to 4 blocks"):
        balanced_cuts(4, 5)


def test_bad_cuts_and_unrewritten_programs_are_refused(program):
    with pytest.raises(ValueError, match="strictly increasing"):
        split_stages(program, 3, cuts=[2, 2])
    with pytest.raises(ValueError, match="strictly increasing blocks in 1..4"):
        split_stages(program, 2, cuts=[5])
    with pytest.raises(ValueError, match="strictly increasing layers in 1..8"):
        split_stages(program, 2, cuts=[9], unit="layer")
    model, args, _ = tiny_gpt(n_layer=2, d_model=16)
    with pytest.raises(ValueError, match="no Block AttnRes reads; rewrite it first"):
        split_stages(torch.export.export(model, args, strict=False).module(), 2)


def test_each_cut_carries_the_completed_summaries_and_the_cache_sends_each_once_per_rank(program):
    split = split_stages(program, 4)
    naive, cached = split.plan(world=2, cached=False), split.plan(world=2, cached=True)
    summaries = lambda names: [split.summaries[n] for n in names if n in split.summaries]  # noqa: E731
    # Without the cache, the hop after stage s carries b_0 .. b_{s+1}: 2 + 3 + 4 summaries.
    assert [summaries(sent) for sent in naive.sent] == [["b_0", "b_1"], ["b_0", "b_1", "b_2"], ["b_0", "b_1", "b_2", "b_3"]]
    # Stage s runs on rank s % 2: rank 0 already holds b_0, b_1 when stage 2 starts, rank 1 b_0 .. b_2 at stage 3.
    assert [summaries(sent) for sent in cached.sent] == [["b_0", "b_1"], ["b_2"], ["b_3"]]
    assert cached.from_cache[2] == naive.sent[0] and set(cached.from_cache[3]) == set(naive.sent[1])
    assert all(not names for names in naive.from_cache + naive.kept)


def _emulated_pipeline(split, cached, x, y):
    """All stages in one process, each cut detached as a send would, stage s as rank s % 2 would run it (with
    that rank's cache): GPipe order, forwards then backwards."""
    caches = [StageCache(), StageCache()] if cached else [None, None]
    modules = [split.stage_module(s, 2, caches[split.rank_of(s, 2)]) for s in range(split.num_stages)]
    size, runs, total = x.shape[0] // MICRO_BATCHES, [], 0.0
    for m in range(MICRO_BATCHES):
        args, run = (x[m * size:(m + 1) * size],), []
        for module in modules:
            out = module(*args)
            out = tuple(out) if isinstance(out, (tuple, list)) else (out,)
            run.append((args, out))
            args = tuple(t.detach().requires_grad_(t.requires_grad) for t in out)
        runs.append(run)
    for m, run in enumerate(runs):
        grads = None
        for stage in reversed(range(split.num_stages)):
            args, out = run[stage]
            if stage == split.num_stages - 1:
                loss = next_token_loss(logits_of(out), y[m * size:(m + 1) * size]) / MICRO_BATCHES
                loss.backward()
                total += loss.item()
            else:
                pairs = [(o, g) for o, g in zip(out, grads) if g is not None]
                torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
            grads = [a.grad if a.requires_grad else None for a in args]
    return total


def test_a_cut_inside_a_block_carries_its_partial_and_its_phase_one_read(program):
    """Layers 2 and 3 form block 1: a cut at layer 3 sends layer 2's branch output and block 1's (o, lse)."""
    by_block, by_layer = split_stages(program, 2, cuts=[1]), split_stages(program, 2, cuts=[3], unit="layer")
    plan = by_layer.plan(world=2, cached=False)
    assert [by_layer.summaries[n] for n in plan.sent[0] if n in by_layer.summaries] == ["b_0", "b_1"]
    roles = [(by_layer._nodes[n].meta.get("custom") or {}).get("attnres", {}).get("role") for n in plan.sent[0]]
    assert roles.count("block_read_output") == 2  # o and lse of block 1's phase-1 read
    assert len(plan.sent[0]) == 5 and len(by_block.plan(world=2, cached=False).sent[0]) == 2


@pytest.mark.parametrize("cut", ["blocks", "layers"])
@pytest.mark.parametrize("cached", [False, True], ids=["naive", "cached"])
def test_stages_chained_give_the_programs_loss_and_gradients(program, cached, cut):
    """A cached value's gradient from a later stage of its rank reaches the stage that kept it."""
    batch = torch.randint(0, VOCAB, (MICRO_BATCHES, 10), generator=torch.Generator().manual_seed(1))
    x, y = batch[:, :-1], batch[:, 1:]
    program.zero_grad()
    want_loss = sum(
        (next_token_loss(logits_of(program(x[m:m + 1])), y[m:m + 1]) / MICRO_BATCHES).item()
        for m in range(MICRO_BATCHES)
    )
    for m in range(MICRO_BATCHES):
        (next_token_loss(logits_of(program(x[m:m + 1])), y[m:m + 1]) / MICRO_BATCHES).backward()
    want = {n: p.grad.clone() for n, p in program.named_parameters()}
    program.zero_grad()
    split = split_stages(program, 4) if cut == "blocks" else split_stages(program, 4, cuts=[3, 4, 7], unit="layer")
    got_loss = _emulated_pipeline(split, cached, x, y)
    assert got_loss == pytest.approx(want_loss, rel=1e-6)
    for name, parameter in program.named_parameters():
        torch.testing.assert_close(parameter.grad, want[name], rtol=1e-5, atol=1e-7, msg=lambda m: f"{name}: {m}")
    assert want["attnres_queries_0"].abs().max() > 0
