"""Quickstart: turn a small GPT into Block AttnRes with ``backend="attnres"`` and train it.

    python examples/quickstart.py            # ~1-2 minutes on a 2-core CPU
    python examples/quickstart.py --steps 30 --layers 2

It saves the trained model to ``runs/quickstart.pt``; ``trained_model`` loads
it back, so the command line can look at it:

    attnres-compile plot examples/quickstart.py:trained_model alpha.png

Steps: build a pre-norm GPT (examples/tiny_gpt.py), ``prepare`` it (adds the
zero-initialized queries as parameters), ``torch.compile(model, backend="attnres")``
(finds the residual stream, rewrites it into Block AttnRes, compiles with
Inductor), then train on bytes of the Python standard library's own source.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import logging
import os
import time

import torch

import attnres_compile
from offline_text import batch_iterator, load_corpus, split_train_val
from tiny_gpt import GPTConfig, TinyGPT, loss_fn


CHECKPOINT = os.path.join("runs", "quickstart.pt")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps")
    parser.add_argument("--layers", type=int, default=4, help="transformer blocks (2 residual layers each)")
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--num-blocks", type=int, default=4, help="Block AttnRes blocks")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--corpus-bytes", type=int, default=1_000_000)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--save", default=CHECKPOINT, help="where to save the trained model ('' to skip)")
    return parser.parse_args(argv)


@torch.no_grad()
def evaluate(compiled, data: torch.Tensor, batch: int, seq: int, batches: int = 4) -> float:
    gen = torch.Generator().manual_seed(1234)
    losses = [loss_fn(compiled(x), y).item() for x, y in itertools.islice(batch_iterator(data, batch, seq, gen), batches)]
    return sum(losses) / len(losses)


def main(argv=None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    log = logging.getLogger("attnres_compile.examples")
    log.setLevel(logging.INFO)  # this script's progress; the library itself only warns
    torch.manual_seed(args.seed)

    train, val = split_train_val(load_corpus(max_bytes=args.corpus_bytes))
    batches = batch_iterator(train, args.batch, args.seq, torch.Generator().manual_seed(args.seed))
    cfg = GPTConfig(n_layer=args.layers, n_head=args.heads, d_model=args.d_model, max_len=args.seq)
    model = TinyGPT(cfg)

    example, _ = next(batches)
    model = attnres_compile.prepare(model, (example,), attnres_compile.AttnResConfig(num_blocks=args.num_blocks))
    print("Rewritten:", model.attnres.plan.summary(), sep="\n")
    compiled = torch.compile(model, backend="attnres")
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)  # after prepare: includes the queries

    losses = []
    start = time.perf_counter()
    print("compiling (the first step traces, rewrites and compiles the model; later steps reuse it) ...", flush=True)
    for step, (x, y) in enumerate(itertools.islice(batches, args.steps), start=1):
        loss = loss_fn(compiled(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if step == 1 or step % args.log_every == 0 or step == args.steps:  # step 1 includes compiling
            queries = model.attnres.queries[0]
            log.info(
                "step %4d  loss %.4f  |queries| %.4f  (%.1f s)",
                step, losses[-1], queries.detach().norm().item(), time.perf_counter() - start,
            )
    val_loss = evaluate(compiled, val, args.batch, args.seq)
    print(f"train loss {losses[0]:.4f} -> {losses[-1]:.4f} over {len(losses)} steps; validation loss {val_loss:.4f}")
    if args.save:
        save_checkpoint(model, args.save)
        print(f"saved the trained model to {args.save}")
    return {"losses": losses, "val_loss": val_loss, "model": model}


def save_checkpoint(model: TinyGPT, path: str) -> None:
    """The model's config, its Block AttnRes config and its ``state_dict`` (queries included)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    torch.save(
        {"gpt": dataclasses.asdict(model.cfg), "attnres": model.attnres.config.to_dict(), "state_dict": model.state_dict()},
        path,
    )


def trained_model(path: str = CHECKPOINT, batch: int = 4):
    """``(model, (ids,))``: the saved model, prepared and loaded, and a validation batch.

    A factory for the command line (``attnres-compile plot examples/quickstart.py:trained_model``).
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: run examples/quickstart.py first")
    saved = torch.load(path)
    cfg = GPTConfig(**saved["gpt"])
    model = TinyGPT(cfg)
    _, val = split_train_val(load_corpus(max_bytes=200_000))
    ids, _ = next(batch_iterator(val, batch, cfg.max_len, torch.Generator().manual_seed(0)))
    attnres_compile.prepare(model, (ids,), attnres_compile.AttnResConfig.from_dict(saved["attnres"]))
    model.load_state_dict(saved["state_dict"])
    return model.eval(), (ids,)


if __name__ == "__main__":
    main()
