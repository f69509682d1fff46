"""One process of a distributed training check, run by ``tests/attnres_compile/test_distributed.py``.

    python distributed_worker.py MODE BACKEND OUT

MODE is ``single`` (one process, the whole global batch), ``ddp``, ``fsdp2``
(``fully_shard`` on the root module only) or ``fsdp2_blocks`` (``fully_shard``
on every transformer block as well: the graph breaks at FSDP2's hooks must leave
the model unrewritten), each as rank ``RANK`` of ``WORLD_SIZE`` over gloo with its
share of the batch and the torchrun-style ``MASTER_ADDR``/``MASTER_PORT`` environment. BACKEND is
``attnres`` (Inductor) or ``eager`` (the rewritten graph run eagerly). Rank 0
(or the single process) saves the trained parameters, queries included, to OUT.
"""

from __future__ import annotations

import logging
import os
import sys

import torch
import torch.distributed as dist

import attnres_compile
from attnres_compile import AttnResBackend
from zoo import VOCAB, tiny_gpt

GLOBAL_BATCH, SEQ, STEPS, LR = 4, 9, 3, 0.5


def global_batches():
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ + 1), generator=gen) for _ in range(STEPS)]


def prepared_model():
    model, args, _ = tiny_gpt(n_layer=1, d_model=16)
    attnres_compile.prepare(model, args)
    return model


def train(model, compiled, rank: int, world: int) -> None:
    from tiny_gpt import loss_fn

    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    share = GLOBAL_BATCH // world
    for batch in global_batches():
        rows = batch[rank * share:(rank + 1) * share]
        loss = loss_fn(compiled(rows[:, :-1]), rows[:, 1:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def main(mode: str, backend_name: str, out: str) -> None:
    backend = AttnResBackend() if backend_name == "attnres" else AttnResBackend(inductor=False)
    model = prepared_model()
    if mode == "single":
        train(model, torch.compile(model, backend=backend), 0, 1)
        assert backend.plans, "the backend rewrote no graph"
        torch.save(model.state_dict(), out)
        return
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        wrapped = DistributedDataParallel(model)
        train(model, torch.compile(wrapped, backend=backend), rank, world)
        state = model.state_dict()
    else:
        from torch.distributed.fsdp import fully_shard

        if mode == "fsdp2_blocks":
            for block in model.blocks:
                fully_shard(block)
        fully_shard(model)
        train(model, torch.compile(model, backend=backend), rank, world)
        state = {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in model.state_dict().items()}
    if rank == 0:
        torch.save({k: v.detach().clone() for k, v in state.items()}, out)
    if mode == "fsdp2_blocks":
        assert not backend.plans, "a graph split off by FSDP2's hooks was rewritten"
    else:
        assert backend.plans, "the backend rewrote no graph"
    dist.destroy_process_group()


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)  # the backend's refusals reach the test through stdout
    main(*sys.argv[1:4])
    sys.stdout.flush()
    os._exit(0)  # skip interpreter teardown of gloo threads
