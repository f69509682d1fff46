"""Put the Attention Residuals paper's claims beside what Block AttnRes does here, at CPU scale.

    python examples/paper_claims.py --threads 1 --out benchmarks/results/paper_claims   # full run (about 55 min)
    python examples/paper_claims.py --quick --out /tmp/paper_claims    # every section, tiny (about a minute)

Kimi's *Attention Residuals* (arXiv 2603.15031) reports that Block AttnRes
matches a baseline trained with about 1.25x the compute, that about 8 blocks
recover most of Full AttnRes, and that the gain holds across model sizes. This
script asks the same questions of the small byte-level GPT of
``compare_training.py``, with its data, model, optimizer, schedule and lockstep
training (imported from it):

1. **Compute equivalence.** Baselines (plain ``torch.compile``) trained for
   1x, 1.25x, 1.5x and 2x the steps (each with warm-up and cosine over its own
   length) against Block AttnRes at 1x. A power law ``L = a * C^-b`` (C in
   units of the 1x run's compute), fitted to the baseline's final validation
   losses per seed, gives the compute at which the baseline reaches Block
   AttnRes's loss: the *compute multiplier*; beyond the largest baseline it is
   an extrapolation, and the summary says so. The rewrite's own cost per step
   (FLOPs of the eager rewritten vs plain model, and measured step time) gives
   the multiplier net of it.
2. **Block count.** ``num_blocks`` 1, 2, 4, 8 and Full AttnRes (one block per
   residual step) on the same model.
3. **Scale mode and retrofit.** ``scale="count"`` (the library default) against
   the paper's ``scale="mean"``, from scratch; and from the trained 1x
   baseline, the plain model and its rewrite (zero queries: it starts exactly at
   the baseline's loss) trained on for the same further steps.
4. **Width.** Baseline against Block AttnRes at 1x at a second width.

Runs that coincide are trained once: the 1x baseline is the compute sweep's
first point, the ablation's reference and the retrofit's start; Block AttnRes
at 1x (``--num-blocks``) is the compute sweep's Block point, the ablation's
entry for that block count and the ``count`` side of the scale comparison. All
1x arms of a seed train in lockstep on the same batches from the same initial
weights; each arm is compiled once and reused across seeds.

Outputs in ``--out``: ``runs.csv`` (one row per run and seed), one curve CSV
per section (``compute_equivalence.csv``, ``block_ablation.csv``,
``scale_mode.csv``, ``retrofit.csv``, ``widths.csv``: one row per run, seed
and step), ``summary.json``, ``loss_curves.png``, ``loss_vs_compute.png``,
``loss_vs_blocks.png`` and ``depth_weights.png`` (the learned depth weights of
the first seed's Block AttnRes model).
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import math
import os
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

import attnres_compile
from attnres_compile.depth_weights import depth_weights
from attnres_compile.report import plot_depth_weights
from compare_training import (
    Arm,
    attnres_arm,
    baseline_arm,
    initial_state,
    mean_std,
    parse_sized,
    seed_batches,
    train_lockstep,
    training_options,
    validation_batches,
    write_csv,
)
from offline_text import load_corpus, split_train_val
from tiny_gpt import GPTConfig, TinyGPT, loss_fn

log = logging.getLogger("attnres_compile.examples")

DEFAULT_OUT = os.path.join("runs", "paper_claims")
SECTIONS = ("compute_equivalence", "block_ablation", "scale_mode", "retrofit", "widths")
FULL = "full"  # the ablation's label for Full AttnRes (one block per residual step)

# --quick: one transformer block (2 residual steps) keeps the number of distinct
# partitions, and so of compiles, small; compiling dominates the time of this run.
QUICK = dict(layers=1, d_model=64, heads=2, seq=32, batch=8, steps=16, seeds=[0, 1], eval_every=8,
             eval_batches=2, corpus_bytes=300_000, width=32, width_seeds=[0], ablation_blocks=[1])


def parse_args(argv=None) -> argparse.Namespace:
    """Command-line options; ``--quick`` replaces the ones that size the run."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], parents=[training_options()])
    parser.set_defaults(d_model=128, eval_every=50, threads=1)
    parser.add_argument("--quick", action="store_true", help="tiny models, a few steps: every section, as a smoke run")
    parser.add_argument("--num-blocks", type=int, default=8, help="Block AttnRes blocks of the main Block arm")
    parser.add_argument("--multipliers", type=float, nargs="+", default=[1.0, 1.25, 1.5, 2.0],
                        help="baseline training lengths, in units of --steps (must include 1)")
    parser.add_argument("--ablation-blocks", type=int, nargs="+", default=[1, 2, 4, 8],
                        help="num_blocks values of the block-count ablation (Full AttnRes is always added)")
    parser.add_argument("--retrofit-ratio", type=float, default=0.5,
                        help="steps of the retrofit's continuation, in units of --steps")
    parser.add_argument("--retrofit-lr-ratio", type=float, default=0.5,
                        help="peak learning rate of the continuation / --lr")
    parser.add_argument("--width", type=int, default=256, help="d_model of the second width")
    parser.add_argument("--width-seeds", type=int, nargs="+", default=[0],
                        help="seeds at the second width (compare_training.py has all three at d 256)")
    args = parse_sized(parser, argv, QUICK, DEFAULT_OUT)
    if 1.0 not in args.multipliers:
        parser.error("--multipliers must include 1 (the Block AttnRes run's own length)")
    if args.width == args.d_model:
        parser.error("--width must differ from --d-model")
    return args


