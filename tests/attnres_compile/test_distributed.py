"""Distributed training and whole-model state of a prepared, compiled tiny GPT (CPU, gloo, localhost).

The training runs live in ``tests/support/distributed_worker.py``, started as
separate processes with the environment ``torchrun`` would set.
"""

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
# SGD on the same global batch: the mean of two half-batch gradients equals the
# full-batch gradient up to fp32 summation order.
ATOL = 1e-5


def _environment(**extra):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(SUPPORT), str(ROOT / "examples"), env.get("PYTHONPATH", "")])
    env.update({k: str(v) for k, v in extra.items()})
    return env


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_single(backend, out):
    subprocess.run([sys.executable, str(SUPPORT / "distributed_worker.py"), "single", backend, str(out)],
                   env=_environment(), check=True, timeout=600, capture_output=True)


def _run_two_ranks(mode, backend, out):
    port = _free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, str(SUPPORT / "distributed_worker.py"), mode, backend, str(out)],
            env=_environment(RANK=rank, WORLD_SIZE=2, LOCAL_RANK=rank, MASTER_ADDR="127.0.0.1", MASTER_PORT=port),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for rank in range(2)
    ]
    logs = [p.communicate(timeout=600)[0] for p in procs]
    return [p.returncode for p in procs], logs


def _assert_same_parameters(got, want):
    assert got.keys() == want.keys()
    assert "attnres_queries_0" in got
    assert got["attnres_queries_0"].abs().max() > 0, "the queries trained"
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=ATOL, msg=lambda m: f"{name}: {m}")


def _check_ddp(backend, tmp_path):
    _run_single(backend, tmp_path / "single.pt")
    codes, logs = _run_two_ranks("ddp", backend, tmp_path / "ddp.pt")
    assert codes == [0, 0], logs[0][-3000:]
    _assert_same_parameters(torch.load(tmp_path / "ddp.pt"), torch.load(tmp_path / "single.pt"))


def test_two_process_ddp_trains_like_one_process(tmp_path):
    """The rewritten graph runs eagerly here to keep the run short; the slow test uses Inductor."""
    _check_ddp("eager", tmp_path)


@pytest.mark.slow
def test_two_process_ddp_with_inductor_trains_like_one_process(tmp_path):
    _check_ddp("attnres", tmp_path)


def test_fsdp2_on_the_root_module_trains_like_one_process(tmp_path):
    """fully_shard on the root keeps the whole stack in one graph: the queries train as in one process."""
    _run_single("eager", tmp_path / "single.pt")
    codes, logs = _run_two_ranks("fsdp2", "eager", tmp_path / "fsdp2.pt")
    assert codes == [0, 0], logs[0][-3000:]
    _assert_same_parameters(torch.load(tmp_path / "fsdp2.pt"), torch.load(tmp_path / "single.pt"))


@pytest.mark.slow
def test_fsdp2_on_every_block_is_left_unrewritten_and_says_why(tmp_path):
    """Dynamo does not trace FSDP2's per-module hooks: each block becomes a graph of its own."""
    codes, logs = _run_two_ranks("fsdp2_blocks", "eager", tmp_path / "fsdp2_blocks.pt")
    assert codes == [0, 0], logs[0][-3000:]
    assert "shard only the root module" in logs[0]


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
