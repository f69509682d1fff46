"""End-to-end cost of Block AttnRes: ``torch.compile`` baseline vs ``backend="attnres"``, side by side.

    python benchmarks/bench_e2e.py --decode                       # CPU, small Llama, batch 1 and 32
    python benchmarks/bench_e2e.py --decode --device cuda         # GPU (bf16)
    python benchmarks/bench_e2e.py --decode --batch 1 8 --layers 8 --hidden 512
    python benchmarks/bench_e2e.py --overhead                     # CPU, the compare_training GPT (6 x 256)
    python benchmarks/bench_e2e.py --overhead --device cuda --write benchmarks/results/e2e_cuda.md
                                                                  # GPU: 24 x 1024 and 24 x 2048, bf16 autocast

One function per measurement (``bench_decode``, ``bench_overhead``), each
printing a markdown table (``--write PATH`` also saves the overhead table). Within a run the two models share weights, shapes and
inputs; their repeats are interleaved so that a busy machine slows both alike,
and the figure is the median over repeats after warm-up (which also compiles).

Decode: prefill a prompt into a ``DynamicCache``, then time ``--steps`` greedy
decode steps (one new token per sequence per step) of the in-place compiled
model; tokens/s = batch x steps / time. The Block AttnRes model is the same
model prepared with random (non-zero) queries: zero queries would cost the same.

Overhead: the hand-written pre-norm GPT of ``examples/tiny_gpt.py`` at each
``--shapes`` entry (layers x d, head size 64), ``torch.compile`` (Inductor) vs
``backend="attnres"`` (library-default ``num_blocks=8`` unless
``--num-blocks``), bf16 autocast on CUDA (fp32 weights and AdamW state), fp32
on CPU. Per shape and arm:

* training step: forward, cross-entropy, backward, AdamW step, ``zero_grad``;
* prefill: one forward under ``torch.no_grad`` of ``--prefill-batch`` x ``--seq`` tokens;
* peak memory of a training step: the arm's resident state (weights and
  optimizer state) plus the most memory the step allocates on top of what was
  allocated before it (CUDA: the caching allocator's peak; CPU: the
  profiler's allocation events), so the other arm's resident weights do not
  count.

Step and prefill times are medians over ``--timed-steps`` (>= 20) repeats after
``--warmup-steps`` (which also compile), the two arms interleaved.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

import attnres_compile
from attnres_compile import memory

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


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
        for q in prepared.attnres.queries:
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
    config = attnres_compile.AttnResConfig(num_blocks=args.num_blocks or 4)
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


# ----------------------------------------------------------------------------- overhead: train step, prefill, memory


def build_gpt(layers: int, d_model: int, vocab: int, seq: int, device: str):
    """The hand-written pre-norm GPT of ``examples/tiny_gpt.py`` (head size 64), fp32 weights, seed 0."""
    if str(EXAMPLES) not in sys.path:
        sys.path.insert(0, str(EXAMPLES))
    from tiny_gpt import GPTConfig, TinyGPT

    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=vocab, n_layer=layers, n_head=max(1, d_model // 64), d_model=d_model, max_len=seq)
    return TinyGPT(cfg).to(device)


@dataclass
class TrainArm:
    """One side of the overhead comparison: a model, its compiled form and its optimizer."""

    model: torch.nn.Module
    compiled: Callable
    optimizer: torch.optim.Optimizer
    graphs: CountingBackend


def make_train_arm(model, backend: CountingBackend, device: str) -> TrainArm:
    # Fused AdamW on CUDA (what a GPU training loop uses); the default (foreach) on CPU.
    fused = {"fused": True} if device.startswith("cuda") else {}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, **fused)  # after prepare: includes the queries
    return TrainArm(model, torch.compile(model, backend=backend), optimizer, backend)


def autocast_context(args):
    """bf16 autocast where asked for (``--amp bf16``), otherwise nothing."""
    if args.amp == "bf16":
        return torch.autocast(device_type=torch.device(args.device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def train_step(arm: TrainArm, x: torch.Tensor, y: torch.Tensor, args) -> None:
    """Forward, loss, backward, optimizer step; gradients freed afterwards so only resident state remains."""
    with autocast_context(args):
        logits = arm.compiled(x)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1))
    loss.backward()
    arm.optimizer.step()
    arm.optimizer.zero_grad(set_to_none=True)


@torch.no_grad()
def prefill(arm: TrainArm, x: torch.Tensor, args) -> None:
    """One forward-only pass over the prompt batch (the no-grad graph)."""
    with autocast_context(args):
        arm.compiled(x)


def timed(fn: Callable, device: str) -> float:
    """Seconds ``fn()`` takes, device work included."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def median_interleaved(fns: dict[str, Callable], device: str, warmup: int, repeats: int) -> dict[str, float]:
    """Median seconds per named callable after ``warmup`` calls each, calls interleaved (A, B, A, B, ...)."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(timed(fn, device))
    return {name: statistics.median(t) for name, t in times.items()}


def resident_bytes(arm: TrainArm) -> int:
    """Bytes of the arm's weights and optimizer state (what stays allocated between steps)."""
    tensors = list(arm.model.parameters())
    tensors += [t for state in arm.optimizer.state.values() for t in state.values() if torch.is_tensor(t)]
    unique = {t.data_ptr(): t.numel() * t.element_size() for t in tensors}  # tied weights once
    return sum(unique.values())