def with_schedule(args: argparse.Namespace, steps: int, lr: Optional[float] = None) -> argparse.Namespace:
    """A copy of ``args`` whose runs last ``steps`` steps (the schedule stretches with them) at peak ``lr``."""
    return argparse.Namespace(**{**vars(args), "steps": steps, "lr": args.lr if lr is None else lr})


def residual_steps(args: argparse.Namespace) -> int:
    """Residual steps (the paper's layers) of the GPT: attention and MLP of every transformer block."""
    return 2 * args.layers


def multiplier_label(multiplier: float) -> str:
    return f"baseline_{multiplier:g}x"


# ----------------------------------------------------------------------------- the Block AttnRes variants


@dataclass(frozen=True)
class Variant:
    """One Block AttnRes arm of the main width: its config, and the ablation labels it answers for."""

    name: str
    config: attnres_compile.AttnResConfig
    block_size: int
    labels: tuple  # num_blocks values (and FULL) whose partition this arm is


def block_variants(args: argparse.Namespace) -> list[Variant]:
    """The main Block arm, one arm per distinct partition of the ablation, and the ``scale="mean"`` arm.

    Ablation values that give the same partition (``num_blocks`` above the
    number of residual steps is Full AttnRes) share one arm.
    """
    steps = residual_steps(args)
    wanted = [args.num_blocks, *args.ablation_blocks, FULL]
    by_size: dict[int, Variant] = {}
    for label in wanted:
        num_blocks = steps if label == FULL else label
        config = attnres_compile.AttnResConfig(num_blocks=num_blocks)
        size = config.layers_per_block(steps)
        if size in by_size:
            old = by_size[size]
            if label not in old.labels:
                by_size[size] = Variant(old.name, old.config, size, (*old.labels, label))
            continue
        name = "attnres" if not by_size else "attnres_full" if label == FULL else f"attnres_nb{label}"
        by_size[size] = Variant(name, config, size, (label,))
    mean = attnres_compile.AttnResConfig(num_blocks=args.num_blocks, scale="mean")
    main_size = mean.layers_per_block(steps)
    return [*by_size.values(), Variant("attnres_mean", mean, main_size, ())]


def block_count(steps: int, block_size: int) -> int:
    """Blocks of a partition of ``steps`` residual steps into blocks of ``block_size`` (the last may be short)."""
    return math.ceil(steps / block_size)


# ----------------------------------------------------------------------------- per-step cost


def _tokens_and_width(shape) -> tuple[int, int]:
    return math.prod(shape[:-1]), shape[-1]


def read_flops(sources, query, *_, out_shape=None, **__) -> int:
    """``attnres::read``: per token, the key norms (2dN) and one query's scores and weighted sum (4dN)."""
    tokens, d = _tokens_and_width(sources[0])
    return tokens * 6 * d * len(sources)


def block_read_flops(sources, queries, *_, out_shape=None, **__) -> int:
    """``attnres::block_read``: per token, the key norms once (2dN), then per query scores and sum (4dN each)."""
    tokens, d = _tokens_and_width(sources[0])
    return tokens * (2 * d * len(sources) + 4 * d * len(sources) * queries[0])


def merge_flops(o, lse, partial, *_, out_shape=None, **__) -> int:
    """``attnres::merge``: the partial's key norm and score (4d), the weighted sum of two (3d); else a scale (d)."""
    tokens, d = _tokens_and_width(o)
    return tokens * (7 * d if partial is not None else d)


def _backward_of(forward: Callable, skip: int) -> Callable:
    """A backward op's count: twice its forward's (the usual convention), from its arguments after ``skip`` grads."""
    def count(*args, out_shape=None, **kwargs):
        return 2 * forward(*args[skip:], **kwargs)
    return count


def _sdpa_cpu_flops(query, key, value, *_, out_shape=None, **__) -> int:
    return sdpa_flop_count(query, key, value)


def _sdpa_cpu_backward_flops(grad_out, query, key, value, *_, out_shape=None, **__) -> int:
    return sdpa_backward_flop_count(grad_out, query, key, value)


def flop_formulas() -> dict:
    """Counts for the ops FlopCounterMode does not know: the reads (analytic) and CPU attention.

    FlopCounterMode counts matmul-family ops only. The reads are elementwise
    products and reductions, counted here as 2 FLOPs per multiply-add; the
    plain model's own elementwise ops (norms, GELU, the residual adds) stay
    uncounted, so the ratio errs toward overstating the rewrite's cost.
    """
    reads = torch.ops.attnres
    formulas = {
        reads.read: read_flops,
        reads.read_backward: _backward_of(read_flops, skip=1),
        reads.block_read: block_read_flops,
        reads.block_read_backward: _backward_of(block_read_flops, skip=2),
        reads.merge: merge_flops,
        reads.merge_backward: _backward_of(merge_flops, skip=1),  # (grad, h, lse, partial, ...): h stands for o
    }
    if hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu"):
        formulas[torch.ops.aten._scaled_dot_product_flash_attention_for_cpu] = _sdpa_cpu_flops
        formulas[torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward] = _sdpa_cpu_backward_flops
    return formulas


