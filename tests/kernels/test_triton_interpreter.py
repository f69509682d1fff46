"""The Triton kernel tests on a CPU-only machine: test_triton_{block_read,merge,read}.py
run under the Triton interpreter, in a fresh process.

``TRITON_INTERPRET=1`` only takes effect if it is set before ``triton.jit``
decorates the kernels (triton 3.x reads it at decoration time), and by the time
this file runs, the rest of the suite has imported the package. A subprocess
with the variable set gives the kernel tests a clean start without changing
anything for the other tests of this run. On a CUDA machine the kernel files run
natively in this process instead and this test is skipped.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
KERNEL_TEST_FILES = ["test_triton_block_read.py", "test_triton_merge.py", "test_triton_read.py"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA runs the kernel tests natively")
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="already interpreting")
def test_kernel_tests_pass_under_the_triton_interpreter():
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x",
               *[str(HERE / name) for name in KERNEL_TEST_FILES]]
    # Not from the repository root: `python -m` puts the working directory on sys.path,
    # where the top-level kernels/ folder would pose as the Hugging Face `kernels` package.
    proc = subprocess.run(command, cwd=HERE, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{' '.join(command)}\n{proc.stdout[-8000:]}\n{proc.stderr[-4000:]}"
    assert " passed" in proc.stdout and " skipped" not in proc.stdout, proc.stdout[-2000:]
