"""One process of a distributed training check, run by ``tests/attnres_compile/test_distributed.py``.

    python distributed_worker.py ENGINE MODEL BACKEND OUT

ENGINE is ``single`` (one process, no process group: the reference), one of
``examples/train_distributed.py``'s engines (``ddp``, ``fsdp``, ``hsdp``,
``fsdp2-root``, ``tp``), ``fsdp2-blocks`` (FSDP2's ``fully_shard`` on every block
as well: the refused route), ``ddp-buckets`` (DDP with 1 MB buckets: refused while
Dynamo splits the graph per bucket, then trained as the example does) or ``refusals`` (every engine above with non-zero
queries on a model whose stack changed after ``prepare``: each must raise).
``pp-gpipe``, ``pp-1f1b``, ``pp-interleaved`` and ``pp-interleaved-cached`` train
stages cut from one rewritten program (``single-pp``: that program in one process,
micro-batch by micro-batch); BACKEND does not apply to them (stages run eagerly).
MODEL is one of the example's models; BACKEND ``attnres`` (Inductor) or
``eager`` (the rewritten graph run eagerly). Every process gets the
torchrun-style environment (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ...).
Rank 0 (or the single process) saves ``{"losses": [...], "state": {...}}``:
the global loss of every step and the trained parameters, queries included.
"""

from __future__ import annotations

import logging
import os
import sys

import torch
import torch.distributed as dist

import attnres_compile
from attnres_compile import AttnResBackend
from train_distributed import (
    ENGINES, Parallel, build_model, build_pipeline, full_state, global_batches, logits_of, next_token_loss, parallelize,
    pipeline_program, train, train_pipeline,
)

VOCAB, LAYERS, WIDTH, GLOBAL_BATCH, SEQ, STEPS, LR = 64, 1, 16, 4, 9, 3, 0.5


# name -> (example model, layers, width); "tiny-gpt-wide" has 3 MB of parameters: several DDP buckets.
SIZES = {"tiny-gpt": ("tiny-gpt", LAYERS, WIDTH), "tiny-gpt-wide": ("tiny-gpt", 1, 256),
         "hf-llama": ("hf-llama", 2, 32), "titan-llama3": ("titan-llama3", 2, 32)}


def prepared_model(name: str) -> torch.nn.Module:
    example, layers, width = SIZES[name]
    model = build_model(example, VOCAB, layers, width, seed=0)
    attnres_compile.prepare(model, (torch.randint(0, VOCAB, (2, SEQ)),))
    return model


def make_backend(name: str) -> AttnResBackend:
    return AttnResBackend() if name == "attnres" else AttnResBackend(inductor=False)


def run_single(model_name: str, backend_name: str, out: str) -> None:
    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    backend, model = make_backend(backend_name), prepared_model(model_name)
    losses = train(torch.compile(model, backend=backend), model, Parallel(model, 0, 1), batches(), LR, "cpu")
    assert backend.plans, "the backend rewrote no graph"
    torch.save({"losses": losses, "state": full_state(model)}, out)


def batches():
    return global_batches(VOCAB, GLOBAL_BATCH, SEQ, STEPS)


def parallelize_for_test(model: torch.nn.Module, engine: str) -> Parallel:
    """The example's engines, and ``fsdp2-blocks``: FSDP2 on every block of the tiny GPT, then on the root."""
    if engine == "fsdp2-blocks":
        from torch.distributed.fsdp import fully_shard

        for block in model.blocks:
            fully_shard(block)
        engine = "fsdp2-root"
    return parallelize(model, engine, "cpu")


def refuse_ddp_buckets(model: torch.nn.Module) -> None:
    """DDP's buckets cut the stack into graphs (DDPOptimizer): the compile must fail, naming the setting."""
    from torch.nn.parallel import DistributedDataParallel

    try:
        torch.compile(DistributedDataParallel(model, bucket_cap_mb=1), backend=make_backend("eager"))(
            batches()[0][:2, :-1])
    except Exception as error:
        assert "optimize_ddp = False" in str(error), error
        print("refused: ddp-buckets", flush=True)
    else:
        raise AssertionError("a stack cut by DDP's buckets ran")
    torch._dynamo.reset()


def run_engine(engine: str, model_name: str, backend_name: str, out: str) -> None:
    backend, model = make_backend(backend_name), prepared_model(model_name)
    if engine == "ddp-buckets":
        refuse_ddp_buckets(model)
        engine = "ddp"
    parallel = parallelize_for_test(model, engine)
    losses = train(torch.compile(parallel.module, backend=backend), model, parallel, batches(), LR, "cpu")
    state = full_state(model)
    if dist.get_rank() == 0:
        torch.save({"losses": losses, "state": state}, out)
    if engine == "fsdp2-blocks":
        assert not backend.plans, "a graph split off by FSDP2's hooks was rewritten"
    else:
        assert backend.plans, "the backend rewrote no graph"