def _first_tensor(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def eager_rewritten_step(cfg: GPTConfig, config: attnres_compile.AttnResConfig, x: torch.Tensor) -> Callable:
    """A forward of a fresh prepared model through its rewritten graph, run eagerly (no Inductor).

    FlopCounterMode cannot see inside a compiled frame, so the backend's graph
    and its inputs (the model's parameters among them) are captured once and
    then called directly.
    """
    model = TinyGPT(cfg)
    attnres_compile.prepare(model, (x,), config)
    reference = attnres_compile.AttnResBackend(config, inductor=False)
    captured = []

    def capture(gm, example_inputs):
        run = reference(gm, example_inputs)
        captured.append((run, example_inputs))
        return run

    torch.compile(model, backend=capture)(x)
    if len(captured) != 1 or not reference.plans:
        raise RuntimeError("the FLOP count expected one rewritten graph of TinyGPT")
    run, inputs = captured[0]
    return lambda: _first_tensor(run(*inputs))


def count_step_flops(forward: Callable[[], torch.Tensor], targets: torch.Tensor) -> dict[str, int]:
    """FLOPs of forward, loss and backward, split into matmuls, attention and the Block AttnRes reads."""
    with FlopCounterMode(display=False, custom_mapping=flop_formulas()) as counter:
        loss_fn(forward().float(), targets).backward()
    split = {"matmul": 0, "attention": 0, "reads": 0}
    for op, flops in counter.get_flop_counts()["Global"].items():
        name = str(op)
        kind = "reads" if name.startswith("attnres.") else "attention" if "attention" in name else "matmul"
        split[kind] += flops
    return {"total": counter.get_total_flops(), **split}


def flops_per_step(cfg: GPTConfig, config: attnres_compile.AttnResConfig, x: torch.Tensor, y: torch.Tensor) -> dict:
    """FLOPs of one training step of the plain model and of its eager Block AttnRes rewrite, and their ratio."""
    plain = TinyGPT(cfg)
    baseline = count_step_flops(lambda: plain(x), y)
    attnres = count_step_flops(eager_rewritten_step(cfg, config, x), y)
    return {"baseline": baseline, "attnres": attnres, "ratio": attnres["total"] / baseline["total"],
            "counted": "FlopCounterMode (matmuls, CPU attention) plus an analytic count of the reads; "
                       "forward + backward of one batch"}


def median_step_seconds(rows: list[dict]) -> float:
    """Median time of a run's steps, leaving out the first two (compiles, first backward)."""
    times = [b["train_seconds"] - a["train_seconds"] for a, b in zip(rows, rows[1:])][1:]
    return statistics.median(times) if times else math.nan


# ----------------------------------------------------------------------------- training the runs


@dataclass
class Results:
    """Everything trained so far: curve rows (one per run, seed and step) and run rows (one per run and seed)."""

    curves: list[dict] = field(default_factory=list)
    runs: list[dict] = field(default_factory=list)
    flops: dict = field(default_factory=dict)
    depth: Optional[dict] = None
    started: float = field(default_factory=time.perf_counter)

    def seeds_of(self, run: str) -> list[int]:
        return [r["seed"] for r in self.runs if r["run"] == run]


def section_of(run: str) -> str:
    """The section a run is trained for (its first use; the summary reuses it elsewhere)."""
    if run.startswith("baseline_") or run == "attnres":
        return "compute_equivalence"
    if run == "attnres_mean":
        return "scale_mode"
    if run.startswith("retrofit_"):
        return "retrofit"
    if run.startswith("d") and run[1].isdigit():
        return "widths"
    return "block_ablation"


def collect(arm: Arm, run: str, seed: int, info: dict, results: Results, *, steps_before: int = 0,
            tokens_before: int = 0) -> None:
    """Move ``arm.rows`` into ``results`` as ``run``'s curve, add its run row and log one line."""
    rows, arm.rows = arm.rows, []
    for row in rows:
        del row["arm"]
        results.curves.append({"run": run, **row, "total_step": steps_before + row["step"],
                               "tokens": tokens_before + row["tokens"]})
    last = rows[-1]
    run_row = {"run": run, "section": section_of(run), "seed": seed, "steps": last["step"], **info,
               "val_loss": last["val_loss"], "train_loss": last["train_loss"], "query_norm": last["query_norm"],
               "train_seconds": last["train_seconds"], "step_seconds": median_step_seconds(rows)}
    results.runs.append(run_row)
    log.info("[%s] %s seed %d: %d steps, val loss %.4f, %.0f s training, %.1f min elapsed", run_row["section"], run,
             seed, last["step"], last["val_loss"], arm.seconds, (time.perf_counter() - results.started) / 60)


def run_info(args: argparse.Namespace, d_model: int, compute: float, variant: Optional[Variant]) -> dict:
    """The settings a run row records beside its losses."""
    steps = residual_steps(args)
    if variant is None:
        return {"d_model": d_model, "compute": compute, "num_blocks": 0, "blocks": 0, "block_size": 0, "scale": ""}
    return {"d_model": d_model, "compute": compute, "num_blocks": variant.config.num_blocks,
            "blocks": block_count(steps, variant.block_size), "block_size": variant.block_size,
            "scale": variant.config.scale}


def clone_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A copy of the weights, safe from the training that goes on in place."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def train_main_seed(seed: int, arms: dict[str, Arm], variants: list[Variant], cfg: GPTConfig, train, val_batches,
                    args: argparse.Namespace, results: Results) -> None:
    """Every run of the main width for one seed: the 1x arms in lockstep, the longer baselines, the retrofit."""
    by_name = {v.name: v for v in variants}
    state = initial_state(cfg, seed)
    train_lockstep(arms, state, seed_batches(train, seed, args), val_batches, seed, args)
    for name, arm in arms.items():
        run = multiplier_label(1.0) if name == "baseline" else name
        collect(arm, run, seed, run_info(args, args.d_model, 1.0, by_name.get(name)), results)
    if results.depth is None:
        results.depth = record_depth_weights(arms["attnres"], val_batches[0][0], seed, args)
    trained_baseline = clone_state(arms["baseline"].model)

    for multiplier in sorted(m for m in args.multipliers if m != 1.0):
        steps = round(multiplier * args.steps)
        baseline = {"baseline": arms["baseline"]}
        train_lockstep(baseline, state, seed_batches(train, seed, args), val_batches, seed, with_schedule(args, steps))
        collect(arms["baseline"], multiplier_label(multiplier), seed,
                run_info(args, args.d_model, steps / args.steps, None), results)

    train_retrofit(seed, arms, by_name["attnres"], trained_baseline, train, val_batches, args, results)


