"""Compile time of a training step: ``torch.compile`` (Inductor) vs ``backend="attnres"``, cold and warm.

    python benchmarks/bench_compile.py                                  # 8, 24, 48 layers, d 128, CPU, 1 thread
    python benchmarks/bench_compile.py --layers 24 --breakdown --out benchmarks/results/compile_cpu.md
    python benchmarks/bench_compile.py --layers 24 48 --device cuda     # the Triton path

Each measurement runs in a fresh process on the hand-written GPT of
``examples/tiny_gpt.py`` (``--layers`` transformer blocks of width
``--d-model``, head size 32), one training step (forward, loss, backward):

* cold: an empty Inductor cache directory (``TORCHINDUCTOR_CACHE_DIR``), so
  every kernel is generated and compiled;
* warm: a second process on the same cache directory, with the FX graph and
  AOTAutograd caches on, as a user's second run would be;
* step: the median of ``--steps`` training steps (forward, backward, AdamW)
  after those, in the warm process.

The two arms of a depth run back to back, so a busy machine slows both alike;
the ratios are what to read. ``--breakdown`` adds where the cold compile went,
from ``torch._dynamo.utils.compilation_time_metrics``: Dynamo tracing, the
attnres pipeline, AOTAutograd (joint graph, partitioner), Inductor (lowering,
codegen, scheduling) and, inside it, the C++ / Triton compiler; and how many
kernels were compiled.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[1]
ARMS = ("plain", "attnres")
INHERIT = "inherit"
"""``--cache-dir inherit``: the Inductor cache directory of the environment (``TORCHINDUCTOR_CACHE_DIR`` or torch's default)."""


# ---------------------------------------------------------------- the child: one arm, one depth, one process


def _metric(name: str) -> float:
    from torch._dynamo.utils import compilation_time_metrics

    return sum(compilation_time_metrics.get(name, []))


def _count_kernels(cache_dir: str) -> int:
    """Compiled kernel files under the Inductor cache: C++ shared objects and Triton cubins."""
    return sum(1 for path in Path(cache_dir).rglob("*") if path.suffix in (".so", ".cubin"))


def _timed_pipeline(store: dict):
    """Wrap the attnres pipeline so that its time is known (it runs inside the backend call)."""
    import attnres_compile.backend as backend

    pipeline = backend.run_pipeline

    def timed(*args, **kwargs):
        start = time.perf_counter()
        try:
            return pipeline(*args, **kwargs)
        finally:
            store["pipeline"] = store.get("pipeline", 0.0) + time.perf_counter() - start

    backend.run_pipeline = timed


def run_child(args: argparse.Namespace) -> dict:
    """One arm at one depth: the first training step (it compiles), then ``--steps`` timed steps."""
    sys.path.insert(0, str(REPO / "examples"))
    import torch
    import torch.nn.functional as F

    import attnres_compile
    from tiny_gpt import GPTConfig, TinyGPT
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    torch.set_num_threads(args.threads) if args.threads else None
    torch.manual_seed(0)
    device = torch.device(args.device)
    config = GPTConfig(vocab_size=256, n_layer=args.layers, n_head=max(1, args.d_model // 32),
                       d_model=args.d_model, max_len=args.seq)
    model = TinyGPT(config).to(device)
    ids = torch.randint(0, 256, (args.batch, args.seq), device=device)
    targets = torch.randint(0, 256, (args.batch, args.seq), device=device)
    store: dict = {}
    if args.arm == "attnres":
        attnres_compile.prepare(model, (ids,))
        _timed_pipeline(store)
        compiled = torch.compile(model, backend="attnres")
    else:
        compiled = torch.compile(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    autocast = torch.autocast("cuda", torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)

    def step():
        with autocast:
            loss = F.cross_entropy(compiled(ids).flatten(0, 1).float(), targets.flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()

    start = time.perf_counter()
    step()
    first = time.perf_counter() - start
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    dynamo = _metric("_compile.compile_inner")
    backend_call = _metric("OutputGraph.call_user_compiler")
    inductor = _metric("compile_fx.<locals>.fw_compiler_base") + _metric("compile_fx.<locals>.bw_compiler")
    inductor_fw = _metric("compile_fx.<locals>.fw_compiler_base")
    return {
        "first_step_s": first,
        "step_ms": 1000 * statistics.median(times) if times else float("nan"),
        "dynamo_s": dynamo - backend_call,
        "pipeline_s": store.get("pipeline", 0.0),
        "aot_s": backend_call - store.get("pipeline", 0.0) - inductor_fw,
        "inductor_s": inductor,
        "compiler_s": _metric("compile_file") + _metric("CompiledKernel.__init__"),
        "kernels": _count_kernels(cache_dir()),
    }


# ---------------------------------------------------------------- the parent: fresh processes, the table


def _cache_directory(arm: str, layers: int, given: Optional[str]):
    """An empty, temporary Inductor cache directory for one arm; or ``given``, kept as it is."""
    if given:
        return contextlib.nullcontext(given)
    return tempfile.TemporaryDirectory(prefix=f"inductor_{arm}_{layers}_")


def _child(arm: str, layers: int, cache_dir: str, args: argparse.Namespace) -> dict:
    env = {**os.environ, "TORCHINDUCTOR_FX_GRAPH_CACHE": "1", "TORCHINDUCTOR_AUTOGRAD_CACHE": "1"}
    if cache_dir != INHERIT:
        env["TORCHINDUCTOR_CACHE_DIR"] = cache_dir
    command = [sys.executable, __file__, "--child", arm, "--layers", str(layers), "--d-model", str(args.d_model),
               "--batch", str(args.batch), "--seq", str(args.seq), "--steps", str(args.steps), "--device", args.device]
    if args.threads:
        command += ["--threads", str(args.threads)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=args.timeout)
    if done.returncode != 0:
        raise RuntimeError(f"{arm} at {layers} layers failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure(layers: int, args: argparse.Namespace) -> dict[str, dict[str, dict]]:
    """``{arm: {"cold": metrics, "warm": metrics}}`` for one depth, each process fresh.

    With ``--cold-only`` the warm process is skipped and the cold one stands in for it (its
    step time is still measured after the compile).
    """
    results: dict[str, dict[str, dict]] = {}
    for arm in ARMS:
        with _cache_directory(arm, layers, args.cache_dir) as cache_dir:
            cold = _child(arm, layers, cache_dir, args)
            warm = cold if args.cold_only else _child(arm, layers, cache_dir, args)
        results[arm] = {"cold": cold, "warm": warm}
        print(f"  {arm:8s} {layers:3d} layers: cold {cold['first_step_s']:6.1f} s, warm {warm['first_step_s']:6.1f} s, "
              f"step {warm['step_ms']:8.1f} ms, {cold['kernels']} kernels", file=sys.stderr, flush=True)
    return results


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}" if b else "-"


def table(results: dict[int, dict], args: argparse.Namespace) -> str:
    lines = [
        f"Compile time of one training step (forward, loss, backward), GPT d {args.d_model}, batch {args.batch} x "
        f"{args.seq} tokens, {args.device}"
        + (f", {args.threads} thread(s)" if args.threads else "")
        + f"; torch {_torch_version()}, {platform.processor() or platform.machine()}; fresh process each",
        "",
        "| layers | plain cold s | attnres cold s | cold ratio | plain warm s | attnres warm s | warm ratio "
        "| plain step ms | attnres step ms | step ratio | kernels plain / attnres |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    if args.cold_only:
        lines[0] += " (--cold-only: no warm process; the warm columns repeat the cold run)"
    for layers, arms in results.items():
        p, a = arms["plain"], arms["attnres"]
        lines.append(
            f"| {layers} | {p['cold']['first_step_s']:.1f} | {a['cold']['first_step_s']:.1f} "
            f"| {_ratio(a['cold']['first_step_s'], p['cold']['first_step_s'])} "
            f"| {p['warm']['first_step_s']:.1f} | {a['warm']['first_step_s']:.1f} "
            f"| {_ratio(a['warm']['first_step_s'], p['warm']['first_step_s'])} "
            f"| {p['warm']['step_ms']:.1f} | {a['warm']['step_ms']:.1f} "
            f"| {_ratio(a['warm']['step_ms'], p['warm']['step_ms'])} "
            f"| {p['cold']['kernels']} / {a['cold']['kernels']} |"
        )
    if args.breakdown:
        lines += [
            "",
            "Where the cold compile went (seconds). Dynamo: tracing (for attnres also prepare's one-off trace);",
            "AOTAutograd: the joint graph and the partitioner; Inductor: lowering, scheduling, codegen and the",
            "compiler; C++/Triton compile: the compiler's time summed over files (it runs in worker threads,",
            "so it can exceed its share of Inductor's wall time).",
            "",
            "| layers | arm | Dynamo | attnres pipeline | AOTAutograd | Inductor | C++/Triton compile | kernels |",
            "|---:|---|---:|---:|---:|---:|---:|---:|",
        ]
        for layers, arms in results.items():
            for arm in ARMS:
                c = arms[arm]["cold"]
                lines.append(
                    f"| {layers} | {arm} | {c['dynamo_s']:.1f} | {c['pipeline_s']:.3f} | {c['aot_s']:.1f} "
                    f"| {c['inductor_s']:.1f} | {c['compiler_s']:.1f} | {c['kernels']} |"
                )
    return "\n".join(lines) + "\n"


def _torch_version() -> str:
    import torch

    return torch.__version__


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[8, 24, 48])
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--steps", type=int, default=5, help="timed training steps after the first")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (0: torch's default)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--breakdown", action="store_true", help="also the table of where the cold compile went")
    parser.add_argument("--cold-only", action="store_true", help="skip the warm process (a quick look, or a smoke run)")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per process")
    parser.add_argument("--cache-dir", help="an Inductor cache directory to use, and keep, instead of an empty one "
                        f"({INHERIT!r}: the environment's): 'cold' then times a start on whatever it holds (a smoke "
                        "run's shortcut, not a measurement)")
    parser.add_argument("--out", type=Path, help="also write the table to this markdown file")
    parser.add_argument("--child", choices=ARMS, dest="arm", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.device != "cpu" and args.threads == 1:
        args.threads = 0
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.arm is not None:
        (args.layers,) = args.layers
        print(json.dumps(run_child(args)))
        return
    results: dict[int, dict] = {}
    for layers in args.layers:
        results[layers] = measure(layers, args)
        if args.out:  # after every depth: a run cut short keeps what it measured
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(table(results, args))
    print(table(results, args))


if __name__ == "__main__":
    main()
