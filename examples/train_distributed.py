"""Train a Block AttnRes model on several processes: DDP, sharded data parallel or tensor parallel.

    torchrun --nproc-per-node 2 examples/train_distributed.py --parallel ddp
    torchrun --nproc-per-node 2 examples/train_distributed.py --parallel fsdp
    torchrun --nproc-per-node 2 examples/train_distributed.py --parallel tp --model titan-llama3
    torchrun --nproc-per-node 4 examples/train_distributed.py --parallel hsdp
    torchrun --nproc-per-node 2 examples/train_distributed.py --parallel pp --schedule interleaved [--no-cache]

CPU processes talk over gloo, GPUs over nccl; nothing else changes. Rank 0
prints the plan the backend applied and the loss of every step.

The order matters: ``prepare`` the plain model first (it traces the model and
adds the queries as parameters), then hand it to the engine, then
``torch.compile(..., backend="attnres")`` the whole model. Every engine here
keeps the layer stack in one graph:

- ``ddp``: ``DistributedDataParallel``, with ``torch._dynamo.config.optimize_ddp
  = False``: otherwise Dynamo cuts the graph at every gradient bucket (past
  1 MB of parameters), and the backend refuses the cut stack.
- ``fsdp``: torchtitan's SimpleFSDP, ``data_parallel(model, mesh,
  mode="fully_shard")``: every parameter, the queries included, is sharded,
  and the all-gathers are traced into the graph, so each module is its own
  shard unit and the whole forward is still one graph. ``hsdp`` is its
  ``hybrid_shard`` on a 2-D mesh (replicate x shard). Its gradients are sums
  over ranks, so the loss is scaled by 1 / ranks; it unties tied weights, so
  a model with any (the tiny GPT) is refused.
- ``fsdp2-root``: FSDP2's ``fully_shard`` on the root module only (one shard
  unit). ``fully_shard`` on each block is refused: Dynamo does not trace
  FSDP2's hooks, so the stack would be cut into one graph per block.
- ``tp``: ``parallelize_module`` with the torchtitan-style plan (colwise q/k/v
  and MLP up-projections, rowwise output projections) on every block;
  ``hf-llama`` and ``titan-llama3`` (the models with separate q/k/v; the tiny
  GPT's fused qkv cannot be split by heads this way).
- ``pp``: the plain model is exported, rewritten (``attnres_compile.rewrite``)
  and cut into stages between AttnRes blocks (``attnres_compile.pipelining``);
  ``--schedule gpipe|1f1b`` runs one stage per process, ``interleaved`` two.
  Each rank caches the block summaries it has seen for a micro-batch, so a hop
  sends only what the next rank lacks (``--no-cache`` sends every live one).
  The stages run eagerly.
"""

from __future__ import annotations

import argparse
import logging
import os
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

import attnres_compile
from attnres_compile import AttnResBackend

log = logging.getLogger("train_distributed")

ENGINES = ("ddp", "fsdp", "hsdp", "fsdp2-root", "tp", "pp")
SCHEDULES = ("gpipe", "1f1b", "interleaved")


def tiny_gpt(vocab: int, layers: int, width: int) -> nn.Module:
    from tiny_gpt import GPTConfig, TinyGPT

    return TinyGPT(GPTConfig(vocab_size=vocab, n_layer=layers, n_head=4, d_model=width, max_len=64))


def hf_llama(vocab: int, layers: int, width: int) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, use_cache=False,
    )
    return LlamaForCausalLM(config)