def train_retrofit(seed: int, arms: dict[str, Arm], variant: Variant, trained_baseline: dict, train, val_batches,
                   args: argparse.Namespace, results: Results) -> None:
    """From the trained 1x baseline, train on the plain model and its rewrite (zero queries) in lockstep.

    Both see the batches that follow the baseline's own (the seed's stream from
    step ``--steps`` on) and get a fresh AdamW and a new warm-up and cosine over
    the continuation, peaking at ``--retrofit-lr-ratio`` x ``--lr``: re-warming
    to the full peak would first undo part of the annealing both start from.
    """
    steps = round(args.retrofit_ratio * args.steps)
    continuation = with_schedule(args, steps, lr=args.lr * args.retrofit_lr_ratio)
    batches = itertools.islice(seed_batches(train, seed, args), args.steps, None)
    pair = {"baseline": arms["baseline"], "attnres": arms["attnres"]}
    train_lockstep(pair, trained_baseline, batches, val_batches, seed, continuation)
    compute = (args.steps + steps) / args.steps
    before = {"steps_before": args.steps, "tokens_before": args.steps * args.batch * args.seq}
    collect(pair["baseline"], "retrofit_plain", seed, run_info(args, args.d_model, compute, None), results, **before)
    collect(pair["attnres"], "retrofit_attnres", seed, run_info(args, args.d_model, compute, variant), results,
            **before)


def train_second_width(train, val_batches, args: argparse.Namespace, results: Results) -> None:
    """Baseline and Block AttnRes (``--num-blocks``) at ``--width``, in lockstep, for ``--width-seeds``."""
    cfg = GPTConfig(n_layer=args.layers, n_head=args.heads, d_model=args.width, max_len=args.seq)
    config = attnres_compile.AttnResConfig(num_blocks=args.num_blocks)
    prefix = f"d{args.width}_"
    arms = {prefix + "baseline": baseline_arm(cfg, args.device, prefix + "baseline"),
            prefix + "attnres": attnres_arm(cfg, val_batches[0][0], config, args.device, prefix + "attnres")}
    variant = Variant(prefix + "attnres", config, config.layers_per_block(residual_steps(args)), ())
    for seed in args.width_seeds:
        train_lockstep(arms, initial_state(cfg, seed), seed_batches(train, seed, args), val_batches, seed, args)
        for name, arm in arms.items():
            collect(arm, name, seed, run_info(args, args.width, 1.0, variant if name.endswith("attnres") else None),
                    results)


def record_depth_weights(arm: Arm, x: torch.Tensor, seed: int, args: argparse.Namespace) -> dict:
    """The trained Block model's mean read weights on one validation batch, plotted to ``depth_weights.png``."""
    weights = depth_weights(arm.model, (x,))
    title = (f"Block AttnRes depth weights: {args.layers} layers x d {args.d_model}, num_blocks={args.num_blocks}, "
             f"seed {seed}, after {args.steps} steps")
    plot_depth_weights(weights, os.path.join(args.out, "depth_weights.png"), title=title)
    stream = weights[0]
    return {"run": arm.name, "seed": seed, "rows": stream.rows, "columns": stream.columns,
            "weights": [[None if math.isnan(v) else round(v, 4) for v in row] for row in stream.weights.tolist()]}


# ----------------------------------------------------------------------------- fits and summaries


def linear_fit(xs: list[float], ys: list[float]) -> tuple[float, float, float]:
    """Least squares ``y = intercept + slope * x``; returns slope, intercept and R^2."""
    mx, my = statistics.mean(xs), statistics.mean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    intercept = my - slope * mx
    total = sum((y - my) ** 2 for y in ys)
    residual = sum((y - intercept - slope * x) ** 2 for x, y in zip(xs, ys))
    return slope, intercept, (1.0 - residual / total) if total > 0 else 1.0


def fit_power_law(points: list[tuple[float, float]]) -> dict:
    """``L = a * C^-b`` through (C, L) points, as a line in log-log space (the paper's form)."""
    slope, intercept, r2 = linear_fit([math.log(c) for c, _ in points], [math.log(loss) for _, loss in points])
    return {"a": math.exp(intercept), "b": -slope, "r2": r2}


def power_law_compute(fit: dict, loss: float) -> float:
    """The compute at which the fitted baseline reaches ``loss``: ``C = (L / a)^(-1/b)``."""
    return (loss / fit["a"]) ** (-1.0 / fit["b"]) if fit["b"] != 0 else math.nan


