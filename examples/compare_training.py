"""Train the same small GPT as a plain compiled model and as Block AttnRes, and compare validation loss.

    python examples/compare_training.py            # 3 seeds, 6 layers x d 256, 200 steps (about 17 min on 2 cores)
    python examples/compare_training.py --quick    # 2 seeds, tiny model, 30 steps: a smoke run (seconds once compiled)
    python examples/compare_training.py --device cuda --layers 12 --d-model 768 --heads 12 ...   # GPU, bf16 autocast

On a CPU that other jobs share, ``--threads 1`` keeps OpenMP from spin-waiting
against them, which can make each step many times slower.

Two arms per seed, trained step by step in lockstep on the same batches:

* ``baseline``: ``torch.compile(model)`` with the default (Inductor) backend;
* ``attnres``: ``attnres_compile.prepare`` then ``torch.compile(model, backend="attnres")``.

Both start from the same initial weights (drawn from the seed), see the same
batches in the same order (drawn from the seed) and use the same optimizer,
learning-rate schedule and gradient clipping. The only difference is the
Block AttnRes rewrite and its zero-initialized queries (one ``[d]`` row per
residual step), which the optimizer trains. With ``scale="count"`` the
rewritten model equals the baseline exactly at step 0, so any gap is learned.

Optimizer: AdamW over every parameter, built after ``prepare``. Weight decay
applies to the weight matrices and embeddings only; biases, norm gains and the
queries get none (the queries are gains of the depth-wise read: decaying them
would pull every read back toward the baseline's uniform mix). The queries use
the same learning rate as everything else. No hyperparameter here was tuned
on the validation set.

Data: bytes of the Python standard library's source (``offline_text.py``),
split into training and validation text by file. Validation loss is the mean
over a fixed set of validation windows, the same for every seed and arm.

Outputs in ``--out`` (default ``runs/compare_training/``):
``curves.csv`` (one row per arm, seed and logged step), ``summary.csv`` (one
row per arm and seed: final validation loss, training time, query norm) and
``loss_curves.png`` (training loss, validation loss and the paired validation gap against step).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import itertools
import logging
import math
import os
import statistics
import time
from dataclasses import dataclass, field

import torch
from torch import nn

import attnres_compile
from offline_text import batch_iterator, load_corpus, split_train_val
from tiny_gpt import GPTConfig, TinyGPT, loss_fn

log = logging.getLogger("attnres_compile.examples")

ARMS = ("baseline", "attnres")
DEFAULT_OUT = os.path.join("runs", "compare_training")
VAL_SEED = 1234  # the validation windows do not depend on the training seed

# --quick: a smoke run of the whole pipeline, sized for a test (compiling dominates).
QUICK = dict(layers=2, d_model=64, heads=2, seq=32, batch=8, steps=30, seeds=[0, 1],
             eval_every=10, eval_batches=2, corpus_bytes=300_000)


def training_options() -> argparse.ArgumentParser:
    """The options that size a run and set its optimizer (a parent parser, shared with ``paper_claims.py``)."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--layers", type=int, default=6, help="transformer blocks (2 residual steps each)")
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--seq", type=int, default=64, help="tokens (bytes) per window")
    parser.add_argument("--batch", type=int, default=16, help="windows per step")
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps per arm and seed")
    parser.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (all parameters)")
    parser.add_argument("--min-lr-ratio", type=float, default=0.1, help="final learning rate / peak")
    parser.add_argument("--warmup", type=float, default=0.1, help="share of steps with linear warm-up")
    parser.add_argument("--weight-decay", type=float, default=0.1, help="on weight matrices and embeddings")
    parser.add_argument("--clip", type=float, default=1.0, help="max global gradient norm")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--eval-every", type=int, default=25, help="steps between validation evaluations")
    parser.add_argument("--eval-batches", type=int, default=8, help="validation windows = this x --batch")
    parser.add_argument("--corpus-bytes", type=int, default=3_000_000)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--amp", choices=("bf16", "none"), default=None,
                        help="autocast of forward and loss (default: bf16 on CUDA, none on CPU)")
    return parser


