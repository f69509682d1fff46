"""The "attnres" torch.compile backend: registration, unprepared models, fallbacks, recompiles."""

import copy
import logging

import pytest
import torch
from torch import nn

import attnres_compile
from attnres_compile import AttnResBackend, AttnResConfig
from zoo import hf_bert, set_random_queries, tiny_gpt


def test_backend_is_found_by_name_through_the_entry_point():
    from torch._dynamo.backends.registry import lookup_backend

    assert lookup_backend("attnres") is attnres_compile.attnres_backend


def test_unprepared_model_compiles_with_zero_queries(caplog):
    model, args, _ = tiny_gpt()
    backend = AttnResBackend()
    with caplog.at_level(logging.INFO, logger="attnres_compile"):
        out = torch.compile(model, backend=backend)(*args)
    torch.testing.assert_close(out, model(*args), rtol=1e-5, atol=1e-6)
    assert len(backend.plans) == 1 and len(backend.plans[0].streams[0].layers) == 4
    assert "not prepared" in caplog.text


def test_post_norm_model_compiles_untouched(caplog):
    model, args, kwargs = hf_bert()
    backend = AttnResBackend()
    with caplog.at_level(logging.INFO, logger="attnres_compile"):
        out = torch.compile(model, backend=backend)(*args, **kwargs)
    torch.testing.assert_close(out.last_hidden_state, model(*args, **kwargs).last_hidden_state)
    assert backend.plans == []
    assert "no residual stream in this graph" in caplog.text


def test_three_sequence_lengths_recompile_once_and_match_the_reference():
    model, args, _ = tiny_gpt()
    attnres_compile.prepare(model, args)
    set_random_queries(model)
    backend = AttnResBackend()
    compiled = torch.compile(model, backend=backend)
    reference = torch.compile(model, backend=AttnResBackend(inductor=False))
    for seq in (5, 9, 17):
        idx = torch.randint(0, 64, (2, seq))
        torch.testing.assert_close(compiled(idx), reference(idx), rtol=1e-5, atol=1e-6)
    recompiles = len(backend.plans) - 1
    print(f"3 sequence lengths: {len(backend.plans)} compiles, {recompiles} recompile(s)")
    # Static first compile, then one dynamic-shape recompile that serves every later length.
    assert recompiles == 1


