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
KERNELS_FORWARD = ("_block_read_fwd_kernel", "_merge_fwd_kernel")
KERNELS_BACKWARD = ("_block_read_bwd_kernel", "_merge_bwd_kernel")


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


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )
    ids = torch.randint(0, 128, (2, 9)).cuda()
    return LlamaForCausalLM(config).cuda(), ids


@pytest.mark.parametrize("merge_impl", ["triton", "aten"])
def test_compiled_llama_runs_the_triton_kernels_and_verifies(monkeypatch, merge_impl):
    pytest.importorskip("transformers")
    monkeypatch.setenv("ATTNRES_MERGE_IMPL", merge_impl)
    model, ids = _tiny_llama()
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
    want = ["_block_read_fwd_kernel", "_block_read_bwd_kernel"]
    if merge_impl == "triton":
        want += ["_merge_fwd_kernel", "_merge_bwd_kernel"]
    missing = [name for name in want if name not in code]
    assert not missing, f"Inductor's output code lacks {missing}"
    if merge_impl == "aten":
        assert "_merge_fwd_kernel" not in code and "_merge_bwd_kernel" not in code

    # GPU matmuls and fused reductions run in another order than eager: 1e-4, not 1e-5.
    report = attnres_compile.verify(prepared, (ids,), config, example_kwargs={"use_cache": False}, rtol=1e-4)
    assert report.ok, str(report)
