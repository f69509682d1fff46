"""End-to-end cost of Block AttnRes: ``torch.compile`` baseline vs ``backend="attnres"``, side by side.

    python benchmarks/bench_e2e.py --decode                       # CPU, small Llama, batch 1 and 32
    python benchmarks/bench_e2e.py --decode --device cuda         # GPU (bf16)
    python benchmarks/bench_e2e.py --decode --batch 1 8 --layers 8 --hidden 512

One function per measurement (``bench_decode`` so far), each printing a
markdown table. Within a run the two models share weights, shapes and
inputs; their repeats are interleaved so that a busy machine slows both alike,
and the figure is the median over repeats after warm-up (which also compiles).

Decode: prefill a prompt into a ``DynamicCache``, then time ``--steps`` greedy
decode steps (one new token per sequence per step) of the in-place compiled
model; tokens/s = batch x steps / time. The Block AttnRes model is the same
model prepared with random (non-zero) queries: zero queries would cost the same.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch

import attnres_compile


@dataclass
class CountingBackend:
    """A ``torch.compile`` backend that counts the graphs it is handed (compiles and recompiles)."""

    backend: Callable
    graphs: int = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return self.backend(gm, example_inputs)


def inductor(gm, example_inputs):
    from torch._inductor.compile_fx import compile_fx

    return compile_fx(gm, example_inputs)


def build_llama(layers: int, hidden: int, vocab: int, device: str, dtype: torch.dtype):
    """A Llama with random weights: ``layers`` decoder layers (2 residual steps each), ``hidden`` wide."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64), num_key_value_heads=max(1, hidden // 128),
        max_position_embeddings=1024,
    )
    return LlamaForCausalLM(config).to(device=device, dtype=dtype).eval()


def with_random_queries(model, prompt: torch.Tensor, config: attnres_compile.AttnResConfig):
    """A prepared copy of ``model`` whose queries are random rows of norm ~1 (non-trivial reads)."""
    prepared = attnres_compile.prepare(copy.deepcopy(model), (prompt,), config)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for q in prepared.attnres.streams:
            q.copy_(torch.randn(q.shape, generator=gen) / q.shape[-1] ** 0.5)
    return prepared


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@torch.no_grad()
def decode_seconds(model, prompt: torch.Tensor, steps: int, device: str) -> float:
    """Seconds for ``steps`` greedy decode steps after prefilling ``prompt`` ``[batch, P]``."""
    out = model(input_ids=prompt, use_cache=True)
    cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        out = model(input_ids=token, past_key_values=cache, use_cache=True)
        token = out.logits[:, -1:].argmax(-1)
    synchronize(device)
    return time.perf_counter() - start


def median_seconds_side_by_side(models: dict, prompt, steps: int, device: str, warmup: int, repeats: int) -> dict:
    """Median decode time per model, repeats interleaved (A, B, A, B, ...)."""
    for _ in range(warmup):
        for model in models.values():
            decode_seconds(model, prompt, steps, device)
    times = {name: [] for name in models}
    for _ in range(repeats):
        for name, model in models.items():
            times[name].append(decode_seconds(model, prompt, steps, device))
    return {name: statistics.median(t) for name, t in times.items()}


def bench_decode(args) -> list[dict]:
    """Decode tokens/s of the compiled baseline and of the compiled Block AttnRes model, per batch size."""
    dtype = getattr(torch, args.dtype)
    base = build_llama(args.layers, args.hidden, args.vocab, args.device, dtype)
    config = attnres_compile.AttnResConfig(num_blocks=args.num_blocks)
    gen = torch.Generator().manual_seed(1)
    rows = []
    for batch in args.batch:
        prompt = torch.randint(0, args.vocab, (batch, args.prompt), generator=gen).to(args.device)
        baseline = copy.deepcopy(base)
        attnres = with_random_queries(base, prompt, config)
        counts = {"baseline": CountingBackend(inductor), "attnres": CountingBackend(attnres_compile.AttnResBackend())}
        baseline.compile(backend=counts["baseline"])
        attnres.compile(backend=counts["attnres"])
        seconds = median_seconds_side_by_side(
            {"baseline": baseline, "attnres": attnres}, prompt, args.steps, args.device, args.warmup, args.repeats
        )
        tokens = batch * args.steps
        rows.append({
            "batch": batch,
            "baseline_tok_s": tokens / seconds["baseline"],
            "attnres_tok_s": tokens / seconds["attnres"],
            "ratio": seconds["baseline"] / seconds["attnres"],
            "graphs": (counts["baseline"].graphs, counts["attnres"].graphs),
        })
        torch._dynamo.reset()  # the next batch size compiles afresh, like a new process would
    print_decode_table(args, base, attnres.attnres, rows)
    return rows


def print_decode_table(args, model, queries, rows: list[dict]) -> None:
    params = sum(p.numel() for p in model.parameters())
    print(f"\n### Decode: {args.device}, {args.dtype}, Llama {args.layers} layers x hidden {args.hidden} "
          f"({params / 1e6:.1f} M parameters, vocab {args.vocab}), {queries.config}")
    print(f"prompt {args.prompt} tokens, {args.steps} decode steps per repeat, median of {args.repeats} "
          f"interleaved repeats after {args.warmup} warm-up; {torch.get_num_threads()} CPU threads; "
          f"torch {torch.__version__}\n")
    print("| batch | torch.compile (Inductor) tok/s | backend=\"attnres\" tok/s | attnres / baseline | graphs compiled (baseline, attnres) |")
    print("|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['batch']} | {r['baseline_tok_s']:,.0f} | {r['attnres_tok_s']:,.0f} | {r['ratio']:.3f} | "
              f"{r['graphs'][0]}, {r['graphs'][1]} |")


SECTIONS = {"decode": bench_decode}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name in SECTIONS:
        parser.add_argument(f"--{name}", action="store_true", help=f"run the {name} measurement")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None, help="default: float32 on CPU, bfloat16 on CUDA")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--num-blocks", type=int, default=4)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--prompt", type=int, default=16, help="prompt length")
    parser.add_argument("--steps", type=int, default=32, help="decode steps per repeat")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    args = parser.parse_args(argv)
    if args.dtype is None:
        args.dtype = "bfloat16" if args.device.startswith("cuda") else "float32"
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    chosen = [name for name in SECTIONS if getattr(args, name)] or list(SECTIONS)
    return {name: SECTIONS[name](args) for name in chosen}


if __name__ == "__main__":
    main()