def default_amp(args: argparse.Namespace) -> None:
    """``--amp`` left unset: bf16 autocast on CUDA, none elsewhere."""
    if args.amp is None:
        args.amp = "bf16" if args.device.startswith("cuda") else "none"


def parse_sized(parser: argparse.ArgumentParser, argv, quick: dict, out: str) -> argparse.Namespace:
    """Parse ``argv`` (``--out`` defaults to ``out``); with ``--quick`` the options in ``quick``, those
    that size the run, replace the given ones."""
    parser.add_argument("--out", default=out, help="output directory")
    args = parser.parse_args(argv)
    if args.quick:
        for name, value in quick.items():
            setattr(args, name, value)
    default_amp(args)
    return args


def parse_args(argv=None) -> argparse.Namespace:
    """Command-line options; ``--quick`` replaces the defaults that size the run."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], parents=[training_options()])
    parser.add_argument("--quick", action="store_true", help="tiny model, few steps, 2 seeds (a smoke run)")
    parser.add_argument("--num-blocks", type=int, default=8, help="Block AttnRes blocks (library default)")
    parser.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS),
                        help="arms to train (one arm alone, e.g. a longer baseline for a compute-equivalence sweep)")
    return parse_sized(parser, argv, QUICK, DEFAULT_OUT)


# ----------------------------------------------------------------------------- the two arms


@dataclass
class Arm:
    """One side of the comparison: a model, its compiled callable and its running record."""

    name: str
    model: nn.Module
    compiled: nn.Module
    optimizer: torch.optim.Optimizer | None = None
    scheduler: torch.optim.lr_scheduler.LambdaLR | None = None
    seconds: float = 0.0  # training time of the current seed, compile included
    rows: list[dict] = field(default_factory=list)

    @property
    def queries(self) -> list[torch.Tensor]:
        """The Block AttnRes queries (empty for the baseline)."""
        attnres = getattr(self.model, "attnres", None)
        return list(attnres.queries) if attnres is not None else []

    def query_norm(self) -> float:
        """Frobenius norm of all queries together (0 for the baseline)."""
        return math.sqrt(sum(float(q.detach().pow(2).sum()) for q in self.queries))


def baseline_arm(cfg: GPTConfig, device: str, name: str = "baseline") -> Arm:
    """The plain model, compiled with the default (Inductor) backend."""
    model = TinyGPT(cfg).to(device)
    return Arm(name, model, torch.compile(model))


def attnres_arm(cfg: GPTConfig, example: torch.Tensor, config: attnres_compile.AttnResConfig, device: str,
                name: str = "attnres") -> Arm:
    """The model prepared for Block AttnRes with ``config`` (zero queries), compiled with ``backend="attnres"``."""
    model = TinyGPT(cfg).to(device)
    attnres_compile.prepare(model, (example,), config)
    if not getattr(model, "attnres", None):
        raise RuntimeError("prepare found no residual stream in TinyGPT")
    log.info("Block AttnRes plan of %s:\n%s", name, model.attnres.plan.summary())
    return Arm(name, model, torch.compile(model, backend="attnres"))


def build_arms(cfg: GPTConfig, example: torch.Tensor, args: argparse.Namespace) -> dict[str, Arm]:
    """The chosen arms, each compiled once; :func:`reset_arm` loads a seed's weights into them in place.

    Reusing one model per arm across seeds keeps the parameter objects (so the
    compiled graphs stay valid) and pays for compiling once, not once per seed.
    """
    arms = {}
    if "baseline" in args.arms:
        arms["baseline"] = baseline_arm(cfg, args.device)
    if "attnres" in args.arms:
        config = attnres_compile.AttnResConfig(num_blocks=args.num_blocks)
        arms["attnres"] = attnres_arm(cfg, example, config, args.device)
    return arms


def autocast(args: argparse.Namespace):
    """bf16 autocast for ``--amp bf16`` (fp32 weights and optimizer state stay), else nothing."""
    if args.amp == "bf16":
        return torch.autocast(device_type=torch.device(args.device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def initial_state(cfg: GPTConfig, seed: int) -> dict[str, torch.Tensor]:
    """The seed's initial weights of the plain model (the baseline's full state)."""
    torch.manual_seed(seed)
    return TinyGPT(cfg).state_dict()


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: decay on matrices and embeddings; none on biases, norm gains and the queries."""
    attnres = getattr(model, "attnres", None)
    query_ids = {id(q) for q in attnres.queries} if attnres is not None else set()
    decay, no_decay = [], []
    for param in model.parameters():  # deduplicated: the tied lm_head / tok_emb weight appears once
        is_matrix = param.dim() >= 2 and id(param) not in query_ids
        (decay if is_matrix else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_factor(step: int, steps: int, warmup: float, min_ratio: float) -> float:
    """Linear warm-up to 1, then cosine decay to ``min_ratio`` at the last step."""
    warm = max(1, round(warmup * steps))
    if step < warm:
        return (step + 1) / warm
    progress = (step - warm) / max(1, steps - warm)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def reset_arm(arm: Arm, state: dict[str, torch.Tensor], args: argparse.Namespace) -> None:
    """Load the seed's initial weights (queries back to zero) and a fresh optimizer and schedule."""
    missing, unexpected = arm.model.load_state_dict(state, strict=False)
    if unexpected or any(not k.startswith("attnres_queries_") for k in missing):
        raise RuntimeError(f"state mismatch for {arm.name}: missing {missing}, unexpected {unexpected}")
    with torch.no_grad():
        for q in arm.queries:
            q.zero_()
    # Built after prepare, from named_parameters: the queries are in it.
    arm.optimizer = torch.optim.AdamW(
        parameter_groups(arm.model, args.weight_decay), lr=args.lr, betas=(0.9, 0.95), eps=1e-8
    )
    arm.scheduler = torch.optim.lr_scheduler.LambdaLR(
        arm.optimizer, lambda step: lr_factor(step, args.steps, args.warmup, args.min_lr_ratio)
    )
    arm.seconds = 0.0


# ----------------------------------------------------------------------------- training


def train_step(arm: Arm, x: torch.Tensor, y: torch.Tensor, args: argparse.Namespace) -> float:
    """One optimizer step on ``(x, y)``; returns the training loss and adds the time to ``arm.seconds``."""
    start = time.perf_counter()
    with autocast(args):
        loss = loss_fn(arm.compiled(x).float(), y)
    arm.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(arm.model.parameters(), args.clip)
    arm.optimizer.step()
    arm.scheduler.step()
    value = loss.item()  # synchronizes: the step's device work is in the time
    arm.seconds += time.perf_counter() - start
    return value


def evaluate(arm: Arm, val_batches: list[tuple[torch.Tensor, torch.Tensor]], args: argparse.Namespace) -> float:
    """Mean validation loss over fixed windows.

    Runs the training graph (grad mode on, no backward): the windows have the
    training shape, so this reuses the compiled training graph instead of
    compiling a second, no-grad graph per arm, which at this size would cost
    more time than all the evaluations together.
    """
    with autocast(args):
        losses = [loss_fn(arm.compiled(x).float(), y).item() for x, y in val_batches]
    return sum(losses) / len(losses)


def validation_batches(val: torch.Tensor, args: argparse.Namespace) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The fixed validation windows: same for every seed and arm."""
    windows = batch_iterator(val, args.batch, args.seq, torch.Generator().manual_seed(VAL_SEED))
    return [(x.to(args.device), y.to(args.device)) for x, y in itertools.islice(windows, args.eval_batches)]


def seed_batches(train: torch.Tensor, seed: int, args: argparse.Namespace):
    """The seed's endless stream of training batches (CPU tensors); every arm of the seed sees the same."""
    return batch_iterator(train, args.batch, args.seq, torch.Generator().manual_seed(seed))


def train_seed(arms: dict[str, Arm], cfg: GPTConfig, train: torch.Tensor, val_batches, seed: int,
               args: argparse.Namespace) -> None:
    """Train both arms from the seed's initial weights on the seed's batches, in lockstep."""
    train_lockstep(arms, initial_state(cfg, seed), seed_batches(train, seed, args), val_batches, seed, args)


def train_lockstep(arms: dict[str, Arm], state: dict[str, torch.Tensor], batches, val_batches, seed: int,
                   args: argparse.Namespace) -> None:
    """Train every arm from ``state`` for ``args.steps`` steps on the next batches of ``batches``, in lockstep.

    Each arm gets a fresh optimizer and schedule (:func:`reset_arm`) and
    appends one row per step to ``arm.rows``.
    """
    for arm in arms.values():
        reset_arm(arm, state, args)
    tokens_per_step = args.batch * args.seq
    for step, (x, y) in enumerate(itertools.islice(batches, args.steps), start=1):
        x, y = x.to(args.device), y.to(args.device)
        evaluate_now = step == args.steps or step % args.eval_every == 0
        for arm in arms.values():  # interleaved, so a busy machine slows both arms alike
            lr = arm.scheduler.get_last_lr()[0]  # the rate this step uses
            train_loss = train_step(arm, x, y, args)
            arm.rows.append({
                "arm": arm.name, "seed": seed, "step": step, "tokens": step * tokens_per_step,
                "lr": lr, "train_loss": train_loss,
                "val_loss": evaluate(arm, val_batches, args) if evaluate_now else math.nan,
                "query_norm": arm.query_norm(), "train_seconds": arm.seconds,
            })
        if evaluate_now or step == 1:
            log.info("seed %d step %4d/%d  %s", seed, step, args.steps, "  ".join(
                f"{a.name}: train {a.rows[-1]['train_loss']:.4f} val {a.rows[-1]['val_loss']:.4f} "
                f"({a.seconds:.0f} s)" for a in arms.values()))


# ----------------------------------------------------------------------------- results


def summarize(arms: dict[str, Arm], seeds: list[int]) -> list[dict]:
    """One row per arm and seed: the last step's validation loss, time and query norm."""
    summary = []
    for arm in arms.values():
        for seed in seeds:
            last = [r for r in arm.rows if r["seed"] == seed][-1]
            summary.append({"arm": arm.name, "seed": seed, "val_loss": last["val_loss"],
                            "train_loss": last["train_loss"], "query_norm": last["query_norm"],
                            "train_seconds": last["train_seconds"]})
    return summary


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def write_csv(path: str, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def plot_curves(path: str, arms: dict[str, Arm], seeds: list[int]) -> None:
    """Training loss, validation loss and the paired validation gap (attnres - baseline) per seed against step."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    colors = {"baseline": "tab:blue", "attnres": "tab:orange"}
    fig, (ax_train, ax_val, ax_gap) = plt.subplots(1, 3, figsize=(16, 4))
    for arm in arms.values():
        for i, seed in enumerate(seeds):
            rows = [r for r in arm.rows if r["seed"] == seed]
            label = arm.name if i == 0 else None
            ax_train.plot([r["step"] for r in rows], [r["train_loss"] for r in rows],
                          color=colors[arm.name], alpha=0.5, lw=0.8, label=label)
            evals = [r for r in rows if not math.isnan(r["val_loss"])]
            ax_val.plot([r["step"] for r in evals], [r["val_loss"] for r in evals],
                        color=colors[arm.name], marker="o", ms=3, lw=1, alpha=0.8, label=label)
    if set(arms) == set(ARMS):
        for seed in seeds:
            val = {name: {r["step"]: r["val_loss"] for r in arm.rows if r["seed"] == seed and not math.isnan(r["val_loss"])}
                   for name, arm in arms.items()}
            steps = sorted(val["baseline"])
            ax_gap.plot(steps, [val["attnres"][s] - val["baseline"][s] for s in steps], marker="o", ms=3,
                        label=f"seed {seed}")
        ax_gap.axhline(0.0, color="black", lw=0.8)
    for ax, title in ((ax_train, "training loss"), (ax_val, "validation loss"),
                      (ax_gap, "validation loss, attnres - baseline")):
        ax.set_xlabel("step")
        ax.set_ylabel("cross entropy (nats / byte)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend()
    fig.suptitle(f"torch.compile baseline vs backend=\"attnres\" ({len(seeds)} seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def format_table(summary: list[dict], seeds: list[int]) -> str:
    """Markdown table: per-seed final validation loss of both arms, their difference, mean ± std."""
    val = {(r["arm"], r["seed"]): r["val_loss"] for r in summary}
    if {r["arm"] for r in summary} != set(ARMS):
        return format_single_arm(summary, seeds)
    lines = ["| seed | baseline val loss | attnres val loss | attnres - baseline |", "|---:|---:|---:|---:|"]
    for seed in seeds:
        b, a = val[("baseline", seed)], val[("attnres", seed)]
        lines.append(f"| {seed} | {b:.4f} | {a:.4f} | {a - b:+.4f} |")
    stats = {arm: mean_std([val[(arm, s)] for s in seeds]) for arm in ARMS}
    diff = mean_std([val[("attnres", s)] - val[("baseline", s)] for s in seeds])
    lines.append(f"| mean ± std | {stats['baseline'][0]:.4f} ± {stats['baseline'][1]:.4f} | "
                 f"{stats['attnres'][0]:.4f} ± {stats['attnres'][1]:.4f} | {diff[0]:+.4f} ± {diff[1]:.4f} |")
    return "\n".join(lines)


def format_single_arm(summary: list[dict], seeds: list[int]) -> str:
    """Markdown table of one arm's final validation loss per seed and mean ± std."""
    arm = summary[0]["arm"]
    values = [r["val_loss"] for r in summary]
    mean, std = mean_std(values)
    lines = [f"| seed | {arm} val loss |", "|---:|---:|"]
    lines += [f"| {seed} | {v:.4f} |" for seed, v in zip(seeds, values)]
    lines.append(f"| mean ± std | {mean:.4f} ± {std:.4f} |")
    return "\n".join(lines)


def write_outputs(out: str, arms: dict[str, Arm], seeds: list[int]) -> tuple[dict[str, str], list[dict], list[dict]]:
    """Write curves.csv, summary.csv and loss_curves.png for the seeds done so far."""
    paths = {name: os.path.join(out, name) for name in ("curves.csv", "summary.csv", "loss_curves.png")}
    summary = summarize(arms, seeds)
    curves = [row for arm in arms.values() for row in arm.rows]
    write_csv(paths["curves.csv"], curves)
    write_csv(paths["summary.csv"], summary)
    plot_curves(paths["loss_curves.png"], arms, seeds)
    return paths, summary, curves


def describe_run(args: argparse.Namespace, cfg: GPTConfig) -> str:
    """One paragraph with the settings the numbers depend on."""
    params = sum(p.numel() for p in TinyGPT(cfg).parameters())  # the plain model's, tied weights once
    tokens = args.steps * args.batch * args.seq
    precision = "bf16 autocast" if args.amp == "bf16" else "fp32"
    return (f"GPT {args.layers} layers x d {args.d_model} ({params / 1e6:.2f} M parameters), {args.device}, "
            f"{precision}, {args.steps} steps x {args.batch} x {args.seq} bytes = {tokens:,} training tokens per arm "
            f"and seed, AdamW lr {args.lr} (warm-up {args.warmup:.0%}, cosine to {args.min_lr_ratio}x), "
            f"Block AttnRes num_blocks={args.num_blocks}; validation: {args.eval_batches * args.batch} windows "
            f"of {args.seq} bytes")


def main(argv=None) -> dict:
    """Run the comparison; returns the summary rows, the curves and the output paths."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    log.setLevel(logging.INFO)  # this script's progress; the library itself only warns
    if args.threads:
        torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    wall = time.perf_counter()

    train, val = split_train_val(load_corpus(max_bytes=args.corpus_bytes))
    val_batches = validation_batches(val, args)
    cfg = GPTConfig(n_layer=args.layers, n_head=args.heads, d_model=args.d_model, max_len=args.seq)
    arms = build_arms(cfg, val_batches[0][0], args)
    for done, seed in enumerate(args.seeds, start=1):
        train_seed(arms, cfg, train, val_batches, seed, args)
        # After every seed, so that an interrupted long run keeps what it finished.
        paths, summary, curves = write_outputs(args.out, arms, args.seeds[:done])

    print(f"\n{describe_run(args, cfg)}\n")
    print(format_table(summary, args.seeds))
    print(f"\nwall time {time.perf_counter() - wall:.0f} s; outputs in {args.out}/")
    return {"summary": summary, "curves": curves, "paths": paths, "args": args}


if __name__ == "__main__":
    main()
