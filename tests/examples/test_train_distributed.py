"""examples/train_distributed.py: its command line under torchrun, and what it refuses."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import attnres_compile
from train_distributed import build_model, parallelize, tensor_parallel_plan

ROOT = Path(__file__).resolve().parents[2]


def _torchrun(tmp_path, *args):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "examples"), os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         str(ROOT / "examples" / "train_distributed.py"), *args],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout + result.stderr


def test_torchrun_two_processes_prints_the_plan_and_the_losses(tmp_path):
    out = _torchrun(tmp_path, "--parallel", "ddp", "--steps", "2", "--layers", "2", "--width", "32", "--eager")
    assert "tiny-gpt on 2 processes (gloo), ddp" in out
    assert "stream 0: d=32, 4 layers, 2 blocks of [2, 2]" in out
    assert "step   0  loss" in out and "step   1  loss" in out


def test_pipeline_command_prints_the_transfer_table_and_the_losses(tmp_path):
    out = _torchrun(tmp_path, "--parallel", "pp", "--steps", "2", "--width", "32")
    assert "interleaved schedule, 4 stages on 2 processes" in out
    assert "2 -> 3 (r0->r1) |  b_0 b_1 b_2 b_3" in out and "(2.25x)" in out
    assert "step   1  loss" in out


@pytest.fixture
def one_process_group():
    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    yield
    dist.destroy_process_group()


def test_simple_fsdp_refuses_tied_weights_naming_them(one_process_group):
    pytest.importorskip("torchtitan")
    model = build_model("tiny-gpt", 64, 1, 16, seed=0)
    attnres_compile.prepare(model, (torch.randint(0, 64, (1, 8)),))
    with pytest.raises(ValueError, match="untie lm_head.weight from tok_emb.weight"):
        parallelize(model, "fsdp", "cpu")


def test_tensor_parallel_plan_names_every_projection_and_refuses_a_fused_qkv():
    plan = tensor_parallel_plan(build_model("hf-llama", 64, 2, 32, seed=0))
    assert sorted(type(style).__name__ for style in plan.values()) == ["ColwiseParallel"] * 10 + ["RowwiseParallel"] * 4
    with pytest.raises(ValueError, match="no tensor-parallel plan for TinyGPT"):
        tensor_parallel_plan(build_model("tiny-gpt", 64, 1, 16, seed=0))
