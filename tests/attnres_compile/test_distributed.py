"""Distributed training of a prepared, compiled model (CPU, gloo, localhost) against one process.

The runs live in ``tests/support/distributed_worker.py`` (on top of
``examples/train_distributed.py``), started as separate processes with the
environment ``torchrun`` would set. Each engine's run must give the per-step
losses and the final parameters, queries included, of one process training the
same rewritten model on the same global batches; and a model with non-zero
queries that cannot be rewritten must raise under every engine.
"""

import importlib.util
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import attnres_compile
from attnres_compile import AttnResBackend
from zoo import tiny_gpt

ROOT = Path(__file__).resolve().parents[2]
SUPPORT = ROOT / "tests" / "support"
# SGD on the same global batch: the mean of the ranks' gradients equals the
# full-batch gradient up to fp32 summation order (measured: 1e-7 relative).
RTOL, ATOL = 1e-5, 1e-6

needs_torchtitan = pytest.mark.skipif(
    importlib.util.find_spec("torchtitan") is None,
    reason="torchtitan is not installed (pip install --no-deps torchtitan==0.3.0, see README 'Distributed')",
)


def _environment(**extra):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(SUPPORT), str(ROOT / "examples"), env.get("PYTHONPATH", "")])
    env.update({k: str(v) for k, v in extra.items()})
    return env


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(engine, model, backend, out):
    return [sys.executable, str(SUPPORT / "distributed_worker.py"), engine, model, backend, str(out)]


def _single_run(model, backend, folder):
    """One process training ``model``: the reference every engine's run is checked against.

    ``backend="pipeline"``: the rewritten program that pipeline stages are cut from, trained whole.
    """
    out = folder / f"single-{model}-{backend}.pt"
    command = _worker("single-pp", model, "eager", out) if backend == "pipeline" else _worker("single", model, backend, out)
    subprocess.run(command, env=_environment(), check=True, timeout=600, capture_output=True)
    return torch.load(out)


def _run_ranks(engine, model, backend, out, world=2):
    port = _free_port()
    procs = [
        subprocess.Popen(
            _worker(engine, model, backend, out),
            env=_environment(RANK=rank, WORLD_SIZE=world, LOCAL_RANK=rank, MASTER_ADDR="127.0.0.1", MASTER_PORT=port),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for rank in range(world)
    ]
    logs = [p.communicate(timeout=600)[0] for p in procs]
    return [p.returncode for p in procs], logs


def _assert_trains_like_one_process(got, want):
    assert got["state"].keys() == want["state"].keys()
    assert "attnres_queries_0" in got["state"]
    assert got["state"]["attnres_queries_0"].abs().max() > 0, "the queries trained"
    torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(want["losses"]), rtol=RTOL, atol=0)
    for name, value in want["state"].items():
        torch.testing.assert_close(got["state"][name], value, rtol=RTOL, atol=ATOL, msg=lambda m: f"{name}: {m}")


@pytest.fixture(scope="module")
def single_runs(tmp_path_factory):
    """``single_runs(model, backend)``: the one-process reference, run once per test worker."""
    folder, runs = tmp_path_factory.mktemp("single"), {}

    def get(model, backend):
        if (model, backend) not in runs:
            runs[model, backend] = _single_run(model, backend, folder)
        return runs[model, backend]

    return get


def _check_engine(engine, model, backend, tmp_path, single_runs, world=2):
    codes, logs = _run_ranks(engine, model, backend, tmp_path / f"{engine}.pt", world)
    assert codes == [0] * world, logs[0][-3000:] + logs[-1][-3000:]
    if engine == "ddp-buckets":
        assert "refused: ddp-buckets" in logs[0]
    _assert_trains_like_one_process(torch.load(tmp_path / f"{engine}.pt"), single_runs(model, backend))


