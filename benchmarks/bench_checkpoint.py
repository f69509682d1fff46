"""Activation checkpointing: bytes saved for the backward, plain compiled vs Block AttnRes, without and with AC.

    python benchmarks/bench_checkpoint.py [--layers 6 --d-model 256 --batch 16 --seq 64]

The GPT of ``examples/tiny_gpt.py`` (the 6 x 256 of the overhead benchmark by
default), fp32, one training forward of ``batch x seq`` tokens, each arm
compiled fresh: ``torch.compile`` (Inductor) and ``backend="attnres"``
(``num_blocks=8``), without AC, with every block wrapped by
``checkpoint_wrapper`` (non-reentrant, as torchtitan applies it), and with the
same wrapper made selective (``context_fn``: a policy that saves the outputs
of matrix multiplications and recomputes the rest). Saved =
``attnres_compile.memory.saved_for_backward_bytes`` (parameters included).
Prints a markdown table; the contract: (with AC) / (without AC) for the
rewrite at most 1.25 x the plain model's + 0.05.
"""

from __future__ import annotations

import argparse
import copy
import functools

import torch
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

import attnres_compile
from attnres_compile.memory import saved_for_backward_bytes
from bench_e2e import build_gpt


MATMULS = (torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default)


def save_matmuls(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    """A selective policy: keep what the matrix multiplications produce, recompute the cheap rest."""
    return CheckpointPolicy.MUST_SAVE if op in MATMULS else CheckpointPolicy.PREFER_RECOMPUTE


CHECKPOINTING = {
    "none": None,
    "AC": {},
    "selective AC (save matmuls)": {"context_fn": functools.partial(create_selective_checkpoint_contexts, save_matmuls)},
}
"""How the blocks are wrapped: ``checkpoint_wrapper``'s keyword arguments, or None for no wrapper."""


def with_checkpointed_blocks(model: torch.nn.Module, **checkpoint_kwargs) -> torch.nn.Module:
    """``model`` with every transformer block wrapped by ``checkpoint_wrapper`` (in place)."""
    for i, block in enumerate(model.blocks):
        model.blocks[i] = checkpoint_wrapper(block, **checkpoint_kwargs)
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
    for name, checkpoint_kwargs in CHECKPOINTING.items():
        plain = copy.deepcopy(base)
        rewritten = attnres_compile.prepare(copy.deepcopy(base), (x,), config)
        if checkpoint_kwargs is not None:
            plain = with_checkpointed_blocks(plain, **checkpoint_kwargs)
            rewritten = with_checkpointed_blocks(rewritten, **checkpoint_kwargs)
        rows[name] = (saved_bytes(plain, x, "inductor"), saved_bytes(rewritten, x, "attnres"))
    print(f"GPT {args.layers} x {args.d_model}, {args.batch} x {args.seq} tokens, fp32, torch {torch.__version__}\n")
    print_table(rows)


def print_table(rows: dict[str, tuple[int, int]]) -> None:
    """One row per model, one column per way of checkpointing, then each one's ratio to no AC."""
    names = list(rows)
    print("| model | " + " | ".join(f"saved MB, {n}" for n in names) + " | " + " | ".join(f"{n} / none" for n in names[1:]) + " |")
    print("|---|" + "---:|" * (2 * len(names) - 1))
    for arm, label in ((0, "torch.compile (Inductor)"), (1, 'backend="attnres"')):
        sizes = " | ".join(f"{rows[n][arm] / 1e6:.1f}" for n in names)
        ratios = " | ".join(f"{rows[n][arm] / rows['none'][arm]:.3f}" for n in names[1:])
        print(f"| {label} | {sizes} | {ratios} |")
    for name in names[1:]:
        plain, ours = (rows[name][arm] / rows["none"][arm] for arm in (0, 1))
        print(f"\n{name}: attnres {ours:.3f}; bound 1.25 x plain ({plain:.3f}) + 0.05 = {1.25 * plain + 0.05:.3f}")


if __name__ == "__main__":
    main()