def step_extra_bytes(fn: Callable, device: str) -> int:
    """The most memory ``fn()`` holds at once on top of what was allocated before it."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    # CPU has no allocator statistics: replay the profiler's allocation (+bytes) and free (-bytes) events
    # in time order. The raw kineto events are used because `prof.events()` folds the allocations made
    # inside an op (such as a whole compiled graph) into that op's net total, which hides the peak.
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    held = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        held += event.nbytes()
        peak = max(peak, held)
    return peak


def saved_for_backward_bytes(arm: TrainArm, x: torch.Tensor, args) -> int:
    """Bytes of the tensors one training step's forward keeps for its backward (``attnres_compile.memory``)."""

    def forward() -> torch.Tensor:
        with autocast_context(args):
            return arm.compiled(x)

    saved = memory.saved_for_backward_bytes(forward)
    arm.optimizer.zero_grad(set_to_none=True)
    return saved


def peak_step_bytes(arm: TrainArm, step: Callable, device: str) -> int:
    """Peak memory of one training step of this arm alone: resident state + the step's own peak."""
    return resident_bytes(arm) + step_extra_bytes(step, device)


def parse_shape(text: str) -> tuple[int, int]:
    layers, _, d_model = text.lower().partition("x")
    return int(layers), int(d_model)


def bench_overhead_shape(args, layers: int, d_model: int) -> dict:
    """Train-step time, prefill latency and peak memory of both arms of one GPT shape, side by side."""
    base = build_gpt(layers, d_model, args.gpt_vocab, args.seq, args.device)
    gen = torch.Generator().manual_seed(1)
    x = torch.randint(0, args.gpt_vocab, (args.train_batch, args.seq), generator=gen).to(args.device)
    y = torch.randint(0, args.gpt_vocab, (args.train_batch, args.seq), generator=gen).to(args.device)
    prompt = torch.randint(0, args.gpt_vocab, (args.prefill_batch, args.seq), generator=gen).to(args.device)
    config = attnres_compile.AttnResConfig(num_blocks=args.num_blocks or 8)
    attnres_model = with_random_queries(base, x, config)
    arms = {
        "baseline": make_train_arm(copy.deepcopy(base), CountingBackend(inductor), args.device),
        "attnres": make_train_arm(
            attnres_model, CountingBackend(attnres_compile.AttnResBackend(recompute=not args.keep_partials)), args.device
        ),
    }
    del base
    train = median_interleaved({n: (lambda a=a: train_step(a, x, y, args)) for n, a in arms.items()},
                               args.device, args.warmup_steps, args.timed_steps)
    infer = median_interleaved({n: (lambda a=a: prefill(a, prompt, args)) for n, a in arms.items()},
                               args.device, args.warmup_steps, args.timed_steps)
    memory = {n: peak_step_bytes(a, lambda a=a: train_step(a, x, y, args), args.device) for n, a in arms.items()}
    saved = {n: saved_for_backward_bytes(a, x, args) for n, a in arms.items()}
    row = {
        "shape": f"{layers} x {d_model}",
        "params": sum(p.numel() for p in arms["baseline"].model.parameters()),
        "plan": attnres_model.attnres.plan.summary().splitlines()[0],
        "train_s": train, "prefill_s": infer, "peak_bytes": memory, "saved_bytes": saved,
        "graphs": {n: a.graphs.graphs for n, a in arms.items()},
    }
    del arms, attnres_model
    torch._dynamo.reset()  # the next shape compiles afresh, like a new process would
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
    return row


def bench_overhead(args) -> list[dict]:
    """Overhead of Block AttnRes per GPT shape: training step, prefill latency and peak memory ratios."""
    rows = [bench_overhead_shape(args, *parse_shape(shape)) for shape in args.shapes]
    table = overhead_table(args, rows)
    print(table)
    if args.write:
        Path(args.write).parent.mkdir(parents=True, exist_ok=True)
        Path(args.write).write_text(overhead_header(args) + table + "\n")
        print(f"\nwrote {args.write}")
    return rows


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} CPU threads"


def overhead_header(args) -> str:
    """The command line that produced the table: the first lines of a results file."""
    command = "python benchmarks/bench_e2e.py " + " ".join(sys.argv[1:] if args.argv is None else args.argv)
    title = '# Block AttnRes overhead: `torch.compile` baseline vs `backend="attnres"`'
    return f"{title}\n\n```bash\n{command}\n```\n\n"