def fit_log_linear(points: list[tuple[float, float]]) -> dict:
    """``L = p - q * ln C`` through (C, L) points (a cross-check of the power law's extrapolation)."""
    slope, intercept, r2 = linear_fit([math.log(c) for c, _ in points], [loss for _, loss in points])
    return {"p": intercept, "q": -slope, "r2": r2}


def log_linear_compute(fit: dict, loss: float) -> float:
    return math.exp((fit["p"] - loss) / fit["q"]) if fit["q"] != 0 else math.nan


def describe(values: dict[int, float]) -> dict:
    """Per-seed values with their mean and sample standard deviation."""
    mean, std = mean_std(list(values.values())) if values else (math.nan, math.nan)
    return {"per_seed": {str(s): v for s, v in values.items()}, "mean": mean, "std": std}


def losses(results: Results, run: str, seeds: Optional[list[int]] = None) -> dict[int, float]:
    """Final validation loss of ``run`` per seed (those of ``seeds`` it has)."""
    return {r["seed"]: r["val_loss"] for r in results.runs if r["run"] == run and (seeds is None or r["seed"] in seeds)}


def paired(a: dict[int, float], b: dict[int, float]) -> dict:
    """``a - b`` per seed both have, described."""
    return describe({s: a[s] - b[s] for s in a if s in b})


def step_time_ratio(results: Results) -> dict:
    """Median step time of the 1x baseline and Block AttnRes runs (trained in lockstep), and their ratio per seed."""
    times = {run: {r["seed"]: r["step_seconds"] for r in results.runs if r["run"] == run}
             for run in (multiplier_label(1.0), "attnres")}
    base, block = times[multiplier_label(1.0)], times["attnres"]
    ratio = describe({s: block[s] / base[s] for s in block if s in base})
    return {"baseline_seconds": describe(base), "attnres_seconds": describe(block), "ratio": ratio}


def compute_equivalence(results: Results, args: argparse.Namespace, overhead: dict) -> dict:
    """The power-law fit of the baseline's loss against compute, and the compute at which it matches Block AttnRes."""
    multipliers = sorted(args.multipliers)
    baseline = {m: losses(results, multiplier_label(m)) for m in multipliers}
    block = losses(results, "attnres")
    per_seed, per_seed_log_linear, fits = {}, {}, {}
    for seed, block_loss in block.items():
        points = [(m, baseline[m][seed]) for m in multipliers if seed in baseline[m]]
        if len(points) < 2:
            continue
        fits[str(seed)] = fit_power_law(points)
        per_seed[seed] = power_law_compute(fits[str(seed)], block_loss)
        per_seed_log_linear[seed] = log_linear_compute(fit_log_linear(points), block_loss)
    pooled_points = [(m, v) for m in multipliers for v in baseline[m].values()]
    pooled = fit_power_law(pooled_points) if len({m for m, _ in pooled_points}) >= 2 else None
    block_mean = statistics.mean(block.values()) if block else math.nan
    pooled_multiplier = power_law_compute(pooled, block_mean) if pooled else math.nan
    largest = multipliers[-1]
    beyond = {s: block[s] < baseline[largest][s] for s in block if s in baseline[largest]}
    multiplier = describe(per_seed)
    return {
        "fit": "power law L = a * C^-b, least squares in log-log space; C = training compute in units of the "
               "1x baseline's (steps / --steps)",
        "multipliers": multipliers,
        "baseline_val_loss": {f"{m:g}": describe(baseline[m]) for m in multipliers},
        "block_val_loss": describe(block),
        "fit_per_seed": fits,
        "fit_pooled": pooled,
        "multiplier": multiplier,
        "multiplier_pooled": pooled_multiplier,
        "multiplier_log_linear": describe(per_seed_log_linear),
        "block_beats_largest_baseline": beyond,
        "extrapolated": bool(beyond) and all(beyond.values()),
        "net_of_flops": multiplier["mean"] / overhead["flops_ratio"],
        "net_of_step_time": multiplier["mean"] / overhead["step_time_ratio"],
    }


def block_ablation(results: Results, variants: list[Variant], args: argparse.Namespace) -> dict:
    """Final validation loss against the number of blocks, with the 1x baseline as the reference."""
    steps = residual_steps(args)
    entries = []
    for label in [*sorted(args.ablation_blocks), FULL]:
        variant = next(v for v in variants if label in v.labels)
        entries.append({"num_blocks": label, "blocks": block_count(steps, variant.block_size),
                        "block_size": variant.block_size, "run": variant.name,
                        "val_loss": describe(losses(results, variant.name))})
    return {"residual_steps": steps, "entries": entries,
            "baseline_val_loss": describe(losses(results, multiplier_label(1.0)))}


def scale_mode(results: Results) -> dict:
    """``scale="count"`` against ``scale="mean"``, both from scratch at 1x."""
    count, mean = losses(results, "attnres"), losses(results, "attnres_mean")
    return {"count": describe(count), "mean": describe(mean), "mean_minus_count": paired(mean, count)}


