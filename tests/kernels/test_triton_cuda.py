"""CUDA only: the Triton path traces (opcheck) and Inductor keeps the kernels in a compiled model.

How the kernels are found in Inductor's output: ``torch._inductor.utils.run_and_get_code``
collects the Python source of every graph Inductor compiles (forward and backward;
the same text ``TORCH_LOGS=output_code`` prints), and a user-defined Triton kernel
appears in it under its own function name.
"""

from __future__ import annotations

import pytest
import torch

import attnres_compile
from attnres_compile import AttnResConfig
from attnres_compile.kernels import ops

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

EPS = 1e-6
# Phase 1's forward has two kernels and the launcher picks by d and S: whole rows in registers
# (``_block_read_fwd_rows_kernel``) while they fit, as at this Llama's d = 48, else the tiled one.
PHASE1_FORWARD_KERNELS = ("_block_read_fwd_kernel", "_block_read_fwd_rows_kernel")
KERNELS_BACKWARD = ("_block_read_bwd_kernel", "_merge_bwd_kernel")
# verify's max |got - want| / max |want|. fp32: GPU matmuls and fused reductions run in another
# order than eager. bf16: one rounding is up to 2^-8 of the largest entry, and eager rounds every
# op's output while Inductor rounds once per fused kernel, so the two differ by a few roundings
# along each output and gradient (1.4e-2 at worst on a CPU); a kernel slip is O(1).
VERIFY_RTOL = {torch.float32: 1e-4, torch.bfloat16: 5e-2}


def _cuda(*shape, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen).to(dtype).cuda()


def _op_cases():
    sources = [_cuda(2, 3, 40, dtype=torch.bfloat16, seed=i).requires_grad_() for i in range(3)]
    partial = _cuda(2, 3, 40, dtype=torch.bfloat16, seed=7).requires_grad_()
    query, queries = _cuda(40, seed=8).requires_grad_(), _cuda(2, 40, seed=9).requires_grad_()
    lse = _cuda(2, 3, seed=10).requires_grad_()
    plain = [s.detach() for s in sources]
    grad = _cuda(2, 3, 40, dtype=torch.bfloat16, seed=11)
    return [
        ("read", (sources, query, EPS, 3.0)),
        ("block_read", (sources, queries, EPS)),
        ("merge", (sources[0], lse, partial, query, EPS, 4.0)),
        ("read_backward", (grad, plain, query.detach(), EPS, 3.0)),
        ("block_read_backward", (_cuda(2, 2, 3, 40, dtype=torch.bfloat16), _cuda(2, 2, 3), plain,
                                 queries.detach(), EPS)),
        ("merge_backward", (grad, plain[0], lse.detach(), partial.detach(), query.detach(), EPS, 4.0)),
    ]


_OP_CASES = _op_cases() if torch.cuda.is_available() else []


@pytest.mark.parametrize("name,args", _OP_CASES, ids=[name for name, _ in _OP_CASES])
def test_opcheck_on_the_triton_path(name, args):
    """Schema, fake tensors (the body runs as its own fake kernel) and AOT dispatch, on CUDA."""
    # bf16 kernels against their own re-run: the default opcheck tolerances for bf16.
    torch.library.opcheck(getattr(torch.ops.attnres, name).default, args)


def _tiny_llama(dtype=torch.float32):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )
    ids = torch.randint(0, 128, (2, 9)).cuda()
    return LlamaForCausalLM(config).to(device="cuda", dtype=dtype), ids


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("merge_impl", ["triton", "aten"])
def test_compiled_llama_runs_the_triton_kernels_and_verifies(monkeypatch, merge_impl, dtype):
    pytest.importorskip("transformers")
    monkeypatch.setenv("ATTNRES_MERGE_IMPL", merge_impl)
    model, ids = _tiny_llama(dtype)
    config = AttnResConfig(num_blocks=2)  # 4 layers, blocks of 2: phase 1, a merge, the final read
    prepared = attnres_compile.prepare(model, (ids,), config, example_kwargs={"use_cache": False})
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # non-zero queries: the merge and the scores matter
        for q in prepared.attnres.queries:
            q.copy_(torch.randn(q.shape, generator=gen).cuda() / q.shape[-1] ** 0.5)
    compiled = torch.compile(prepared, backend="attnres")

    def step():
        compiled(ids, use_cache=False).logits.float().square().mean().backward()

    _, codes = torch._inductor.utils.run_and_get_code(step)
    code = "\n".join(codes)
    want = ["_block_read_bwd_kernel"]
    if merge_impl == "triton":
        want += ["_merge_fwd_kernel", "_merge_bwd_kernel"]
    missing = [name for name in want if name not in code]
    if not any(name in code for name in PHASE1_FORWARD_KERNELS):
        missing.append(" or ".join(PHASE1_FORWARD_KERNELS))
    assert not missing, f"Inductor's output code lacks {missing}"
    if merge_impl == "aten":
        assert "_merge_fwd_kernel" not in code and "_merge_bwd_kernel" not in code

    report = attnres_compile.verify(prepared, (ids,), config, example_kwargs={"use_cache": False},
                                    rtol=VERIFY_RTOL[dtype])
    assert report.ok, str(report)