def titan_llama3(vocab: int, layers: int, width: int) -> nn.Module:
    """torchtitan's Llama 3, built from its own config classes (separate wq/wk/wv).

    torchtitan's language models take flex or varlen attention; its SDPA module
    (kept for Flux) runs them causally without masks, which CPU and any GPU run.
    """
    from torchtitan.models import llama3
    from torchtitan.models.common import ComplexRoPE, Embedding, Linear, RMSNorm
    from torchtitan.models.common.attention import ScaledDotProductAttention

    heads = 4
    blocks = llama3._build_llama3_layers(
        n_layers=layers, dim=width, n_heads=heads, n_kv_heads=2, hidden_dim=2 * width, fuse_qkv=False,
        rope=ComplexRoPE.Config(dim=width // heads, max_seq_len=64, theta=10000.0), attn_backend="flex",
    )
    for block in blocks:
        block.attention.inner_attention = ScaledDotProductAttention.Config()
    config = llama3.Llama3Model.Config(
        dim=width, vocab_size=vocab, layers=blocks,
        tok_embeddings=Embedding.Config(num_embeddings=vocab, embedding_dim=width, param_init=llama3._EMBEDDING_INIT),
        norm=RMSNorm.Config(normalized_shape=width, param_init=llama3._NORM_INIT),
        lm_head=Linear.Config(in_features=width, out_features=vocab, param_init=llama3._output_linear_init(width)),
    )
    model = config.build()
    model.init_weights()
    return model


MODELS: dict[str, Callable[[int, int, int], nn.Module]] = {
    "tiny-gpt": tiny_gpt,
    "hf-llama": hf_llama,
    "titan-llama3": titan_llama3,
}


def build_model(name: str, vocab: int, layers: int, width: int, seed: int) -> nn.Module:
    """The same random model on every rank (same seed)."""
    torch.manual_seed(seed)
    return MODELS[name](vocab, layers, width)


def logits_of(output) -> Tensor:
    """Logits [B, T, V] from a model's output: a tensor, a Hugging Face output, or a program's flat outputs."""
    if isinstance(output, (tuple, list)):
        return output[0]
    return output.logits if hasattr(output, "logits") else output


def next_token_loss(logits: Tensor, targets: Tensor) -> Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))


def tensor_parallel_plan(model: nn.Module) -> dict[str, object]:
    """torchtitan's plan for attention and MLP, by the model's module names.

    Colwise q/k/v and up/gate projections shard the heads and the hidden
    features; rowwise output projections sum the shards back, so the residual
    stream stays a whole (replicated) tensor on every rank.
    """
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    names = {name for name, _ in model.named_modules()}
    if any(n.endswith("self_attn.q_proj") for n in names):  # Hugging Face Llama family
        colwise = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj")
        rowwise = ("self_attn.o_proj", "mlp.down_proj")
    elif any(n.endswith("attention.qkv_linear.wq") for n in names):  # torchtitan
        colwise = ("attention.qkv_linear.wq", "attention.qkv_linear.wk", "attention.qkv_linear.wv",
                   "feed_forward.w1", "feed_forward.w3")
        rowwise = ("attention.wo", "feed_forward.w2")
    else:
        raise ValueError(
            f"no tensor-parallel plan for {type(model).__name__}: the plan needs separate q/k/v projections "
            "(Hugging Face Llama or torchtitan Llama 3 names)"
        )
    plan = {}
    for name in sorted(names):
        for suffix in colwise:
            if name.endswith(suffix):
                plan[name] = ColwiseParallel()
        for suffix in rowwise:
            if name.endswith(suffix):
                plan[name] = RowwiseParallel()
    return plan


@dataclass
class Parallel:
    """A model handed to an engine: what to compile, and how the global batch is split."""

    module: nn.Module
    data_rank: int
    data_world: int
    loss_scale: float = 1.0