def retrofit(results: Results, args: argparse.Namespace) -> dict:
    """The continuation of the trained baseline: plain against rewritten, and where both started."""
    start = losses(results, multiplier_label(1.0))
    plain, rewritten = losses(results, "retrofit_plain"), losses(results, "retrofit_attnres")
    first = {r["run"]: r["train_loss"] for r in results.curves
             if r["run"].startswith("retrofit_") and r["step"] == 1 and r["seed"] == args.seeds[0]}
    same_total = 1.0 + args.retrofit_ratio
    return {
        "steps_before": args.steps, "steps_after": round(args.retrofit_ratio * args.steps),
        "peak_lr": args.lr * args.retrofit_lr_ratio,
        "start_val_loss": describe(start), "plain": describe(plain), "attnres": describe(rewritten),
        "attnres_minus_plain": paired(rewritten, plain),
        "first_step_train_loss": first,  # equal: the rewrite with zero queries is the trained baseline
        "baseline_same_total_compute": (describe(losses(results, multiplier_label(same_total)))
                                        if same_total in args.multipliers else None),
    }


def widths(results: Results, args: argparse.Namespace) -> list[dict]:
    """Baseline against Block AttnRes at 1x, at each width."""
    rows = []
    for d_model, base_run, block_run in ((args.d_model, multiplier_label(1.0), "attnres"),
                                         (args.width, f"d{args.width}_baseline", f"d{args.width}_attnres")):
        cfg = GPTConfig(n_layer=args.layers, n_head=args.heads, d_model=d_model, max_len=args.seq)
        base, block = losses(results, base_run), losses(results, block_run)
        rows.append({"d_model": d_model, "parameters": sum(p.numel() for p in TinyGPT(cfg).parameters()),
                     "seeds": sorted(block), "baseline": describe(base), "attnres": describe(block),
                     "attnres_minus_baseline": paired(block, base)})
    return rows


def summarize(results: Results, variants: list[Variant], args: argparse.Namespace) -> dict:
    """The summary JSON: setup, per-step cost and one entry per section."""
    timing = step_time_ratio(results)
    overhead = {"flops": results.flops, "flops_ratio": results.flops["ratio"], "step_time": timing,
                "step_time_ratio": timing["ratio"]["mean"]}
    cfg = GPTConfig(n_layer=args.layers, n_head=args.heads, d_model=args.d_model, max_len=args.seq)
    return {
        "setup": {"model": f"TinyGPT {args.layers} layers x d {args.d_model}, byte-level",
                  "parameters": sum(p.numel() for p in TinyGPT(cfg).parameters()),
                  "residual_steps": residual_steps(args), "num_blocks": args.num_blocks,
                  "steps": args.steps, "tokens_per_step": args.batch * args.seq,
                  "tokens_1x": args.steps * args.batch * args.seq, "seeds": args.seeds,
                  "width_seeds": args.width_seeds, "lr": args.lr, "warmup": args.warmup,
                  "min_lr_ratio": args.min_lr_ratio, "validation_windows": args.eval_batches * args.batch,
                  "threads": args.threads, "device": args.device,
                  "wall_seconds": time.perf_counter() - results.started},
        "overhead": overhead,
        "compute_equivalence": compute_equivalence(results, args, overhead),
        "block_ablation": block_ablation(results, variants, args),
        "scale_mode": scale_mode(results),
        "retrofit": retrofit(results, args),
        "widths": widths(results, args),
        "depth_weights": results.depth,
    }


def finite_or_none(value):
    """JSON has no NaN or infinity: such values become null, recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(v) for v in value]
    return value


# ----------------------------------------------------------------------------- outputs


def section_runs(section: str, args: argparse.Namespace, variants: list[Variant]) -> list[str]:
    """The runs whose curves a section's CSV holds."""
    base = multiplier_label(1.0)
    return {
        "compute_equivalence": [multiplier_label(m) for m in sorted(args.multipliers)] + ["attnres"],
        "block_ablation": [base] + [v.name for v in variants if v.labels],
        "scale_mode": [base, "attnres", "attnres_mean"],
        "retrofit": [base, "retrofit_plain", "retrofit_attnres"],
        "widths": [base, "attnres", f"d{args.width}_baseline", f"d{args.width}_attnres"],
    }[section]


def write_outputs(results: Results, variants: list[Variant], args: argparse.Namespace) -> dict:
    """runs.csv, the section CSVs, the summary and the plots of the runs trained so far."""
    paths = {"runs.csv": os.path.join(args.out, "runs.csv")}
    write_csv(paths["runs.csv"], results.runs)
    for section in SECTIONS:
        wanted = section_runs(section, args, variants)
        rows = [r for r in results.curves if r["run"] in wanted]
        if rows:
            paths[f"{section}.csv"] = os.path.join(args.out, f"{section}.csv")
            write_csv(paths[f"{section}.csv"], rows)
    summary = summarize(results, variants, args)
    paths["summary.json"] = os.path.join(args.out, "summary.json")
    with open(paths["summary.json"], "w") as f:
        json.dump(finite_or_none(summary), f, indent=2)
    paths.update(write_plots(results, summary, variants, args))
    paths["depth_weights.png"] = os.path.join(args.out, "depth_weights.png")
    return {"paths": paths, "summary": summary}