class _PreNormLayer(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.norm, self.mlp = nn.LayerNorm(d), nn.Linear(d, d)

    def forward(self, x):
        return x + self.mlp(self.norm(x))


class _BrokenStack(nn.Module):
    """A pre-norm stack with a graph break between its second and third layer."""

    def __init__(self, d=16):
        super().__init__()
        self.l0, self.l1, self.l2, self.l3 = (_PreNormLayer(d) for _ in range(4))

    def forward(self, x):
        x = self.l1(self.l0(x))
        torch._dynamo.graph_break()
        return self.l3(self.l2(x))


def test_graph_break_inside_the_stack_runs_unchanged_with_the_reason(caplog):
    torch.manual_seed(0)
    model, x = _BrokenStack(), torch.randn(2, 3, 16)
    backend = AttnResBackend()
    with caplog.at_level(logging.WARNING, logger="attnres_compile"):
        out = torch.compile(model, backend=backend)(x)
    torch.testing.assert_close(out, model(x))
    assert backend.plans == []
    assert "graph break" in caplog.text and "rather than rewrite half a stream" in caplog.text


def test_prepare_refuses_a_stack_split_by_graph_breaks(caplog):
    torch.manual_seed(0)
    model, x = _BrokenStack(), torch.randn(2, 3, 16)
    with caplog.at_level(logging.WARNING, logger="attnres_compile"):
        attnres_compile.prepare(model, (x,))
    assert not hasattr(model, "attnres")
    assert "graph breaks split the layer stack" in caplog.text


def test_queries_that_do_not_fit_the_graph_fall_back_loudly(caplog):
    model, args, _ = tiny_gpt()
    attnres_compile.prepare(model, args)
    with torch.no_grad():
        model.attnres_queries_0 = nn.Parameter(torch.ones(3, 32))
    with caplog.at_level(logging.ERROR, logger="attnres_compile"), pytest.raises(Exception, match="non-zero"):
        torch.compile(model, backend=AttnResBackend())(*args)
    assert "the model's queries have shapes [(3, 32)] but this graph needs [(5, 32)]" in caplog.text


@pytest.mark.parametrize("prepared", [False, True])
def test_model_called_on_the_stream_itself(prepared):
    """b_0 is the graph input: the queries (made in-graph, or carried by the marker) come first."""
    torch.manual_seed(0)
    model, x = nn.Sequential(*(_PreNormLayer(16) for _ in range(3))), torch.randn(2, 5, 16)
    if prepared:
        attnres_compile.prepare(model, (x,))
        set_random_queries(model)
    reference = torch.compile(model, backend=AttnResBackend(inductor=False))(x)
    compiled = torch.compile(model, backend=AttnResBackend())(x)
    torch.testing.assert_close(compiled, reference, rtol=1e-5, atol=1e-6)
    if not prepared:
        torch.testing.assert_close(compiled, model(x), rtol=1e-5, atol=1e-6)


def test_each_prepared_model_has_its_own_recompile_budget():
    """Ten differently shaped prepared models in one process all get rewritten.

    Dynamo allows 8 cache entries per code object; the forward wrapper prepare
    installs must not make every prepared model share one code object.
    """
    for depth in range(1, 11):
        torch.manual_seed(depth)
        model, x = nn.Sequential(*(_PreNormLayer(16) for _ in range(depth))), torch.randn(2, 3, 16)
        attnres_compile.prepare(model, (x,))
        set_random_queries(model)
        backend = AttnResBackend(inductor=False)
        torch.compile(model, backend=backend)(x)
        assert len(backend.plans) == 1, f"model {depth} was not compiled by the backend"


def test_compiling_is_said_in_the_log(caplog):
    """A user sees what goes to Inductor and how long it took: compiling is the slow part of a first step."""
    import re

    model, args, _ = tiny_gpt()  # 2 blocks: 4 residual steps, 5 reads
    with caplog.at_level(logging.INFO, logger="attnres_compile"):
        torch.compile(model, backend="attnres")(*args)
    assert re.search(
        r"compiling a graph of \d+ nodes with 5 Block AttnRes reads \(Inductor; reads without a Triton kernel: extern\)",
        caplog.text,
    )
    assert re.search(r"compiled in \d+\.\d s", caplog.text)


@pytest.fixture
def cache_key_tags(monkeypatch) -> list:
    """The ``cache_key_tag`` in force at each ``compile_fx`` call the backend makes."""
    import torch._inductor.compile_fx as inductor

    tags = []
    compile_fx = inductor.compile_fx

    def recording(gm, example_inputs, *args, **kwargs):
        tags.append(torch.compiler.config.cache_key_tag)
        return compile_fx(gm, example_inputs, *args, **kwargs)

    monkeypatch.setattr(inductor, "compile_fx", recording)
    return tags


def test_the_compile_caches_key_on_our_ops_sources(cache_key_tags):
    """Inductor's graph caches key on the graph, not on our ops' bodies: the backend adds their hash."""
    from attnres_compile.backend import _recompute_fingerprint
    from attnres_compile.kernels import ops

    model, args, _ = tiny_gpt()
    torch.compile(model, backend="attnres")(*args)
    recompute = f"recompute-{_recompute_fingerprint()}"  # the recompute tags, which the graph's key does not see
    assert cache_key_tags == [
        f"attnres-ops-{ops.implementation_fingerprint()}-{recompute}-merge=triton,reference_reads=extern"
    ]
    assert torch.compiler.config.cache_key_tag == ""  # only while our graph compiles


@pytest.mark.parametrize(
    "env, grad, expected",
    [(None, True, "extern"), (None, False, "traced"), ("extern", False, "extern"), ("traced", True, "traced")],
)
def test_reads_without_triton_kernel_are_extern_for_training_and_traced_for_inference(
    cache_key_tags, monkeypatch, env, grad, expected
):
    """ATTNRES_REFERENCE_READS=auto (default): a graph with a backward gets extern reads (compile time flat in
    depth), an inference graph traced ones (step latency); a set value applies to both; same numbers."""
    if env is not None:
        monkeypatch.setenv("ATTNRES_REFERENCE_READS", env)
    model, args, _ = tiny_gpt()
    attnres_compile.prepare(model, args)
    set_random_queries(model)
    with torch.no_grad():
        want = torch.compile(model, backend=AttnResBackend(inductor=False))(*args)
    torch._dynamo.reset()
    cache_key_tags.clear()
    with torch.set_grad_enabled(grad):
        got = torch.compile(model, backend="attnres")(*args)
    assert len(cache_key_tags) == 1 and cache_key_tags[0].endswith(f"reference_reads={expected}")
    torch.testing.assert_close(got.detach(), want, rtol=1e-5, atol=1e-6)


def test_local_shard_shapes_are_part_of_the_cache_key():
    """Ranks holding uneven shards of one DTensor (a 9-row query matrix over 2 ranks) must not share compiled code."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard

    from attnres_compile.backend import _local_shapes_key

    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    try:
        mesh = init_device_mesh("cpu", (1,))

        def shard(rows):  # as rank 0 (5 rows) or rank 1 (4 rows) of a [9, 4] matrix sees it
            return DTensor.from_local(torch.zeros(rows, 4), mesh, [Shard(0)], run_check=False, shape=(9, 4), stride=(4, 1))

        assert _local_shapes_key([torch.zeros(3)]) == ""
        assert _local_shapes_key([shard(5)]) != _local_shapes_key([shard(4)])
        assert _local_shapes_key([shard(5)]) == _local_shapes_key([shard(5)])
    finally:
        dist.destroy_process_group()