def parallelize(model: nn.Module, engine: str, device: str) -> Parallel:
    """Wrap a prepared ``model`` for ``engine`` on the default process group."""
    from torch.distributed.device_mesh import init_device_mesh

    rank, world = dist.get_rank(), dist.get_world_size()
    if engine == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        # Dynamo's DDPOptimizer would cut the compiled graph at every gradient bucket (the first at
        # 1 MB of parameters); the rewrite needs the layer stack in one graph.
        torch._dynamo.config.optimize_ddp = False
        return Parallel(DistributedDataParallel(model), rank, world)
    if engine in ("fsdp", "hsdp"):
        from torchtitan.experiments.graph_trainer.simple_fsdp import data_parallel

        _require_untied(model, engine)
        if engine == "fsdp":
            mesh, mode = init_device_mesh(device, (world,)), "fully_shard"
        else:
            if world % 2:
                raise ValueError(f"hsdp needs an even number of processes (a 2 x {world / 2} mesh), got {world}")
            mesh, mode = init_device_mesh(device, (2, world // 2), mesh_dim_names=("replicate", "shard")), "hybrid_shard"
        # SimpleFSDP's gradients are sums over the data-parallel ranks (Partial("sum")), not means.
        return Parallel(data_parallel(model, mesh, mode=mode), rank, world, loss_scale=1.0 / world)
    if engine == "fsdp2-root":
        from torch.distributed.fsdp import fully_shard

        return Parallel(fully_shard(model), rank, world)
    if engine == "tp":
        from torch.distributed.tensor.parallel import parallelize_module

        parallelize_module(model, init_device_mesh(device, (world,)), tensor_parallel_plan(model))
        return Parallel(model, 0, 1)  # every rank computes on the whole batch
    raise ValueError(f"unknown engine {engine!r}; one of {ENGINES}")


def _require_untied(model: nn.Module, engine: str) -> None:
    """SimpleFSDP gives every module its own sharded copy of its parameters: a shared one would come apart."""
    seen: dict[int, str] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        if id(parameter) in seen:
            raise ValueError(
                f"--parallel {engine} (SimpleFSDP) would untie {name} from {seen[id(parameter)]}: it registers a "
                "separate sharded copy of each module's parameters. Use a model without tied weights "
                "(hf-llama, titan-llama3), or ddp / fsdp2-root"
            )
        seen[id(parameter)] = name


def global_batches(vocab: int, batch: int, seq: int, steps: int, seed: int = 1) -> list[Tensor]:
    """The same token windows [batch, seq + 1] on every rank, from the offline corpus (bytes) or random ids."""
    gen = torch.Generator().manual_seed(seed)
    if vocab == 256:
        from offline_text import batch_iterator, load_corpus

        windows = batch_iterator(load_corpus(200_000), batch, seq, gen)
        return [torch.cat([x, y[:, -1:]], dim=1) for (x, y), _ in zip(windows, range(steps))]
    return [torch.randint(0, vocab, (batch, seq + 1), generator=gen) for _ in range(steps)]


def train(compiled: Callable, model: nn.Module, parallel: Parallel, batches: list[Tensor], lr: float,
          device: str, on_step: Optional[Callable[[int, float], None]] = None) -> list[float]:
    """SGD on each global batch, this rank's share of it; the global loss of every step."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    losses = []
    for step, batch in enumerate(batches):
        share = batch.shape[0] // parallel.data_world
        rows = batch[parallel.data_rank * share:(parallel.data_rank + 1) * share].to(device)
        loss = next_token_loss(logits_of(compiled(rows[:, :-1])), rows[:, 1:])
        optimizer.zero_grad()
        (loss * parallel.loss_scale).backward()
        optimizer.step()
        total = loss.detach().clone()
        dist.all_reduce(total)
        losses.append(total.item() / dist.get_world_size())
        if on_step is not None:
            on_step(step, losses[-1])
    return losses


def pipeline_program(model: nn.Module, micro_batch: Tensor, config: attnres_compile.AttnResConfig) -> nn.Module:
    """The model as one rewritten program (``torch.export`` then ``rewrite``), for one micro-batch's shape."""
    program = torch.export.export(model, (micro_batch,), strict=False)
    return attnres_compile.rewrite(program, config)


@dataclass
class Pipeline:
    """This rank's share of a pipeline: its stage modules, the schedule and the split they came from."""

    split: object
    modules: dict
    schedule: object
    cache: Optional[object]
    parameters: list
    shared: list  # parameters stages on several ranks read: their gradients are summed across ranks
    transfers: list  # what each stage takes and gives for one micro-batch (PipelineSplit.example_transfers)


def build_pipeline(program: nn.Module, micro_batch: Tensor, schedule_name: str, cached: bool, n_microbatches: int,
                   device: str, cuts: Optional[list[int]] = None) -> Pipeline:
    """Stages cut from ``program`` (one per rank, two per rank for the interleaved schedule) and their schedule.

    ``micro_batch`` is one micro-batch of input ids, for the stages' shapes.
    The loss of each micro-batch is divided by the number of micro-batches and
    the schedule does not rescale: the step's gradient is the whole batch's mean,
    as in one process, also for parameters two stages of a rank share.
    """
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B

    from attnres_compile.pipelining import StageCache, split_stages

    rank, world = dist.get_rank(), dist.get_world_size()
    num_stages = world * (2 if schedule_name == "interleaved" else 1)
    split = split_stages(program, num_stages, cuts)
    cache = StageCache() if cached else None
    mine = split.stages_of_rank(rank, world)
    modules = {s: split.stage_module(s, world, cache) for s in mine}
    transfers = split.example_transfers((micro_batch.to(device),), world, cached)
    stages = [
        PipelineStage(modules[s], s, num_stages, torch.device(device), input_args=transfers[s][0],
                      output_args=transfers[s][1])
        for s in mine
    ]

    def loss_fn(output, target):
        return next_token_loss(logits_of(output), target) / n_microbatches

    if schedule_name == "interleaved":
        schedule = ScheduleInterleaved1F1B(stages, n_microbatches, loss_fn=loss_fn, scale_grads=False)
    else:
        kind = ScheduleGPipe if schedule_name == "gpipe" else Schedule1F1B
        schedule = kind(stages[0], n_microbatches, loss_fn=loss_fn, scale_grads=False)
    parameters = list({id(p): p for s in mine for p in split.parameters_of_stage(s).values()}.values())
    return Pipeline(split, modules, schedule, cache, parameters, split.shared_parameters(world), transfers)


def train_pipeline(pipeline: Pipeline, batches: list[Tensor], lr: float, device: str,
                   on_step: Optional[Callable[[int, float], None]] = None) -> list[float]:
    """SGD through the pipeline on each global batch; the batch's mean loss of every step."""
    from attnres_compile.pipelining import sync_shared_gradients

    num_stages = pipeline.split.num_stages
    optimizer = torch.optim.SGD(pipeline.parameters, lr=lr)
    losses = []
    for step, batch in enumerate(batches):
        x, y = batch[:, :-1].to(device), batch[:, 1:].to(device)
        optimizer.zero_grad()
        if pipeline.cache is not None:
            pipeline.cache.start_step()
        micro_losses: list[Tensor] = []
        args = (x,) if 0 in pipeline.modules else ()
        kwargs = {"target": y, "losses": micro_losses} if num_stages - 1 in pipeline.modules else {}
        pipeline.schedule.step(*args, **kwargs)
        sync_shared_gradients(pipeline.shared)
        optimizer.step()
        total = torch.tensor(float(sum(l.item() for l in micro_losses)))
        dist.all_reduce(total)  # only the last stage's rank has the loss
        losses.append(total.item())
        if on_step is not None:
            on_step(step, losses[-1])
    return losses


def full_state(model: nn.Module) -> dict[str, Tensor]:
    """Every parameter and buffer of the (unwrapped) model whole and on CPU: sharded ones gathered."""
    return {
        name: (value.full_tensor() if hasattr(value, "full_tensor") else value).detach().cpu().clone()
        for name, value in model.state_dict().items()
    }


def transfer_table(split, micro_batch: Tensor, world: int) -> list[str]:
    """Per hop: the block summaries sent and the bytes per micro-batch (activations forward + gradients
    backward), without and with the cache."""
    rows = ["hop            | naive: summaries, KB | cached: summaries, KB"]
    both = {cached: split.example_transfers((micro_batch,), world, cached) for cached in (False, True)}
    plans = {cached: split.plan(world, cached) for cached in (False, True)}
    totals = {False: 0, True: 0}
    for stage in range(split.num_stages - 1):
        cells = []
        for cached in (False, True):
            sent = both[cached][stage][1]
            nbytes = sum(t.numel() * t.element_size() * (2 if t.requires_grad else 1) for t in sent)
            totals[cached] += nbytes
            names = [split.summaries[n] for n in plans[cached].sent[stage] if n in split.summaries]
            cells.append(f"{' '.join(names) or '-':>16} {nbytes / 1e3:7.1f}")
        rows.append(f"{stage} -> {stage + 1} (r{split.rank_of(stage, world)}->r{split.rank_of(stage + 1, world)}) | "
                    + " | ".join(cells))
    rows.append(f"total per micro-batch: naive {totals[False] / 1e3:.1f} KB, cached {totals[True] / 1e3:.1f} KB "
                f"({totals[False] / max(totals[True], 1):.2f}x)")
    return rows


def main_pipeline(args: argparse.Namespace, model: nn.Module, batches: list[Tensor],
                  config: attnres_compile.AttnResConfig, device: str) -> list[float]:
    """--parallel pp: the plain model exported, rewritten, cut into stages and trained through a schedule."""
    rank, world = dist.get_rank(), dist.get_world_size()
    if args.batch % args.micro_batches:
        raise ValueError(f"--batch {args.batch} does not split into {args.micro_batches} micro-batches")
    micro_batch = batches[0][: args.batch // args.micro_batches, :-1].to(device)
    program = pipeline_program(model, micro_batch, config)
    pipeline = build_pipeline(program, micro_batch, args.schedule, not args.no_cache, args.micro_batches, device,
                              args.cuts)
    if rank == 0:
        split = pipeline.split
        log.info("%s, %s schedule, %d stages on %d processes (stage s on rank s %% %d), stages start at blocks %s, "
                 "%s", args.model, args.schedule, split.num_stages, world, world, [0] + split.cuts,
                 "no cache" if args.no_cache else "cached")
        for row in transfer_table(split, micro_batch, world):
            log.info("%s", row)

    def say(step: int, loss: float) -> None:
        if rank == 0:
            log.info("step %3d  loss %.4f", step, loss)

    return train_pipeline(pipeline, batches, args.lr, device, say)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parallel", choices=ENGINES, default="ddp")
    parser.add_argument("--model", choices=sorted(MODELS), default=None,
                        help="default: tiny-gpt for ddp and fsdp2-root, hf-llama for the others (untied weights, "
                             "separate q/k/v)")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--num-blocks", type=int, default=None,
                        help="Block AttnRes blocks (default 2; for pp, 4: at least one per stage)")
    parser.add_argument("--batch", type=int, default=8, help="global batch (split over data-parallel ranks)")
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--schedule", choices=SCHEDULES, default="interleaved",
                        help="pp: the pipeline schedule (interleaved: two stages per process)")
    parser.add_argument("--micro-batches", type=int, default=4, help="pp: micro-batches per step")
    parser.add_argument("--cuts", type=lambda text: [int(c) for c in text.split(",")], default=None,
                        help="pp: the blocks that start stages 1.. (e.g. 1,2,3); default: blocks spread evenly")
    parser.add_argument("--no-cache", action="store_true",
                        help="pp: send every live block summary at every hop instead of caching them per rank")
    parser.add_argument("--eager", action="store_true",
                        help="run the rewritten graph eagerly instead of compiling it with Inductor (quick checks)")
    args = parser.parse_args(argv)
    args.model = args.model or ("tiny-gpt" if args.parallel in ("ddp", "fsdp2-root", "pp") else "hf-llama")
    args.num_blocks = args.num_blocks or (4 if args.parallel == "pp" else 2)
    return args


def main(argv=None) -> list[float]:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if device == "cuda" else "gloo")
    rank = dist.get_rank()
    if rank != 0:
        logging.getLogger("attnres_compile").setLevel(logging.WARNING)
    model = build_model(args.model, 256, args.layers, args.width, args.seed).to(device)
    batches = global_batches(256, args.batch, args.seq, args.steps)
    config = attnres_compile.AttnResConfig(num_blocks=args.num_blocks)
    if args.parallel == "pp":
        losses = main_pipeline(args, model, batches, config, device)
        dist.destroy_process_group()
        return losses
    attnres_compile.prepare(model, (batches[0][:1, :-1].to(device),), config)
    parallel = parallelize(model, args.parallel, device)
    backend = AttnResBackend(inductor=not args.eager)
    compiled = torch.compile(parallel.module, backend=backend)
    if rank == 0:
        log.info("%s on %d processes (%s), %s: compiling ...", args.model, dist.get_world_size(),
                 dist.get_backend(), args.parallel)

    def say(step: int, loss: float) -> None:
        if rank == 0:
            if step == 0:
                log.info("plan:\n%s", "\n".join(p.summary() for p in backend.plans))
            log.info("step %3d  loss %.4f", step, loss)

    losses = train(compiled, model, parallel, batches, args.lr, device, say)
    if not backend.plans:
        raise RuntimeError("the attnres backend rewrote no graph")
    dist.destroy_process_group()
    return losses


if __name__ == "__main__":
    main()
