"""Read-op roofline: one block of Block AttnRes reads, ours against the reference and the public kernels.

    .venv/bin/python benchmarks/bench_read.py [--out benchmarks/results/read_h100.md]
    .venv/bin/python benchmarks/bench_read.py --shape 16384x2048x9     # the headline only
    .venv/bin/python benchmarks/bench_read.py --smoke     # every code path, tiny shapes

Workload (per shape T x d x N, bf16): the S = 6 layers of one block, each
reading the same N completed sources ``[T, d]``; layer j >= 1 also reads its
intra-block partial ``p_j`` (a distinct ``[T, d]`` tensor per layer), layer 0
has none. Output: the S layer inputs ``h_j``. Forward is timed under
``torch.no_grad``; forward+backward runs the forward with autograd and then the
grads of ``sum_j <h_j, R_j>`` (fixed random ``R_j``) w.r.t. every source,
partial and query. Median of ``--repeats`` CUDA-event timings after warm-up.

% of floor = (floor bytes / copy bandwidth) / measured time, where the copy
bandwidth is that of ``dst.copy_(src)`` on a 1 GiB buffer measured in the same
run (bytes read + written per second), and the floor is the least HBM traffic
of any implementation that runs the block's layers in order (``p_j`` exists only
once layer j-1 has run, so whatever layer j needs from the completed sources is
either kept -- written and read back once -- or re-read). With ``e`` bytes per
element (2 for bf16) and ``U = T * d * e``::

    forward:  U * (N            # read each completed source once
                   + (S - 1)    # read each partial once
                   + S          # write each h_j once
                   + 2 (S - 1)) # phase 1's mix for layers 1..S-1: written, read back
              + 2 (S - 1) * T * 4   # its fp32 log-sum-exp: written, read back
    backward: U * (2 N + S      # read the sources and the S grads of the mixes, write dsources
                   + 5 (S - 1)) # merges: read grad_h, o, p; write grad_o, grad_p
    fwd+bwd:  forward + backward

Implementations (rows), all with key-norm eps 1e-6, no key gain (ones where an
API takes one: a gain folds into the query), no 1/sqrt(d), logit scale 1 and
output scale c_l = 1:

- ``reference``: kernels/reference.py two-phase (block_read + S merges) with
  autograd, eager and ``torch.compile`` (Inductor);
- ``ours``: ``attnres::block_read`` once + S ``attnres::merge``, eager and
  compiled, with phase 2 as the Triton kernel or as aten ops fused by Inductor
  (``ops.use_merge_impl``); the partials are inputs here, so the aten merge has no
  add to fuse with (in a model it also takes the add that forms ``p_j``);
- anchors, when importable (``pip install --no-deps`` their wheels), each in its
  best way of doing the same block:
  flash-linear-attention ``fused_attnres`` (one query per call: S calls over
  N or N+1 sources as a pointer tuple, ``checkpoint_level=1`` default),
  Liger-Kernel ``liger_attn_res`` (S calls; it stacks the list into
  ``[N, 1, T, d]`` inside, and that copy is timed), fast-attnres ``attnres``
  (S calls over a tuple of sources; it takes bf16 queries only),
  flash-attn-res (two-phase: ``torch.stack`` of the sources into ``[N, 1, T, d]``,
  timed, then phase 1 once and phase 2 for layers 1..S-1).
  attn-res (plain PyTorch einsum helpers) is left out: it is the reference row.

``err`` is max_j max |h_j - h_j^ref| / max |h_j^ref| against the fp32 reference on
the same bf16 inputs (a layout or convention slip shows here first).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

if "--smoke" in sys.argv and not torch.cuda.is_available():
    # Must precede triton.jit decorating the kernels (package import below).
    os.environ.setdefault("TRITON_INTERPRET", "1")

import attnres_compile  # noqa: E402,F401  (registers torch.ops.attnres.*)
from attnres_compile.kernels import ops  # noqa: E402
from attnres_compile.kernels import reference as ref  # noqa: E402
from attnres_compile.kernels.ops import attnres_block_read, attnres_merge  # noqa: E402

log = logging.getLogger("bench_read")

EPS = 1e-6
LAYERS = 6
TOKENS = 16384
DIMS = (1024, 2048, 4096)
NUM_SOURCES = (5, 9, 17)
HEADLINE = (16384, 2048, 9)


@dataclass(frozen=True)
class Shape:
    tokens: int
    d: int
    sources: int
    layers: int


@dataclass
class Block:
    """One block's inputs: N sources and S - 1 partials [T, d], S queries [S, d] (fp32)."""

    sources: list[torch.Tensor]
    partials: list[torch.Tensor]
    queries: torch.Tensor
    grads: list[torch.Tensor]  # R_j [T, d], the fixed projection of h_j

    def leaves(self) -> list[torch.Tensor]:
        return [*self.sources, *self.partials, self.queries]


