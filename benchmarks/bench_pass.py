"""Pass time: the pipeline (clean up, detect, partition, plan, insert the reads) on a Dynamo-captured graph.

    .venv/bin/python benchmarks/bench_pass.py [--repeats 5]

The hand-written GPT of ``examples/tiny_gpt.py`` (d 32) with 6, 24, 50 and 100
blocks, i.e. 12, 48, 100 and 200 residual steps. The Dynamo capture is not
timed; each repeat rewrites a fresh copy of the captured graph. Prints a
markdown table: graph nodes, median ms, ms per residual step.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.fx as fx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

from attnres_compile.core import run_pipeline  # noqa: E402
from attnres_compile.passes.graph import copy_graph  # noqa: E402
from tiny_gpt import GPTConfig, TinyGPT  # noqa: E402

STEPS = (12, 48, 100, 200)


def capture(num_steps: int):
    """The Dynamo graph of a TinyGPT with ``num_steps`` residual steps and its example inputs."""
    torch._dynamo.reset()
    model = TinyGPT(GPTConfig(vocab_size=64, n_layer=num_steps // 2, n_head=4, d_model=32, max_len=32))
    graphs = []

    def backend(gm, example_inputs):
        graphs.append((gm, example_inputs))
        return gm.forward

    with torch.no_grad():
        torch.compile(model, backend=backend, fullgraph=True)(torch.randint(0, 64, (2, 16)))
    return graphs[0]


def time_pass(gm: fx.GraphModule, example_inputs, num_steps: int) -> float:
    """Seconds for one run of the pipeline on a fresh copy of ``gm``."""
    copy = fx.GraphModule(gm, copy_graph(gm.graph))
    start = time.perf_counter()
    result = run_pipeline(copy, example_inputs)
    elapsed = time.perf_counter() - start
    assert result.rewritten and len(result.plan.streams[0].layers) == num_steps, result.plan.summary()
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of {args.repeats}\n")
    print("| residual steps | graph nodes | pass ms | ms per step |")
    print("|---:|---:|---:|---:|")
    for steps in STEPS:
        gm, example_inputs = capture(steps)
        times = [time_pass(gm, example_inputs, steps) for _ in range(args.repeats)]
        ms = 1000 * statistics.median(times)
        print(f"| {steps} | {len(gm.graph.nodes)} | {ms:.1f} | {ms / steps:.2f} |", flush=True)


if __name__ == "__main__":
    main()