def test_two_process_ddp_trains_like_one_process(tmp_path, single_runs):
    """The rewritten graph runs eagerly here to keep the run short; the slow test uses Inductor."""
    _check_engine("ddp", "tiny-gpt", "eager", tmp_path, single_runs)


@pytest.mark.slow
def test_two_process_ddp_with_inductor_trains_like_one_process(tmp_path, single_runs):
    _check_engine("ddp", "tiny-gpt", "attnres", tmp_path, single_runs)


def test_ddp_buckets_that_cut_the_stack_are_refused_and_optimize_ddp_false_trains(tmp_path, single_runs):
    """A 3 MB model fills several DDP buckets: Dynamo's DDPOptimizer would cut the graph at each."""
    _check_engine("ddp-buckets", "tiny-gpt-wide", "eager", tmp_path, single_runs)


def test_fsdp2_on_the_root_module_trains_like_one_process(tmp_path, single_runs):
    """fully_shard on the root keeps the whole stack in one graph: the queries train as in one process."""
    _check_engine("fsdp2-root", "tiny-gpt", "eager", tmp_path, single_runs)


@pytest.mark.slow
def test_fsdp2_on_every_block_is_left_unrewritten_and_names_the_routes(tmp_path):
    """Dynamo does not trace FSDP2's per-module hooks: each block becomes a graph of its own."""
    codes, logs = _run_ranks("fsdp2-blocks", "tiny-gpt", "eager", tmp_path / "fsdp2_blocks.pt")
    assert codes == [0, 0], logs[0][-3000:]
    assert "shard only the root module" in logs[0] and "SimpleFSDP" in logs[0]


@needs_torchtitan
@pytest.mark.parametrize("model", ["hf-llama", pytest.param("titan-llama3", marks=pytest.mark.slow)])
def test_simple_fsdp_fully_shard_trains_like_one_process(model, tmp_path, single_runs):
    """Every parameter, the queries included, sharded; the all-gathers are in the graph the pass rewrites."""
    _check_engine("fsdp", model, "eager", tmp_path, single_runs)


@needs_torchtitan
@pytest.mark.slow
def test_simple_fsdp_with_inductor_trains_like_one_process(tmp_path, single_runs):
    _check_engine("fsdp", "hf-llama", "attnres", tmp_path, single_runs)


@needs_torchtitan
@pytest.mark.slow
def test_simple_fsdp_hybrid_shard_on_four_processes_trains_like_one_process(tmp_path, single_runs):
    """hybrid_shard on a 2 x 2 mesh: replicated across one dimension, sharded along the other."""
    _check_engine("hsdp", "hf-llama", "eager", tmp_path, single_runs, world=4)


@pytest.mark.parametrize("model", ["hf-llama", pytest.param("titan-llama3", marks=needs_torchtitan)])
def test_tensor_parallel_attention_and_mlp_trains_like_one_process(model, tmp_path, single_runs):
    """Colwise q/k/v and up projections, rowwise output projections: the stream stays whole on every rank."""
    _check_engine("tp", model, "eager", tmp_path, single_runs)