def check_refusals(model_name: str) -> None:
    """Non-zero queries and a stack that is no longer the one ``prepare`` traced: every engine must raise."""
    # Not hsdp: torchtitan caches SimpleFSDP's wrapper class per model class, with the first
    # model's mesh in it, so one process cannot shard a second model of a class on another mesh.
    # Not pp: split_stages refuses a program without Block AttnRes reads, so no stage runs plain.
    engines = [e for e in ENGINES if e not in ("hsdp", "pp")]
    if model_name == "tiny-gpt":  # tied weights (SimpleFSDP refuses them), a fused qkv (no tp plan)
        engines = ["ddp", "fsdp2-root", "fsdp2-blocks"]
    for engine in engines:
        model = prepared_model(model_name)
        with torch.no_grad():
            for q in model.attnres.queries:
                q.fill_(0.1)
        drop_last_block(model)
        engine_module = parallelize_for_test(model, engine).module
        torch._dynamo.reset()
        try:
            torch.compile(engine_module, backend=make_backend("eager"))(batches()[0][:2, :-1])
        except RuntimeError as error:
            assert "non-zero" in str(error), f"{engine}: {error}"
            print(f"refused: {engine}", flush=True)
        else:
            raise AssertionError(f"{engine}: a model with non-zero queries ran without the rewrite")


def drop_last_block(model: torch.nn.Module) -> None:
    """Remove the last transformer block: the stack is then not the one ``prepare`` traced."""
    blocks = getattr(model, "blocks", None) or getattr(model, "layers", None) or model.model.layers
    del blocks[str(len(blocks) - 1) if isinstance(blocks, torch.nn.ModuleDict) else -1]


MICRO_BATCHES, PIPELINE_BLOCKS = 4, 4


def micro_batch() -> torch.Tensor:
    """The input ids of the first micro-batch: the shapes every micro-batch has."""
    return batches()[0][: GLOBAL_BATCH // MICRO_BATCHES, :-1]


def program_of(model_name: str) -> torch.nn.Module:
    """The model as one rewritten program for pipeline stages: 4 blocks, so 4 stages can each hold one."""
    example, _, width = SIZES[model_name]
    model = build_model(example, VOCAB, PIPELINE_BLOCKS, width, seed=0)
    return pipeline_program(model, micro_batch(), attnres_compile.AttnResConfig(num_blocks=PIPELINE_BLOCKS))


def run_single_pipeline(model_name: str, out: str) -> None:
    """The whole program in one process, micro-batch by micro-batch, each loss divided by their number."""
    program = program_of(model_name)
    optimizer = torch.optim.SGD(program.parameters(), lr=LR)
    size, losses = GLOBAL_BATCH // MICRO_BATCHES, []
    for batch in batches():
        optimizer.zero_grad()
        total = 0.0
        for m in range(MICRO_BATCHES):
            rows = batch[m * size:(m + 1) * size]
            loss = next_token_loss(logits_of(program(rows[:, :-1])), rows[:, 1:]) / MICRO_BATCHES
            loss.backward()
            total += loss.item()
        optimizer.step()
        losses.append(total)
    torch.save({"losses": losses, "state": {k: v.detach().clone() for k, v in program.state_dict().items()}}, out)


def run_pipeline(schedule: str, cached: bool, model_name: str, out: str) -> None:
    """Train through the pipeline; rank 0 saves the losses, every rank's parameters, and what each hop sent."""
    program = program_of(model_name)
    pipeline = build_pipeline(program, micro_batch(), schedule, cached, MICRO_BATCHES, "cpu")
    losses = train_pipeline(pipeline, batches(), LR, "cpu")
    mine = {id(p) for p in pipeline.parameters}
    state = {k: v.detach().clone() for k, v in program.named_parameters(remove_duplicate=False) if id(v) in mine}
    world = dist.get_world_size()
    hops = {
        stage: {"to_rank": pipeline.split.rank_of(stage + 1, world), "bytes": module.sent_bytes,
                "summaries": module.summaries_sent(),
                "declared": sum(t.numel() * t.element_size() for t in pipeline.transfers[stage][1])}
        for stage, module in pipeline.modules.items() if stage + 1 < pipeline.split.num_stages
    }
    gathered = [None] * world
    dist.gather_object((state, hops), gathered if dist.get_rank() == 0 else None, dst=0)
    if dist.get_rank() == 0:
        merged_state = {k: v for rank_state, _ in gathered for k, v in rank_state.items()}
        merged_hops = {stage: hop for _, rank_hops in gathered for stage, hop in rank_hops.items()}
        torch.save({"losses": losses, "state": merged_state, "hops": merged_hops}, out)


def main(engine: str, model_name: str, backend_name: str, out: str) -> None:
    if engine == "single":
        run_single(model_name, backend_name, out)
        return
    if engine == "single-pp":
        run_single_pipeline(model_name, out)
        return
    dist.init_process_group("gloo")
    if engine.startswith("pp-"):  # pp-<schedule>[-cached]
        _, schedule, *cached = engine.split("-")
        run_pipeline(schedule, bool(cached), model_name, out)
    elif engine == "refusals":
        check_refusals(model_name)
    else:
        run_engine(engine, model_name, backend_name, out)
    dist.destroy_process_group()


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)  # the backend's refusals reach the test through stdout
    main(*sys.argv[1:5])
    sys.stdout.flush()
    os._exit(0)  # skip interpreter teardown of gloo threads