def overhead_table(args, rows: list[dict]) -> str:
    """Markdown: per shape, both arms' train step, prefill and peak memory, and attnres / baseline ratios."""
    amp = "bf16 autocast (fp32 weights)" if args.amp == "bf16" else "fp32"
    lines = [
        f"### Overhead: {args.device} ({device_name(args.device)}), {amp}, torch {torch.__version__}",
        "",
        f"GPT from `examples/tiny_gpt.py`, vocab {args.gpt_vocab}; training step = forward + backward + AdamW "
        f"on {args.train_batch} x {args.seq} tokens; prefill = no-grad forward of {args.prefill_batch} x {args.seq} "
        f"tokens; median of {args.timed_steps} interleaved repeats after {args.warmup_steps} warm-up; peak "
        "memory = the arm's weights and AdamW state + the step's own peak allocation; saved = the bytes the "
        "forward keeps for the backward (`saved_tensors_hooks`); intra-block partials "
        + ("kept for the backward (`--keep-partials`)." if args.keep_partials else "recomputed in the backward (default)."),
        "",
        "| layers x d | params | Block AttnRes plan | train step ms (baseline / attnres) | train ratio | "
        "prefill ms (baseline / attnres) | prefill ratio | peak MiB (baseline / attnres) | memory ratio | "
        "saved MB (baseline / attnres) | saved ratio | graphs (baseline, attnres) |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        t, p, m, s, g = r["train_s"], r["prefill_s"], r["peak_bytes"], r["saved_bytes"], r["graphs"]
        lines.append(
            f"| {r['shape']} | {r['params'] / 1e6:.1f} M | {r['plan']} | "
            f"{1e3 * t['baseline']:.1f} / {1e3 * t['attnres']:.1f} | {t['attnres'] / t['baseline']:.3f} | "
            f"{1e3 * p['baseline']:.2f} / {1e3 * p['attnres']:.2f} | {p['attnres'] / p['baseline']:.3f} | "
            f"{m['baseline'] / 2**20:,.1f} / {m['attnres'] / 2**20:,.1f} | {m['attnres'] / m['baseline']:.3f} | "
            f"{s['baseline'] / 1e6:,.1f} / {s['attnres'] / 1e6:,.1f} | {s['attnres'] / s['baseline']:.3f} | "
            f"{g['baseline']}, {g['attnres']} |"
        )
    return "\n".join(lines)


SECTIONS = {"decode": bench_decode, "overhead": bench_overhead}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name in SECTIONS:
        parser.add_argument(f"--{name}", action="store_true", help=f"run the {name} measurement")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None, help="default: float32 on CPU, bfloat16 on CUDA")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--num-blocks", type=int, default=None, help="default: 4 for --decode, 8 for --overhead")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--prompt", type=int, default=16, help="prompt length")
    parser.add_argument("--steps", type=int, default=32, help="decode steps per repeat")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    overhead = parser.add_argument_group("--overhead (defaults depend on --device: CUDA / CPU)")
    overhead.add_argument("--shapes", nargs="+", default=None, help="GPT shapes LAYERSxD (24x1024 24x2048 / 6x256)")
    overhead.add_argument("--seq", type=int, default=None, help="tokens per sequence (2048 / 64)")
    overhead.add_argument("--train-batch", type=int, default=None, help="sequences per training step (4 / 16)")
    overhead.add_argument("--prefill-batch", type=int, default=1, help="sequences per prefill")
    overhead.add_argument("--gpt-vocab", type=int, default=None, help="vocabulary (50304 / 256 bytes)")
    overhead.add_argument("--amp", choices=("bf16", "none"), default=None, help="autocast (bf16 / none)")
    overhead.add_argument("--warmup-steps", type=int, default=3, help="untimed calls per arm (they compile)")
    overhead.add_argument("--timed-steps", type=int, default=20, help="timed calls per arm (median)")
    overhead.add_argument("--keep-partials", action="store_true",
                          help="keep the intra-block partials for the backward instead of recomputing them")
    overhead.add_argument("--write", default=None, help="also write the overhead table to this markdown file")
    args = parser.parse_args(argv)
    args.argv = argv
    cuda = args.device.startswith("cuda")
    if args.dtype is None:
        args.dtype = "bfloat16" if cuda else "float32"
    for name, on_cuda, on_cpu in (("shapes", ["24x1024", "24x2048"], ["6x256"]), ("seq", 2048, 64),
                                  ("train_batch", 4, 16), ("gpt_vocab", 50304, 256), ("amp", "bf16", "none")):
        if getattr(args, name) is None:
            setattr(args, name, on_cuda if cuda else on_cpu)
    if args.timed_steps < 20:
        parser.error("--timed-steps must be at least 20 (a median of fewer repeats is too noisy to report)")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    chosen = [name for name in SECTIONS if getattr(args, name)] or list(SECTIONS)
    return {name: SECTIONS[name](args) for name in chosen}


if __name__ == "__main__":
    main()