PIPELINES = [
    "pp-interleaved-cached",
    pytest.param("pp-interleaved", marks=pytest.mark.slow),
    pytest.param("pp-gpipe", marks=pytest.mark.slow),
    pytest.param("pp-gpipe-cached", marks=pytest.mark.slow),
    pytest.param("pp-1f1b", marks=pytest.mark.slow),
    pytest.param("pp-1f1b-cached", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("engine", PIPELINES)
def test_pipeline_stages_train_like_one_process(engine, tmp_path, single_runs):
    """Stages cut from one rewritten program (4 blocks; interleaved: 2 ranks x 2 stages), 4 micro-batches."""
    codes, logs = _run_ranks(engine, "tiny-gpt", "eager", tmp_path / "pp.pt")
    assert codes == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    got = torch.load(tmp_path / "pp.pt")
    _assert_trains_like_one_process(got, single_runs("tiny-gpt", "pipeline"))
    # Per receiving rank and micro-batch run (3 steps x 4 micro-batches), the summaries that reached it
    # over every hop, as counted when sent.
    received: dict[tuple[int, int], list[str]] = {}
    for stage, hop in sorted(got["hops"].items()):
        assert hop["bytes"] == [hop["declared"]] * (3 * 4), "each hop sent, every micro-batch, what it declared"
        for run, summaries in enumerate(hop["summaries"]):
            assert all(size > 0 for size in summaries.values())
            received.setdefault((hop["to_rank"], run), []).extend(summaries)
    assert len(received) == len({hop["to_rank"] for hop in got["hops"].values()}) * 3 * 4
    twice = {key: names for key, names in received.items() if len(names) > len(set(names))}
    if engine.endswith("-cached"):
        assert not twice, f"(rank, micro-batch run) received a block summary twice: {twice}"
    elif engine == "pp-interleaved":  # rank 1 receives two hops (0 -> 1, 2 -> 3): b_0 and b_1 on both
        assert sorted(twice) == [(1, run) for run in range(3 * 4)], "without the cache a summary crosses twice"


@pytest.mark.slow
def test_pipeline_of_a_hugging_face_llama_trains_like_one_process(tmp_path, single_runs):
    """Rotary tables and the causal mask cross the cuts beside the summaries."""
    codes, logs = _run_ranks("pp-interleaved-cached", "hf-llama", "eager", tmp_path / "pp.pt")
    assert codes == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    _assert_trains_like_one_process(torch.load(tmp_path / "pp.pt"), single_runs("hf-llama", "pipeline"))


@pytest.mark.parametrize("model", [
    "tiny-gpt",
    pytest.param("hf-llama", marks=needs_torchtitan),
    pytest.param("titan-llama3", marks=[needs_torchtitan, pytest.mark.slow]),
])
def test_no_engine_runs_non_zero_queries_without_the_rewrite(model, tmp_path):
    """A stack changed after prepare cannot take the queries: under DDP, SimpleFSDP, FSDP2 and TP it raises.

    Under SimpleFSDP the queries reach the graph all-gathered, as no graph input: the check sits in the graph.
    """
    codes, logs = _run_ranks("refusals", model, "eager", tmp_path / "unused.pt")
    assert codes == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    engines = ["ddp", "fsdp2-root", "fsdp2-blocks"] if model == "tiny-gpt" else ["ddp", "fsdp", "fsdp2-root", "tp"]
    for engine in engines:
        assert f"refused: {engine}" in logs[0], logs[0][-3000:]


LOAD_AND_RUN = """
import sys, torch, attnres_compile
model = torch.load(sys.argv[1], weights_only=False)
idx = torch.load(sys.argv[2])
with torch.no_grad():
    out = torch.compile(model, backend="attnres")(idx)
torch.save(out, sys.argv[3])
"""


def test_whole_prepared_model_saved_with_torch_save_compiles_in_a_fresh_process(tmp_path):
    model, args, _ = tiny_gpt()
    attnres_compile.prepare(model, args)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for q in model.attnres.queries:
            q.copy_(torch.randn(q.shape, generator=gen) / q.shape[-1] ** 0.5)
        want = torch.compile(model, backend=AttnResBackend(inductor=False))(*args)
    torch.save(model, tmp_path / "model.pt")
    torch.save(args[0], tmp_path / "idx.pt")
    subprocess.run(
        [sys.executable, "-c", LOAD_AND_RUN, str(tmp_path / "model.pt"), str(tmp_path / "idx.pt"), str(tmp_path / "out.pt")],
        env=_environment(), check=True, timeout=600, cwd=tmp_path,
    )
    torch.testing.assert_close(torch.load(tmp_path / "out.pt"), want, rtol=1e-5, atol=1e-6)
    assert (want - model.eval().__class__.forward(model, *args)).abs().max() > 1e-3  # the queries matter