def write_plots(results: Results, summary: dict, variants: list[Variant], args: argparse.Namespace) -> dict:
    """The three plots of the summary (the depth-weight heatmap is written when it is recorded)."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    paths = {name: os.path.join(args.out, name)
             for name in ("loss_curves.png", "loss_vs_compute.png", "loss_vs_blocks.png")}
    plot_loss_curves(paths["loss_curves.png"], results, args, variants)
    plot_loss_vs_compute(paths["loss_vs_compute.png"], summary["compute_equivalence"], results, args)
    plot_loss_vs_blocks(paths["loss_vs_blocks.png"], summary["block_ablation"])
    return paths


def mean_curve(results: Results, run: str, key: str) -> tuple[list[int], list[float]]:
    """Mean over seeds of a curve's ``key`` at each total step where every seed has it."""
    by_step: dict[int, list[float]] = {}
    for row in results.curves:
        if row["run"] == run and not math.isnan(row[key]):
            by_step.setdefault(row["total_step"], []).append(row[key])
    seeds = len(results.seeds_of(run))
    steps = sorted(s for s, values in by_step.items() if len(values) == seeds)
    return steps, [statistics.mean(by_step[s]) for s in steps]


def plot_loss_curves(path: str, results: Results, args: argparse.Namespace, variants: list[Variant]) -> None:
    """Validation loss (markers) and smoothed training loss (thin) against step, one panel per section."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(18, 9))
    for ax, section in zip(axes.flat, SECTIONS):
        for i, run in enumerate(section_runs(section, args, variants)):
            if not results.seeds_of(run):
                continue
            color = plt.cm.tab10(i % 10)
            steps, train = mean_curve(results, run, "train_loss")
            window = max(1, len(steps) // 20)
            smooth = [statistics.mean(train[max(0, j - window + 1): j + 1]) for j in range(len(train))]
            ax.plot(steps, smooth, color=color, lw=0.8, alpha=0.4)
            steps, val = mean_curve(results, run, "val_loss")
            ax.plot(steps, val, color=color, marker="o", ms=3, lw=1.2, label=run)
        ax.set_title(section.replace("_", " "))
        ax.set_xlabel("step")
        ax.set_ylabel("cross entropy (nats / byte)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes.flat[-1].axis("off")
    fig.suptitle(f"Validation loss (markers) and smoothed training loss, mean over seeds; "
                 f"{args.layers} layers x d {args.d_model} unless named")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_loss_vs_compute(path: str, equivalence: dict, results: Results, args: argparse.Namespace) -> None:
    """Baseline loss against compute (seeds, means, power-law fit) and Block AttnRes at 1x with its match."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    multipliers = equivalence["multipliers"]
    for m in multipliers:
        per_seed = list(equivalence["baseline_val_loss"][f"{m:g}"]["per_seed"].values())
        ax.scatter([m] * len(per_seed), per_seed, color="tab:blue", alpha=0.4, s=14)
    means = [equivalence["baseline_val_loss"][f"{m:g}"]["mean"] for m in multipliers]
    ax.plot(multipliers, means, "o", color="tab:blue", label="baseline (mean over seeds)")
    block = equivalence["block_val_loss"]["mean"]
    matched = equivalence["multiplier_pooled"]
    fit = equivalence["fit_pooled"]
    end = multipliers[-1]
    if fit:
        # The fitted line reaches as far as the match when that is within a sane range of the data.
        end = max(multipliers[-1], min(matched, 50 * multipliers[-1])) if math.isfinite(matched) else multipliers[-1]
        grid = [multipliers[0] * (end / multipliers[0]) ** (i / 100) for i in range(101)]
        ax.plot(grid, [fit["a"] * c ** -fit["b"] for c in grid], color="tab:blue", lw=1,
                label=f"fit L = {fit['a']:.3f} C^-{fit['b']:.3f}")
        if math.isfinite(matched) and matched <= end:
            ax.plot([1.0, matched], [block, block], ls="--", color="tab:orange", lw=1)
            ax.annotate(f"baseline matches at {matched:.2f}x", (matched, block), textcoords="offset points",
                        xytext=(4, 6), fontsize=8)
    ax.plot([1.0], [block], "*", color="tab:orange", ms=14, label="Block AttnRes at 1x (mean)")
    ax.set_xscale("log")
    ticks = sorted({*multipliers, *([round(matched, 2)] if fit and math.isfinite(matched) and matched <= end else [])})
    ax.set_xticks(ticks, [f"{t:g}x" for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel(f"training compute (x {args.steps} steps of the baseline)")
    ax.set_ylabel("final validation loss (nats / byte)")
    ax.set_title("Compute equivalence")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_loss_vs_blocks(path: str, ablation: dict) -> None:
    """Final validation loss (mean ± std over seeds) against the number of blocks; the baseline as a band."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    entries = {e["blocks"]: e for e in ablation["entries"]}  # one point per distinct partition
    blocks = sorted(entries)
    for b in blocks:
        per_seed = list(entries[b]["val_loss"]["per_seed"].values())
        ax.scatter([b] * len(per_seed), per_seed, color="tab:orange", alpha=0.4, s=14)
    ax.errorbar(blocks, [entries[b]["val_loss"]["mean"] for b in blocks],
                yerr=[entries[b]["val_loss"]["std"] for b in blocks], color="tab:orange", marker="o", capsize=3,
                label="Block AttnRes")
    base = ablation["baseline_val_loss"]
    ax.axhline(base["mean"], color="tab:blue", label="baseline")
    ax.axhspan(base["mean"] - base["std"], base["mean"] + base["std"], color="tab:blue", alpha=0.15)
    ax.set_xscale("log", base=2)
    ax.set_xticks(blocks, [f"{b}\n(Full)" if b == ablation["residual_steps"] else str(b) for b in blocks])
    ax.set_xlabel(f"blocks (of {ablation['residual_steps']} residual steps)")
    ax.set_ylabel("final validation loss (nats / byte)")
    ax.set_title("Block count")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def format_stats(stats: dict) -> str:
    return f"{stats['mean']:.4f} ± {stats['std']:.4f}"


def format_summary(summary: dict) -> str:
    """Markdown tables of every section, for the end of the log."""
    setup, eq, over = summary["setup"], summary["compute_equivalence"], summary["overhead"]
    lines = [f"{setup['model']} ({setup['parameters'] / 1e6:.2f} M parameters), {setup['steps']} steps x "
             f"{setup['tokens_per_step']} tokens = {setup['tokens_1x']:,} tokens at 1x, seeds {setup['seeds']}", "",
             "| run | compute | final val loss (mean ± std) |", "|---|---:|---:|"]
    lines += [f"| baseline | {m}x | {format_stats(s)} |" for m, s in eq["baseline_val_loss"].items()]
    lines.append(f"| Block AttnRes | 1x | {format_stats(eq['block_val_loss'])} |")
    mult = eq["multiplier"]
    fit = eq["fit_pooled"]
    lines += ["", f"power law, pooled over seeds: L = {fit['a']:.4f} * C^-{fit['b']:.4f} (R^2 {fit['r2']:.3f})",
              "baseline compute matching Block AttnRes, per seed: "
              + ", ".join(f"{s}: {v:.2f}x" for s, v in mult["per_seed"].items())
              + f"; mean {mult['mean']:.2f} ± {mult['std']:.2f}x; pooled {eq['multiplier_pooled']:.2f}x"
              + (" (an extrapolation: Block beats the largest baseline)" if eq["extrapolated"] else ""),
              f"per-step cost of the rewrite: {over['flops_ratio']:.4f}x FLOPs, {over['step_time_ratio']:.2f}x step "
              f"time; net multiplier {eq['net_of_flops']:.2f}x (FLOPs), {eq['net_of_step_time']:.2f}x (time)", "",
              "| num_blocks | blocks x size | final val loss |", "|---:|---:|---:|"]
    abl = summary["block_ablation"]
    lines.append(f"| baseline | - | {format_stats(abl['baseline_val_loss'])} |")
    lines += [f"| {e['num_blocks']} | {e['blocks']} x {e['block_size']} | {format_stats(e['val_loss'])} |"
              for e in abl["entries"]]
    scale, retro = summary["scale_mode"], summary["retrofit"]
    lines += ["", f"scale count {format_stats(scale['count'])}, mean {format_stats(scale['mean'])}, "
                  f"mean - count {format_stats(scale['mean_minus_count'])}",
              f"retrofit after {retro['steps_before']} + {retro['steps_after']} steps: start "
              f"{format_stats(retro['start_val_loss'])}, plain {format_stats(retro['plain'])}, rewritten "
              f"{format_stats(retro['attnres'])}, rewritten - plain {format_stats(retro['attnres_minus_plain'])}", "",
              "| d_model | parameters | seeds | baseline | Block AttnRes | difference |",
              "|---:|---:|---|---:|---:|---:|"]
    lines += [f"| {w['d_model']} | {w['parameters'] / 1e6:.2f} M | {w['seeds']} | {format_stats(w['baseline'])} | "
              f"{format_stats(w['attnres'])} | {format_stats(w['attnres_minus_baseline'])} |"
              for w in summary["widths"]]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main


def run_all(args: argparse.Namespace) -> dict:
    """Train every run; the outputs are written after each seed of the main width and at the end."""
    results = Results()
    train, val = split_train_val(load_corpus(max_bytes=args.corpus_bytes))
    val_batches = validation_batches(val, args)
    x, y = val_batches[0]
    cfg = GPTConfig(n_layer=args.layers, n_head=args.heads, d_model=args.d_model, max_len=args.seq)
    variants = block_variants(args)
    log.info("Block AttnRes arms: %s", ", ".join(
        f"{v.name} ({block_count(residual_steps(args), v.block_size)} blocks x {v.block_size}, {v.config.scale})"
        for v in variants))
    results.flops = flops_per_step(cfg, variants[0].config, x, y)
    log.info("FLOPs per training step: baseline %.3e, Block AttnRes %.3e (%.4fx)",
             results.flops["baseline"]["total"], results.flops["attnres"]["total"], results.flops["ratio"])

    arms = {"baseline": baseline_arm(cfg, args.device)}
    arms.update({v.name: attnres_arm(cfg, x, v.config, args.device, v.name) for v in variants})
    for seed in args.seeds:
        train_main_seed(seed, arms, variants, cfg, train, val_batches, args, results)
        write_outputs(results, variants, args)  # an interrupted run keeps its finished seeds
    train_second_width(train, val_batches, args, results)
    return {**write_outputs(results, variants, args), "results": results, "args": args}


def main(argv=None) -> dict:
    """Run every section; returns the summary, the output paths, the results and the arguments."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    log.setLevel(logging.INFO)  # this script's progress; the library itself only warns
    os.makedirs(args.out, exist_ok=True)
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        # Models of two widths share TinyGPT.forward: without this, the second width's compile would
        # make the sizes symbolic (automatic dynamic shapes) instead of compiling its own static graph.
        with torch._dynamo.config.patch(automatic_dynamic_shapes=False):
            outcome = run_all(args)
    finally:
        torch.set_num_threads(threads)
    print("\n" + format_summary(outcome["summary"]))
    print(f"\nwall time {outcome['summary']['setup']['wall_seconds']:.0f} s; outputs in {args.out}/")
    return outcome


if __name__ == "__main__":
    main()
