"""What the Triton kernel tests share: where they run, their tolerances, their error measure.

The kernel test files run on CUDA, or on CPU under the Triton interpreter
(``tests/kernels/test_triton_interpreter.py`` starts them in a process with
``TRITON_INTERPRET=1``, which must be set before ``triton.jit`` decorates the
kernels). Tolerances, as max |got - want| / max |want| against the fp32
reference on the same (rounded) inputs: fp32 2e-5 (fp32 accumulation in
another order); bf16 and fp16 outputs 1e-2: one rounding of the result, at
most 2^-7 relative for bf16 (one ulp: the Triton 3.9 interpreter rounds
fp32 -> bf16 toward zero, a GPU to nearest, half that), plus reduction order.
"""

from __future__ import annotations

import os

import pytest
import torch

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() and not INTERPRETING else "cpu"
needs_triton_device = pytest.mark.skipif(
    not (INTERPRETING or torch.cuda.is_available()),
    reason="needs CUDA or TRITON_INTERPRET=1 (test_triton_interpreter.py runs this file so)",
)

EPS = 1e-6
TOL = {torch.float32: 2e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| / max |want|, in fp64 on the CPU."""
    got, want = got.double().cpu(), want.double().cpu()
    return ((got - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()
