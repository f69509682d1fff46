"""Activation checkpointing: bytes saved for the backward, plain compiled vs Block AttnRes, without and with AC.

    python benchmarks/bench_checkpoint.py [--layers 6 --d-model 256 --batch 16 --seq 64]

The GPT of ``examples/tiny_gpt.py`` (the 6 x 256 of the overhead benchmark by
default), fp32, one training forward of ``batch x seq`` tokens, each arm
compiled fresh: ``torch.compile`` (Inductor) and ``backend="attnres"``
(``num_blocks=8``), without AC and with every block wrapped by
``checkpoint_wrapper`` (non-reentrant, as torchtitan applies it). Saved =
``attnres_compile.memory.saved_for_backward_bytes`` (parameters included).
Prints a markdown table; the contract is the last column: (with AC) / (without
AC) for the rewrite at most 1.25 x the plain model's + 0.05.
"""

from __future__ import annotations

import argparse
import copy

import torch
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

import attnres_compile
from attnres_compile.memory import saved_for_backward_bytes
from bench_e2e import build_gpt


def with_checkpointed_blocks(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` with every transformer block wrapped by ``checkpoint_wrapper`` (in place)."""
    for i, block in enumerate(model.blocks):
        model.blocks[i] = checkpoint_wrapper(block)
    return model


def saved_bytes(model: torch.nn.Module, x: torch.Tensor, backend) -> int:
    """Saved-for-backward bytes of one compiled training forward, after a first (compiling) step."""
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=backend)
    compiled(x).float().square().mean().backward()
    saved = saved_for_backward_bytes(lambda: compiled(x))
    model.zero_grad(set_to_none=True)
    return saved


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    base = build_gpt(args.layers, args.d_model, 256, args.seq, "cpu")
    x = torch.randint(0, 256, (args.batch, args.seq), generator=torch.Generator().manual_seed(1))
    config = attnres_compile.AttnResConfig(num_blocks=8)
    rows = {}
    for ac in (False, True):
        plain = copy.deepcopy(base)
        rewritten = attnres_compile.prepare(copy.deepcopy(base), (x,), config)
        if ac:
            plain, rewritten = with_checkpointed_blocks(plain), with_checkpointed_blocks(rewritten)
        rows[ac] = (saved_bytes(plain, x, "inductor"), saved_bytes(rewritten, x, "attnres"))
    (plain_off, ours_off), (plain_on, ours_on) = rows[False], rows[True]
    print(f"GPT {args.layers} x {args.d_model}, {args.batch} x {args.seq} tokens, fp32, torch {torch.__version__}\n")
    print("| model | saved MB, no AC | saved MB, AC | AC / no AC |")
    print("|---|---:|---:|---:|")
    print(f"| torch.compile (Inductor) | {plain_off / 1e6:.1f} | {plain_on / 1e6:.1f} | {plain_on / plain_off:.3f} |")
    print(f"| backend=\"attnres\" | {ours_off / 1e6:.1f} | {ours_on / 1e6:.1f} | {ours_on / ours_off:.3f} |")
    bound = 1.25 * plain_on / plain_off + 0.05
    print(f"\nattnres AC / no AC = {ours_on / ours_off:.3f}; bound 1.25 x plain + 0.05 = {bound:.3f}")


if __name__ == "__main__":
    main()