def make_block(shape: Shape, device: str, dtype: torch.dtype, seed: int = 0) -> Block:
    gen = torch.Generator().manual_seed(seed)

    def rand(*size, dt=dtype, scale=1.0):
        return (torch.randn(size, generator=gen) * scale).to(dt).to(device)

    t, d = shape.tokens, shape.d
    return Block(
        sources=[rand(t, d) for _ in range(shape.sources)],
        partials=[rand(t, d) for _ in range(shape.layers - 1)],
        queries=rand(shape.layers, d, dt=torch.float32, scale=1 / math.sqrt(d)),  # O(1) scores
        grads=[rand(t, d) for _ in range(shape.layers)],
    )


# --------------------------------------------------------------------------
# Traffic floor and copy bandwidth
# --------------------------------------------------------------------------


def floor_bytes(shape: Shape, elem_bytes: int) -> tuple[int, int]:
    """(forward, forward+backward) least HBM bytes; the formula is in the module docstring."""
    n, s = shape.sources, shape.layers
    unit = shape.tokens * shape.d * elem_bytes
    forward = unit * (n + (s - 1) + s + 2 * (s - 1)) + 2 * (s - 1) * shape.tokens * 4
    backward = unit * (2 * n + s + 5 * (s - 1))
    return forward, forward + backward


def copy_bandwidth(device: str, nbytes: int, repeats: int) -> float:
    """Bytes per ms of ``dst.copy_(src)`` (read + write) on ``nbytes`` buffers."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device, repeats, warmup=3)
    return 2 * nbytes / ms


def time_ms(fn: Callable[[], object], device: str, repeats: int, warmup: int) -> float:
    """Median ms of ``fn()`` (CUDA events on CUDA, wall clock elsewhere)."""
    for _ in range(warmup):
        fn()
    if device != "cuda":
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(1000 * (time.perf_counter() - start))
        return statistics.median(times)
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


# --------------------------------------------------------------------------
# The block, per implementation: (sources, partials, queries) -> [h_0 .. h_{S-1}], each [T, d]
# --------------------------------------------------------------------------


def ours_block(sources, partials, queries):
    o, lse = attnres_block_read(sources, queries, EPS)  # [S, T, d], [S, T]
    return [
        attnres_merge(o[j], lse[j], partials[j - 1] if j else None, queries[j], EPS, 1.0)
        for j in range(queries.shape[0])
    ]


def reference_block(sources, partials, queries):
    o, lse = ref.block_read_forward(sources, queries, EPS)
    return [
        ref.merge_forward(o[j], lse[j], partials[j - 1] if j else None, queries[j], EPS, 1.0)
        for j in range(queries.shape[0])
    ]


def _layer_sources(sources, partials, j):
    """What layer j reads in a one-query-per-call API: the completed sources, then its partial."""
    return [*sources, partials[j - 1]] if j else list(sources)


def fla_block(sources, partials, queries):
    from fla.ops.attnres import fused_attnres

    ones = torch.ones(queries.shape[-1], dtype=queries.dtype, device=queries.device)
    return [
        fused_attnres(queries[j], _layer_sources(sources, partials, j), ones, rms_eps=EPS)
        for j in range(queries.shape[0])
    ]


def liger_block(sources, partials, queries):
    from liger_kernel.transformers.functional import liger_attn_res

    ones = torch.ones(queries.shape[-1], dtype=queries.dtype, device=queries.device)
    return [
        liger_attn_res([v.unsqueeze(0) for v in _layer_sources(sources, partials, j)], queries[j], ones, eps=EPS)[0]
        for j in range(queries.shape[0])
    ]


def fast_attnres_block(sources, partials, queries):
    import attnres

    queries = queries.to(torch.bfloat16)  # bf16 queries only; in the autograd graph, so grads reach fp32
    return [
        attnres.attnres(tuple(_layer_sources(sources, partials, j)), queries[j], eps=EPS)
        for j in range(queries.shape[0])
    ]


def flash_attn_res_block(sources, partials, queries):
    from flash_attn_res.ops.phase_1 import phase_1_batched_attention_triton_op
    from flash_attn_res.ops.phase_2 import phase_2_online_softmax_merge_triton_op

    stacked = torch.stack(sources).unsqueeze(1)  # [N, 1, T, d]: its API takes one 4-D tensor
    o, lse = phase_1_batched_attention_triton_op(stacked, queries, EPS)  # [S, 1, T, d], [S, 1, T]
    hs = [o[0, 0]]
    for j in range(1, queries.shape[0]):
        h = phase_2_online_softmax_merge_triton_op(partials[j - 1].unsqueeze(0), queries[j], o[j], lse[j], EPS)
        hs.append(h[0])
    return hs


@dataclass(frozen=True)
class Impl:
    name: str
    block: Callable
    compiled: bool = False
    merge_impl: Optional[str] = None  # ops.use_merge_impl while this row runs (None: the default)
    module: Optional[str] = None  # import name of an anchor package
    cuda_only: bool = False


IMPLS = [
    Impl("reference, eager", reference_block),
    Impl("reference, torch.compile", reference_block, compiled=True),
    Impl("ours, Triton merge, eager", ours_block, merge_impl="triton"),
    Impl("ours, Triton merge, torch.compile", ours_block, compiled=True, merge_impl="triton"),
    Impl("ours, aten merge, torch.compile", ours_block, compiled=True, merge_impl="aten"),
    Impl("fla fused_attnres (S calls)", fla_block, module="fla", cuda_only=True),
    Impl("liger_attn_res (S calls, stacks)", liger_block, module="liger_kernel", cuda_only=True),
    Impl("fast-attnres attnres (S calls)", fast_attnres_block, module="attnres", cuda_only=True),
    Impl("flash-attn-res (stack + phase 1 + phase 2)", flash_attn_res_block, module="flash_attn_res", cuda_only=True),
]


# --------------------------------------------------------------------------
# Measuring one row
# --------------------------------------------------------------------------


@dataclass
class Row:
    shape: Shape
    impl: str
    fwd_ms: Optional[float] = None
    fwd_bwd_ms: Optional[float] = None
    err: Optional[float] = None
    note: str = ""


def _unavailable(impl: Impl, device: str) -> Optional[str]:
    if impl.cuda_only and device != "cuda":
        return "CUDA only"
    if impl.module is not None:
        try:
            __import__(impl.module)
        except Exception as error:  # an anchor that fails to import is reported, not fatal
            return f"not importable ({type(error).__name__})"
    return None


def _rel_err(hs: list[torch.Tensor], want: list[torch.Tensor]) -> float:
    return max(
        ((h.double() - w.double()).abs().max() / w.double().abs().max().clamp_min(1e-30)).item()
        for h, w in zip(hs, want, strict=True)
    )


def measure(impl: Impl, shape: Shape, block: Block, want: list[torch.Tensor], args) -> Row:
    row = Row(shape, impl.name)
    reason = _unavailable(impl, args.device)
    if reason:
        row.note = reason
        return row
    torch._dynamo.reset()  # one compile per (row, shape); the merge impl is read while tracing
    merge_impl = ops.use_merge_impl(impl.merge_impl) if impl.merge_impl is not None else contextlib.nullcontext()
    try:
        with merge_impl:
            fn = torch.compile(impl.block, backend=args.compile_backend) if impl.compiled else impl.block
            leaves = [t.detach().requires_grad_() for t in block.leaves()]
            n, s = shape.sources, shape.layers
            sources, partials, queries = leaves[:n], leaves[n : n + s - 1], leaves[-1]

            def forward():
                with torch.no_grad():
                    return fn(sources, partials, queries)

            def forward_backward():
                hs = fn(sources, partials, queries)
                return torch.autograd.grad(hs, leaves, block.grads, allow_unused=True)

            row.err = _rel_err(forward(), want)
            row.fwd_ms = time_ms(forward, args.device, args.repeats, args.warmup)
            row.fwd_bwd_ms = time_ms(forward_backward, args.device, args.repeats, args.warmup)
    except Exception as error:  # one failing row (an anchor on this torch/triton) keeps the table
        log.exception("%s at %s failed", impl.name, shape)
        row.note = f"failed: {type(error).__name__}: {str(error).splitlines()[0][:80] if str(error) else ''}"
    return row


# --------------------------------------------------------------------------
# Table
# --------------------------------------------------------------------------


def _pct(floor: int, bandwidth: float, ms: Optional[float]) -> str:
    return "" if ms is None else f"{100 * floor / bandwidth / ms:.0f}%"


def _ms(ms: Optional[float]) -> str:
    return "" if ms is None else f"{ms:.3f}"


def table(rows: list[Row], bandwidth: float, elem_bytes: int) -> list[str]:
    lines = [
        "| T | d | N | S | implementation | fwd ms | fwd % floor | fwd+bwd ms | fwd+bwd % floor | err | note |",
        "|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---|",
    ]
    for row in rows:
        sh = row.shape
        fwd_floor, fwd_bwd_floor = floor_bytes(sh, elem_bytes)
        err = "" if row.err is None else f"{row.err:.1e}"
        lines.append(
            f"| {sh.tokens} | {sh.d} | {sh.sources} | {sh.layers} | {row.impl} | {_ms(row.fwd_ms)} "
            f"| {_pct(fwd_floor, bandwidth, row.fwd_ms)} | {_ms(row.fwd_bwd_ms)} "
            f"| {_pct(fwd_bwd_floor, bandwidth, row.fwd_bwd_ms)} | {err} | {row.note} |"
        )
    return lines


def shapes_for(args) -> list[Shape]:
    if args.smoke:
        # Odd T and d; S = 2: a layer without and one with a partial. (The kernels' own
        # tests cover more sources than one launch takes.)
        return [Shape(3, 9, 3, 2)]
    if args.shape:
        return [Shape(*(int(x) for x in text.split("x")), args.layers) for text in args.shape]
    shapes = [Shape(TOKENS, d, n, args.layers) for d in DIMS for n in NUM_SOURCES]
    headline = Shape(*HEADLINE, args.layers)
    return [headline] + [s for s in shapes if s != headline]


def header(args, bandwidth: float) -> list[str]:
    import triton

    device = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    mode = "smoke run: tiny shapes, timings meaningless" if args.smoke else f"median of {args.repeats}"
    interp = " (Triton interpreter)" if os.environ.get("TRITON_INTERPRET") == "1" else ""
    return [
        f"# Block AttnRes reads: one block of S layers, {args.dtype}",
        "",
        f"{device}{interp}; torch {torch.__version__}, triton {triton.__version__}; {mode}; "
        f"compile backend {args.compile_backend}.",
        f"Copy bandwidth measured in this run: {bandwidth / 1e6:.0f} GB/s (read + write of dst.copy_(src)).",
        "Floor bytes (e = bytes per element, U = T d e): fwd U (N + 4S - 3) + 8 (S - 1) T; "
        "fwd+bwd adds U (2N + 6S - 5). See benchmarks/bench_read.py for the derivation.",
        "Anchors: one-query-per-call APIs run S calls (layer j >= 1 also reads its partial); "
        "flash-attn-res runs phase 1 once on torch.stack(sources) [N, 1, T, d] (the stack is timed) "
        "and phase 2 for layers 1..S-1; key gains are ones, eps 1e-6 everywhere.",
        "",
    ]


def main(argv: Optional[list[str]] = None) -> list[str]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, one repeat: checks every code path")
    parser.add_argument("--out", type=Path, help="also write the markdown table to this file")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--layers", type=int, default=LAYERS, help="S, the layers of the block")
    parser.add_argument("--only", nargs="*", help="run only rows whose name contains one of these")
    parser.add_argument("--shape", action="append", metavar="TxDxN",
                        help="a shape to run instead of the default nine, e.g. 16384x2048x9 (repeatable)")
    args = parser.parse_args(argv)
    args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.smoke:
        args.repeats, args.warmup = 1, 0  # the error check's forward call is the warm-up
    elif args.device != "cuda":
        parser.error("needs CUDA for real numbers; use --smoke to check the code paths on CPU")
    # The CPU smoke run stays quick with aot_eager (same tracing path, no C++ compile).
    args.compile_backend = "inductor" if args.device == "cuda" else "aot_eager"
    args.dtype = torch.bfloat16
    elem_bytes = 2

    bandwidth = copy_bandwidth(args.device, (1 << 30) if args.device == "cuda" else (8 << 20), args.repeats)
    lines = header(args, bandwidth)
    print("\n".join(lines + table([], bandwidth, elem_bytes)), flush=True)
    rows = []
    impls = [i for i in IMPLS if not args.only or any(key in i.name for key in args.only)]
    for shape in shapes_for(args):
        block = make_block(shape, args.device, args.dtype)
        f32 = lambda ts: [t.float() for t in ts]  # noqa: E731
        want = reference_block(f32(block.sources), f32(block.partials), block.queries)
        for impl in impls:
            row = measure(impl, shape, block, want, args)
            rows.append(row)
            print(table([row], bandwidth, elem_bytes)[-1], flush=True)
        del block, want
        if args.device == "cuda":
            torch.cuda.empty_cache()
    lines += table(rows, bandwidth, elem_bytes)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(lines) + "\n")
        print(f"\nwrote {args.out}")
    return lines


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    main()
